"""Switching one model between the variants a benchmark compares: unmodified, tomesd, or a tofu config."""

from __future__ import annotations

from typing import Union

import torch

import tofu_diffusion as tofu
from tofu_diffusion.api import denoiser_of

try:
    import tomesd
except ImportError:  # optional: compared only when installed
    tomesd = None

# None: the unmodified model; ("tomesd", ratio): tomesd 0.1.3's patch; or a TokenFusionConfig.
Variant = Union[None, tuple, tofu.TokenFusionConfig]


def use_variant(model, variant: Variant) -> None:
    """Put ``model`` (a pipeline, so that schedules read its scheduler's steps, or a model) in ``variant``,
    removing whatever variant it was in."""
    if tofu.handle_of(model) is not None:
        tofu.remove(model)
    denoiser = model if isinstance(model, torch.nn.Module) else denoiser_of(model)  # tomesd takes UNets
    if tomesd is not None:
        tomesd.remove_patch(denoiser)
    if isinstance(variant, tuple) and variant[0] == "tomesd":
        tomesd.apply_patch(denoiser, ratio=variant[1])
    elif variant is not None:
        tofu.apply(model, variant)
