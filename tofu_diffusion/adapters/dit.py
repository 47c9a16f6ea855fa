"""Patchified transformers: DiT (``DiTTransformer2DModel``) and PixArt (``PixArtTransformer2DModel``).

The denoiser receives the (B, C, H, W) latent and patchifies it with ``config.patch_size``, so its
token grid is (H / p, W / p). All blocks share that one grid (level 1) and are reduced by default.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock

from .base import Site
from .blocks import BlockAdapter, all_levels, patch_grid
from .hooks import key_mask_of_kept


def transformer_sites(model: torch.nn.Module) -> list[Site]:
    return [
        Site(f"transformer_blocks.{i}", block, model, 1)
        for i, block in enumerate(model.transformer_blocks)
        if isinstance(block, BasicTransformerBlock)
    ]


# PixArt's attention_mask over the latent's tokens reaches every block's self-attention: in block scope it
# follows the kept tokens (in sublayer scope merging self-attention under a mask is refused with a message).
ADAPTER = BlockAdapter("dit", (DiTTransformer2DModel, PixArtTransformer2DModel), transformer_sites, patch_grid,
                       all_levels, block_followers={"attention_mask": key_mask_of_kept})
