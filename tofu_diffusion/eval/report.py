"""Writing results: JSON, CSV, and a quality-against-speed plot (shared by the sweep and eval.classify)."""

from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence


def write_json_csv(out: str, result: dict, columns: Sequence[str]) -> None:
    """``results.json`` (the whole result) and ``results.csv`` (its rows) under ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()})


def mark_pareto(rows: list[dict], speed: str, quality: str, lower_is_better: bool) -> None:
    """Set ``row["pareto"]``: True when no other row is at least as fast and as good, and better in one."""
    def good(row):
        value = row[quality]
        return -value if lower_is_better else value

    for row in rows:
        row["pareto"] = not any(
            other is not row and other[speed] >= row[speed] and good(other) >= good(row)
            and (other[speed] > row[speed] or good(other) > good(row))
            for other in rows
        )


def format_value(value, fmt: str) -> str:
    """``value`` formatted, or ``n/a`` where a metric was not measured (None)."""
    return "n/a" if value is None else format(value, fmt)


def format_speedup(row: dict) -> str:
    """``1.21x (1.15-1.27)``: the speedup and the spread of its interleaved rounds."""
    if row.get("speedup_low") is None:
        return f"{row['speedup']:.2f}x"
    return f"{row['speedup']:.2f}x ({row['speedup_low']:.2f}-{row['speedup_high']:.2f})"


def tradeoff_plot(path: str, rows: list[dict], x: str, y: str, label: str, xlabel: str, ylabel: str, title: str,
                  band: Optional[tuple[float, float, str]] = None) -> None:
    """One line per series (``row["series"]``, else its method) from the baseline (the first row, marked
    with a star) through its settings; rows flagged ``pareto`` are joined by a dashed front.

    ``label`` names the row field printed next to each point (the ratio or r); ``band`` (low, high, text)
    shades a horizontal range, e.g. the baseline plus the noise floor.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("plots need matplotlib: pip install -e '.[eval]'") from error
    base = rows[0]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    def series(row):
        return row.get("series", row["method"])

    for name in dict.fromkeys(series(r) for r in rows[1:]):
        members = [r for r in rows[1:] if series(r) == name]
        joined = name not in ("presets", "variants")  # a ratio sweep is a line; presets/variants are points
        line = ([base] + members) if joined else members
        drawn = ax.plot([r[x] for r in line], [r[y] for r in line], marker="o", label=name,
                        linestyle="-" if joined else "none")[0]
        low, high = f"{x}_low", f"{x}_high"
        if all(r.get(low) is not None and r.get(high) is not None for r in members):  # the timing noise
            ax.errorbar([r[x] for r in members], [r[y] for r in members], fmt="none", color=drawn.get_color(),
                        xerr=[[r[x] - r[low] for r in members], [r[high] - r[x] for r in members]], capsize=2,
                        alpha=0.6)
        for r in members:
            ax.annotate(f"{r[label]}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r[x])
    if len(front) > 1:
        ax.plot([r[x] for r in front], [r[y] for r in front], linestyle="--", color="black", alpha=0.5,
                label="Pareto front")
    ax.scatter([base[x]], [base[y]], marker="*", s=200, color="black", zorder=5, label="baseline")
    if band is not None:
        ax.axhspan(band[0], band[1], color="grey", alpha=0.2, label=band[2])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
