"""The main job: sweep token-reduction methods and ratios on a pipeline; quality against speed.

    tofu-diffusion sweep --model tiny-dit --methods tome tofu mctf --ratios 0 0.25 0.5 0.75 \\
        --num-images 256 --out results/

For every (method, ratio) it draws the same seeded images and reports seconds per image and speedup
(interleaved repeats against the baseline in the same run, median), FID, class accuracy (bundled models)
or CLIP score (text-to-image checkpoints), PSNR / SSIM against the unreduced images of the same seeds,
and peak memory. The baseline is the row with ratio 0. The noise floor, FID of the baseline against
itself drawn with other seeds, is printed beside the results. Writes ``results.json``, ``results.csv``,
``quality_vs_speed.png`` and ``samples_<method>_<ratio>.png`` under ``--out``.

Runs as is or under ``accelerate launch`` (images split between processes, metrics gathered: the same
results as one process).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

import tofu_diffusion as tofu
from tofu_diffusion.eval import metrics, report, workloads
from tofu_diffusion.eval.timing import BASELINE_AGAIN, interleaved_times, noise_interval, ratio_interval, synchronize
from tofu_diffusion.eval.variants import Variant, use_variant

NOISE_FLOOR_SEED_OFFSET = 1_000_000  # the baseline drawn again with seeds this far away


def parse_args(argv=None) -> argparse.Namespace:
    from tofu_diffusion.pipelines import EMBEDDED_GENERATORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-unet",
                   help=f"{', '.join(EMBEDDED_GENERATORS)} (bundled), or a diffusers pipeline's id / local folder")
    p.add_argument("--methods", nargs="+", default=["tome", "tofu", "mctf"], choices=tofu.METHODS + ("tomesd",),
                   help="swept at every ratio; tomesd is the installed tomesd package (Stable Diffusion UNets)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0, 0.25, 0.5, 0.75])
    p.add_argument("--presets", nargs="*", default=[], choices=["default"] + list(tofu.PRESETS),
                   help="rows for named presets (default: what tofu.apply(pipe) does with no options)")
    p.add_argument("--variants", nargs="*", default=[], metavar="SPEC",
                   help="extra rows, each a space-free list of TokenFusionConfig options, e.g. "
                        "method=tome,schedule=0.5:0.75,blocks=1:-1 (schedule P:R[;P:R], blocks A:B or I;J)")
    p.add_argument("--merge-scope", default=None, choices=["block", "sublayers"], help="default: the library's")
    p.add_argument("--num-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--shift", type=float, default=None,
                   help="sample with the scheduler's timestep shift (SD3: 3; Flux-dev at 1024 px: 3.16); "
                        "default: the pipeline's own scheduler")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default: the pipeline's own (bundled: default_guidance_scale in model_index.json)")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i")
    p.add_argument("--num-reference", type=int, default=2048, help="real images for FID (bundled models)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median)")
    p.add_argument("--timing-batch", type=int, default=None, help="images per timed call (default: --batch-size)")
    p.add_argument("--grid", type=int, default=16, help="images in each sample grid")
    p.add_argument("--out", default="results")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    # real checkpoints
    p.add_argument("--prompts", help="text file, one prompt per line (cycled over the images)")
    p.add_argument("--reference-dir", help="folder of real images for FID (checkpoints)")
    p.add_argument("--inception-weights", help="torch-fidelity Inception weights file for FID (checkpoints)")
    p.add_argument("--feature-module", help="MODULE:FUNCTION returning the FID feature network instead of Inception")
    p.add_argument("--clip-model", help="local CLIP folder (or id) for CLIP score")
    p.add_argument("--resolution", type=int, help="image size for text-to-image checkpoints")
    p.add_argument("--num-classes", type=int, default=1000, help="class-conditional checkpoints: labels cycled")
    args = p.parse_args(argv)
    bad = [r for r in args.ratios if not 0 <= r < 1]
    if bad:
        p.error(f"--ratios must lie in [0, 1); got {bad}")
    if args.num_images < 2:
        p.error("--num-images must be at least 2 (FID needs two images per set)")
    return args


@dataclass
class Setting:
    """One row of the sweep: how the denoiser is modified, and how the row is labelled."""

    name: str  # "baseline", "tome_0.5", "tomesd_0.5", "preset_quality", or a variant's spec
    method: str  # "none", a tofu method, "tomesd", or "preset"
    ratio: Optional[float]  # None where the ratio varies over steps (presets, schedules)
    variant: Variant
    series: str  # rows drawn as one line in the plot
    label: str  # printed next to the point

    @property
    def file_key(self) -> str:
        if self.method == "none":
            return "none_0"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.name)


def parse_variant(spec: str) -> dict:
    """``method=tome,schedule=0.5:0.75;0.8:0.5,blocks=1:-1,merge_mode=mlerp`` -> TokenFusionConfig options."""
    fields = {f for f in tofu.TokenFusionConfig.__dataclass_fields__}
    options = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"variant {spec!r}: {item!r} is not OPTION=VALUE with a TokenFusionConfig option")
        if key == "schedule":
            options[key] = [tuple(float(v) for v in point.split(":")) for point in value.split(";")]
        elif key == "blocks":
            if ":" in value:
                start, stop = (int(v) if v else None for v in value.split(":"))
                options[key] = slice(start, stop)
            else:
                options[key] = [int(v) for v in value.split(";")]
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    continue
            options[key] = value
    return options


def settings_of(args) -> list[Setting]:
    """The baseline first, then every method at every nonzero ratio, then presets and variants."""
    common = {"merge_scope": args.merge_scope} if args.merge_scope else {}
    settings = [Setting("baseline", "none", 0.0, None, "baseline", "")]
    for method in args.methods:
        for ratio in sorted(set(args.ratios)):
            if ratio > 0:
                variant = ("tomesd", ratio) if method == "tomesd" else \
                    tofu.TokenFusionConfig(method=method, ratio=ratio, **common)
                settings.append(Setting(f"{method}_{ratio:g}", method, ratio, variant, method, f"{ratio:g}"))
    for preset in args.presets:
        named = {} if preset == "default" else {"preset": preset}
        config = tofu.TokenFusionConfig(**named, **common)
        settings.append(Setting(f"preset_{preset}", "preset", None, config, "presets", preset))
    for spec in args.variants:
        options = {**common, **parse_variant(spec)}
        config = tofu.TokenFusionConfig(**options)
        settings.append(Setting(spec, config.method or "preset", config.ratio, config, "variants", spec))
    return settings


def check_applicable(settings: list[Setting], denoiser: torch.nn.Module) -> None:
    """tomesd patches Stable Diffusion UNets only: say so before anything is drawn."""
    from diffusers import UNet2DConditionModel

    if any(s.method == "tomesd" for s in settings):
        from tofu_diffusion.eval.variants import tomesd

        if tomesd is None:
            raise RuntimeError("--methods tomesd needs the tomesd package: pip install -e '.[peers]'")
        if not isinstance(denoiser, UNet2DConditionModel):
            raise ValueError(f"tomesd patches Stable Diffusion UNets (UNet2DConditionModel); this model's denoiser "
                             f"is a {type(denoiser).__name__}: drop tomesd from --methods")


class DenoiserClock:
    """Wall time and number of the denoiser's calls (one per denoising step), via forward hooks."""

    def __init__(self, denoiser: torch.nn.Module, device: torch.device):
        self.device, self.seconds, self.calls, self._start = device, 0.0, 0, 0.0
        self._handles = [denoiser.register_forward_pre_hook(self._pre), denoiser.register_forward_hook(self._post)]

    def _pre(self, *_):
        synchronize(self.device)
        self._start = time.perf_counter()

    def _post(self, *_):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self):
        self.seconds, self.calls = 0.0, 0

    def close(self):
        for h in self._handles:
            h.remove()


