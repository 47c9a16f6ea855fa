"""ToFu's criterion for where to stop pruning and start merging: how linear the rest of the network is.

Merging replaces tokens by their average, which is harmless exactly where what follows is linear:
``f(a x1 + (1 - a) x2) = a f(x1) + (1 - a) f(x2)``. Where ``f`` is far from linear an average is a
token the network never saw, and keeping one of the tokens (pruning) is safer.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def interpolation_gap(f: Callable[[torch.Tensor], torch.Tensor], x1: torch.Tensor, x2: torch.Tensor,
                      alphas: Sequence[float] = (0.5,),
                      outputs: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> float:
    """How far ``f`` is from linear between ``x1`` and ``x2`` (batches of the same shape): the mean over
    ``alphas`` and the batch of ``||f(a x1 + (1 - a) x2) - (a f(x1) + (1 - a) f(x2))|| / ||f(x1) - f(x2)||``.

    0 for a linear (or affine) ``f``; scale-free, so gaps of different depths compare. Pairs whose outputs
    do not differ carry no information and are left out. ``outputs``: ``(f(x1), f(x2))`` when the caller
    already has them.
    """
    y1, y2 = (f(x1), f(x2)) if outputs is None else outputs
    y1, y2 = y1.float(), y2.float()
    spread = (y1 - y2).flatten(1).norm(dim=1)
    informative = spread > 1e-6 * y1.flatten(1).norm(dim=1).clamp_min(1e-12)
    if not bool(informative.any()):
        raise ValueError("the sample inputs give identical outputs; pass inputs that differ")
    gaps = []
    for a in alphas:
        if not 0.0 < a < 1.0:
            raise ValueError(f"interpolation weights must lie in (0, 1), got {a}")
        mixed = f(a * x1 + (1 - a) * x2).float()
        deviation = (mixed - (a * y1 + (1 - a) * y2)).flatten(1).norm(dim=1)
        gaps.append((deviation / spread.clamp_min(1e-12))[informative])
    return torch.cat(gaps).mean().item()


def switch_depth_from_gaps(gaps: Sequence[float], tolerance: float) -> int:
    """The first depth from which the rest of the network is within ``tolerance`` of linear.

    ``gaps[d]`` is the interpolation gap of the layers from ``d`` to the end (it shrinks as non-linear
    layers drop out of the suffix). Returns ``len(gaps)`` when no suffix is linear enough (prune everywhere).
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    for depth, gap in enumerate(gaps):
        if gap <= tolerance:
            return depth
    return len(gaps)
