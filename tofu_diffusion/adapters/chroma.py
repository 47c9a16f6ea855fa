"""Chroma: ``ChromaTransformer2DModel``, Flux-like double-stream ``ChromaTransformerBlock``s and single-stream
``ChromaSingleTransformerBlock``s.

Image tokens are the 2x2-packed latent's, on the grid of ``img_ids`` (as Flux). The rotary table
(``image_rotary_emb``: (cos, sin), each (T + N, D)) covers [text; image], text first, and is one for the batch;
the attention mask (``attention_mask``: (B, T + N)) covers the same sequence and each block makes it pairwise.
Only image tokens are reduced, each block run whole on the merged image tokens with every text token, once per
sample with the rotary rows of its kept tokens (``rotary.PerSampleRotaryBlockHook``); the mask keeps the text's
entries and takes the kept image tokens'.

* Double-stream blocks take text and image apart and return ``(text, image)``.
* Single-stream blocks take and return the joint [text; image] sequence: its last N tokens (N from the grid)
  are the image's, and only they are merged.

ToDo is refused (``rotary_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ChromaTransformer2DModel
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock, ChromaTransformerBlock

from ..config import TokenFusionConfig
from ..core import MergePlan
from .base import Site
from .blocks import all_levels, packed_ids_grid, self_attention, stream_sites
from .joint import JointBlockAdapter
from .planning import BlockState
from .registry import register
from .rotary import ROTARY_BLOCK_HOOK, PerSampleRotaryBlockHook, text_rows


def chroma_sites(model: torch.nn.Module) -> list[Site]:
    return stream_sites(model, ChromaTransformerBlock, ChromaSingleTransformerBlock)


def text_first_mask(mask, plan: MergePlan):
    """A (B, T + N) mask over [text; image]: the text's entries, then the kept image tokens'."""
    t = mask.shape[1] - plan.num_tokens
    return torch.cat([mask[:, :t].expand(plan.batch_size, -1), plan.take(mask[:, t:, None])[..., 0]], dim=1)


@dataclass(frozen=True)
class ChromaAdapter(JointBlockAdapter):
    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        attention = self_attention(block) if config.method == "mctf" else None
        single = isinstance(block, ChromaSingleTransformerBlock)
        hook = PerSampleRotaryBlockHook(state, attention, self.image_output, "image_rotary_emb",
                                        text_rows,
                                        followers={"attention_mask": text_first_mask}, joint_sequence=single)
        register(block, hook, ROTARY_BLOCK_HOOK)


ADAPTER = ChromaAdapter("chroma", (ChromaTransformer2DModel,), chroma_sites, packed_ids_grid, all_levels,
                        timestep_unit=1e-3, packing=2, rotary_attention=True, pipeline_sigmas=True)