class Sharding:
    """Splits image indices between processes and gathers results; a no-op in a single process."""

    def __init__(self):
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            # Without CUDA, accelerate only forms a CPU process group (gloo) when told to use the CPU.
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.is_main = self.accelerator is None or self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def local(self, indices: list[int]) -> list[int]:
        if self.accelerator is None:
            return indices
        with self.accelerator.split_between_processes(indices) as mine:
            return list(mine)

    def gather(self, items: list) -> list:
        if self.accelerator is None:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def wait(self):
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def draw_images(work: workloads.Workload, indices: list[int], seed: int, batch_size: int, bar) -> list:
    """(index, uint8 image) for each local index, drawn in batches."""
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images = work.draw([seed + i for i in chunk], [work.condition(i) for i in chunk])
        # uint8 on CPU, as a saved image would be: every metric sees what a user would save
        out.extend(zip(chunk, metrics.to_uint8(images).cpu()))
        bar.update(len(chunk))
    return out


def collect(sharding: Sharding, pairs: list) -> torch.Tensor:
    """All processes' (index, image) pairs, in index order."""
    gathered = sorted(sharding.gather(pairs), key=lambda pair: pair[0])
    return torch.stack([image for _, image in gathered])


def time_settings(work, args, settings, device, show: bool = True) -> tuple[dict, dict, dict, dict]:
    """Seconds per image, denoiser ms per step, peak memory, and each setting's speedups over the baseline in
    each interleaved round (the baseline's: its second timing over its first, the timing noise)."""
    batch = args.timing_batch or args.batch_size
    indices = list(range(batch))
    seeds, conditions = [args.seed + i for i in indices], [work.condition(i) for i in indices]
    names = [setting.name for setting in settings]
    setups = {setting.name: functools.partial(use_variant, work.pipe, setting.variant) for setting in settings}
    # The baseline is timed twice per round (first and last): its speedup over itself is the timing noise.
    names.append(BASELINE_AGAIN)
    setups[BASELINE_AGAIN] = setups[names[0]]
    clock = DenoiserClock(work.denoiser, device)
    step_ms: dict[str, list[float]] = {name: [] for name in names}

    def timed(name):
        def call():
            clock.reset()
            work.draw(seeds, conditions)
            step_ms[name].append(1000 * clock.seconds / max(1, clock.calls))
        return call

    peaks: dict[str, float] = {}
    warmup = 1
    bar = tqdm(total=(warmup + args.repeats) * len(names), desc=f"timing {work.name}", disable=not show)
    try:
        rounds = interleaved_times({n: timed(n) for n in names}, setups, repeats=args.repeats, warmup=warmup,
                                   device=device, peak_memory=peaks,
                                   progress=lambda name: (bar.set_postfix_str(name), bar.update()))
    finally:
        bar.close()
        clock.close()
        use_variant(work.pipe, None)
    again = rounds.pop(BASELINE_AGAIN)
    per_image = {n: statistics.median(s) / batch for n, s in rounds.items()}
    # the warm-up round's calls are timed by the clock too; they are not the steady state
    denoiser_ms = {n: statistics.median(v[warmup:]) for n, v in step_ms.items()}
    base = rounds[names[0]]
    speedups = {n: [b / t for b, t in zip(base, s)] for n, s in rounds.items()}
    speedups[names[0]] = [b / t for b, t in zip(base, again)]
    return per_image, denoiser_ms, peaks, speedups


