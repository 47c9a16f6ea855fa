"""Where a denoiser call sits in its sampling run, read from the pipeline's scheduler.

A ratio schedule is keyed on progress in [0, 1] (0 at pure noise, 1 at the clean image) on one of two axes
(``TokenFusionConfig.schedule_axis``):

* ``"steps"``: the share of this call's denoising steps already taken, ``index / len(scheduler.timesteps)``.
  The index is the scheduler's own (``step_index``, which a pipeline advances once per loop iteration, so
  two denoiser calls of one iteration - true CFG - are one step and a Heun scheduler's repeated timesteps
  do not restart the count), or, before the scheduler's first step, the position of the received timestep
  in ``scheduler.timesteps``.
* ``"noise"``: ``1 - t / num_train_timesteps`` of the timestep the denoiser receives, converted to the
  scheduler's units by the family's convention (Flux receives t / 1000).

At shift 1 both axes agree; a shifted scheduler (SD3: 3; Flux-dev at 1024 px: e^1.15) spends most of its
steps at high noise, so a schedule keyed on noise reduces far fewer of its steps.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .guidance import LatentBatchRecorder

logger = logging.getLogger("tofu_diffusion")


@dataclass
class StepPosition:
    """One denoiser call's place in its run: the step index and count (None when no scheduler says)."""

    index: Optional[int]
    count: Optional[int]
    noise_progress: Optional[float]  # 1 - t / num_train_timesteps, clamped to [0, 1]

    def progress(self, axis: str) -> Optional[float]:
        if axis == "steps" and self.index is not None and self.count:
            return self.index / self.count
        return self.noise_progress


