"""Wan 2.1 / 2.2: ``WanTransformer3DModel`` and its ``WanTransformerBlock``s (video).

The (B, C, F, H, W) latent is patchified by a Conv3d of ``patch_size`` (1, 2, 2) into frame-major, then
row-major tokens: a (F / pt, H / ph, W / pw) grid, read at the model. Each block is self-attention with a
rotary table (``rotary_emb``: (cos, sin), each (1, N, 1, head_dim), built once per forward), cross-attention
to the text (``attn2``; Wan 2.1 I2V's image embedding rides along with the text) and a feed-forward
(``ffn``); every modulation and gate is applied around the sublayers. Only video tokens are reduced; the text
is attended across and never merged.

* ``merge_scope="sublayers"``: each sublayer runs on merged tokens and is unmerged; the rotary rows
  of ``attn1`` follow the kept tokens (a merged group takes its destination's position). Modulation (Wan 2.2
  TI2V's per-token one included) stays on the full tokens, so every token keeps its own conditioning.
* ``merge_scope="block"`` (the default): the whole block runs on merged tokens; the rotary rows and a
  per-token modulation ((B, N, 6, D)) follow the kept tokens.

The default stride (2, 2) is one destination per 1 x 2 x 2 cell (within a frame); ``stride=(2, 2, 2)``
merges across frames too. ToDo is refused: the processor applies one rotary table to queries and keys
together, so the keys cannot be downsampled alone.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from .base import Site
from .blocks import BlockAdapter, all_levels, video_latent_grid
from .hooks import per_token_rows, rows_of_kept

SUBLAYERS = (
    ("attn1", "self_attention", "merge_self_attention"),
    ("attn2", "cross_attention", "merge_cross_attention"),
    ("ffn", "feed_forward", "merge_feed_forward"),
)


def wan_sites(model: torch.nn.Module) -> list[Site]:
    return [Site(f"blocks.{i}", block, model, 1) for i, block in enumerate(model.blocks)
            if isinstance(block, WanTransformerBlock)]


ADAPTER = BlockAdapter("wan", (WanTransformer3DModel,), wan_sites, video_latent_grid, all_levels, grid_rank=3,
                       rotary_attention=True, sublayer_attributes=SUBLAYERS,
                       self_attention_followers={"rotary_emb": rows_of_kept},
                       block_followers={"rotary_emb": rows_of_kept, "temb": per_token_rows})
