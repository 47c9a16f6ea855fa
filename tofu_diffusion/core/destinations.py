"""Destination choice: which tokens may receive merges (set B) and which may be merged away (set A).

Both functions return ``(src_idx, dst_idx)``: 1-D long tensors of token indices, shared by the whole
batch.
"""

from __future__ import annotations

from typing import Optional

import torch

DESTINATIONS = ("random", "fixed")


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One destination per ``sy x sx`` cell of a ``height x width`` token grid (row-major tokens).

    With a ``generator`` the destination sits at a random position in each cell; without one at the
    fixed ``position`` (0 = top-left, row-major inside the cell). Rows/columns left over when the
    stride does not divide the grid hold only sources, as in tomesd.
    """
    sy, sx = stride
    cells_y, cells_x = height // sy, width // sx
    if cells_y == 0 or cells_x == 0:
        raise ValueError(
            f"a {height}x{width} token grid is smaller than the {sy}x{sx} merge stride, so no destination "
            f"tokens can be placed; use a smaller stride or do not reduce this resolution level"
        )
    if generator is not None:
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
