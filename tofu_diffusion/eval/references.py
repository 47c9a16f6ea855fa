"""``tofu-diffusion references``: keep an edit's reference image whole, or reduce it too (``reduce_references``)?

An edit pipeline (Flux.1 Kontext's layout here) appends the reference image's tokens to the target's; the
denoiser's prediction for the target is all the pipeline keeps. No trained edit model runs on this machine, so
fidelity is measured against the unreduced model itself: the relative error of the target's prediction,
``||y - y0|| / ||y0||``, on a Kontext-layout ``FluxTransformer2DModel`` (random weights, seeded) whose reference
is a smooth latent (a real latent's spatial redundancy, which merging relies on) and whose target is that
reference edited (shifted) and noised, at several noise levels. Beside it: the share of the image tokens each
setting removes and its speedup over whole calls, interleaved with the baseline.

    tofu-diffusion references --size 32 --ratios 0.25 0.5 0.75 --out docs/results/references
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import tofu_diffusion as tofu

from .timing import interleaved_times, speedups_of, with_baseline_again

NOISE_LEVELS = (0.3, 0.6, 0.9)


def kontext_transformer(width: int = 128, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    heads = width // 32
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                  attention_head_dim=32, num_attention_heads=heads, joint_attention_dim=64,
                                  pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12)).eval()


def _smooth_latent(size: int, generator: torch.Generator) -> torch.Tensor:
    """(1, size, size, 64): a low-frequency field (a quarter-side grid upsampled) plus a little fine detail."""
    coarse = torch.randn(1, 64, max(1, size // 4), max(1, size // 4), generator=generator)
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (field + 0.1 * torch.randn(field.shape, generator=generator)).permute(0, 2, 3, 1)


def _ids(size: int, image: int) -> torch.Tensor:
    ids = torch.zeros(size, size, 3)
    ids[..., 0], ids[..., 1], ids[..., 2] = image, torch.arange(size)[:, None], torch.arange(size)[None, :]
    return ids.reshape(-1, 3)


def edit_inputs(size: int, noise: float, batch: int = 2, seed: int = 0) -> dict:
    """Kontext's layout: the noised target's size x size tokens, then the clean reference's (image index 1)."""
    g = torch.Generator().manual_seed(seed)
    target, reference = _clean_pair(size, batch, g)  # the "edit": the reference's content moved
    target = (1 - noise) * target + noise * torch.randn(target.shape, generator=g)
    tokens = torch.cat([target, reference], dim=1)
    return {"hidden_states": tokens, "encoder_hidden_states": torch.randn(batch, 16, 64, generator=g),
            "pooled_projections": torch.randn(batch, 64, generator=g), "timestep": torch.full((batch,), noise),
            "img_ids": torch.cat([_ids(size, 0), _ids(size, 1)]), "txt_ids": torch.zeros(16, 3)}


