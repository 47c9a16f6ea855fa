"""Patchified transformers: DiT (``DiTTransformer2DModel``) and PixArt (``PixArtTransformer2DModel``).

The denoiser receives the (B, C, H, W) latent and patchifies it with ``config.patch_size``, so its
token grid is (H / p, W / p). All blocks share that one grid (level 1) and are reduced by default.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock

from .base import Site
from .blocks import BlockAdapter


def transformer_sites(model: torch.nn.Module) -> list[Site]:
    return [
        Site(f"transformer_blocks.{i}", block, model, 1)
        for i, block in enumerate(model.transformer_blocks)
        if isinstance(block, BasicTransformerBlock)
    ]


def patch_grid(model: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[int, int]:
    if hidden.dim() != 4:
        raise ValueError(f"expected a (batch, channels, height, width) latent, got {tuple(hidden.shape)}")
    p = model.config.patch_size
    if hidden.shape[-2] % p or hidden.shape[-1] % p:
        raise ValueError(
            f"latent {hidden.shape[-2]}x{hidden.shape[-1]} is not divisible by the patch size {p}; "
            f"use a resolution that is a multiple of {p * 8} pixels"
        )
    return hidden.shape[-2] // p, hidden.shape[-1] // p


def all_levels(sites: list[Site]) -> set[int]:
    return {site.level for site in sites}


ADAPTER = BlockAdapter("dit", (DiTTransformer2DModel, PixArtTransformer2DModel), transformer_sites, patch_grid,
                       all_levels)
