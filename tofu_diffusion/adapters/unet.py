"""Stable Diffusion 1.x/2.x and SDXL: ``UNet2DConditionModel``.

Each ``Transformer2DModel`` inside the UNet receives a (B, C, H, W) feature map, so it defines the
token grid of its blocks exactly, for any latent size. Resolution levels are read from the UNet's
structure (down blocks, mid block, up blocks and their samplers), not guessed from token counts.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from .base import Site
from .blocks import BlockAdapter


def _blocks_of(stage: torch.nn.Module, prefix: str, level: int) -> list[Site]:
    sites = []
    for owner_name, owner in stage.named_modules():
        if not isinstance(owner, Transformer2DModel):
            continue
        for name, block in owner.named_modules():
            if isinstance(block, BasicTransformerBlock):
                full = ".".join(p for p in (prefix, owner_name, name) if p)
                sites.append(Site(full, block, owner, level))
    return sites


def unet_sites(unet: torch.nn.Module) -> list[Site]:
    sites: list[Site] = []
    level = 1
    for i, stage in enumerate(unet.down_blocks):
        sites += _blocks_of(stage, f"down_blocks.{i}", level)
        if getattr(stage, "downsamplers", None):
            level *= 2
    if unet.mid_block is not None:
        sites += _blocks_of(unet.mid_block, "mid_block", level)
    for i, stage in enumerate(unet.up_blocks):
        sites += _blocks_of(stage, f"up_blocks.{i}", level)
        if getattr(stage, "upsamplers", None):
            level //= 2
    return sites


def feature_map_grid(owner: torch.nn.Module, hidden: torch.Tensor, arguments: dict) -> tuple[int, int]:
    if hidden.dim() != 4:
        raise ValueError(f"expected a (batch, channels, height, width) feature map, got {tuple(hidden.shape)}")
    return hidden.shape[-2], hidden.shape[-1]


def highest_resolution_level(sites: list[Site]) -> set[int]:
    # SDXL has no attention at full resolution: its highest-resolution attention level is 2.
    return {min(site.level for site in sites)} if sites else set()


ADAPTER = BlockAdapter("unet", (UNet2DConditionModel,), unet_sites, feature_map_grid, highest_resolution_level)
