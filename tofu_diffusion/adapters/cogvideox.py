"""CogVideoX 1.0 / 1.5: ``CogVideoXTransformer3DModel`` and its ``CogVideoXBlock``s (video).

The (B, F, C, H, W) latent is patchified frame-major, then row-major, into a (F / pt, H / p, W / p) grid
(1.0: ``patch_size_t`` None, one frame per token; 1.5: 2), read at the model. Each block attends over
[text; video] jointly, runs its feed-forward on the same concatenation, and returns ``(video, text)``; it is
reduced whole, as ``joint.JointBlockAdapter`` does, with only the video tokens merged. The 5B models' rotary
table (``image_rotary_emb``: (cos, sin), each (N, D), video only, one for the batch) follows the kept tokens
per sample (``rotary.PerSampleRotaryBlockHook``); the 2B model adds sin-cos positions in the patch embedding
and has none. ToDo is refused: the attention projects text and video keys together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

from ..config import TokenFusionConfig
from .base import Site
from .blocks import all_levels, self_attention
from .joint import JointBlockAdapter
from .planning import BlockState
from .registry import register
from .rotary import ROTARY_BLOCK_HOOK, PerSampleRotaryBlockHook, no_rows_before_image


def cogvideox_sites(model: torch.nn.Module) -> list[Site]:
    return [Site(f"transformer_blocks.{i}", block, model, 1) for i, block in enumerate(model.transformer_blocks)
            if isinstance(block, CogVideoXBlock)]


def frames_first_grid(model: torch.nn.Module, hidden: torch.Tensor, arguments: dict) -> tuple[int, int, int]:
    """(frames, rows, cols) of a (B, F, C, H, W) latent patchified by ``patch_size`` (and ``patch_size_t``)."""
    if hidden.dim() != 5:
        raise ValueError(f"expected a (batch, frames, channels, height, width) latent, got {tuple(hidden.shape)}")
    patch, patch_t = model.config.patch_size, model.config.patch_size_t or 1
    frames, height, width = hidden.shape[1], hidden.shape[3], hidden.shape[4]
    if frames % patch_t or height % patch or width % patch:
        raise ValueError(f"latent {frames}x{height}x{width} (frames x height x width) does not tile into patches of "
                         f"{patch_t}x{patch}x{patch}; use a frame count and size the patch divides")
    return frames // patch_t, height // patch, width // patch


@dataclass(frozen=True)
class CogVideoXAdapter(JointBlockAdapter):
    def refuse(self, model_name: str, config: TokenFusionConfig) -> None:
        super().refuse(model_name, config)
        if config.method == "todo":
            raise ValueError(f"todo is not available for {model_name}: its attention projects the text and video "
                             f"tokens' keys together (and rotates the video's), so the video keys cannot be "
                             f"downsampled alone; use tome, tofu or mctf")

    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        attention = self_attention(block) if config.method == "mctf" else None
        hook = PerSampleRotaryBlockHook(state, attention, self.image_output, "image_rotary_emb", no_rows_before_image)
        register(block, hook, ROTARY_BLOCK_HOOK)


ADAPTER = CogVideoXAdapter("cogvideox", (CogVideoXTransformer3DModel,), cogvideox_sites, frames_first_grid,
                           all_levels, grid_rank=3, image_output=0)
