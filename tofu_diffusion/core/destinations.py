"""Destination choice: which tokens may receive merges (set B) and which may be merged away (set A).

Both partition functions return ``(src_idx, dst_idx)``: 1-D long tensors of token indices, shared by
the whole batch.

Random choices are drawn from a counter-based hash of an integer key (``mix_key`` / ``hashed``) rather
than a ``torch.Generator``: the same key gives the same draw on any device, in a recomputed forward
(gradient checkpointing) and inside ``torch.compile`` graphs, with no generator state and no host sync.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

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


def max_grid_ratio(stride: tuple[int, int]) -> float:
    """The largest share of tokens a one-destination-per-cell partition can remove."""
    sy, sx = stride
    return 1.0 - 1.0 / (sy * sx)


def grid_partition(
    height: int,
    width: int,
    stride: tuple[int, int] = (2, 2),
    generator: Optional[torch.Generator] = None,
    position: int = 0,
    device: torch.device | str = "cpu",
    key: Optional[Key] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One destination per ``sy x sx`` cell of a ``height x width`` token grid (row-major tokens).

    With a ``key`` (hashed, see ``hashed``) or a ``generator`` the destination sits at a random position
    in each cell; without either at the fixed ``position`` (0 = top-left, row-major inside the cell).
    Rows/columns left over when the stride does not divide the grid hold only sources, as in tomesd.
    """
    sy, sx = stride
    cells_y, cells_x = height // sy, width // sx
    if cells_y == 0 or cells_x == 0:
        raise ValueError(
            f"a {height}x{width} token grid is smaller than the {sy}x{sx} merge stride, so no destination "
            f"tokens can be placed; use a smaller stride or do not reduce this resolution level"
        )
    if key is not None:
        offset = (hashed(key, cells_y * cells_x, device) % (sy * sx)).view(cells_y, cells_x)
    elif generator is not None:
        # Drawn on the generator's device so seeded CPU generators work for models on any device.
        offset = torch.randint(sy * sx, (cells_y, cells_x), generator=generator, device=generator.device)
        offset = offset.to(device)
    else:
        if not 0 <= position < sy * sx:
            raise ValueError(f"fixed destination position {position} is outside a {sy}x{sx} cell")
        offset = torch.full((cells_y, cells_x), position, dtype=torch.long, device=device)
    rows = torch.arange(cells_y, device=device).unsqueeze(1) * sy + offset // sx
    cols = torch.arange(cells_x, device=device).unsqueeze(0) * sx + offset % sx
    is_dst = torch.zeros(height * width, dtype=torch.bool, device=device)
    is_dst[(rows * width + cols).flatten()] = True
    # Sorting (-1 = destination, 0 = source) puts destinations first without a host sync. The same
    # (unstable) sort call as tomesd keeps merged tokens in tomesd's order, so results match it exactly.
    order = (-is_dst.long()).reshape(1, -1, 1).argsort(dim=1).flatten()
    num_dst = cells_y * cells_x
    return order[num_dst:], order[:num_dst]