def evaluate(args, sharding: Sharding) -> Optional[dict]:
    device = sharding.device
    dtype = getattr(torch, args.dtype)
    from tofu_diffusion.pipelines import shapes_pipeline_class

    if shapes_pipeline_class(args.model) is not None:
        work = workloads.embedded(args.model, device, args.steps, args.guidance_scale, args.shift)
    else:
        work = workloads.checkpoint(args, device, dtype)
    settings = settings_of(args)
    check_applicable(settings, work.denoiser)
    indices = list(range(args.num_images))
    mine = sharding.local(indices)

    # Speed first, on a warm model; each process times its own calls.
    per_image, denoiser_ms, peaks, speedups = time_settings(work, args, settings, device, sharding.is_main)
    timings = sharding.gather([(per_image, denoiser_ms, peaks, speedups)])

    bar = tqdm(total=len(mine) * (len(settings) + 1), desc=f"drawing {work.name}", disable=not sharding.is_main)
    images, removed = {}, {}
    for setting in settings:
        use_variant(work.pipe, setting.variant)
        bar.set_postfix_str(setting.name)
        images[setting.name] = collect(sharding, draw_images(work, mine, args.seed, args.batch_size, bar))
        handle = tofu.handle_of(work.pipe)
        # what the reduced blocks removed on these images (a threshold's share follows the content)
        removed[setting.name] = handle.removed_share() if handle is not None else None
    use_variant(work.pipe, None)
    bar.set_postfix_str("noise floor")
    floor_images = collect(sharding, draw_images(work, mine, args.seed + NOISE_FLOOR_SEED_OFFSET, args.batch_size, bar))
    bar.close()
    if not sharding.is_main:
        return None

    conditions = [work.condition(i) for i in indices]
    real = work.real_images(max(args.num_reference, args.num_images)) if work.real_images else None
    fid = kid = None
    if real is not None:
        # a video's frames are scored as images: FID of all the frames against real frames
        scorer = metrics.FID(work.fid_metric().to(device), real.to(device))
        fid = lambda fake: scorer(metrics.as_frames(metrics.from_uint8(fake)).to(device))  # noqa: E731
        if work.kid_metric is not None:
            kid_scorer = metrics.KID(work.kid_metric().to(device), real.to(device))
            kid = lambda fake: kid_scorer(metrics.as_frames(metrics.from_uint8(fake)).to(device))  # noqa: E731
    baseline = metrics.from_uint8(images["baseline"])
    baseline_frames = metrics.as_frames(baseline)  # a video's frames are scored as images
    noise_floor = None
    if work.fid_metric is not None:
        # The same model and settings, other seeds: how far FID moves by chance alone.
        against_baseline = metrics.FID(work.fid_metric().to(device), baseline_frames.to(device))
        noise_floor = against_baseline(metrics.as_frames(metrics.from_uint8(floor_images)).to(device))
    family = tofu.family_of(work.denoiser)
    rows = []
    for setting in tqdm(settings, desc="scoring", disable=not sharding.is_main):
        name, fake = setting.name, metrics.from_uint8(images[setting.name])
        frames = metrics.as_frames(fake)
        seconds = sum(t[0][name] for t in timings) / len(timings)
        # every process's interleaved rounds, pooled: the median and spread of the paired speedups
        pooled = [ratio for t in timings for ratio in t[3][name]]
        # the baseline's speedup is 1 by definition; its (low, high) is itself timed twice: the noise
        speedup, low, high = noise_interval(pooled) if setting is settings[0] else ratio_interval(pooled)
        scores = work.score(fake.to(device), conditions)
        kid_mean, kid_std = kid(images[name]) if kid else (None, None)
        config = setting.variant if isinstance(setting.variant, tofu.TokenFusionConfig) else None
        resolved = config.resolve(family) if config is not None else None
        rows.append({
            "setting": name, "method": setting.method if resolved is None else resolved.method,
            "ratio": setting.ratio, "series": setting.series, "label": setting.label,
            "schedule": format_schedule(resolved) if resolved is not None else None,
            "seconds_per_image": seconds,
            "denoiser_ms_per_step": sum(t[1][name] for t in timings) / len(timings),
            "speedup": speedup, "speedup_low": low, "speedup_high": high,
            "tokens_removed": removed[name],
            "fid": fid(images[name]) if fid else None,
            "kid": kid_mean, "kid_std": kid_std,
            "clip_score": scores.get("clip_score"),
            "class_accuracy": scores.get("class_accuracy"),
            "psnr": float(metrics.psnr(frames, baseline_frames).mean()),
            "ssim": float(metrics.ssim(frames, baseline_frames).mean()),
            **_temporal_scores(fake, baseline),
            "peak_memory_mb": max(t[2][name] for t in timings),
        })
    report.mark_pareto(rows, "speedup", "fid" if fid else "psnr", lower_is_better=bool(fid))
    result = {"model": work.name, "num_images": args.num_images, "steps": args.steps, "shift": args.shift,
              "device": str(device),
              "processes": len(timings), "noise_floor_fid": noise_floor, "rows": rows}
    write_outputs(args.out, result, images, settings, args.grid)
    return result


