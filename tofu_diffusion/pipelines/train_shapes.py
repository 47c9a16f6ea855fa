"""Train the bundled shapes models from a seed (``W`` = tofu_diffusion/pipelines/weights).

    python -m tofu_diffusion.pipelines.train_shapes classifier --steps 3000 --out W/shapes-classifier
    python -m tofu_diffusion.pipelines.train_shapes vit --steps 4000 --out W/tiny-vit
    python -m tofu_diffusion.pipelines.train_shapes unet --minutes 40 --out W/tiny-unet
    python -m tofu_diffusion.pipelines.train_shapes dit --minutes 40 --out W/tiny-dit
    python -m tofu_diffusion.pipelines.train_shapes mmdit --minutes 40 --out W/tiny-mmdit
    python -m tofu_diffusion.pipelines.train_shapes wan --minutes 40 --out W/tiny-wan
    python -m tofu_diffusion.pipelines.train_shapes dit --image-size 64 --init W/tiny-dit --out W/tiny-dit-64

Data is generated on the fly (a fresh seed per batch), so nothing is downloaded. The generators are
trained with rectified flow: x_t = (1 - t) x_0 + t noise, the model predicts noise - x_0, t drawn
logit-normal; warm-up then a constant high learning rate; an EMA of the weights is what is saved;
10% of labels are replaced by the "no class" label for classifier-free guidance. The final losses,
and for the generators the classifier's accuracy on their samples, are written to ``training_log.json``
next to the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import WEIGHTS_DIR
from .classifier import ShapesClassifier, load_classifier, shapes_vit, shapes_vit_processor
from .shapes import CLASSES, FRAMES, HELD_OUT_SEED, IMAGE_SIZE, generate, generate_clips
from .shapes_pipeline import (
    DEFAULT_GUIDANCE,
    ClassTokens,
    ShapesDiTPipeline,
    ShapesMMDiTPipeline,
    ShapesUNetPipeline,
    ShapesWanPipeline,
    flow_scheduler,
    shapes_dit,
    shapes_mmdit,
    shapes_unet,
    shapes_wan,
    to_latent,
)

KD_TEMPERATURE = 2.0
FEATURE_LAYER = 3  # tiny-vit hidden state whose patch tokens match the CNN's feature map
WAN_CLASS_CHANNELS = 8  # condition channels that carry the class to every video token (tiny-wan)


@torch.enable_grad()
def train_classifier(args) -> None:
    """The CNN (``classifier``) or tiny-vit (``vit``): AdamW, warm-up then cosine decay, fresh data each step."""
    torch.manual_seed(args.seed)
    vit = getattr(args, "what", "classifier") == "vit"
    model = shapes_vit() if vit else ShapesClassifier()
    if vit and getattr(args, "init", None):  # continue a run from its saved weights (fresh optimizer)
        model = type(model).from_pretrained(args.init)
    model.train()
    peak_lr = args.lr
    warmup = max(1, args.steps // 20)
    # tiny-vit also learns from the shipped CNN (DeiT-style distillation): its soft predictions, and its
    # 8x8 feature map as a target for the patch tokens after layer 3 (through a projection used only in
    # training). On labels alone a ViT sat at chance for over 1,300 steps here (soft labels alone: 1,600):
    # shapes in random colours give attention nothing to start from; the dense feature target does.
    teacher = load_classifier(args.teacher) if vit and getattr(args, "teacher", None) else None
    params = list(model.parameters())
    if teacher is not None:
        projection = torch.nn.Linear(model.config.hidden_size, ShapesClassifier.feature_dim)
        params += list(projection.parameters())
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.05 if vit else 1e-4)
    log = []
    start = time.time()
    for step in range(args.steps):
        images, labels = generate(args.batch, seed=args.seed * 1_000_000 + getattr(args, "data_offset", 0) + step)
        for group in opt.param_groups:  # cosine decay: the last steps settle the features FID relies on
            group["lr"] = peak_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        if teacher is None:
            logits = model(images).logits if vit else model(images)
            loss = F.cross_entropy(logits, labels)
        else:
            output = model(images, output_hidden_states=True)
            with torch.no_grad():
                feature_map = teacher.feature_map(images)  # (B, C, 8, 8)
                soft = (teacher.head(feature_map.mean(dim=(2, 3))) / KD_TEMPERATURE).softmax(dim=-1)
                target = F.layer_norm(feature_map.flatten(2).transpose(1, 2), (feature_map.shape[1],))
            distill = F.kl_div((output.logits / KD_TEMPERATURE).log_softmax(dim=-1), soft, reduction="batchmean")
            tokens = output.hidden_states[FEATURE_LAYER][:, 1:]  # patch tokens, CLS dropped
            loss = (F.cross_entropy(output.logits, labels) + KD_TEMPERATURE**2 * distill
                    + F.mse_loss(projection(tokens), target))
        opt.zero_grad()
        loss.backward()
        if vit:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            log.append({"step": step, "loss": loss.item()})
            print(f"{'vit' if vit else 'classifier'} step {step} loss {loss.item():.4f} "
                  f"({(time.time() - start) / 60:.1f} min)", flush=True)
    model.eval()
    with torch.no_grad():
        images, labels = generate(2000, seed=HELD_OUT_SEED)
        logits = model(images).logits if vit else model(images)
        accuracy = (logits.argmax(1) == labels).float().mean().item()
    os.makedirs(args.out, exist_ok=True)
    if vit:
        model.save_pretrained(args.out)
        shapes_vit_processor().save_pretrained(args.out)  # so --data ImageFolder evaluation works too
    else:
        save_file(model.state_dict(), os.path.join(args.out, "model.safetensors"))
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump({"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": peak_lr,
                   "teacher": getattr(args, "teacher", None) if vit else None,
                   "minutes": round((time.time() - start) / 60, 2), "threads": torch.get_num_threads(),
                   "final_loss": sum(e["loss"] for e in log[-3:]) / len(log[-3:]),
                   "held_out_accuracy": accuracy, "log": log}, f, indent=1)
    print(f"held-out accuracy {accuracy:.4f}; saved to {args.out}")


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def class_accuracy(pipe, classifier: ShapesClassifier, per_class: int, seed: int, steps: int,
                   guidance_scale: float | None = None) -> float:
    """How often ``classifier`` recognises the requested class in ``pipe``'s samples.

    ``guidance_scale`` None samples at the pipeline's own default guidance.
    """
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    output = pipe(labels, num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(seed))
    images = output.frames if hasattr(output, "frames") else output.images
    if images.dim() == 5:  # a video: every frame is scored against its clip's class
        labels = labels.repeat_interleave(images.shape[1])
        images = images.flatten(0, 1)
    with torch.no_grad():
        return (classifier(images).argmax(1) == labels).float().mean().item()


def build_pipeline(kind: str, image_size: int = IMAGE_SIZE):
    """A freshly initialised generator pipeline: ``"unet"`` (tiny-unet), ``"dit"`` (tiny-dit), ``"mmdit"`` or
    ``"wan"`` (tiny-wan, moving-shapes clips).

    ``image_size`` other than 32 is offered for the UNet and the DiT (tiny-unet-64, tiny-dit-64: 64 px,
    1,024 tokens where they attend).
    """
    if image_size != IMAGE_SIZE and kind not in ("unet", "dit"):
        raise ValueError(f"--image-size {image_size} is offered for the unet and the dit only")
    if kind == "unet":
        pipe = ShapesUNetPipeline(shapes_unet(image_size=image_size), ClassTokens(), flow_scheduler())
    elif kind == "wan":
        # The class reaches a Wan block through cross-attention only, too weakly for this small model (its
        # samples barely changed with the label); condition channels give it the class on every token as well.
        pipe = ShapesWanPipeline(shapes_wan(class_channels=WAN_CLASS_CHANNELS),
                                 ClassTokens(map_channels=WAN_CLASS_CHANNELS), flow_scheduler())
    elif kind == "mmdit":
        pipe = ShapesMMDiTPipeline(shapes_mmdit(), ClassTokens(pooled_dim=64), flow_scheduler())
    else:
        pipe = ShapesDiTPipeline(shapes_dit(image_size), flow_scheduler())
    for module in _components(pipe):  # as from_pretrained returns them: DiT drops labels in train mode
        module.eval()
    return pipe


def _warm_start(fresh, saved):
    """``saved`` itself when it has ``fresh``'s image size, or another packing of the latent (channels: the first
    tiny-wan's space-to-depth clips, which a resumed run continues as they are); otherwise ``fresh`` with
    ``saved``'s weights.

    A UNet has no position table, and a DiT's sin-cos table is computed from its size, not stored, so a
    32 px model's weights load into a 64 px one unchanged (the DiT sees positions 0..31 instead of 0..15 per
    side; the shapes may sit anywhere, so little hangs on absolute position) and the 64 px model starts from
    everything the 32 px one knows.
    """
    if saved.latent_shape() == fresh.latent_shape() and _state_shapes(saved) == _state_shapes(fresh):
        return saved
    if saved.latent_shape()[0] != fresh.latent_shape()[0]:
        return saved
    for name, module in fresh.components.items():
        if isinstance(module, torch.nn.Module):
            _load_widened(module, getattr(saved, name).state_dict())
    fresh.register_to_config(default_guidance_scale=saved.config.get("default_guidance_scale", DEFAULT_GUIDANCE))
    return fresh


def _state_shapes(pipe) -> dict:
    return {(name, key): tuple(value.shape) for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module) for key, value in module.state_dict().items()}


@torch.no_grad()
def _load_widened(module: torch.nn.Module, saved: dict) -> None:
    """Load ``saved`` into ``module``, which may have more input channels (or new parameters) than it.

    A widened weight gets the saved one on its leading input channels and zeros on the new ones, so the
    model starts out computing exactly what the saved one did; new parameters keep their initialisation.
    """
    for key, value in module.state_dict().items():
        if key not in saved:
            continue
        old = saved[key]
        if old.shape == value.shape:
            value.copy_(old)
        elif old.dim() >= 2 and old.shape[0] == value.shape[0] and old.shape[2:] == value.shape[2:] \
                and old.shape[1] < value.shape[1]:
            value.zero_()
            value[:, :old.shape[1]].copy_(old)
        else:
            raise ValueError(f"cannot warm-start {key}: saved shape {tuple(old.shape)}, new {tuple(value.shape)}")


def _components(pipe) -> list[torch.nn.Module]:
    return [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]


@torch.enable_grad()
def train_generator(args) -> None:
    torch.manual_seed(args.seed)
    size = getattr(args, "image_size", IMAGE_SIZE)
    pipe = build_pipeline(args.what, size)
    if getattr(args, "init", None):  # continue from a saved pipeline (its EMA weights) with a fresh optimizer
        pipe = _warm_start(pipe, type(pipe).from_pretrained(args.init))
    ema_pipe = copy.deepcopy(pipe)
    ema_pipe.set_progress_bar_config(disable=True)
    # The models stay in eval mode: they have no dropout, and DiT's train-mode label dropout would add to
    # the explicit "no class" labels below.
    params = [p for m in _components(pipe) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    start, step, log, best = time.time(), 0, [], -1.0
    print(f"{args.what} parameters: {sum(p.numel() for p in params) / 1e6:.2f}M", flush=True)
    while (time.time() - start) / 60 < args.minutes and step < args.max_steps:
        data_seed = args.seed * 1_000_000 + getattr(args, "data_offset", 0) + step
        if args.what == "wan":
            # A --stills-share of the steps trains on single frames instead, FRAMES times as many for the same
            # tokens: eight times the layouts per step for what a frame looks like; rotary attention within a
            # frame is the same at any frame count, so what is learned there carries over to the clips.
            share = getattr(args, "stills_share", 0.0)
            still = int((step + 1) * share) > int(step * share)
            clips, labels, _ = generate_clips(args.batch * (FRAMES if still else 1), seed=data_seed,
                                              frames=1 if still else FRAMES)
            x0 = pipe.encode(clips)
        else:
            images, labels = generate(args.batch, seed=data_seed, size=size)
            x0 = to_latent(images) if args.what == "unet" else images
        # 10% "no class" labels teach the unconditional prediction classifier-free guidance needs.
        drop = torch.rand(labels.shape[0], generator=g) < 0.1
        labels = torch.where(drop, torch.full_like(labels, pipe.null_class), labels)
        noise = torch.randn(x0.shape, generator=g)
        t = _training_timesteps(labels.shape[0], getattr(args, "timestep_shift", 1.0), g)
        t = t.view(-1, *[1] * (x0.dim() - 1))
        xt = (1 - t) * x0 + t * noise
        loss = F.mse_loss(pipe.velocity(xt, t.flatten() * 1000, labels), noise - x0)
        for group in opt.param_groups:
            group["lr"] = _generator_lr(args, step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        for e, m in zip(_components(ema_pipe), _components(pipe)):
            _ema_update(e, m, decay)
        if step % 100 == 0:
            log.append({"step": step, "minutes": round((time.time() - start) / 60, 2), "loss": loss.item()})
            print(f"{args.what} step {step} loss {loss.item():.4f} ({(time.time() - start) / 60:.1f} min)", flush=True)
        step += 1
        if args.snapshot_every and step % args.snapshot_every == 0:
            best = _save_generator(args, ema_pipe, step, start, log, best)
    _save_generator(args, ema_pipe, step, start, log, best)
    print(f"saved to {args.out}")


def _training_timesteps(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal noise levels, shifted towards pure noise by `shift` as SD3 does for larger latents.

    The shift is the sampler's own map t -> s t / (1 + (s - 1) t); at s = 1 this is plain logit-normal, which
    puts only about 1% of the samples above t = 0.9, too few for a model to learn a clip's layout from noise.
    """
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * t / (1 + (shift - 1) * t)


