"""Token-reduction-consistency fine-tuning (MCTF's objective) shown on the bundled tiny-vit.

    tofu-diffusion finetune --method mctf --r 8 --max-steps 300 --threads 1 --out results/finetune

Measures top-1 on held-out shapes, unreduced and reduced at ``--r``, before and after a short
fine-tune with ``tofu_diffusion.training.consistency_loss`` on fresh shapes (seeds the tiny-vit never
trained on), and reports how much of the accuracy lost to reduction the fine-tune recovered.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import tofu_diffusion as tofu
from tofu_diffusion.training import consistency_loss

# tiny-vit trained on data seeds 0..3,999 (training_log.json); the fine-tune draws from its own range.
FINETUNE_SEEDS = 5_000_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-vit", help="tiny-vit (bundled) or a folder saved from one")
    p.add_argument("--method", default="mctf", choices=tofu.CLASSIFIER_METHODS)
    p.add_argument("--r", type=int, default=8, help="the student's tokens removed per layer")
    p.add_argument("--teacher-max-r", type=int, default=4, help="the teacher's r is drawn from [0, this)")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--num-images", type=int, default=2000, help="held-out evaluation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="also save the fine-tuned model to this folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="results/finetune")
    return p.parse_args(argv)


@torch.no_grad()
def accuracies(model, images, labels, student) -> dict:
    """Top-1 of ``model`` as it is and reduced by ``student``."""
    from tofu_diffusion.eval.classify import accuracy

    model.eval()
    device, dtype = model.device, model.dtype
    unreduced = accuracy(model, images, labels, 500, device, dtype)
    with tofu.fused(model, student):
        reduced = accuracy(model, images, labels, 500, device, dtype)
    return {"unreduced": unreduced, "reduced": reduced}


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:  # a caller in the same process (a test, a notebook) keeps its own thread count
        torch.set_num_threads(threads)


def _run(args) -> dict:
    from transformers import AutoModelForImageClassification

    from tofu_diffusion.eval.classify import embedded_or
    from tofu_diffusion.pipelines.shapes import HELD_OUT_SEED, generate

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoModelForImageClassification.from_pretrained(embedded_or(args.model))
    images, labels = generate(args.num_images, seed=HELD_OUT_SEED)
    student = tofu.TokenFusionConfig(method=args.method, r=args.r)
    before = accuracies(model, images, labels, student)
    print(f"off the shelf: {100 * before['unreduced']:.2f}% unreduced, {100 * before['reduced']:.2f}% at "
          f"{args.method} r={args.r}", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(args.seed)
    start, step, log = time.time(), 0, []
    model.train()
    while (time.time() - start) / 60 < args.minutes and step < args.max_steps:
        batch, targets = generate(args.batch, seed=FINETUNE_SEEDS + args.seed * 100_000 + step)
        with torch.enable_grad():  # also when called under no_grad
            loss, parts = consistency_loss(model, batch, targets, student, teacher_max_r=args.teacher_max_r,
                                           generator=g)
            optimizer.zero_grad()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            log.append({"step": step, "loss": loss.item(), **parts})
            print(f"step {step} loss {loss.item():.4f} ({(time.time() - start) / 60:.1f} min)", flush=True)
        step += 1

    after = accuracies(model, images, labels, student)
    lost = before["unreduced"] - before["reduced"]
    recovered = (after["reduced"] - before["reduced"]) / lost if lost > 0 else float("nan")
    result = {"model": args.model, "method": args.method, "r": args.r, "steps": step,
              "minutes": round((time.time() - start) / 60, 2), "batch": args.batch, "lr": args.lr,
              "num_images": args.num_images, "before": before, "after": after, "recovered": recovered, "log": log}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    if args.save:
        model.save_pretrained(args.save)
    print(f"\n{args.model}, {args.method} r={args.r}, {step} steps ({result['minutes']} min), "
          f"{args.num_images} held-out images")
    print(f"{'':<16}{'unreduced':>10}{'reduced':>10}")
    for name, acc in (("off the shelf", before), ("fine-tuned", after)):
        print(f"{name:<16}{100 * acc['unreduced']:>9.2f}%{100 * acc['reduced']:>9.2f}%")
    print(f"recovered {100 * recovered:.0f}% of the {100 * lost:.2f} points lost to reduction; "
          f"wrote {args.out}/results.json")
    return result


if __name__ == "__main__":
    main()
