"""Whether a denoiser call's batch is a classifier-free guidance pair, as its pipeline built it.

Pipelines that batch guidance run the denoiser on ``cat([x, x])``: the unconditional and conditional halves of the
same latents. Others call it once per half (Flux's true CFG, Wan, Qwen-Image) or have no guidance (distilled models,
Z-Image Turbo). Equal halves cannot tell these apart: two prompts drawn from one seed have them too. What does is
the batch: every latent pipeline prepares its latents with ``prepare_latents``, and a denoiser call on twice the
samples it prepared is a guidance pair. ``LatentBatchRecorder`` stands in for a pipeline's ``prepare_latents`` and
records that batch; it is installed by ``apply`` on a pipeline and taken out by ``remove``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .callers import PerCaller

_ATTRIBUTE = "prepare_latents"


class LatentBatchRecorder:
    """A pipeline's ``prepare_latents``, recording how many samples the latents it returns have (per caller)."""

    def __init__(self, original):
        self.original = original
        self.batch = PerCaller()

    def __call__(self, *args, **kwargs):
        prepared = self.original(*args, **kwargs)
        latents = prepared[0] if isinstance(prepared, (tuple, list)) and prepared else prepared
        if isinstance(latents, torch.Tensor) and latents.dim() > 0:
            self.batch.set(int(latents.shape[0]))
        return prepared

    def forget(self) -> None:
        """The pipeline call ended (diffusers resets its denoiser's stateful hooks): a later bare call is no pair."""
        self.batch.reset()


def record_latent_batches(pipeline) -> Optional[LatentBatchRecorder]:
    """The pipeline's recorder, installed on first use; None for a pipeline without ``prepare_latents``."""
    current = getattr(pipeline, _ATTRIBUTE, None)
    if isinstance(current, LatentBatchRecorder):
        return current
    if not callable(current):
        return None
    recorder = LatentBatchRecorder(current)
    setattr(pipeline, _ATTRIBUTE, recorder)  # an instance attribute: the class's method stays as it is
    return recorder


def stop_recording(pipeline) -> None:
    """Take the recorder out (the pipeline's own ``prepare_latents`` is the class's again)."""
    if isinstance(pipeline.__dict__.get(_ATTRIBUTE), LatentBatchRecorder):
        del pipeline.__dict__[_ATTRIBUTE]


def batch_of(latent) -> Optional[int]:
    """The samples of a denoiser's first input: a batched tensor, or a list of per-sample latents (Z-Image)."""
    if isinstance(latent, torch.Tensor) and latent.dim() > 0:
        return int(latent.shape[0])
    if isinstance(latent, (list, tuple)) and latent and all(isinstance(x, torch.Tensor) for x in latent):
        return len(latent)
    return None


def is_guidance_pair(setting: Optional[bool], batch: Optional[int], prepared: Optional[int]) -> bool:
    """``share_guidance_plans`` read for one call of ``batch`` samples when the pipeline prepared ``prepared``
    (None: no pipeline says): None shares where the batch is twice the prepared one, True on every even batch."""
    if setting is False or not batch or batch % 2:
        return False
    return True if setting else prepared is not None and batch == 2 * prepared
