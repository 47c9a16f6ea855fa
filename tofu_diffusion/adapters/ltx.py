"""LTX-Video: ``LTXVideoTransformer3DModel`` and its ``LTXVideoTransformerBlock``s (video).

The pipeline packs the latent frame-major, then row-major, into (B, N, C) tokens and passes the latent's
``num_frames``, ``height`` and ``width``: the (frames, rows, cols) grid, read at the model. Each block is
self-attention with a rotary table (``image_rotary_emb``: (cos, sin), each (B, N, inner_dim)),
cross-attention to the text (``attn2``, with the text's mask) and a feed-forward (``ff``), modulated around
the sublayers by ``temb`` ((B, 1, 6D), or (B, N, 6D) per token in image-to-video). Only video tokens are
reduced; the text is attended across and never merged.

* ``merge_scope="sublayers"``: the rotary rows of ``attn1`` follow the kept tokens; modulation
  stays on the full tokens, so the conditioning frame's tokens (timestep 0 in image-to-video) keep theirs.
* ``merge_scope="block"`` (the default): the rotary rows and a per-token ``temb`` follow the kept tokens.

ToDo is refused, as on Wan: one rotary table is applied to queries and keys together.
"""

from __future__ import annotations

import math

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import LTXVideoTransformerBlock

from ..core import MergePlan
from .base import Site
from .blocks import BlockAdapter, all_levels
from .hooks import rows_of_kept


def ltx_sites(model: torch.nn.Module) -> list[Site]:
    return [Site(f"transformer_blocks.{i}", block, model, 1) for i, block in enumerate(model.transformer_blocks)
            if isinstance(block, LTXVideoTransformerBlock)]


def packed_video_grid(model: torch.nn.Module, hidden: torch.Tensor, arguments: dict) -> tuple[int, int, int]:
    """(frames, rows, cols) of the packed tokens, from the ``num_frames`` / ``height`` / ``width`` arguments."""
    sizes = [arguments.get(name) for name in ("num_frames", "height", "width")]
    if any(s is None for s in sizes):
        raise ValueError("token fusion reads LTX's token grid from num_frames, height and width; pass them (as "
                         "LTXPipeline does) rather than video_coords alone")
    grid = tuple(int(s) for s in sizes)
    n = hidden.shape[1]
    if math.prod(grid) != n:
        patch_t, patch = model.config.patch_size_t, model.config.patch_size
        grid = (grid[0] // patch_t, grid[1] // patch, grid[2] // patch)
    if math.prod(grid) != n:
        raise ValueError(f"num_frames x height x width = {sizes[0]}x{sizes[1]}x{sizes[2]} does not match the "
                         f"{n} tokens; token fusion needs the packed latent's own sizes (as LTXPipeline passes)")
    return grid


def per_token_modulation(value, plan: MergePlan):
    """``temb`` follows the kept tokens when it has one row per token ((B, N, 6D)), not when shared ((B, 1, 6D))."""
    if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[1] == plan.num_tokens > 1:
        return plan.take(value)
    return value




ADAPTER = BlockAdapter("ltx", (LTXVideoTransformer3DModel,), ltx_sites, packed_video_grid, all_levels, grid_rank=3,
                       rotary_attention=True, pipeline_sigmas=True,
                       self_attention_followers={"image_rotary_emb": rows_of_kept},
                       block_followers={"image_rotary_emb": rows_of_kept, "temb": per_token_modulation})
