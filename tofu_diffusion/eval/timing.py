"""Interleaved timing: runs A B C A B C ... so slow drifts of a noisy machine hit every variant alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median(
    variants: dict[str, Callable[[], object]],
    setup: dict[str, Callable[[], None]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    peak_memory: Optional[dict[str, float]] = None,
) -> dict[str, float]:
    """Median seconds per call of each variant; ``setup[name]()`` switches the model to that variant.

    When ``peak_memory`` is a dict it receives each variant's peak memory (MB) over its calls.
    """
    times = interleaved_times(variants, setup, repeats, warmup, torch.device(device), peak_memory)
    return {name: statistics.median(values) for name, values in times.items()}


def speedup_interval(baseline: list[float], variant: list[float]) -> tuple[float, float, float]:
    """(median, low, high) of the per-round speedups ``baseline[i] / variant[i]`` of interleaved rounds.

    Pairing by round cancels the machine's slow drifts; the spread of the pairs is the noise a single number
    would hide. low/high are the middle 80% (10th-90th percentile) of the rounds' ratios, the extremes with
    fewer than five rounds.
    """
    return ratio_interval([b / v for b, v in zip(baseline, variant)])


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(median, low, high) of per-round speedups, as ``speedup_interval``."""
    ratios = sorted(ratios)
    if not ratios:
        raise ValueError("no timed rounds")
    if len(ratios) < 5:
        return statistics.median(ratios), ratios[0], ratios[-1]
    cut = round(0.1 * (len(ratios) - 1))  # as many rounds cut from each end, so symmetric data stay symmetric
    return statistics.median(ratios), ratios[cut], ratios[-1 - cut]


BASELINE_AGAIN = "baseline, timed again"


def noise_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(1.0, low, high) for the baseline from the ratios of its two timings in each round.

    Which of two timings of the same work is called "the baseline" is arbitrary, so each round counts both
    ways (r and 1/r): the interval is the spread of identical work timed twice, and always contains 1.
    """
    _, low, high = ratio_interval(list(ratios) + [1 / r for r in ratios])
    return 1.0, low, high


def with_baseline_again(calls: dict, setups: dict, baseline: str = "baseline") -> tuple[dict, dict]:
    """``calls`` / ``setups`` with the baseline timed once more at the end of every interleaved round."""
    return {**calls, BASELINE_AGAIN: calls[baseline]}, {**setups, BASELINE_AGAIN: setups[baseline]}


def speedups_of(times: dict[str, list[float]], baseline: str = "baseline") -> dict[str, dict]:
    """Each variant's ``speedup`` / ``speedup_low`` / ``speedup_high`` from interleaved rounds timed with
    ``with_baseline_again``: the variants' paired per-round ratios, the baseline's own noise (it needs the
    second timing)."""
    out = {}
    for name, values in times.items():
        if name == BASELINE_AGAIN:
            continue
        if name == baseline:
            speedup, low, high = noise_interval([b / a for b, a in zip(times[baseline], times[BASELINE_AGAIN])])
        else:
            speedup, low, high = speedup_interval(times[baseline], values)
        out[name] = {"speedup": speedup, "speedup_low": low, "speedup_high": high}
    return out


def interleaved_times(
    variants: dict[str, Callable[[], object]],
    setup: dict[str, Callable[[], None]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    peak_memory: Optional[dict[str, float]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, list[float]]:
    """Seconds of every timed round of each variant (``interleaved_median``'s rounds, unreduced).

    ``progress(name)``, when given, is called after every call (warm-up ones too): a progress bar's update.
    """
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + repeats):
        for name, fn in variants.items():
            setup[name]()
            synchronize(device)
            reset_peak_memory(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
            if peak_memory is not None:
                peak_memory[name] = max(peak_memory.get(name, 0.0), peak_memory_mb(device))
            if progress is not None:
                progress(name)
    return times


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator peak, or the process's resident-set high-water mark on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # writing 5 to clear_refs resets VmHWM (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA allocated bytes, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
