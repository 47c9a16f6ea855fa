"""``apply`` / ``remove`` / ``fused``: attach token fusion to a diffusers pipeline, denoiser or classifier.

This module only dispatches: the model's adapter (``adapters.adapter_for``) checks the request and
attaches the hooks; ``remove`` takes out exactly the hooks token fusion registered.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch

from .adapters import adapter_for
from .adapters.base import Patch
from .adapters.blocks import BlockAdapter
from .adapters.guidance import record_latent_batches, stop_recording
from .adapters.registry import unregister_all
from .adapters.steps import reference_to
from .config import TokenFusionConfig
from .core import switch_depth_from_gaps

logger = logging.getLogger("tofu_diffusion")

_HANDLE_ATTR = "_tofu_diffusion_handle"
# ToFu switch-depth calibration: merge from the first depth whose remaining layers' midpoint deviates from
# linear by at most half their output spread (gap <= 0.5). That is the break-even of the two choices: for two
# tokens whose outputs differ by D, keeping one (pruning) costs |D|^2 in squared error, their average costs
# |D|^2 / 2 + 2 |gap * D|^2, which is smaller exactly when gap < 0.5.
SWITCH_TOLERANCE = 0.5
_DENOISER_NAMES = ("unet", "transformer")
# A second denoiser that takes over part of the steps (Wan 2.2 A14B: the low-noise ones): patched alongside.
_SECOND_STAGE_NAMES = ("transformer_2",)


class TokenFusionHandle:
    """What ``apply`` attached: the config, the reduced blocks, and per-block token counts."""

    def __init__(self, model: torch.nn.Module, config: TokenFusionConfig, family: str, patch: Patch):
        self.model = model
        self.config = config
        self.family = family
        self.blocks = patch.blocks
        self._counts = patch.counts
        self._undo = patch.undo
        self.stages: list[TokenFusionHandle] = []  # the handles of a pipeline's second-stage denoisers
        self.owner: TokenFusionHandle = self  # a second stage's handle: the pipeline's first-stage handle
        self._scheduler = None  # the scheduler= given to apply, for re-applying the same patch
        self._through = None  # a reference to the pipeline it was applied through (None: the model itself)

    @property
    def pipeline(self):
        """The pipeline this patch was applied through (it reads its steps there), or None."""
        return None if self._through is None else self._through()

    def _adopt(self, other: "TokenFusionHandle") -> None:
        """Become ``other``'s patch (re-applied with this handle's config), so a caller's handle stays live; the
        stages' handles (matched by model) too."""
        self.blocks, self._counts, self._undo = other.blocks, other._counts, other._undo
        self._through, self._scheduler = other._through, other._scheduler
        setattr(self.model, _HANDLE_ATTR, self)
        mine = {id(stage.model): stage for stage in self.stages}
        self.stages = [mine[id(new.model)] if id(new.model) in mine else new for new in other.stages]
        for stage, new in zip(self.stages, other.stages):
            if stage is not new:
                stage._adopt(new)
            stage.owner = self

    def token_counts(self) -> dict[str, tuple[int, int]]:
        """(tokens in, tokens out) of each reduced block (classifiers: each layer) in its latest call."""
        if self._counts is not None:
            return dict(self._counts())
        return {b.name: b.last_tokens for b in self.blocks if b.last_tokens is not None}

    def removed_share(self) -> Optional[float]:
        """Diffusion models: the share of the reduced blocks' tokens (``todo``: keys) removed over every call
        since ``apply`` or ``reset_counts()``; None before any. With ``threshold=`` it is what the content
        allowed; with a ratio, the ratio where every reduced block ran reduced."""
        totals = [b.totals for b in self.blocks if hasattr(b, "totals")]
        seen = sum(t[0] for t in totals)
        return None if not seen else 1.0 - sum(t[1] for t in totals) / seen

    def reset_counts(self) -> None:
        """Start ``removed_share()`` afresh."""
        for block in self.blocks:
            if hasattr(block, "totals"):
                block.totals[:] = [0, 0]

    def last_plans(self) -> dict[str, tuple]:
        """Diffusion models: ``{block: (plan, (rows, cols))}``, each reduced block's merge plan of its latest
        call and the token grid it was computed on (plan None where nothing was merged; ``todo`` merges
        nothing). ``plan.assignment`` (B, N) maps every token, row-major on the grid, to its group."""
        if not all(hasattr(b, "last_plan") for b in self.blocks):
            raise ValueError("classifiers reduce tokens for good; their plans are not kept (see token_counts())")
        return {b.name: (b.last_plan, b.grid.latest) for b in self.blocks}

    @property
    def schedule(self) -> Optional[list[int]]:
        """Classifiers: the tokens each layer removes (after capping)."""
        return [b.removed for b in self.blocks] if all(hasattr(b, "removed") for b in self.blocks) else None

    def remove(self) -> None:
        """Remove this patch; a stale handle (token fusion was applied again since) is refused."""
        if getattr(self.model, _HANDLE_ATTR, None) is not self:
            raise ValueError("this handle is stale: token fusion was removed or applied again since; remove the "
                             "current patch with tofu.remove(model) or the handle the latest apply returned")
        remove(self.model)

    def __repr__(self) -> str:
        return (
            f"TokenFusionHandle({type(self.model).__name__}, family={self.family}, method={self.config.method}, "
            f"ratio={self.config.ratio}, schedule={self.config.schedule}, blocks={len(self.blocks)})"
        )


