"""Does a reduced step's damage follow its noise level or its place among the steps?

    tofu-diffusion axis --model tiny-mmdit --settings 1:28 3:28 3:8 --starts 0.8 0.7 --num-images 48

For each scheduler setting (shift:steps) it draws the unreduced images, then the same seeds with tome 0.75
from each start on both schedule axes (``schedule_axis="noise"``: 1 - t/T; ``"steps"``: the share of the
call's steps), and reports the share of steps reduced, class accuracy, FID and PSNR against the unreduced
images. If damage follows noise, a noise-keyed schedule costs the same at every shift while a steps-keyed
one costs more where the scheduler is shifted; if it follows the steps, the reverse. Quality only (the
share of steps reduced is what speed follows); writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch

import tofu_diffusion as tofu
from tofu_diffusion.eval import metrics, workloads
from tofu_diffusion.eval.sweep import parse_variant
from tofu_diffusion.eval.timing import interleaved_times, speedups_of, with_baseline_again
from tofu_diffusion.eval.variants import use_variant


def time_calls(work, variants, args) -> dict:
    """Whole pipeline calls, every variant interleaved with the baseline (and the baseline against itself)."""
    seeds = [args.seed + i for i in range(args.timing_batch)]
    conditions = [work.condition(i) for i in range(args.timing_batch)]
    calls = {name: (lambda: work.draw(seeds, conditions)) for name, _ in variants}
    setups = {name: functools.partial(use_variant, work.pipe, config) for name, config in variants}
    times = interleaved_times(*with_baseline_again(calls, setups), repeats=args.time, warmup=1)
    use_variant(work.pipe, None)
    return speedups_of(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-mmdit")
    p.add_argument("--settings", nargs="+", default=["1:28", "3:28", "3:8"], help="shift:steps pairs")
    p.add_argument("--starts", nargs="*", type=float, default=[0.8, 0.7])
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--variants", nargs="*", default=[], metavar="SPEC",
                   help="more rows, as eval.sweep's --variants (e.g. method=tome,schedule=0:0;0.6:0.5;0.8:0.75)")
    p.add_argument("--presets", nargs="*", default=[], help="rows for named presets ('default': no options)")
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                   help="also time whole pipeline calls of --timing-batch images, every variant interleaved with the "
                        "baseline for ROUNDS rounds (speedup with the spread of the rounds)")
    p.add_argument("--timing-batch", type=int, default=8)
    p.add_argument("--time-only", action="store_true", help="skip the quality rows")
    p.add_argument("--out", default="results/axis")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    rows = []
    for spec in args.settings:
        shift, steps = float(spec.split(":")[0]), int(spec.split(":")[1])
        work = workloads.embedded(args.model, device, steps, None, shift)
        conditions = [work.condition(i) for i in range(args.num_images)]
        fid = None if args.time_only else metrics.FID(work.fid_metric(), work.real_images(2048))

        def draw():
            out = [work.draw([args.seed + i for i in range(s, min(s + args.batch_size, args.num_images))],
                             conditions[s:s + args.batch_size]) for s in range(0, args.num_images, args.batch_size)]
            return metrics.from_uint8(metrics.to_uint8(torch.cat(out)))

        use_variant(work.pipe, None)
        base = None if args.time_only else draw()
        variants = [("baseline", None)] + [
            (f"{axis} from {start:g}", tofu.TokenFusionConfig(method="tome", schedule=((0, 0), (start, args.ratio)),
                                                              schedule_axis=axis))
            for start in args.starts for axis in ("noise", "steps")]
        variants += [(f"preset {name}", tofu.TokenFusionConfig(**({} if name == "default" else {"preset": name})))
                     for name in args.presets]
        variants += [(spec, tofu.TokenFusionConfig(**parse_variant(spec))) for spec in args.variants]
        speed = time_calls(work, variants, args) if args.time else {}
        for name, config in variants:
            if args.time_only:
                rows.append({"shift": shift, "steps": steps, "schedule": name, **speed[name]})
                print(f"shift {shift:g} steps {steps:2d} {name:36s} {speed[name]['speedup']:.2f}x "
                      f"({speed[name]['speedup_low']:.2f}-{speed[name]['speedup_high']:.2f})", flush=True)
                continue
            use_variant(work.pipe, config)
            images = base if config is None else draw()
            row = {"shift": shift, "steps": steps, "schedule": name,
                   "share_reduced": 0.0 if config is None else
                   tofu.explain(work.pipe, config, num_inference_steps=steps).reduced_steps / steps,
                   "class_accuracy": work.score(images, conditions)["class_accuracy"],
                   "fid": fid(images), "psnr": float(metrics.psnr(images, base).mean()), **speed.get(name, {})}
            rows.append(row)
            timing = f" {row['speedup']:.2f}x ({row['speedup_low']:.2f}-{row['speedup_high']:.2f})" if speed else ""
            print(f"shift {shift:g} steps {steps:2d} {name:36s} reduced {row['share_reduced']:.0%} "
                  f"acc {row['class_accuracy']:.1%} FID {row['fid']:.2f} PSNR {row['psnr']:.1f}{timing}", flush=True)
        use_variant(work.pipe, None)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"model": args.model, "ratio": args.ratio, "num_images": args.num_images, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
