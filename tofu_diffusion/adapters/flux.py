"""Flux: ``FluxTransformer2DModel`` with double-stream ``FluxTransformerBlock``s and single-stream
``FluxSingleTransformerBlock``s.

Both kinds take text and image separately and return ``(text, image)``; their attention joins
[text; image] and applies rotary embeddings built once per forward from ``cat(txt_ids, img_ids)``. Only
image tokens are reduced: each block runs on the merged image tokens with every text token, and the
rotary rows follow the kept tokens (a merged group takes its destination's row), so every reduced token
keeps its position; the block returns all N image tokens. The grid is read from ``img_ids`` (column 1 =
row, column 2 = column of the packed 2x2 latent). Tokens off the main grid (Kontext's reference image,
``img_ids[:, 0] != 0``) are refused with a clear error rather than mis-placed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from ..config import TokenFusionConfig
from .base import Site
from .blocks import all_levels, packed_ids_grid, self_attention, stream_sites
from .joint import JointBlockAdapter
from .planning import BlockState
from .registry import register
from .rotary import ROTARY_BLOCK_HOOK, PerSampleRotaryBlockHook, text_rows


def flux_sites(model: torch.nn.Module) -> list[Site]:
    return stream_sites(model, FluxTransformerBlock, FluxSingleTransformerBlock)


@dataclass(frozen=True)
class FluxAdapter(JointBlockAdapter):
    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        attention = self_attention(block) if config.method == "mctf" else None
        hook = PerSampleRotaryBlockHook(state, attention, self.image_output, "image_rotary_emb", text_rows)
        register(block, hook, ROTARY_BLOCK_HOOK)


ADAPTER = FluxAdapter("flux", (FluxTransformer2DModel,), flux_sites, packed_ids_grid, all_levels, timestep_unit=1e-3,
                      packing=2, rotary_attention=True, pipeline_sigmas=True, reference_images=True)
