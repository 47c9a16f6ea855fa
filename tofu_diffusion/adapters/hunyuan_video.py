"""HunyuanVideo: ``HunyuanVideoTransformer3DModel``, its dual-stream ``HunyuanVideoTransformerBlock``s and
single-stream ``HunyuanVideoSingleTransformerBlock``s (video).

The (B, C, F, H, W) latent is patchified frame-major into a (F / pt, H / p, W / p) grid, read at the model.
Every block takes the video and text streams separately and returns ``(video, text)``; its attention joins
[video; text] (video first) under a mask over both (``attention_mask``: (B, 1, 1, N + T)), and applies one
rotary table to the video rows (``freqs_cis`` / ``image_rotary_emb``: (cos, sin), each (N, D), one for the
batch). Only video tokens are reduced: a block runs whole on the merged video tokens with every text token;
the mask is rebuilt for the reduced length (the kept tokens' entries, then the text's), and the rotary rows
follow the kept tokens per sample (``rotary.PerSampleRotaryBlockHook``).

Image-to-video with ``image_condition_type="token_replace"``: the first frame is the conditioning image, and
the token-replace blocks (``HunyuanVideoTokenReplace*``) modulate the first ``first_frame_num_tokens`` tokens of
the stream with t = 0, by position. Those tokens are kept whole and first (``ImageLayout.leading``), so the count
the model passes still selects exactly them and each keeps its own conditioning; the other frames are reduced
(``ratio`` applies to them). Merging them instead would give a clean image token the noisy frames' modulation.
ToDo is refused (``rotary_attention``): one rotary table covers queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTokenReplaceSingleTransformerBlock,
    HunyuanVideoTokenReplaceTransformerBlock,
    HunyuanVideoTransformerBlock,
)

from ..config import TokenFusionConfig
from ..core import MergePlan
from .arguments import Signature
from .base import Site
from .blocks import all_levels, self_attention, stream_sites, video_latent_grid
from .joint import JointBlockAdapter
from .planning import BlockState
from .registry import register
from .rotary import ROTARY_BLOCK_HOOK, PerSampleRotaryBlockHook, no_rows_before_image
from .state import ImageLayout

_BLOCKS = (HunyuanVideoTransformerBlock, HunyuanVideoSingleTransformerBlock)
_TOKEN_REPLACE = (HunyuanVideoTokenReplaceTransformerBlock, HunyuanVideoTokenReplaceSingleTransformerBlock)


def hunyuan_sites(model: torch.nn.Module) -> list[Site]:
    return stream_sites(model, _BLOCKS + _TOKEN_REPLACE, _BLOCKS + _TOKEN_REPLACE)


def video_first_mask(mask, plan: MergePlan):
    """A (B, 1, 1, N + T) mask over [video; text]: the kept video tokens' entries, then the text's."""
    n, kept = plan.num_tokens, plan.kept_idx.to(mask.device)
    b, middle = kept.shape[0], mask.shape[1:-1]
    index = kept.view(b, *([1] * len(middle)), -1).expand(b, *middle, kept.shape[1])
    video = mask[..., :n].expand(b, *middle, n).gather(-1, index)
    return torch.cat([video, mask[..., n:].expand(b, *middle, -1)], dim=-1)


def hunyuan_video_grid(model: torch.nn.Module, hidden: torch.Tensor, arguments: dict) -> ImageLayout:
    """The video's (frames, rows, cols) grid; under token replace, the first frame's tokens lead, kept whole."""
    return token_replace_layout(model, video_latent_grid(model, hidden, arguments))


def token_replace_layout(model: torch.nn.Module, grid: tuple[int, int, int]) -> ImageLayout:
    frames, rows, cols = grid
    if getattr(model.config, "image_condition_type", None) != "token_replace":
        return ImageLayout((frames, rows, cols))
    return ImageLayout((frames - 1, rows, cols), leading=rows * cols)


@dataclass(frozen=True)
class HunyuanVideoAdapter(JointBlockAdapter):
    image_output: int = 0  # blocks return (video, text)

    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        attention = self_attention(block) if config.method == "mctf" else None
        names = Signature(block).names
        rotary = "freqs_cis" if "freqs_cis" in names else "image_rotary_emb"
        hook = PerSampleRotaryBlockHook(state, attention, self.image_output, rotary, no_rows_before_image,
                                        followers={"attention_mask": video_first_mask})
        register(block, hook, ROTARY_BLOCK_HOOK)

    def planned_layout(self, model: torch.nn.Module, grid: tuple[int, ...]) -> ImageLayout:
        return token_replace_layout(model, grid)


ADAPTER = HunyuanVideoAdapter("hunyuan_video", (HunyuanVideoTransformer3DModel,), hunyuan_sites,
                              hunyuan_video_grid, all_levels, grid_rank=3, rotary_attention=True,
                              pipeline_sigmas=True)  # the pipeline passes linspace(1, 0, N + 1)[:-1]
