"""Which queries estimate the attention each token receives: a stratified sample of the token grid.

MCTF's informativeness is the attention a token receives, averaged over all queries. On a denoiser
the block never computes the full attention map, so it is estimated from a few queries. Those must
represent the whole image: a 1-D stride over row-major tokens lands in one grid column whenever the
stride divides the grid width (256 tokens, 16 queries: all in column 0, the left edge).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .destinations import Key, hashed
from .grid import axis_view, ravel


def _bounds(length: int, parts: int, device) -> torch.Tensor:
    """``parts + 1`` integer cut points splitting ``range(length)`` into near-equal, non-empty spans."""
    return torch.div(torch.arange(parts + 1, device=device) * length, parts, rounding_mode="floor")


def _root(x: float, k: int) -> float:
    return math.sqrt(x) if k == 2 else x ** (1.0 / k)


def query_cells(grid: Sequence[int], num_queries: int) -> tuple[int, ...]:
    """Cells per axis: their product close to ``num_queries``, each cell about as long on every axis."""
    k = len(grid)
    counts: list[int] = []
    for axis, side in enumerate(grid):
        if axis == k - 1:
            share = num_queries / math.prod(counts) if counts else num_queries
        else:  # side * (num_queries / total) ** (1 / k), written so that 2-D is sqrt(q * h / w)
            others = math.prod(g for i, g in enumerate(grid) if i != axis)
            share = _root(num_queries * side ** (k - 1) / others, k)
        counts.append(min(side, max(1, round(share))))
    return tuple(counts)


def stratified_grid_queries(
    grid: Sequence[int],
    num_queries: int,
    generator: Optional[torch.Generator] = None,
    key: Optional[Key] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per cell of a partition of a token grid of any rank (row-major tokens).

    The cells tile the grid with about ``num_queries`` cells of roughly equal extent on every axis, for
    any aspect ratio. Each query sits at a uniformly random position of its cell (drawn from ``key``,
    hashed as in ``destinations.hashed``, or from ``generator``; without either, the cell's centre).
    Returns ``(index, weight)``: token indices (Q,) and weights (Q,) equal to each cell's share of the
    grid, so that ``sum_q weight_q * f(query_q)`` is an unbiased estimate of the grid mean of ``f``
    (exact when ``f`` is constant on each cell), whatever the cell sizes.
    """
    grid = tuple(int(g) for g in grid)
    if not grid or min(grid) < 1 or num_queries < 1:
        raise ValueError(f"need a non-empty grid and at least one query; got {grid}, {num_queries}")
    k = len(grid)
    counts = query_cells(grid, num_queries)
    # Computed where the key lives (the model's device), so a device key needs no host round trip.
    device = key.device if isinstance(key, torch.Tensor) else "cpu"
    bounds = [_bounds(side, parts, device) for side, parts in zip(grid, counts)]
    sizes = [axis_view(b[1:] - b[:-1], axis, k) for axis, b in enumerate(bounds)]
    if key is not None:
        u = (hashed(key, k * math.prod(counts), device).float() / 2**31).view(k, *counts)
    elif generator is not None:
        u = torch.rand(k, *counts, generator=generator, device=generator.device).cpu()
    else:
        u = None
    coords = []
    for axis, (b, size) in enumerate(zip(bounds, sizes)):
        offset = size // 2 if u is None else (u[axis] * size).long().clamp_max(size - 1)
        coords.append(axis_view(b[:-1], axis, k) + offset)
    index = ravel(coords, grid).flatten()
    volume = sizes[0]
    for size in sizes[1:]:
        volume = volume * size
    weight = volume.flatten().float() / math.prod(grid)
    return index, weight