def _generator_lr(args, step: int) -> float:
    """Warm-up, then constant; with ``--cosine``, a cosine decay to 10% by ``--max-steps``."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    if getattr(args, "cosine", False):
        progress = min(1.0, step / args.max_steps)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def save_half(pipe, folder: str) -> None:
    """Save a pipeline with float16 weights (half the repository size; loading upcasts to float32)."""
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(folder, safe_serialization=True)


def _save_generator(args, pipe, step, start, log, best: float = -1.0) -> float:
    """Save the EMA pipeline and its training log (with the classifier's accuracy on its samples).

    With ``--keep-best`` a snapshot replaces ``--out`` only when the classifier's accuracy on its samples
    improved (the last one goes to ``<out>-last``), so a long run never overwrites a better model.
    Returns the best accuracy so far.
    """
    result = {"what": args.what, "seed": args.seed, "steps": step, "batch": args.batch, "lr": args.lr,
              "minutes": round((time.time() - start) / 60, 2), "threads": torch.get_num_threads(),
              "final_loss": sum(e["loss"] for e in log[-5:]) / max(1, min(5, len(log))), "log": log,
              "timestep_shift": getattr(args, "timestep_shift", 1.0),
              "stills_share": getattr(args, "stills_share", 0.0)}
    if args.classifier:
        guidance = getattr(args, "score_guidance", None)
        per_class = getattr(args, "score_per_class", 32)
        result["class_accuracy"] = class_accuracy(pipe, load_classifier(args.classifier), per_class, seed=1, steps=20,
                                                  guidance_scale=guidance)
        result["class_accuracy_samples"] = per_class * len(CLASSES)
        if guidance is not None:
            result["class_accuracy_guidance"] = guidance
        print(f"step {step}: classifier accuracy on samples {result['class_accuracy']:.3f} "
              f"(chance {1 / len(CLASSES):.3f})", flush=True)
    accuracy = result.get("class_accuracy", 0.0)
    folder = args.out
    if getattr(args, "keep_best", False):
        best = max(best, _saved_accuracy(args.out))  # a resumed run never overwrites a better earlier model
    if getattr(args, "keep_best", False) and args.classifier and accuracy <= best:
        folder = args.out.rstrip("/") + "-last"
    save_half(pipe, folder)
    with open(os.path.join(folder, "training_log.json"), "w") as f:
        json.dump(result, f, indent=1)
    return max(best, accuracy) if folder == args.out else best


def _saved_accuracy(folder: str) -> float:
    """The class accuracy recorded with the model saved in ``folder`` (-1 when there is none)."""
    try:
        with open(os.path.join(folder, "training_log.json")) as f:
            return float(json.load(f).get("class_accuracy", -1.0))
    except (OSError, ValueError):
        return -1.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for kind, steps, lr, out in (("classifier", 3000, 2e-3, "shapes-classifier"), ("vit", 4000, 1e-3, "tiny-vit")):
        c = sub.add_parser(kind)
        c.add_argument("--steps", type=int, default=steps)
        c.add_argument("--batch", type=int, default=64)
        c.add_argument("--lr", type=float, default=lr)
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--data-offset", type=int, default=0, help="first data seed step (continuing a run)")
        c.add_argument("--out", default=os.path.join(WEIGHTS_DIR, out))
        if kind == "vit":
            c.add_argument("--init", help="start from this saved tiny-vit folder instead of random weights")
            c.add_argument("--teacher", default=os.path.join(WEIGHTS_DIR, "shapes-classifier"),
                           help="CNN whose soft predictions the ViT also learns from ('' for labels only)")
    for kind in ("unet", "dit", "mmdit", "wan"):
        u = sub.add_parser(kind)
        u.add_argument("--minutes", type=float, default=40)
        u.add_argument("--max-steps", type=int, default=10**9)
        u.add_argument("--batch", type=int, default=64)
        u.add_argument("--lr", type=float, default=1e-3)
        u.add_argument("--warmup", type=int, default=200)
        u.add_argument("--ema", type=float, default=0.999)
        u.add_argument("--seed", type=int, default=0)
        u.add_argument("--snapshot-every", type=int, default=0, help="save (and score) the EMA every N steps")
        u.add_argument("--keep-best", action="store_true", help="a snapshot replaces --out only if it scores better")
        u.add_argument("--timestep-shift", type=float, default=1.0,
                       help="shift the logit-normal training noise levels towards pure noise (SD3 uses 3)")
        u.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to 10%% by --max-steps")
        u.add_argument("--init", help="start from this saved pipeline folder instead of random weights")
        u.add_argument("--data-offset", type=int, default=0, help="first data seed step (continuing a run)")
        u.add_argument("--classifier", default=os.path.join(WEIGHTS_DIR, "shapes-classifier"))
        u.add_argument("--score-guidance", type=float,
                       help="guidance scale for scoring snapshots (default: the pipeline's own)")
        u.add_argument("--score-per-class", type=int, default=32,
                       help="samples per class when scoring a snapshot (fewer for the costly 64 px model)")
        u.add_argument("--out", default=os.path.join(WEIGHTS_DIR, f"tiny-{kind}"))
        if kind == "wan":
            u.add_argument("--stills-share", type=float, default=0.0,
                           help="share of the steps that train on single frames (FRAMES x the batch) instead of clips")
        if kind in ("unet", "dit"):
            u.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                           help=f"64 for the 1,024-token tiny-{kind}-64 (--init from a 32 px model warm-starts it)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    (train_classifier if args.what in ("classifier", "vit") else train_generator)(args)


if __name__ == "__main__":
    main()
