"""HunyuanVideo 1.5: ``HunyuanVideo15Transformer3DModel`` and its dual-stream ``HunyuanVideo15TransformerBlock``s
(video).

It differs from HunyuanVideo where token fusion looks: one stack of 54 dual-stream blocks and no single-stream
ones; the (B, 65, F, H, W) input is the noisy latent, the conditioning latent and its mask stacked on channels
(image-to-video conditions by channels, so its first frame needs no token of its own kept whole); the text
stream holds the SigLIP image, byT5 and MLLM tokens; and the mask covers the text alone ((B, T)), which the
attention processor pads for the video rows itself, so it fits any reduced length as it is. Blocks return
``(video, text)``; their attention joins [video; text] with one rotary table over the video rows
(``freqs_cis``: (cos, sin), each (N, D)), which follows the kept tokens per sample. Only video tokens are
reduced. ToDo is refused (``rotary_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15TransformerBlock

from ..config import TokenFusionConfig
from .base import Site
from .blocks import all_levels, self_attention, video_latent_grid
from .joint import JointBlockAdapter
from .planning import BlockState
from .registry import register
from .rotary import ROTARY_BLOCK_HOOK, PerSampleRotaryBlockHook, no_rows_before_image


def hunyuan15_sites(model: torch.nn.Module) -> list[Site]:
    return [Site(f"transformer_blocks.{i}", block, model, 1) for i, block in enumerate(model.transformer_blocks)
            if isinstance(block, HunyuanVideo15TransformerBlock)]


@dataclass(frozen=True)
class HunyuanVideo15Adapter(JointBlockAdapter):
    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        attention = self_attention(block) if config.method == "mctf" else None
        register(block, PerSampleRotaryBlockHook(state, attention, 0, "freqs_cis", no_rows_before_image),
                 ROTARY_BLOCK_HOOK)


ADAPTER = HunyuanVideo15Adapter("hunyuan_video15", (HunyuanVideo15Transformer3DModel,), hunyuan15_sites,
                                video_latent_grid, all_levels, grid_rank=3, rotary_attention=True, image_output=0,
                                pipeline_sigmas=True)  # the pipeline passes linspace(1, 0, N + 1)[:-1]
