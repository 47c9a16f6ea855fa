"""Model families: each adapter finds its reducible blocks and how to read their token grid."""

from __future__ import annotations

import torch

from . import dit, unet
from .base import Adapter, Site

_FAMILIES = ((unet.SUPPORTED, unet.UNET_ADAPTER), (dit.SUPPORTED, dit.DIT_ADAPTER))

SUPPORTED_MODELS = tuple(cls.__name__ for classes, _ in _FAMILIES for cls in classes)


def adapter_for(model: torch.nn.Module) -> Adapter:
    for classes, adapter in _FAMILIES:
        if isinstance(model, classes):
            return adapter
    blocks: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("Block") and "Transformer" in name:
            blocks[name] = blocks.get(name, 0) + 1
    found = ", ".join(f"{name} x{count}" for name, count in sorted(blocks.items())) or "none"
    raise TypeError(
        f"tofu-diffusion cannot patch {type(model).__name__}: it is not one of the supported denoisers "
        f"({', '.join(SUPPORTED_MODELS)}). Transformer blocks found in it: {found}. "
        f"Apply to a supported model or pipeline instead."
    )


__all__ = ["Adapter", "Site", "SUPPORTED_MODELS", "adapter_for"]