def denoiser_of(model_or_pipeline) -> torch.nn.Module:
    """The denoiser of a pipeline (``unet`` or ``transformer``), or the model itself."""
    if isinstance(model_or_pipeline, torch.nn.Module):
        return model_or_pipeline
    for name in _DENOISER_NAMES:
        denoiser = getattr(model_or_pipeline, name, None)
        if isinstance(denoiser, torch.nn.Module):
            return denoiser
    components = getattr(model_or_pipeline, "components", None)
    listed = ", ".join(f"{k}={type(v).__name__}" for k, v in (components or {}).items()) or "none"
    raise TypeError(
        f"{type(model_or_pipeline).__name__} is neither a torch module nor a pipeline with a `unet` or "
        f"`transformer` component (components: {listed}); pass the denoiser model itself"
    )


def _model_of(model_or_pipeline) -> torch.nn.Module:
    """The module to patch: a model as given, or a pipeline's denoiser."""
    return model_or_pipeline if isinstance(model_or_pipeline, torch.nn.Module) else denoiser_of(model_or_pipeline)


def family_of(model_or_pipeline) -> str:
    """The adapter family of a pipeline's denoiser or a model ("unet", "dit", "sd3", "flux" or "vit"): presets
    are per family."""
    return adapter_for(_model_of(model_or_pipeline)).family


def _scheduling(model_or_pipeline, scheduler):
    """What the hooks read each call's step from: an explicit scheduler, else the pipeline (its scheduler is
    read at every call, so one swapped after ``apply`` is followed), else nothing (a bare model)."""
    if scheduler is not None:
        if not hasattr(scheduler, "timesteps"):
            raise TypeError(f"scheduler= takes a diffusers scheduler (with timesteps), got {type(scheduler).__name__}")
        return scheduler
    return None if isinstance(model_or_pipeline, torch.nn.Module) else model_or_pipeline


def _prepare(model_or_pipeline, config: Optional[TokenFusionConfig], options: dict):
    """(model, adapter, resolved config, what the adapter checked): everything that can refuse, touching nothing."""
    config = TokenFusionConfig.from_kwargs(config, **options)
    model = _model_of(model_or_pipeline)
    adapter = adapter_for(model)
    config = config.resolve(adapter.family)
    return model, adapter, config, adapter.check(model, config)


