"""ToDo (token downsampling): queries keep every token; keys and values come from a downsampled grid.

Nothing is merged, so nothing is unmerged. The spatial axes (the last two) are resized to ``sqrt(1 - ratio)``
of each side (nearest-exact, as ToDo's reference); a video grid's frames are kept.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.profiler import record_function

from ..core import downsampled_size, resize_tokens
from .hooks import SignedHook
from .planning import BlockState
from .registry import register

DOWNSAMPLE_HOOK = "tofu_diffusion_downsample"


def downsample_on_grid(state: BlockState, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """``tokens`` (B, N, C) on the block's grid, downsampled by the step's ratio; None when that keeps every
    token. Records the token counts."""
    n = tokens.shape[1]
    ratio = state.run.ratio
    size = None
    if ratio > 0:
        grid = state.checked_grid(n)
        size = downsampled_size(grid, ratio)
    if size is None or math.prod(size) >= n:
        state.count_tokens(n, n)
        return None
    with record_function("tofu_diffusion::downsample"):
        out = resize_tokens(tokens, grid, size)
    state.count_tokens(n, out.shape[1])
    return out


class KeyValueDownsampleHook(SignedHook):
    """ToDo on a self-attention: every query attends to keys and values of a downsampled token grid.

    The attention's input is downsampled (``downsample_on_grid``) and passed as ``encoder_hidden_states``,
    which a diffusers ``Attention`` projects to keys and values; queries and outputs keep all N tokens.
    """

    def __init__(self, state: BlockState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        keys = downsample_on_grid(self.state, self.signature.first(args, kwargs))
        if keys is None:
            return args, kwargs
        if self.signature.get(args, kwargs, "attention_mask") is not None:
            raise ValueError(f"{self.state.name}: self-attention was called with an attention_mask, which todo "
                             f"cannot downsample; use another method for this model")
        return self.signature.replace(args, kwargs, "encoder_hidden_states", keys)


class ProjectionDownsampleHook(SignedHook):
    """ToDo inside a joint attention: on the image ``to_k`` / ``to_v`` projections, their outputs are
    downsampled on the grid. Keys and values of the image shrink while its queries and every text token
    stay; the processor joins [image; text] keys and values of any length. Strided (nearest) selection
    commutes with the per-token projection and q/k norm, so this equals downsampling the input."""

    def __init__(self, state: BlockState):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        reduced = downsample_on_grid(self.state, output)
        return output if reduced is None else reduced


def attach_self_attention(attention: torch.nn.Module, state: BlockState) -> None:
    """ToDo on an attention whose input is the block's tokens alone."""
    register(attention, KeyValueDownsampleHook(state), DOWNSAMPLE_HOOK)


def attach_projections(attention: torch.nn.Module, state: BlockState) -> None:
    """ToDo inside a joint attention: only the image stream's key and value projections."""
    for projection in (attention.to_k, attention.to_v):
        register(projection, ProjectionDownsampleHook(state), DOWNSAMPLE_HOOK)
