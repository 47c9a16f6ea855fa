"""Z-Image: ``ZImageTransformer2DModel`` and the ``ZImageTransformerBlock``s of its main ``layers``.

The model takes a list of per-sample latents ((C, 1, H, W)), patchifies each 2x2 and runs its refiners on the
image and the caption apart (``noise_refiner``, ``context_refiner``: not reduced, they are short and each sees
one stream). The main layers then run on one unified sequence per sample, image first: [image tokens (row-major),
image padding to a multiple of 32, caption, caption padding], with a complex rotary table over every token, one
per sample (``freqs_cis``: (B, S, D/2)), and an attention mask (B, S) when the samples' lengths differ. Only the
image tokens are reduced: each layer runs on [merged image; everything after it as it is], the rotary rows and
the mask follow the kept tokens, and the image comes back as all N tokens. The pipeline passes t = 1 - sigma
(it rises over the run); the schedule reads it as 1000 * (1 - t). ToDo is refused (``rotary_attention``); the
omni mode (nested lists of images, per-token ``noise_mask``) is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

from ..config import TokenFusionConfig
from .base import Site
from .blocks import all_levels, self_attention
from .hooks import key_mask_of_kept, rows_of_kept
from .joint import JointBlockAdapter
from .planning import BlockState
from .registry import register
from .rotary import ROTARY_BLOCK_HOOK, PerSampleRotaryBlockHook, no_rows_before_image


def z_image_sites(model: torch.nn.Module) -> list[Site]:
    return [Site(f"layers.{i}", block, model, 1) for i, block in enumerate(model.layers)
            if isinstance(block, ZImageTransformerBlock)]


def z_image_grid(model: torch.nn.Module, images, arguments: dict) -> tuple[int, int]:
    """(rows, cols) of the image tokens, from the list of (C, 1, H, W) latents and the call's patch size."""
    name = type(model).__name__
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"{name} takes a list of (channels, 1, height, width) latents, got {type(images).__name__}")
    if isinstance(images[0], (list, tuple)):
        raise ValueError(f"token fusion does not reduce {name}'s omni mode (a list of images per sample, with "
                         f"per-token noise masks); call it with one latent per sample, as ZImagePipeline does")
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1:
        raise ValueError(f"the latents of one {name} call have different sizes {sorted(shapes)}; token fusion needs "
                         f"one image size per batch (diffusers' Z-Image pipelines give every sample the same)")
    _, frames, height, width = images[0].shape
    patch = int(arguments.get("patch_size") or 2)
    frame_patch = int(arguments.get("f_patch_size") or 1)
    if frames // frame_patch != 1:
        raise ValueError(f"token fusion reduces {name} on images (one frame per latent); got {frames} frames")
    if height % patch or width % patch:
        raise ValueError(f"a {height}x{width} latent does not tile into {name}'s {patch}x{patch} patches; use a size "
                         f"whose latent is a multiple of {patch}")
    return height // patch, width // patch


@dataclass(frozen=True)
class ZImageAdapter(JointBlockAdapter):
    def to_scheduler_units(self, timestep: float) -> float:
        return (1.0 - timestep) * 1000.0  # the pipeline passes (1000 - t) / 1000

    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        attention = self_attention(block) if config.method == "mctf" else None
        hook = PerSampleRotaryBlockHook(state, attention, 0, None, no_rows_before_image,
                                        followers={"freqs_cis": rows_of_kept, "attn_mask": key_mask_of_kept,
                                                   "noise_mask": key_mask_of_kept},
                                        joint_sequence=True, image_at="start")
        register(block, hook, ROTARY_BLOCK_HOOK)


ADAPTER = ZImageAdapter("z_image", (ZImageTransformer2DModel,), z_image_sites, z_image_grid, all_levels,
                        timestep_argument="t", packing=2, rotary_attention=True)
