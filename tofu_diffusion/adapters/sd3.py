"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` and its ``JointTransformerBlock``s.

Each block attends over [image; text] jointly and returns ``(text, image)``; they are reduced as
``joint.JointBlockAdapter`` does. The last block (``context_pre_only``) returns no text; SD3.5's q/k norm and
image-only ``attn2`` run on the merged tokens like the rest of the block. There is no rotary embedding
(positions are added once in ``pos_embed``), so nothing else follows the kept tokens. The grid is the
latent's, patchified by 2, read at the model level.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock

from .base import Site
from .blocks import all_levels, patch_grid
from .joint import JointBlockAdapter


def joint_sites(model: torch.nn.Module) -> list[Site]:
    return [
        Site(f"transformer_blocks.{i}", block, model, 1)
        for i, block in enumerate(model.transformer_blocks)
        if isinstance(block, JointTransformerBlock)
    ]


ADAPTER = JointBlockAdapter("sd3", (SD3Transformer2DModel,), joint_sites, patch_grid, all_levels)
