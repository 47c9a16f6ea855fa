"""MCTF's fused attention on a classifier: a registered transformers attention function that applies the
fused attention matrix to the merged tokens' values, switched on per model and switched back on removal."""

from __future__ import annotations

import torch

from ...core import apply_fused_attention
from .state import LayerState

FUSED_ATTENTION = "tofu_diffusion_fused"
_STATE_ATTR = "_tofu_diffusion_layer_state"
_ORIGINAL_ATTR = "_tofu_diffusion_original_attention"


def fused_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: MCTF's fused attention where one is pending, else the original.

    The fused matrix is applied without being formed (``core.apply_fused_attention``), so no attention
    weights are returned for it."""
    state = getattr(module, _STATE_ATTR, None)
    scratch = None if state is None else state.scratch()
    if scratch is None or scratch.unmerged_attention is None:
        original = getattr(module, _ORIGINAL_ATTR)
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    probs = torch.nn.functional.dropout(scratch.unmerged_attention, p=dropout, training=module.training)
    out = apply_fused_attention(probs, scratch.plan, value)  # (B, H, K, D)
    return out.transpose(1, 2).contiguous(), None


def _register_attention_function() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FUSED_ATTENTION, fused_attention)


def _original_attention(config) -> callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.vit.modeling_vit import eager_attention_forward

    name = config._attn_implementation
    return eager_attention_forward if name in (None, "eager") else ALL_ATTENTION_FUNCTIONS[name]


class FusedAttentionSwitch:
    """Switches a model to the fused-attention function (MCTF); ``undo`` switches it back. An object, not a
    closure, so that a deep copy of the model undoes its own copy."""

    def __init__(self, backbone: torch.nn.Module, layers, states: list[LayerState]):
        _register_attention_function()
        self.backbone, self.layers = backbone, layers
        config = backbone.config
        self.previous = config._attn_implementation
        original = _original_attention(config)
        for layer, state in zip(layers, states):
            setattr(layer.attention, _ORIGINAL_ATTR, original)
            setattr(layer.attention, _STATE_ATTR, state)
        backbone.set_attn_implementation(FUSED_ATTENTION)

    def undo(self) -> None:
        self.backbone.set_attn_implementation(self.previous)
        for layer in self.layers:
            for attr in (_ORIGINAL_ATTR, _STATE_ATTR):
                if hasattr(layer.attention, attr):
                    delattr(layer.attention, attr)
