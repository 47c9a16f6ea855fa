"""Which classifiers are patched (transformers' ViT and DeiT; timm refused) and their tokens."""

from __future__ import annotations

from typing import Optional

import torch

_LAYER_PARTS = ("attention", "layernorm_before", "layernorm_after", "mlp")


def backbone_of(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The ViTModel/DeiTModel inside ``model`` (or ``model`` itself); None if it is not one."""
    for candidate in (model, getattr(model, "vit", None), getattr(model, "deit", None)):
        if candidate is None:
            continue
        layers = getattr(candidate, "layers", None)
        embeddings = getattr(candidate, "embeddings", None)
        if (isinstance(layers, torch.nn.ModuleList) and len(layers) and embeddings is not None
                and hasattr(embeddings, "cls_token") and all(hasattr(layers[0], p) for p in _LAYER_PARTS)
                and hasattr(layers[0].attention, "k_proj")):
            return candidate
    return None


def is_timm_vit(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def num_protected(backbone: torch.nn.Module) -> int:
    """CLS, plus DeiT's distillation token: they sit first and are never merged."""
    return 2 if hasattr(backbone.embeddings, "distillation_token") else 1


def num_tokens(backbone: torch.nn.Module) -> int:
    patches = backbone.embeddings.patch_embeddings.num_patches
    return patches + num_protected(backbone)


def check_supported(model: torch.nn.Module) -> None:
    if is_timm_vit(model):
        raise TypeError(
            f"{type(model).__name__} is a timm model; tofu-diffusion reduces transformers' ViT/DeiT "
            "(ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification[WithTeacher]). "
            "Load the checkpoint with transformers instead, e.g. ViTForImageClassification.from_pretrained."
        )
