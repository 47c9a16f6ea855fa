"""Qwen-Image: ``QwenImageTransformer2DModel`` and its ``QwenImageTransformerBlock``s.

The 2x2-packed latent's tokens lie row-major on the grid of ``img_shapes`` (one ``(1, rows, cols)`` per image
of each sample). Each block takes image and text apart, attends over both jointly (the processor builds the
mask from the text's, so it adapts to any image length) and returns ``(text, image)``. Its rotary is a pair of
complex tables, ``(image (N, D/2), text (T, D/2))``, one for the batch. Only image tokens are reduced: a block
runs whole on the merged image tokens with every text token, once per sample with its kept tokens' rows of the
image table (``rotary.PerSampleRotaryBlockHook``); the per-token ``modulate_index`` (edit models' zero_cond_t:
0 for the target, 1 for a reference) follows the kept tokens. The pipeline passes t / 1000.

Reference images (Qwen-Image-Edit appends their tokens after the target's, ``img_shapes`` lists them after it)
are kept whole: only the target's tokens are merged, and the references' enter every block as they are, with
their own rotary rows and ``modulate_index``. ToDo is refused (``rotary_attention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

from ..config import TokenFusionConfig
from ..core import MergePlan
from .base import Site
from .blocks import all_levels, self_attention
from .hooks import sample_of
from .joint import JointBlockAdapter
from .planning import BlockState
from .registry import register
from .rotary import ROTARY_BLOCK_HOOK, PerSampleRotaryBlockHook, image_table_of_pair, no_rows_before_image
from .state import ImageLayout


def qwen_sites(model: torch.nn.Module) -> list[Site]:
    return [Site(f"transformer_blocks.{i}", block, model, 1) for i, block in enumerate(model.transformer_blocks)
            if isinstance(block, QwenImageTransformerBlock)]


def image_shapes_of_sample(shapes) -> list:
    """One sample's image shapes [target, references...] from ``img_shapes``, read as diffusers' rotary reads it:
    one entry per sample, each a list of shapes (edit pipelines: the target's, then the references') or a single
    ``(frames, rows, cols)`` (QwenImageControlNetPipeline passes them flat). Every sample must have the same."""
    entries = [entry if isinstance(entry, list) else [entry] for entry in shapes]
    first = [tuple(int(v) for v in shape) for shape in entries[0]]
    if any([tuple(int(v) for v in shape) for shape in entry] != first for entry in entries[1:]):
        raise ValueError(f"img_shapes differ between the samples of the batch ({list(shapes)}); token fusion needs "
                         f"one layout for the batch (diffusers' pipelines give every sample the same)")
    return first


def shapes_grid(model: torch.nn.Module, hidden: torch.Tensor, arguments: dict) -> ImageLayout:
    """(rows, cols) of the target image's tokens, from ``img_shapes`` (``image_shapes_of_sample``); the reference
    images' tokens (Qwen-Image-Edit appends them after the target's) are kept whole, or reduced on their own grids
    with ``reduce_references``."""
    shapes = arguments.get("img_shapes")
    if not shapes:
        raise ValueError(f"token fusion reads {type(model).__name__}'s token grid from img_shapes; pass img_shapes "
                         f"(as QwenImagePipeline does)")
    per_sample = image_shapes_of_sample(shapes)
    sizes = [math.prod(shape) for shape in per_sample]
    frames, rows, cols = per_sample[0]
    if sum(sizes) != hidden.shape[1] or frames != 1:
        raise ValueError(f"img_shapes {per_sample} (one sample's) does not match the {hidden.shape[1]} image tokens")
    references = tuple((r, c) for f, r, c in per_sample[1:])
    if any(f != 1 for f, _, _ in per_sample[1:]):
        references = ()  # a reference of several frames (layers): kept whole
    return ImageLayout((rows, cols), sum(sizes[1:]), references)


def per_token_index(value, plan: MergePlan):
    """``modulate_index`` (B, N): each kept token's (references' tokens are kept whole by the plan)."""
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == plan.num_tokens:
        return plan.take(value[..., None])[..., 0]
    return value


def sample_part(name: str, value, index: int, batch: int):
    """Sample ``index`` of a block argument; with zero_cond_t, ``temb`` stacks [B conditioned; B at t = 0]."""
    if name == "temb" and isinstance(value, torch.Tensor) and value.shape[0] == 2 * batch:
        return value[index::batch]
    return sample_of(value, index, batch)


@dataclass(frozen=True)
class QwenImageAdapter(JointBlockAdapter):
    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        attention = self_attention(block) if config.method == "mctf" else None
        hook = PerSampleRotaryBlockHook(state, attention, self.image_output, "image_rotary_emb", no_rows_before_image,
                                        followers={"modulate_index": per_token_index},
                                        select_rows=image_table_of_pair, sample=sample_part)
        register(block, hook, ROTARY_BLOCK_HOOK)


# config.patch_size (2) is the pipeline's own 2x2 packing: the transformer patchifies no further
ADAPTER = QwenImageAdapter("qwen_image", (QwenImageTransformer2DModel,), qwen_sites, shapes_grid, all_levels,
                           timestep_unit=1e-3, rotary_attention=True, pipeline_sigmas=True,
                           reference_images=True)

