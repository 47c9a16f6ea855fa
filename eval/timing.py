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
    low, high = (ratios[round(q * (len(ratios) - 1))] for q in (0.1, 0.9))
    return statistics.median(ratios), low, high


def interleaved_times(
    variants: dict[str, Callable[[], object]],
    setup: dict[str, Callable[[], None]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    peak_memory: Optional[dict[str, float]] = None,
) -> dict[str, list[float]]:
    """Seconds of every timed round of each variant (``interleaved_median``'s rounds, unreduced)."""
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