class StepLocator:
    """Locates each denoiser call in the scheduler of the pipeline it was applied through.

    ``source`` is a pipeline (its ``scheduler`` is read at every call, so a scheduler swapped after
    ``apply`` is followed), a scheduler, or None (a bare denoiser: only the noise axis is known).
    ``to_scheduler_units`` maps the timestep the denoiser receives to the scheduler's (the family's
    convention).
    """

    def __init__(self, source=None, to_scheduler_units: Callable[[float], float] = float):
        self._source = None if source is None else reference_to(source)
        self.to_scheduler_units = to_scheduler_units
        self._host = HostTimesteps()

    @property
    def scheduler(self):
        source = self.pipeline
        if source is None:
            return None
        return getattr(source, "scheduler", source)

    def _recorder(self) -> Optional[LatentBatchRecorder]:
        recorder = getattr(self.pipeline, "prepare_latents", None)
        return recorder if isinstance(recorder, LatentBatchRecorder) else None

    def prepared_batch(self) -> Optional[int]:
        """How many samples the pipeline's latents have in its current call (None: no pipeline says)."""
        recorder = self._recorder()
        return None if recorder is None else recorder.batch.get()

    def forget_batch(self) -> None:
        recorder = self._recorder()
        if recorder is not None:
            recorder.forget()

    @property
    def pipeline(self):
        """The source of steps (a pipeline, a scheduler, or None)."""
        return None if self._source is None else self._source()

    @property
    def num_train_timesteps(self) -> float:
        """The scale of the scheduler's timesteps (progress = 1 - t / T); 1000 without a scheduler."""
        return _train_timesteps(self.scheduler)

    def clock(self) -> Optional["StepClock"]:
        """The clock of the scheduler this locator reads (installed on first use), or None without one."""
        scheduler = self.scheduler
        return None if scheduler is None or not hasattr(scheduler, "timesteps") else StepClock.of(scheduler)

    def timesteps(self) -> Optional[torch.Tensor]:
        timesteps = getattr(self.scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return None
        return self._host.of(timesteps)

    def locate(self, received: Optional[float]) -> StepPosition:
        """Where a call that received timestep ``received`` (a float, in the denoiser's units) sits."""
        if received is None:
            return StepPosition(None, None, None)
        t, scale = self.to_scheduler_units(received), self.num_train_timesteps
        noise = noise_progress(t, scale)
        timesteps = self.timesteps()
        if timesteps is None:
            return StepPosition(None, None, noise)
        tolerance = 0.01 * scale  # half-precision timesteps are off by a few units
        index = getattr(self.scheduler, "step_index", None)
        if not (isinstance(index, int) and 0 <= index < len(timesteps)
                and abs(float(timesteps[index]) - t) <= tolerance):
            distance = (timesteps - t).abs()
            index = int(distance.argmin())
            if float(distance[index]) > tolerance:  # called outside the scheduler's loop
                return StepPosition(None, None, noise)
        return StepPosition(index, len(timesteps), noise)


def noise_progress(timestep: float, scale: float) -> float:
    """``1 - t / num_train_timesteps`` of a timestep in the scheduler's units, clamped to [0, 1]."""
    return min(1.0, max(0.0, 1.0 - timestep / scale))


class HostTimesteps:
    """A scheduler's timesteps on the host, copied once per run (a new ``timesteps`` tensor is a new run)."""

    def __init__(self):
        self._cached: tuple = (None, None)  # (scheduler.timesteps object, its CPU copy)

    def of(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self._cached[0] is not timesteps:
            self._cached = (timesteps, timesteps.detach().float().cpu().flatten())
        return self._cached[1]


class _Ticking:
    """A scheduler method that tells its clock when it has run (an instance attribute over the class's)."""

    def __init__(self, original, clock: "StepClock", name: str):
        self.original, self.clock, self.name = original, clock, name
        self.__wrapped__ = original  # inspect.signature follows it (pipelines ask set_timesteps for "sigmas")

    def __call__(self, *args, **kwargs):
        result = self.original(*args, **kwargs)
        self.clock.tick(self.name)
        return result


class StepClock:
    """The next step of a scheduler, noted eagerly where the pipeline moves it (``set_timesteps``,
    ``set_begin_index``, ``step``): a compiled denoiser cannot read a timestep's value without a host sync, and
    every value its graph reads is a guard. Each listening patch prepares its next call's decision here
    (``RunState.prepare``), so that the compiled call reads a few static values (a ratio, a flag)."""

    _METHODS = ("set_timesteps", "set_begin_index", "step")

    def __init__(self, scheduler):
        self.scheduler = reference_to(scheduler)
        self.listeners: list = []
        self._host = HostTimesteps()
        self._index = 0  # the clock's own count, for schedulers without a step_index (DDIM)
        for name in self._METHODS:
            if callable(getattr(scheduler, name, None)):
                setattr(scheduler, name, _Ticking(getattr(scheduler, name), self, name))

    @classmethod
    def of(cls, scheduler) -> "StepClock":
        """The scheduler's clock, installed on first use."""
        ticking = vars(scheduler).get("step")
        return ticking.clock if isinstance(ticking, _Ticking) else cls(scheduler)

    def listen(self, run) -> None:
        if run not in self.listeners:
            self.listeners.append(run)

    def release(self, run) -> None:
        """Stop telling ``run``; the scheduler's own methods come back with the last listener."""
        if run in self.listeners:
            self.listeners.remove(run)
        scheduler = self.scheduler()
        if not self.listeners and scheduler is not None:
            for name in self._METHODS:
                ticking = vars(scheduler).get(name)
                if isinstance(ticking, _Ticking) and ticking.clock is self:  # (a copied patch's clock is not)
                    delattr(scheduler, name)

    def tick(self, method: str) -> None:
        """The scheduler ran ``method``: note where its next step is, and let the listeners decide it."""
        scheduler = self.scheduler()
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or not timesteps.numel():
            return
        values = self._host.of(timesteps)
        index = getattr(scheduler, "step_index", None)
        if index is None:
            index = self._index + 1 if method == "step" else getattr(scheduler, "begin_index", None) or 0
        self._index = index
        starts_run = method == "set_timesteps"
        value = float(values[index]) if index < len(values) else None
        for run in self.listeners:
            run.prepare(StepPosition(index, len(values), None if value is None else
                                     noise_progress(value, _train_timesteps(scheduler))), starts_run)


def _train_timesteps(scheduler) -> float:
    value = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    return float(value) if value else 1000.0


def reference_to(source):
    """A weak reference where the object allows one (the pipeline owns the model; its hooks must not own it back)."""
    try:
        return weakref.ref(source)
    except TypeError:
        return lambda: source


def linear_dynamic_shift(scheduler, image_tokens: int) -> float:
    """The ``mu`` Flux.1, Qwen-Image and Z-Image pipelines pass for ``image_tokens`` tokens: diffusers' own
    ``calculate_shift``, linear in the sequence length between the scheduler's (base_image_seq_len, base_shift)
    and (max_image_seq_len, max_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    return calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def preview_timesteps(scheduler, num_inference_steps: int, mu: Optional[float] = None,
                      pipeline_sigmas: bool = False) -> torch.Tensor:
    """The timesteps ``scheduler`` will run for ``num_inference_steps``, from a copy (the pipeline's own
    scheduler is left as it is). ``mu``: the dynamic shift a pipeline passes (Flux, Qwen-Image, LTX);
    ``pipeline_sigmas``: the pipeline passes sigmas ``linspace(1, 1/N, N)``, where the scheduler takes them."""
    import copy
    import inspect

    preview = copy.deepcopy(scheduler)
    options = {}
    parameters = inspect.signature(preview.set_timesteps).parameters
    if pipeline_sigmas and "sigmas" in parameters and not getattr(preview.config, "use_flow_sigmas", False):
        options["sigmas"] = torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps,
                                           dtype=torch.float64).tolist()
    if getattr(preview.config, "use_dynamic_shifting", False):
        if mu is None:
            raise ValueError(f"{type(scheduler).__name__} shifts dynamically: its shift depends on the image size; "
                             f"give height and width (or mu)")
        options["mu"] = mu
    if "device" in parameters:
        options["device"] = "cpu"
    preview.set_timesteps(num_inference_steps, **options)
    return preview.timesteps.detach().float().cpu()