def apply(model_or_pipeline, config: Optional[TokenFusionConfig] = None, *, scheduler=None,
          **options) -> TokenFusionHandle:
    """Attach token fusion to a diffusers pipeline or denoiser, or a ViT/DeiT classifier. Returns a handle.

    ``config`` is a :class:`TokenFusionConfig`; keyword ``options`` build one or override its fields.
    Levers left unset come from the config's preset for the model's family (``TokenFusionConfig.resolve``);
    ``handle.config`` is the resolved config. Applying again replaces the previous configuration cleanly.

    Schedules are read on the pipeline's own steps (``schedule_axis="steps"``): applied to a pipeline, the
    hooks ask its scheduler; applied to a bare denoiser, pass the ``scheduler`` that will drive it.
    """
    return _apply(model_or_pipeline, config, scheduler, None, options)


def _apply(model_or_pipeline, config, scheduler, through, options) -> TokenFusionHandle:
    """``apply``; ``through``: the pipeline a bare denoiser belongs to, whose steps and batches it reads (a scoped
    patch on one part of a patched pipeline)."""
    requested = config
    model, adapter, config, checked = _prepare(model_or_pipeline, requested, options)
    stages = [_prepare(stage, requested, options) for stage in _second_stages(model_or_pipeline, model)]
    if through is None and not isinstance(model_or_pipeline, torch.nn.Module):
        through = model_or_pipeline
    scheduling = _scheduling(through or model_or_pipeline, scheduler)
    for target in [model] + [stage[0] for stage in stages]:
        if getattr(target, _HANDLE_ATTR, None) is not None:
            logger.info("token fusion was already applied to %s; replacing it", type(target).__name__)
            remove(target)
    if through is not None:
        record_latent_batches(through)
    handle = _attach(model, adapter, config, checked, scheduling, through, scheduler)
    try:
        handle.stages = [_attach(*stage, scheduling, through, scheduler) for stage in stages]
    except Exception:
        remove(model)
        raise
    for stage in handle.stages:
        stage.owner = handle
    return handle


def _attach(model, adapter, config, checked, scheduling, through, scheduler) -> TokenFusionHandle:
    try:
        patch = adapter.attach(model, config, checked, scheduling)
    except Exception:
        unregister_all(model)
        if through is not None:
            _stop_recording_if_unused(through)
        raise
    handle = TokenFusionHandle(model, config, adapter.family, patch)
    handle._through = None if through is None else reference_to(through)
    handle._scheduler = scheduler
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def _stop_recording_if_unused(pipeline) -> None:
    """The pipeline's ``prepare_latents`` is its own again once none of its denoisers is patched."""
    parts = [getattr(pipeline, name, None) for name in _DENOISER_NAMES + _SECOND_STAGE_NAMES]
    if not any(getattr(part, _HANDLE_ATTR, None) is not None for part in parts):
        stop_recording(pipeline)


def _second_stages(model_or_pipeline, model: torch.nn.Module) -> list[torch.nn.Module]:
    if isinstance(model_or_pipeline, torch.nn.Module):
        return []
    stages = [getattr(model_or_pipeline, name, None) for name in _SECOND_STAGE_NAMES]
    return [stage for stage in stages if isinstance(stage, torch.nn.Module) and stage is not model]


def explain(model_or_pipeline, config: Optional[TokenFusionConfig] = None, *, num_inference_steps: int,
            height: Optional[int] = None, width: Optional[int] = None, num_frames: Optional[int] = None,
            mu: Optional[float] = None, scheduler=None, **options):
    """What a configuration will do in one call of ``num_inference_steps`` at ``height`` x ``width`` pixels (and
    ``num_frames`` for video; None: the pipeline's defaults), before it runs: per step the ratio, the reduced
    blocks' token counts and the share of the transformer blocks' multiply-adds saved. ``print()`` the result.

    The configuration is ``config`` and ``options`` resolved as ``apply`` would, or, with neither, the one
    applied now (else the default). ``mu``: a dynamically shifting scheduler's shift (default: computed from
    the image's token count, as Flux's pipeline does). Nothing is attached and the scheduler is not touched.
    """
    from .explanation import explain_call

    handle = handle_of(model_or_pipeline)
    if config is None and not options and handle is not None:
        config = handle.config
    model, adapter, config, checked = _prepare(model_or_pipeline, config, options)
    if not isinstance(adapter, BlockAdapter):
        raise TypeError("explain describes the steps of a diffusion pipeline call; a classifier's per-layer token "
                        "counts are in tofu.apply(model).schedule")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    source = _scheduling(model_or_pipeline, scheduler)
    pipeline = model_or_pipeline if source is model_or_pipeline else _SchedulerOnly(source)
    return explain_call(pipeline, model, adapter, config, checked, num_inference_steps, height, width, mu,
                        num_frames)


