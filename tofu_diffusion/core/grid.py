"""Token grids of any rank: (rows, cols) for images, (frames, rows, cols) for video; tokens are row-major.

A stride names one cell of the grid per axis; a 2-D stride on a 3-D grid covers one frame (its leading
axes get stride 1), so an image setting means the same on a video.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Grid = tuple[int, ...]


def grid_text(grid: Sequence[int]) -> str:
    return "x".join(str(int(g)) for g in grid)


def num_tokens(grid: Sequence[int]) -> int:
    return math.prod(int(g) for g in grid)


def expand_stride(stride: Sequence[int], rank: int) -> tuple[int, ...]:
    """``stride`` for a grid of ``rank`` axes: missing leading axes get 1 (a cell inside one frame)."""
    stride = tuple(int(s) for s in stride)
    if len(stride) > rank:
        raise ValueError(f"a {len(stride)}-axis stride {stride} does not fit a {rank}-axis token grid; "
                         f"give at most {rank} values")
    return (1,) * (rank - len(stride)) + stride


def cells(grid: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """Whole cells along each axis (a remainder that the stride does not divide holds no cell)."""
    stride = expand_stride(stride, len(grid))
    return tuple(int(g) // s for g, s in zip(grid, stride))


def axis_view(values: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """A 1-D tensor shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return values.view(shape)


def ravel(coords: Sequence[torch.Tensor], grid: Sequence[int]) -> torch.Tensor:
    """Row-major token indices of per-axis coordinates (broadcast together)."""
    index = coords[0]
    for coord, side in zip(coords[1:], grid[1:]):
        index = index * int(side) + coord
    return index


def downsampled_size(grid: Sequence[int], ratio: float) -> tuple[int, ...]:
    """ToDo's grid for a ratio: each spatial side (the last two axes) times ``sqrt(1 - ratio)``, rounded (at
    least 1); leading axes (a video's frames) are kept."""
    keep = (1.0 - ratio) ** 0.5
    return tuple(int(g) for g in grid[:-2]) + tuple(max(1, round(int(side) * keep)) for side in grid[-2:])


def resize_tokens(tokens: torch.Tensor, grid: Sequence[int], size: Sequence[int],
                  mode: str = "nearest-exact") -> torch.Tensor:
    """(B, N, C) tokens on ``grid`` resampled to the grid ``size`` (same rank), as (B, N', C)."""
    b, n, c = tokens.shape
    if num_tokens(grid) != n or len(size) != len(grid):
        raise ValueError(f"{n} tokens do not lie on a {grid_text(grid)} grid resized to {grid_text(size)}")
    volume = tokens.transpose(1, 2).reshape(b, c, *grid)
    out = torch.nn.functional.interpolate(volume, size=tuple(size), mode=mode)
    return out.flatten(2).transpose(1, 2)
