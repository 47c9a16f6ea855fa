"""Which queries estimate the attention each token receives: a stratified sample of the 2-D grid.

MCTF's informativeness is the attention a token receives, averaged over all queries. On a denoiser
the block never computes the full attention map, so it is estimated from a few queries. Those must
represent the whole image: a 1-D stride over row-major tokens lands in one grid column whenever the
stride divides the grid width (256 tokens, 16 queries: all in column 0, the left edge).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .destinations import Key, hashed


def _bounds(length: int, parts: int, device) -> torch.Tensor:
    """``parts + 1`` integer cut points splitting ``range(length)`` into near-equal, non-empty spans."""
    return torch.div(torch.arange(parts + 1, device=device) * length, parts, rounding_mode="floor")


def stratified_grid_queries(
    height: int,
    width: int,
    num_queries: int,
    generator: Optional[torch.Generator] = None,
    key: Optional[Key] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per cell of a ``qh x qw`` partition of a ``height x width`` grid (row-major tokens).

    The cells tile the grid with ``qh * qw`` close to ``num_queries`` and roughly square cells for any
    aspect ratio. Each query sits at a uniformly random position of its cell (drawn from ``key``, hashed
    as in ``destinations.hashed``, or from ``generator``; without either, the cell's centre). Returns ``(index, weight)``: token indices (Q,) and weights (Q,) equal to
    each cell's share of the grid, so that ``sum_q weight_q * f(query_q)`` is an unbiased estimate of the
    grid mean of ``f`` (exact when ``f`` is constant on each cell), whatever the cell sizes.
    """
    if height < 1 or width < 1 or num_queries < 1:
        raise ValueError(f"need a non-empty grid and at least one query; got {height}x{width}, {num_queries}")
    qh = min(height, max(1, round(math.sqrt(num_queries * height / width))))
    qw = min(width, max(1, round(num_queries / qh)))
    # Computed where the key lives (the model's device), so a device key needs no host round trip.
    device = key.device if isinstance(key, torch.Tensor) else "cpu"
    rows, cols = _bounds(height, qh, device), _bounds(width, qw, device)
    row_size = (rows[1:] - rows[:-1]).view(qh, 1)
    col_size = (cols[1:] - cols[:-1]).view(1, qw)
    if key is not None:
        u = (hashed(key, 2 * qh * qw, device).float() / 2**31).view(2, qh, qw)
        dy = (u[0] * row_size).long().clamp_max(row_size - 1)
        dx = (u[1] * col_size).long().clamp_max(col_size - 1)
    elif generator is None:
        dy, dx = row_size // 2, col_size // 2
    else:
        u = torch.rand(2, qh, qw, generator=generator, device=generator.device).cpu()
        dy = (u[0] * row_size).long().clamp_max(row_size - 1)
        dx = (u[1] * col_size).long().clamp_max(col_size - 1)
    y = rows[:-1].view(qh, 1) + dy
    x = cols[:-1].view(1, qw) + dx
    index = (y * width + x).flatten()
    weight = (row_size * col_size).flatten().float() / (height * width)
    return index, weight
