"""The classifier adapter: checks a request and attaches the layer hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import DIFFUSION_OPTIONS, TokenFusionConfig
from ...core import interpolation_gap
from ..base import Adapter, Patch
from ..registry import register
from .attention import FusedAttentionSwitch
from .hooks import (
    VIT_KEY_HOOK,
    VIT_LAYER_HOOK,
    VIT_MLP_HOOK,
    VIT_MODEL_HOOK,
    VIT_NORM_HOOK,
    VIT_SKIP_HOOK,
    KeyHook,
    LayerHook,
    MlpHook,
    NormAfterHook,
    SkipProjectionHook,
    ViTModelHook,
)
from .model import backbone_of, check_supported, is_timm_vit, num_protected, num_tokens
from .state import LayerState, ViTRun

FAMILY = "vit"


@dataclass(frozen=True)
class ClassifierAdapter(Adapter):
    """transformers' ViT and DeiT classifiers (and timm models, which it refuses with what to do instead)."""

    def matches(self, model: torch.nn.Module) -> bool:
        return backbone_of(model) is not None or is_timm_vit(model)

    def check(self, model: torch.nn.Module, config: TokenFusionConfig) -> torch.nn.Module:
        check_supported(model)
        if config.method == "todo" or config.schedule is not None or config.blocks is not None:
            raise ValueError("todo, schedule and blocks are for diffusion denoisers; classifiers take method "
                             "tome/tofu/mctf with ratio or r, and layers")
        other = config.options_set(DIFFUSION_OPTIONS)
        if other:
            raise ValueError(f"{', '.join(other)} {'is an option' if len(other) == 1 else 'are options'} of "
                             f"diffusion denoisers, which a classifier does not read; remove it (classifiers take "
                             f"method, ratio or r, layers, merge_mode, proportional_attention and token_order)")
        if config.ratio is not None and config.ratio > 0.5:
            raise ValueError(f"ratio {config.ratio} is more than a classifier layer can remove: the ratio is the share "
                             f"of each layer's tokens merged, and bipartite matching pairs at most half of them; give "
                             f"a ratio of at most 0.5, or r (tokens per layer)")
        backbone = backbone_of(model)
        n = len(backbone.layers)
        if config.layers is not None and max(config.layers) >= n:
            raise ValueError(f"layers {list(config.layers)} out of range: the model has {n} layers (0..{n - 1})")
        if isinstance(config.r, list) and len(config.r) > n:  # refused here, before a previous patch is removed
            raise ValueError(f"r lists {len(config.r)} layers but the model has {n}; give at most {n} values")
        return backbone

    def attach(self, model: torch.nn.Module, config: TokenFusionConfig, backbone: torch.nn.Module,
               scheduling=None) -> Patch:
        run, states, undo = attach(backbone, config)
        return Patch(states, counts=run.counts, undo=undo)

    @torch.no_grad()
    def linearity_profile(self, model: torch.nn.Module, sample_inputs: torch.Tensor) -> list[float]:
        """Interpolation gap of layers ``d..`` for each depth ``d``, between the hidden states of each sample image
        and the next one's (pixel values, at least two images). The final norm is left out: it is not linear
        on any input, so it would hide how linear the layers are."""
        check_supported(model)
        backbone = backbone_of(model)
        if not isinstance(sample_inputs, torch.Tensor) or sample_inputs.dim() != 4 or sample_inputs.shape[0] < 2:
            raise ValueError("sample_inputs must be pixel values (N, C, H, W) of at least two images")
        weight = backbone.embeddings.patch_embeddings.projection.weight
        hidden = backbone.embeddings(sample_inputs.to(weight.device, weight.dtype))
        entering = []
        for layer in backbone.layers:
            entering.append(hidden)
            hidden = layer(hidden)
        # Every suffix maps the states entering it to the same final states (layers act per image), so
        # only the interpolated inputs need new forward passes.
        outputs = (hidden, hidden.roll(1, dims=0))

        def suffix(depth):
            def run(h):
                for layer in backbone.layers[depth:]:
                    h = layer(h)
                return h
            return run

        return [interpolation_gap(suffix(d), h, h.roll(1, dims=0), outputs=outputs) for d, h in enumerate(entering)]


def attach(backbone: torch.nn.Module, config: TokenFusionConfig):
    """Register the hooks on ``backbone``; returns (run, layer states, what undoes the non-hook state)."""
    layers = backbone.layers
    run = ViTRun(config, num_protected(backbone), len(layers), num_tokens(backbone))
    register(backbone, ViTModelHook(run), VIT_MODEL_HOOK)
    # Every layer gets its hooks: which layers reduce depends on each input's token count.
    reduces = config.r is not None or (config.ratio or 0) > 0
    states = []
    for index, layer in enumerate(layers):
        # tome weighs by size; mctf by attention received times size (the plan's weights)
        mode = config.merge_mode_for(index, len(layers), tome_mode="size_weighted")
        state = LayerState(f"layers.{index}", index, run, mode)
        register(layer, LayerHook(state), VIT_LAYER_HOOK)
        if reduces and config.method == "mctf":
            for projection in (layer.attention.q_proj, layer.attention.k_proj):
                register(projection, SkipProjectionHook(state), VIT_SKIP_HOOK)
        elif reduces:
            register(layer.attention.k_proj, KeyHook(state, layer.attention.num_attention_heads), VIT_KEY_HOOK)
            register(layer.layernorm_after, NormAfterHook(state), VIT_NORM_HOOK)
            register(layer.mlp, MlpHook(state), VIT_MLP_HOOK)
        states.append(state)
    undo = None
    if reduces and config.method == "mctf":
        undo = FusedAttentionSwitch(backbone, layers, states).undo
    return run, states, undo


ADAPTER = ClassifierAdapter(FAMILY, ())
