"""Model families. Each adapter says which models it patches, checks a request and attaches the hooks;
adding a family is one file here and one line in ``FAMILIES``."""

from __future__ import annotations

import torch

from . import (
    chroma,
    cogvideox,
    dit,
    flux,
    flux2,
    hunyuan_video,
    hunyuan_video15,
    ltx,
    qwen_image,
    sd3,
    unet,
    vit,
    wan,
    z_image,
)
from .base import Adapter, Patch, Site

FAMILIES: tuple[Adapter, ...] = (unet.ADAPTER, dit.ADAPTER, sd3.ADAPTER, flux.ADAPTER, wan.ADAPTER, ltx.ADAPTER,
                                  cogvideox.ADAPTER, hunyuan_video.ADAPTER, hunyuan_video15.ADAPTER, chroma.ADAPTER,
                                  qwen_image.ADAPTER, flux2.ADAPTER, z_image.ADAPTER, vit.ADAPTER)

SUPPORTED_MODELS = tuple(cls.__name__ for adapter in FAMILIES for cls in adapter.classes) + (
    "transformers ViT/DeiT classifiers",
)


def adapter_for(model: torch.nn.Module) -> Adapter:
    for adapter in FAMILIES:
        if adapter.matches(model):
            return adapter
    blocks: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("Block") and "Transformer" in name:
            blocks[name] = blocks.get(name, 0) + 1
    found = ", ".join(f"{name} x{count}" for name, count in sorted(blocks.items())) or "none"
    raise TypeError(
        f"tofu-diffusion cannot patch {type(model).__name__}: it is not one of the supported models "
        f"({', '.join(SUPPORTED_MODELS)}). Transformer blocks found in it: {found}. "
        f"Apply to a supported model or pipeline instead."
    )


__all__ = ["Adapter", "FAMILIES", "Patch", "SUPPORTED_MODELS", "Site", "adapter_for"]