class _SchedulerOnly:
    """A bare model with its scheduler given: the pipeline-shaped view explain reads."""

    vae_scale_factor = 8  # every diffusers latent pipeline's VAE (SD, SDXL, SD3, Flux before its 2x2 packing)

    def __init__(self, scheduler):
        self.scheduler = scheduler


def _target_of(model_or_pipeline) -> torch.nn.Module:
    if isinstance(model_or_pipeline, torch.nn.Module) and getattr(model_or_pipeline, _HANDLE_ATTR, None) is not None:
        return model_or_pipeline
    return denoiser_of(model_or_pipeline)


def remove(model_or_pipeline) -> None:
    """Remove token fusion; the model behaves exactly as before ``apply``."""
    model = _target_of(model_or_pipeline)
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError(f"token fusion is not applied to this {type(model).__name__}; nothing to remove")
    unregister_all(model)
    if handle._undo is not None:
        handle._undo()
    delattr(model, _HANDLE_ATTR)
    for stage in handle.stages:
        if getattr(stage.model, _HANDLE_ATTR, None) is stage:
            remove(stage.model)
    if handle.pipeline is not None:
        _stop_recording_if_unused(handle.pipeline)


def handle_of(model_or_pipeline) -> Optional[TokenFusionHandle]:
    """The active handle, or None when token fusion is not applied."""
    return getattr(_target_of(model_or_pipeline), _HANDLE_ATTR, None)


def calibrate_switch_depth(model, sample_inputs, tolerance: float = SWITCH_TOLERANCE) -> int:
    """ToFu's switch depth from its own criterion, for ``TokenFusionConfig(method="tofu", switch_depth=...)``.

    For each depth ``d`` it measures how far the layers from ``d`` to the end are from linear between the
    hidden states of the sample inputs (``core.interpolation_gap``: a few forward passes), and returns the
    first depth whose gap is at most ``tolerance``: tokens are pruned before it and merged with MLERP from
    it on (``len(layers)``: prune everywhere). Classifiers (ViT/DeiT); ``sample_inputs`` are pixel values of
    a handful of images (at least two). Run it on the unpatched model.
    """
    model = _model_of(model)
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise ValueError("calibrate on the unpatched model: call tofu.remove(model) first, then apply with the "
                         "returned switch_depth")
    gaps = adapter_for(model).linearity_profile(model, sample_inputs)
    return switch_depth_from_gaps(gaps, tolerance)


@contextlib.contextmanager
def fused(model_or_pipeline, config: Optional[TokenFusionConfig] = None, **options) -> Iterator[TokenFusionHandle]:
    """Scoped token fusion: ``with fused(pipe, method="mctf", ratio=0.5): ...``.

    On exit the model returns to what it was: unpatched, or patched as before - under the previous handle,
    which stays live (its ``token_counts()`` follow the next calls, its ``remove()`` works). A scope on one
    denoiser of a patched pipeline (``fused(pipe.transformer, ...)``) reads the pipeline's steps inside, and
    on exit the whole pipeline's patch comes back as it was applied: every stage, through the pipeline and
    with the ``scheduler=`` it was applied with.
    """
    previous = handle_of(model_or_pipeline)
    owner = None if previous is None else previous.owner
    through = None if owner is None or not isinstance(model_or_pipeline, torch.nn.Module) else owner.pipeline
    handle = _apply(model_or_pipeline, config, None, through, options)
    try:
        yield handle
    finally:
        remove(model_or_pipeline)
        if owner is not None:
            target = owner.model if owner.pipeline is None else owner.pipeline
            owner._adopt(_apply(target, owner.config, owner._scheduler, None, {}))
