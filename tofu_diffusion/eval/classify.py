"""Accuracy against throughput of ToMe / ToFu / MCTF on a ViT/DeiT image classifier.

    tofu-diffusion classify --model tiny-vit --methods none tome tofu mctf --r 4 8 --out results/classify

``--ratios`` adds rows by share of each layer's tokens (MCTF's form) and ``--presets`` rows for the named
presets (``default``: what ``tofu.apply(model)`` does with no options). For every setting: top-1 accuracy,
images per second (interleaved repeats against the baseline in the same run, median), GFLOPs per image
(torch.utils.flop_counter, matching included) and the tokens entering each layer. Writes ``results.json``,
``results.csv`` and ``accuracy_vs_throughput.png``.

The embedded default ``tiny-vit`` is evaluated on held-out procedural shapes; a real checkpoint is
``--model <hub id or folder> --data <ImageFolder>`` (one sub-folder per class, named as the model's labels).

Speed at real geometry (random weights, no data; accuracy is not measured):

    tofu-diffusion classify --bench --geometries vit-s vit-b --r 8 13 --bench-batch 16 --out results/classify_bench

times ViT-S/16 and ViT-B/16 at 224 px (197 tokens) for every method and r in one interleaved run, with the
FLOP ideal (baseline FLOPs / reduced FLOPs) beside each speedup.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image
from tqdm.auto import tqdm

import tofu_diffusion as tofu
from tofu_diffusion.eval import report
from tofu_diffusion.eval.flops import count_flops
from tofu_diffusion.eval.timing import interleaved_times, speedups_of, with_baseline_again
from tofu_diffusion.eval.variants import use_variant
from tofu_diffusion.eval.workloads import IMAGE_SUFFIXES

COLUMNS = ("setting", "method", "r", "ratio", "accuracy", "images_per_second", "speedup", "speedup_low",
           "speedup_high", "gflops", "tokens_per_layer")
BENCH_COLUMNS = ("geometry", "setting", "method", "r", "ratio", "images_per_second", "speedup", "speedup_low",
                 "speedup_high", "gflops", "ideal_speedup", "efficiency")
# ViT-S/16 and ViT-B/16 (DeiT-S/B have the same shapes): 12 layers, 224 px, patch 16 -> 196 patches + CLS.
GEOMETRIES = {
    "vit-s": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
    "vit-b": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-vit", help="tiny-vit (bundled) or a transformers hub id / local folder")
    p.add_argument("--methods", nargs="+", default=["none", "tome", "tofu", "mctf"],
                   choices=("none", *tofu.CLASSIFIER_METHODS))
    p.add_argument("--r", nargs="*", type=int, default=[2, 4, 8], help="tokens removed per layer")
    p.add_argument("--ratios", nargs="*", type=float, default=[],
                   help="share of each layer's tokens removed (MCTF's form), for every method")
    classifier_presets = [name for name, options in tofu.PRESETS.items() if "vit" in options]
    p.add_argument("--presets", nargs="*", default=[], choices=["default", *classifier_presets],
                   help="rows for named presets (default: what tofu.apply(model) does with no options)")
    p.add_argument("--data", help="ImageFolder of evaluation images (real checkpoints)")
    p.add_argument("--num-images", type=int, default=2000, help="bundled model: held-out images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (median)")
    p.add_argument("--out", default="results/classify")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--bench", action="store_true", help="time --geometries with random weights instead")
    p.add_argument("--geometries", nargs="+", default=["vit-s", "vit-b"], choices=list(GEOMETRIES))
    p.add_argument("--bench-batch", type=int, default=16, help="images per timed call (--bench)")
    args = p.parse_args(argv)
    if args.r and min(args.r) < 0:
        p.error("--r values must be >= 0")
    if args.ratios and not all(0 < ratio <= 0.5 for ratio in args.ratios):
        p.error("--ratios must lie in (0, 0.5]: bipartite matching removes at most half of a layer's tokens")
    return args


@dataclass(frozen=True)
class Setting:
    """One row: the unmodified model (method "none"), a method at ``r`` or ``ratio``, or a named preset."""

    method: str
    r: int = 0
    ratio: Optional[float] = None
    preset: Optional[str] = None

    @property
    def name(self) -> str:
        if self.preset is not None:
            return f"preset {self.preset}"
        if self.method == "none":
            return "none"
        return f"{self.method} ratio={self.ratio:g}" if self.ratio is not None else f"{self.method} r={self.r}"

    def config(self) -> Optional[tofu.TokenFusionConfig]:
        if self.preset == "default":
            return tofu.TokenFusionConfig()
        if self.preset is not None:
            return tofu.TokenFusionConfig(preset=self.preset)
        if self.method == "none":
            return None
        if self.ratio is not None:
            return tofu.TokenFusionConfig(method=self.method, ratio=self.ratio)
        return tofu.TokenFusionConfig(method=self.method, r=self.r)

    def row(self, model) -> dict:
        """The setting's columns; a preset's method and reduction are what it resolves to on ``model``."""
        if self.preset is None:
            return {"setting": self.name, "method": self.method, "r": self.r, "ratio": self.ratio}
        resolved = self.config().resolve(tofu.family_of(model))
        return {"setting": self.name, "method": resolved.method, "r": resolved.r or 0, "ratio": resolved.ratio}


def embedded_or(name: str) -> str:
    """The folder of the bundled ``tiny-vit``, or ``name`` itself (a hub id or folder)."""
    if name == "tiny-vit":
        from tofu_diffusion.pipelines import embedded_path

        return embedded_path("tiny-vit")
    return name


def load_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(embedded_or(name), dtype=dtype).to(device).eval()


def load_data(args, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): held-out shapes for tiny-vit, else an ImageFolder through the model's processor."""
    if args.data is None:
        if args.model != "tiny-vit":
            raise ValueError(f"{args.model}: pass --data with an ImageFolder (one sub-folder per class)")
        from tofu_diffusion.pipelines.shapes import HELD_OUT_SEED, generate

        return generate(args.num_images, seed=HELD_OUT_SEED)
    from transformers import AutoImageProcessor

    if not os.path.isdir(args.data):
        raise ValueError(f"--data {args.data} is not a folder (expected one sub-folder of images per class)")
    source = embedded_or(args.model)
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except OSError as error:
        raise ValueError(f"{args.model} has no image processor (preprocessor_config.json) to prepare --data "
                         "images; save one next to the model with ViTImageProcessor(...).save_pretrained") from error
    label2id = {k.lower(): v for k, v in model.config.label2id.items()}
    classes = sorted(d for d in os.listdir(args.data) if os.path.isdir(os.path.join(args.data, d)))
    if not classes:
        raise ValueError(f"--data {args.data} has no class sub-folders")
    unknown = [c for c in classes if c.lower() not in label2id]
    if unknown:
        raise ValueError(f"class folders {unknown[:5]} are not labels of {args.model} "
                         f"(e.g. {list(label2id)[:5]}); name the folders after model.config.id2label")
    pixels, labels = [], []
    for name in classes:
        folder = os.path.join(args.data, name)
        for file in sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)):
            image = Image.open(os.path.join(folder, file)).convert("RGB")
            pixels.append(processor(images=image, return_tensors="pt")["pixel_values"][0])
            labels.append(label2id[name.lower()])
    return torch.stack(pixels), torch.tensor(labels)