def _temporal_scores(fake: torch.Tensor, baseline: torch.Tensor) -> dict:
    """Videos only: frame-to-frame changes and the moving shape's track, each against the unreduced clips."""
    if fake.dim() != 5:
        return {"temporal_error": None, "trajectory_error": None}
    track = metrics.trajectory_error(fake, baseline)
    return {"temporal_error": float(metrics.temporal_error(fake, baseline).mean()),
            "trajectory_error": float(track.nanmean()) if not track.isnan().all() else None}


# ---- outputs ---------------------------------------------------------------------------------------------

COLUMNS = ("setting", "method", "ratio", "schedule", "seconds_per_image", "denoiser_ms_per_step", "speedup",
           "speedup_low", "speedup_high", "tokens_removed", "fid",
           "kid", "kid_std", "clip_score", "class_accuracy", "psnr", "ssim", "temporal_error", "trajectory_error",
           "peak_memory_mb", "pareto")


def format_schedule(config: tofu.TokenFusionConfig) -> str:
    """How a resolved config reduces: ``0.5`` or ``0@0 0.75@0.5`` (ratio@progress), plus its blocks."""
    if config.schedule is None:
        text = f"{config.ratio:g}"
    else:
        text = " ".join(f"{r:g}@{p:g}" for p, r in config.schedule)
    if config.blocks is not None:
        blocks = config.blocks
        text += f" blocks {blocks.start}:{blocks.stop}" if isinstance(blocks, slice) else f" blocks {list(blocks)}"
    if config.threshold is not None:
        text += f" sim>{config.threshold:g}"
    return text