def _clean_pair(size: int, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, reference), each (batch, size * size, 64): the target is the reference with its content moved."""
    reference = torch.cat([_smooth_latent(size, g) for _ in range(batch)])
    target = torch.roll(reference, shifts=(size // 8, size // 8), dims=(1, 2))
    return target.reshape(batch, -1, 64), reference.reshape(batch, -1, 64)


@torch.enable_grad()
def train_edit(model, size: int, steps: int, batch: int = 4, lr: float = 1e-3, seed: int = 1) -> list[float]:
    """Teach ``model`` the edit (flow matching on the target's tokens, the clean reference appended), so that its
    prediction depends on the reference as a trained edit model's does. Returns the losses every 50 steps."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    template = edit_inputs(size, 0.5, batch=batch, seed=seed)
    n, losses = size * size, []
    for step in range(steps):
        target, reference = _clean_pair(size, batch, g)
        t = torch.rand(batch, generator=g)
        noise = torch.randn(target.shape, generator=g)
        noisy = (1 - t.view(-1, 1, 1)) * target + t.view(-1, 1, 1) * noise
        inputs = {**template, "hidden_states": torch.cat([noisy, reference], dim=1), "timestep": t}
        loss = torch.nn.functional.mse_loss(model(**inputs, return_dict=False)[0][:, :n], noise - target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def _target(model, inputs: dict, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0][:, :n]


def measure(size: int = 32, ratios=(0.25, 0.5, 0.75), method: str = "tome", width: int = 128, repeats: int = 5,
            warmup: int = 1, train_steps: int = 0) -> tuple[list[dict], dict]:
    """One row per setting: removed share of the image tokens, relative error per noise level, speedup; and
    what the model is: its training losses and how much its prediction depends on the reference at all (the
    error when another reference is given: the scale the settings' errors compare with)."""
    model = kontext_transformer(width)
    losses = train_edit(model, size, train_steps) if train_steps else []
    n = size * size
    cases = {noise: edit_inputs(size, noise) for noise in NOISE_LEVELS}
    base = {noise: _target(model, inputs, n) for noise, inputs in cases.items()}
    other = edit_inputs(size, 0.5, seed=99)["hidden_states"][:, n:]
    dependence = {str(noise): float((_target(model, {**inputs, "hidden_states": torch.cat(
        [inputs["hidden_states"][:, :n], other], dim=1)}, n) - base[noise]).norm() / base[noise].norm())
        for noise, inputs in cases.items()}
    about = {"train_steps": train_steps, "losses": losses, "error_with_another_reference": dependence}
    settings = {"baseline": None}
    for ratio in ratios:
        settings[f"references whole, ratio {ratio:g}"] = dict(method=method, ratio=ratio)
        settings[f"references reduced, ratio {ratio:g}"] = dict(method=method, ratio=ratio, reduce_references=True)
    rows = []
    for name, options in settings.items():
        row = {"setting": name, "ratio": 0.0 if options is None else options["ratio"],
               "reduce_references": bool(options and options.get("reduce_references"))}
        if options is None:
            row.update(removed=0.0, errors={str(t): 0.0 for t in NOISE_LEVELS})
        else:
            handle = tofu.apply(model, **options)
            errors = {}
            for noise, inputs in cases.items():
                y = _target(model, inputs, n)
                errors[str(noise)] = float((y - base[noise]).norm() / base[noise].norm())
            counts = list(handle.token_counts().values())
            # of the image stream's 2n tokens (target and reference), over the blocks
            row.update(removed=sum(i - o for i, o in counts) / (2 * n * len(counts)), errors=errors)
            tofu.remove(model)
        row["error"] = statistics.mean(row["errors"].values())
        rows.append(row)
    # Time whole calls at the middle noise level, every setting interleaved with the baseline.
    inputs = cases[NOISE_LEVELS[1]]
    calls = {name: (lambda: _target(model, inputs, n)) for name in settings}

    def switch(options):
        def setup():
            if tofu.handle_of(model) is not None:
                tofu.remove(model)
            if options is not None:
                tofu.apply(model, **options)
        return setup

    setups = {name: switch(options) for name, options in settings.items()}
    times = interleaved_times(*with_baseline_again(calls, setups), repeats=repeats, warmup=warmup)
    setups["baseline"]()
    speed = speedups_of(times)
    for row in rows:
        row.update(speed[row["setting"]])
    return rows, about


def table(rows: list[dict], about: dict) -> str:
    scale = " / ".join(f"{about['error_with_another_reference'][str(t)]:.3f}" for t in NOISE_LEVELS)
    lines = [f"Model trained {about['train_steps']} steps on the edit; its error with another reference: {scale}",
             "",
             "| setting | image tokens removed | error of the target's prediction (noise 0.3 / 0.6 / 0.9) | "
             "speedup (10-90%) |", "|---|---:|---:|---:|"]
    for row in rows:
        errors = " / ".join(f"{row['errors'][str(t)]:.3f}" for t in NOISE_LEVELS)
        lines.append(f"| {row['setting']} | {row['removed']:.0%} | {errors} (mean {row['error']:.3f}) | "
                     f"{row['speedup']:.2f}x ({row['speedup_low']:.2f}-{row['speedup_high']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="target and reference side in tokens (default 32)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--method", default="tome", choices=["tome", "tofu", "mctf"])
    parser.add_argument("--width", type=int, default=128, help="the transformer's width (a multiple of 32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=300,
                        help="steps of teaching the random model the edit first, so it reads the reference")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="folder for references.json and references.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, about = measure(args.size, tuple(args.ratios), args.method, args.width, args.repeats,
                          train_steps=args.train_steps)
    text = table(rows, about)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "references.json"), "w") as f:
            json.dump({"size": args.size, "method": args.method, "width": args.width, **about, "rows": rows}, f,
                      indent=1)
        with open(os.path.join(args.out, "references.md"), "w") as f:
            f.write(text + "\n")