def accuracy(model, images, labels, batch_size, device, dtype) -> float:
    hits = 0
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device, dtype)
        hits += int((model(batch).logits.argmax(-1).cpu() == labels[start:start + batch_size]).sum())
    return hits / images.shape[0]


def settings_of(args) -> list[Setting]:
    settings = [Setting("none")]
    for method in args.methods:
        if method != "none":
            settings += [Setting(method, r=r) for r in sorted(set(args.r)) if r > 0]
            settings += [Setting(method, ratio=ratio) for ratio in sorted(set(args.ratios))]
    settings += [Setting("preset", preset=name) for name in dict.fromkeys(args.presets)]
    return settings


def use(model, setting: Setting) -> None:
    """Switch ``model`` to one setting (method "none" is the unmodified model)."""
    use_variant(model, setting.config())


def tokens_per_layer(model, sample) -> list[int]:
    """Tokens entering each layer, and the count after the last one."""
    handle = tofu.handle_of(model)
    if handle is None:
        from tofu_diffusion.adapters.vit import backbone_of, num_tokens

        backbone = backbone_of(model)
        return [num_tokens(backbone)] * (len(backbone.layers) + 1)
    model(sample)
    counts = handle.token_counts()
    ordered = [counts[f"layers.{i}"] for i in range(len(counts))]
    return [n_in for n_in, _ in ordered] + [ordered[-1][1]]


def _timed(model, inputs, names: list[str], setups: dict, args, device) -> tuple[dict, dict]:
    """Median seconds per call and each setting's speedup with its interval (``names[0]`` is the baseline,
    timed twice per round for its own noise)."""
    calls = {n: (lambda: model(inputs)) for n in names}
    rounds = interleaved_times(*with_baseline_again(calls, setups, names[0]), repeats=args.repeats, device=device)
    return {n: statistics.median(rounds[n]) for n in names}, speedups_of(rounds, names[0])


