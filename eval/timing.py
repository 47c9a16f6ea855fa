"""Interleaved timing: runs A B C A B C ... so slow drifts of a noisy machine hit every variant alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median(
    variants: dict[str, Callable[[], object]],
    setup: dict[str, Callable[[], None]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),
) -> dict[str, float]:
    """Median seconds per call of each variant; ``setup[name]()`` switches the model to that variant."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + repeats):
        for name, fn in variants.items():
            setup[name]()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
