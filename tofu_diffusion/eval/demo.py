"""The main job: the quality-against-speed sweep on the three bundled generators, and one page to read it.

    tofu-diffusion demo                      # about 15 minutes on 2 CPU cores; writes results/index.html
    tofu-diffusion demo --num-images 256     # tighter FID, longer

For each of tiny-unet, tiny-dit and tiny-mmdit: every method at ratio 0.5, the default and the "fast" preset
(and tomesd on the UNet when it is installed), timed interleaved against the baseline and scored on seeded
images. Each model's sweep goes to ``OUT/sweep_<model>/``; ``OUT/index.html`` shows the three tables, the
quality-against-speed plots and the sample grids side by side.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import time
from datetime import datetime

import torch

from tofu_diffusion.eval import report, sweep
from tofu_diffusion.eval.report import format_value
from tofu_diffusion.eval.variants import tomesd

MODELS = ("tiny-unet", "tiny-dit", "tiny-mmdit")
METHODS = ("tome", "tofu", "mctf", "todo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="results")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--num-images", type=int, default=64, help="seeded images per setting (FID, class accuracy)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=4, help="interleaved timing rounds (the speedups' intervals)")
    p.add_argument("--timing-batch", type=int, default=8, help="images per timed call")
    p.add_argument("--num-reference", type=int, default=1024, help="real images for FID")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sweep_args(model: str, args) -> list[str]:
    methods = [*METHODS, *(["tomesd"] if model == "tiny-unet" and tomesd is not None else [])]
    return ["--model", model, "--methods", *methods, "--ratios", "0", "0.5", "--presets", "default", "fast",
            "--num-images", str(args.num_images), "--steps", str(args.steps), "--repeats", str(args.repeats),
            "--timing-batch", str(args.timing_batch), "--num-reference", str(args.num_reference),
            "--seed", str(args.seed), "--out", os.path.join(args.out, f"sweep_{model}")]


def main(argv=None) -> str:
    args = parse_args(argv)
    started = time.perf_counter()
    results, minutes = [], {}
    for k, model in enumerate(args.models):
        print(f"\n[{k + 1}/{len(args.models)}] {model}", flush=True)
        begun = time.perf_counter()
        results.append(sweep.main(sweep_args(model, args)))
        minutes[model] = (time.perf_counter() - begun) / 60
    total = (time.perf_counter() - started) / 60
    path = write_index(args.out, results, minutes, total, args)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_markdown(results) + "\n")
    print(f"\n{summary_markdown(results)}\n\ndemo: {total:.1f} minutes; open {path}")
    return path


HEADLINE = ("baseline", "preset_default", "preset_fast", "tome_0.5")


def summary_markdown(results: list[dict]) -> str:
    """The headline rows of every model (the README's table): baseline, the default, fast, tome 0.5."""
    lines = ["| model | setting | speedup (low-high) | FID | class accuracy | PSNR (dB) |", "|---|---|---|---|---|---|"]
    for result in results:
        rows = {r["setting"]: r for r in result["rows"]}
        for name in HEADLINE:
            if name in rows:
                r = rows[name]
                label = {"preset_default": "**default** (`tofu.apply(pipe)`)", "preset_fast": "preset fast"}.get(
                    name, name.replace("_", " "))
                lines.append(f"| {result['model']} | {label} | {report.format_speedup(r)} "
                             f"| {format_value(r['fid'], '.2f')} "
                             f"| {format_value(r['class_accuracy'] and 100 * r['class_accuracy'], '.1f')}% "
                             f"| {format_value(r['psnr'], '.1f')} |")
    return "\n".join(lines)


# ---- the page ---------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
section { margin-bottom: 2.5em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
tr.pareto td:first-child { font-weight: bold; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.plot img { width: 460px; }
.grids { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; }
figure img { width: 200px; image-rendering: pixelated; }
figcaption { font-size: 0.8em; text-align: center; }
.note { font-size: 0.85em; color: #555; max-width: 60em; }
"""


def table_html(result: dict) -> str:
    head = ("setting", "reduces", "s/image", "speedup (low-high)", "FID", "KID x1e3", "class acc", "PSNR", "SSIM")
    lines = ["<table>", "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in result["rows"]:
        kid = "n/a" if r["kid"] is None else f"{1e3 * r['kid']:.2f} &plusmn; {1e3 * r['kid_std']:.2f}"
        cells = [html.escape(r["setting"]), html.escape(r["schedule"] or (f"{r['ratio']:g}" if r["ratio"] else "-")),
                 f"{r['seconds_per_image']:.4f}", report.format_speedup(r), format_value(r["fid"], ".2f"), kid,
                 format_value(r["class_accuracy"], ".3f"), format_value(r["psnr"], ".1f"),
                 format_value(r["ssim"], ".3f")]
        css = ' class="pareto"' if r.get("pareto") else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def section_html(result: dict, folder: str, minutes: float) -> str:
    grids = "\n".join(f'<figure><img src="{folder}/{r["samples"]}" alt="{html.escape(r["setting"])}">'
                      f'<figcaption>{html.escape(r["setting"])}</figcaption></figure>'
                      for r in result["rows"] if r.get("samples"))
    floor = format_value(result.get("noise_floor_fid"), ".2f")
    return f"""<section>
<h2>{html.escape(result['model'])}</h2>
<p class="note">{result['num_images']} images per setting, {result['steps']} steps, {minutes:.1f} minutes.
FID noise floor (the baseline against itself with other seeds): {floor}. Bold: on the quality-speed Pareto front.
Files: <a href="{folder}/results.json">results.json</a>, <a href="{folder}/results.csv">results.csv</a>.</p>
<div class="row">
<div>{table_html(result)}</div>
<div class="plot"><img src="{folder}/quality_vs_speed.png" alt="quality against speed"></div>
</div>
<h3>Samples (the same seeds in every setting)</h3>
<div class="grids">
{grids}
</div>
</section>"""


def write_index(out: str, results: list[dict], minutes: dict, total: float, args) -> str:
    sections = "\n".join(section_html(r, f"sweep_{model}", minutes[model]) for model, r in zip(args.models, results))
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tofu-diffusion demo</title><style>{STYLE}</style></head>
<body>
<h1>tofu-diffusion: quality against speed on the bundled generators</h1>
<p class="note">{datetime.now():%Y-%m-%d %H:%M}, {html.escape(machine)}; {total:.1f} minutes in all.
Speedups are whole pipeline calls (batch {args.timing_batch}) against the baseline timed interleaved in the same run,
{args.repeats} rounds: the median and, in brackets, the spread of the rounds; the baseline's own spread is the
timing noise. Class accuracy is the shipped shapes classifier's on the generated images; FID and KID use its
features against {args.num_reference} real images.</p>
{sections}
</body></html>
"""
    path = os.path.join(out, "index.html")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        f.write(page)
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump({"minutes": minutes, "total_minutes": total, "args": vars(args)}, f, indent=1)
    return path


if __name__ == "__main__":
    main()
