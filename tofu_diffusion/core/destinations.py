"""Destination choice: which tokens may receive merges (set B) and which may be merged away (set A).

Both partition functions return ``(src_idx, dst_idx)``: 1-D long tensors of token indices, shared by
the whole batch.

Random choices are drawn from a counter-based hash of an integer key (``mix_key`` / ``hashed``) rather
than a ``torch.Generator``: the same key gives the same draw on any device, in a recomputed forward
(gradient checkpointing) and inside ``torch.compile`` graphs, with no generator state and no host sync.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .grid import axis_view, cells, expand_stride, grid_text, ravel

DESTINATIONS = ("random", "fixed")
_MASK = 0x7FFFFFFF  # keys and hashes stay below 2**31, so every product below fits in int64

Key = Union[int, torch.Tensor]  # a non-negative int, or a 0-d int64 tensor (e.g. derived from a timestep)


def _scramble(x: Key) -> Key:
    """A 31-bit integer finaliser (xor-shift-multiply); works on Python ints and int64 tensors alike."""
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _MASK
    return x ^ (x >> 15)


def mix_key(*parts: Key) -> Key:
    """Combine integers (e.g. seed, step, block) into one key; a tensor part makes a tensor key."""
    key = 0x3C6EF372
    for part in parts:
        key = _scramble((key ^ (part & _MASK)) & _MASK)
    return key


def hashed(key: Key, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` pseudo-random int64 values in [0, 2**31), a pure function of ``(key, position)``."""
    if not isinstance(key, torch.Tensor):
        key = torch.tensor(key & _MASK, dtype=torch.long)
    counter = torch.arange(count, device=device, dtype=torch.long)
    return _scramble((_scramble(key.to(device)) + counter * 0x9E3779B) & _MASK)


def alternating_partition(num_tokens: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """ViT style: even positions are sources (A), odd positions destinations (B)."""
    idx = torch.arange(num_tokens, device=device)
    return idx[0::2], idx[1::2]


def max_grid_ratio(stride: Sequence[int]) -> float:
    """The largest share of tokens a one-destination-per-cell partition can remove."""
    return 1.0 - 1.0 / math.prod(int(s) for s in stride)


def grid_partition(
    grid: Sequence[int],
    stride: Sequence[int] = (2, 2),
    generator: Optional[torch.Generator] = None,
    position: int = 0,
    device: torch.device | str = "cpu",
    key: Optional[Key] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One destination per cell of a token grid of any rank (row-major tokens): ``(rows, cols)`` with a
    ``(sy, sx)`` stride, ``(frames, rows, cols)`` with a 3-axis stride or a 2-axis one (cells in one frame).

    With a ``key`` (hashed, see ``hashed``) or a ``generator`` the destination sits at a random position
    in each cell; without either at the fixed ``position`` (0 = first, row-major inside the cell).
    Rows/columns left over when the stride does not divide the grid hold only sources, as in tomesd.
    """
    grid = tuple(int(g) for g in grid)
    stride = expand_stride(stride, len(grid))
    counts = cells(grid, stride)
    if min(counts) == 0:
        raise ValueError(
            f"a {grid_text(grid)} token grid is smaller than the {grid_text(stride)} merge stride, so no "
            f"destination tokens can be placed; use a smaller stride or do not reduce this resolution level"
        )
    cell_size, num_dst = math.prod(stride), math.prod(counts)
    if key is not None:
        offset = (hashed(key, num_dst, device) % cell_size).view(counts)
    elif generator is not None:
        # Drawn on the generator's device so seeded CPU generators work for models on any device.
        offset = torch.randint(cell_size, counts, generator=generator, device=generator.device)
        offset = offset.to(device)
    else:
        if not 0 <= position < cell_size:
            raise ValueError(f"fixed destination position {position} is outside a {grid_text(stride)} cell")
        offset = torch.full(counts, position, dtype=torch.long, device=device)
    coords, rest = [], offset
    for axis, step in enumerate(stride):
        inner = math.prod(stride[axis + 1:])  # the offset is row-major inside the cell
        within, rest = rest // inner, rest % inner
        coords.append(axis_view(torch.arange(counts[axis], device=device), axis, len(grid)) * step + within)
    is_dst = torch.zeros(math.prod(grid), dtype=torch.bool, device=device)
    is_dst[ravel(coords, grid).flatten()] = True
    # Sorting (-1 = destination, 0 = source) puts destinations first without a host sync. The same
    # (unstable) sort call as tomesd keeps merged tokens in tomesd's order, so results match it exactly.
    order = (-is_dst.long()).reshape(1, -1, 1).argsort(dim=1).flatten()
    return order[num_dst:], order[:num_dst]