def evaluate(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = load_model(args.model, device, dtype)
    images, labels = load_data(args, model)
    settings = settings_of(args)
    timing_batch = images[: args.batch_size].to(device, dtype)
    one = images[:1].to(device, dtype)

    names = [setting.name for setting in settings]
    setups = {setting.name: functools.partial(use, model, setting) for setting in settings}
    seconds, speedups = _timed(model, timing_batch, names, setups, args, device)
    rows = []
    for name, setting in tqdm(list(zip(names, settings)), desc="evaluating"):
        use(model, setting)
        rows.append({
            **setting.row(model),
            "accuracy": accuracy(model, images, labels, args.batch_size, device, dtype),
            "images_per_second": timing_batch.shape[0] / seconds[name],
            **speedups[name],
            "gflops": count_flops(lambda: model(one)) / 1e9,
            "tokens_per_layer": tokens_per_layer(model, one),
        })
    use(model, settings[0])
    return {"model": args.model, "num_images": int(images.shape[0]), "device": str(device),
            "timing_batch": int(timing_batch.shape[0]), "rows": rows}


def geometry_model(name: str, device, dtype) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, num_hidden_layers=12, num_labels=1000, **GEOMETRIES[name])
    return ViTForImageClassification(config).to(device, dtype).eval()


def bench(args) -> dict:
    """Throughput of every (method, r) at ViT-S/B geometry, interleaved with the baseline, and the FLOP ideal."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    settings = settings_of(args)
    names = [setting.name for setting in settings]
    rows = []
    for geometry in args.geometries:
        model = geometry_model(geometry, device, dtype)
        batch = torch.randn(args.bench_batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        setups = {setting.name: functools.partial(use, model, setting) for setting in settings}
        seconds, speedups = _timed(model, batch, names, setups, args, device)
        flops = {}
        for setting in settings:
            use(model, setting)
            flops[setting.name] = count_flops(lambda: model(batch[:1]))
        use(model, settings[0])
        base = names[0]
        for name, setting in zip(names, settings):
            timed, ideal = speedups[name], flops[base] / flops[name]
            speedup = timed["speedup"]
            rows.append({"geometry": geometry, **setting.row(model),
                         "images_per_second": batch.shape[0] / seconds[name], **timed,
                         "gflops": flops[name] / 1e9, "ideal_speedup": ideal, "efficiency": speedup / ideal})
    return {"device": str(device), "dtype": args.dtype, "batch": args.bench_batch, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "rows": rows}


def format_bench(result: dict) -> str:
    header = (f"{'geometry':<9}{'setting':<20}{'img/s':>9}{'speedup':>21}{'GFLOPs':>8}{'FLOP ideal':>12}"
              f"{'of ideal':>10}")
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(f"{row['geometry']:<9}{row['setting']:<20}{row['images_per_second']:>9.1f}"
                     f"{report.format_speedup(row):>21}{row['gflops']:>8.2f}{row['ideal_speedup']:>11.2f}x"
                     f"{row['efficiency']:>10.2f}")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    header = f"{'setting':<20}{'top-1':>8}{'img/s':>10}{'speedup':>21}{'GFLOPs':>9}  tokens per layer"
    lines = [header, "-" * (len(header) + 20)]
    for row in result["rows"]:
        lines.append(f"{row['setting']:<20}{100 * row['accuracy']:>7.2f}%{row['images_per_second']:>10.0f}"
                     f"{report.format_speedup(row):>21}{row['gflops']:>9.4f}  "
                     f"{' '.join(map(str, row['tokens_per_layer']))}")
    return "\n".join(lines)


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.bench:
        result = bench(args)
        report.write_json_csv(args.out, result, BENCH_COLUMNS)
        print(f"\n{result['device']} {result['dtype']}, batch {result['batch']}, median of {result['repeats']} "
              f"interleaved repeats, {result['threads']} threads")
        print(format_bench(result))
        print(f"\nwrote {args.out}/results.json, results.csv")
        return result
    result = evaluate(args)
    report.write_json_csv(args.out, result, COLUMNS)
    report.tradeoff_plot(os.path.join(args.out, "accuracy_vs_throughput.png"),
                         [dict(r, accuracy=100 * r["accuracy"]) for r in result["rows"]],
                         "images_per_second", "accuracy", "r", "images per second", "top-1 accuracy (%)",
                         f"{result['model']}: accuracy vs throughput ({result['num_images']} images)")
    print(f"\n{result['model']}: {result['num_images']} images, {result['device']}, "
          f"timing batch {result['timing_batch']}")
    print(format_table(result))
    print(f"\nwrote {args.out}/results.json, results.csv, accuracy_vs_throughput.png")
    return result


if __name__ == "__main__":
    main()