def write_outputs(out: str, result: dict, images: dict, settings, grid: int) -> None:
    for setting, row in zip(settings, result["rows"]):
        row["samples"] = f"samples_{setting.file_key}.png"
    report.write_json_csv(out, result, COLUMNS)
    for setting, row in zip(settings, result["rows"]):
        shown = images[setting.name][:grid]  # a video: one clip per row, its frames left to right
        save_grid(metrics.as_frames(shown), os.path.join(out, row["samples"]),
                  columns=shown.shape[1] if shown.dim() == 5 else 8)
    rows, floor = result["rows"], result.get("noise_floor_fid")
    title = f"{result['model']}: quality vs speed ({result['num_images']} images, {result['steps']} steps)"
    if rows[0]["fid"] is not None:
        band = (rows[0]["fid"], rows[0]["fid"] + floor, "baseline + noise floor") if floor is not None else None
        report.tradeoff_plot(os.path.join(out, "quality_vs_speed.png"), rows, "speedup", "fid", "label",
                             "speedup over the baseline (x)", "FID (lower is better)", title, band)
    else:  # no reference set: fidelity to the unreduced images instead
        report.tradeoff_plot(os.path.join(out, "quality_vs_speed.png"), rows, "speedup", "psnr", "label",
                             "speedup over the baseline (x)", "PSNR vs baseline (dB, higher is better)", title)


def save_grid(images: torch.Tensor, path: str, columns: int = 8, min_side: int = 96) -> None:
    """uint8 images (N, 3, H, W) tiled into one PNG, small images enlarged (nearest) to be seen."""
    from PIL import Image

    n, _, h, w = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    canvas = torch.full((3, rows * (h + 2), columns * (w + 2)), 255, dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        canvas[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = images[k]
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    scale = max(1, min_side // h)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def format_table(result: dict) -> str:
    cell = report.format_value
    condition = "class acc" if any(r["class_accuracy"] is not None for r in result["rows"]) else "CLIP"
    width = max(12, *(len(r["setting"]) + 2 for r in result["rows"]))
    video = any(r.get("temporal_error") is not None for r in result["rows"])
    header = (f"{'setting':<{width}}{'method':<8}{'reduces':<24}{'s/image':>9}{'speedup':>21}{'FID':>8}{'KID x1e3':>16}"
              f"{condition:>10}{'PSNR':>7}{'SSIM':>7}" + (f"{'temp err':>9}{'track px':>9}" if video else "")
              + f"{'mem MB':>8} pareto")
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        score = r["class_accuracy"] if r["class_accuracy"] is not None else r["clip_score"]
        kid = "n/a" if r["kid"] is None else f"{1e3 * r['kid']:.2f}+-{1e3 * r['kid_std']:.2f}"
        reduces = r["schedule"] or (f"{r['ratio']:g}" if r["ratio"] else "-")
        lines.append(f"{r['setting']:<{width}}{r['method']:<8}{reduces:<24}{r['seconds_per_image']:>9.4f}"
                     f"{report.format_speedup(r):>21}{cell(r['fid'], '.2f'):>8}{kid:>16}{cell(score, '.3f'):>10}"
                     f"{cell(r['psnr'], '.1f'):>7}{cell(r['ssim'], '.3f'):>7}"
                     + (f"{cell(r['temporal_error'], '.4f'):>9}{cell(r['trajectory_error'], '.2f'):>9}"
                        if video else "")
                     + f"{r['peak_memory_mb']:>8.0f} {'*' if r['pareto'] else ''}")
    floor = result.get("noise_floor_fid")
    lines.append(f"noise floor: FID of the baseline against itself with other seeds = {cell(floor, '.2f')} "
                 "(FID differences smaller than this are not real)")
    lines.append("speedup (low-high): the middle 80% of the interleaved rounds' speedups; the baseline's own spread "
                 "is the timing noise")
    if video:
        lines.append("video: s/image is per clip; FID, class accuracy, PSNR and SSIM frame by frame; temp err: mean "
                     "absolute difference of the frame-to-frame changes from the unreduced clip's; track px: how far "
                     "the moving shape's centre is from where the unreduced clip has it")
    lines.append("pareto *: no other row is both faster and better (FID; PSNR where there is no reference set)")
    return "\n".join(lines)


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    sharding = Sharding()
    result = evaluate(args, sharding)
    if result is not None:
        print(f"\n{result['model']}: {result['num_images']} images, {result['steps']} steps, {result['device']}, "
              f"{result['processes']} process(es)")
        print(format_table(result))
        print(f"\nwrote {args.out}/results.json, results.csv, quality_vs_speed.png, samples_*.png")
    sharding.wait()
    return result


if __name__ == "__main__":
    main()
