"""Flux.2: ``Flux2Transformer2DModel`` with double-stream ``Flux2TransformerBlock``s and single-stream
``Flux2SingleTransformerBlock``s.

The 2x2-packed latent's tokens lie on the grid of ``img_ids`` ((N, 4): image, row, col, layer); reference images
(Flux2Pipeline's ``image=``) follow the target's tokens with image index 10, 20, ... and are kept whole. The
rotary table (``image_rotary_emb``: (cos, sin), each (T + N, D)) covers [text; image], text first, and is one for
the batch, so a reduced block runs once per sample with its kept tokens' rows (``rotary.PerSampleRotaryBlockHook``).

* Double-stream blocks take text and image apart and return ``(text, image)``.
* Single-stream blocks receive the joint [text; image] sequence (``encoder_hidden_states=None``) and return it;
  the image is its last tokens.

The modulation is one per sample, shared by every block. Flux.2's single-stream attention fuses q, k, v and the
MLP's input into one projection; mctf reads its queries and keys from that projection's rows
(``FusedQueryKey``). Klein's reference KV cache (``kv_cache_mode``) is refused: it moves the references in and
out of the sequence between steps. ToDo is refused (``rotary_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock

from ..config import TokenFusionConfig
from .base import Site
from .blocks import all_levels, packed_ids_grid, self_attention, stream_sites
from .joint import JointBlockAdapter
from .planning import BlockState
from .registry import register
from .rotary import ROTARY_BLOCK_HOOK, PerSampleRotaryBlockHook, text_rows


def flux2_sites(model: torch.nn.Module) -> list[Site]:
    return stream_sites(model, Flux2TransformerBlock, Flux2SingleTransformerBlock)


def flux2_grid(model: torch.nn.Module, hidden: torch.Tensor, arguments: dict):
    if arguments.get("kv_cache_mode") is not None:
        raise ValueError(f"token fusion does not reduce {type(model).__name__} with its reference KV cache "
                         f"(kv_cache_mode={arguments['kv_cache_mode']!r}, Flux2KleinKVPipeline): the cache moves the "
                         f"reference tokens out of the sequence between steps. Use Flux2KleinPipeline, or remove "
                         f"token fusion for this pipeline")
    return packed_ids_grid(model, hidden, arguments)


class FusedQueryKey:
    """The query and key projections inside a fused ``to_qkv_mlp_proj`` (Flux.2's parallel single-stream
    attention), in the form mctf's informativeness estimate reads (``to_q``, ``to_k``, ``heads``, the qk norms)."""

    def __init__(self, attention: torch.nn.Module):
        self.attention = attention

    @property
    def heads(self) -> int:
        return self.attention.heads

    @property
    def norm_q(self):
        return self.attention.norm_q

    @property
    def norm_k(self):
        return self.attention.norm_k

    def _rows(self, x: torch.Tensor, part: int) -> torch.Tensor:
        projection, inner = self.attention.to_qkv_mlp_proj, self.attention.inner_dim
        rows = slice(part * inner, (part + 1) * inner)
        bias = None if projection.bias is None else projection.bias[rows]
        return F.linear(x, projection.weight[rows], bias)

    def to_q(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(x, 0)

    def to_k(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(x, 1)


@dataclass(frozen=True)
class Flux2Adapter(JointBlockAdapter):
    def dynamic_shift(self, scheduler, image_tokens: int, num_steps: int) -> float:
        """Flux2Pipeline's own empirical ``mu``, from the sequence length and the number of steps (at 1024x1024
        and 28 steps 2.15, a shift of e^2.15 = 8.6). Imported when asked: the pipeline module loads transformers."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_tokens, num_steps)

    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        single = isinstance(block, Flux2SingleTransformerBlock)
        attention = None
        if config.method == "mctf":
            attention = FusedQueryKey(block.attn) if single else self_attention(block)
        hook = PerSampleRotaryBlockHook(state, attention, self.image_output, "image_rotary_emb", text_rows,
                                        joint_sequence=single)
        register(block, hook, ROTARY_BLOCK_HOOK)


ADAPTER = Flux2Adapter("flux2", (Flux2Transformer2DModel,), flux2_sites, flux2_grid, all_levels, timestep_unit=1e-3,
                       packing=2, rotary_attention=True, pipeline_sigmas=True, reference_images=True)
