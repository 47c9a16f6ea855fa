"""Per-call state of a patched denoiser: what each caller's current step decided, and the token grid of its call.

State is kept per calling thread (``PerCaller``), so concurrent calls of one model never see each other's
steps or plans. Every state class has ``reset()``; the hooks that hold it implement diffusers'
``reset_state``, so ``HookRegistry.reset_stateful_hooks`` starts the next sampling run clean.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import TokenFusionConfig
from ..core import grid_partition, mix_key
from ..core.destinations import Key
from .callers import PerCaller
from .guidance import batch_of, is_guidance_pair
from .steps import StepLocator, StepPosition

logger = logging.getLogger("tofu_diffusion")


@dataclass(frozen=True)
class ImageLayout:
    """What a grid function reads from a denoiser's input: the grid of the image that is reduced, and how many
    tokens follow it in the image stream that are kept whole (reference images of an edit pipeline), with the
    grids of those references when they tile (``references``, in order: what ``reduce_references`` reduces).
    ``leading``: tokens before the grid's that are always kept whole (an image-to-video model's conditioning
    frame, which the model modulates by its position at the start of the stream)."""

    grid: tuple
    kept_whole: int = 0
    references: tuple = ()
    leading: int = 0


class GridRecord:
    """The token grid of a grid-owning module's current call, per caller: (rows, cols), (frames, rows, cols), ...
    and the tokens after the grid's that are kept whole (``ImageLayout``). With ``reduce_references`` the
    references' grids are planned too, each on its own, and nothing is kept whole."""

    def __init__(self, reduce_references: bool = False):
        self._layouts = PerCaller()
        self.reduce_references = reduce_references

    def set(self, layout) -> None:
        """``layout``: an ``ImageLayout``, or a grid alone (nothing kept whole)."""
        if not isinstance(layout, ImageLayout):
            layout = ImageLayout(layout)
        references = tuple(tuple(int(g) for g in grid) for grid in layout.references)
        if references and sum(math.prod(g) for g in references) != layout.kept_whole:
            raise ValueError(f"reference grids {references} do not cover the {layout.kept_whole} tokens after the "
                             f"image's")
        if self.reduce_references and layout.kept_whole and not references:
            raise ValueError(f"reduce_references=True, but the {layout.kept_whole} reference tokens after the image's "
                             f"do not tile a grid (their ids or shapes are not row-major); use "
                             f"reduce_references=False to keep them whole")
        self._layouts.set(ImageLayout(tuple(int(g) for g in layout.grid), int(layout.kept_whole), references,
                                      int(layout.leading)))

    def get(self) -> Optional[tuple[int, ...]]:
        """The reduced image's grid (the target's, in an edit pipeline)."""
        layout = self._layouts.get()
        return None if layout is None else layout.grid

    def grids(self) -> tuple[tuple[int, ...], ...]:
        """The grids planned, in sequence order: the image's, then each reference's with ``reduce_references``."""
        layout = self._layouts.get()
        if layout is None:
            return ()
        return (layout.grid,) + (layout.references if self.reduce_references else ())

    def leading(self) -> int:
        """Tokens before the grid's that the plan keeps whole (0 unless the model treats them specially)."""
        layout = self._layouts.get()
        return 0 if layout is None else layout.leading

    def planned_tokens(self) -> Optional[int]:
        """How many tokens the plan covers: the leading ones, then the grids' (None before a call)."""
        grids = self.grids()
        return self.leading() + sum(math.prod(g) for g in grids) if grids else None

    def kept_whole(self) -> int:
        """Tokens after the planned ones in the image stream that pass through unreduced (0 without references)."""
        layout = self._layouts.get()
        if layout is None or (self.reduce_references and layout.references):
            return 0
        return layout.kept_whole

    @property
    def latest(self) -> Optional[tuple[int, ...]]:
        """The grid of the latest call of any caller, for reports."""
        layout = self._layouts.latest
        return None if layout is None else layout.grid

    def reset(self) -> None:
        self._layouts = PerCaller()


def step_timestep(timestep: torch.Tensor) -> torch.Tensor:
    """The step's timestep from what the denoiser receives: one per sample (the first), or one per token (Wan 2.2
    TI2V gives a clean first frame t = 0): the largest, the step's own noise level."""
    return timestep.flatten()[0] if timestep.dim() < 2 else timestep.amax()


def _step_key(timestep) -> Key:
    """An integer key of the step's timestep (x1000, rounded), read where it lives: no host sync."""
    if timestep is None:
        return 0
    if isinstance(timestep, torch.Tensor):
        return (step_timestep(timestep).float() * 1000).round().long()
    return int(round(float(timestep) * 1000))


_COMPILE_NEEDS_A_SCHEDULER = (
    "token fusion with a ratio schedule (or plan_reuse_steps > 1, or unmerge_mode='cached') decides each step "
    "where the scheduler moves, and this compiled denoiser has no scheduler to follow (or its scheduler was "
    "replaced after apply): apply to the pipeline (or pass scheduler= to apply) after setting its scheduler, or "
    "use a constant ratio=..."
)


@dataclass
class Upcoming:
    """The decision for a caller's next denoiser calls, prepared eagerly where the scheduler moved
    (``steps.StepClock``): what a compiled call reads instead of the timestep's value."""

    ratio: float
    reuse: bool
    calls: int = 0  # denoiser calls made in this step so far


# More kinds of step than this (distinct ratios, times two with plan reuse) is warned of: each is a compiled graph.
COMPILED_KINDS_OF_STEP = 6

# The cached unmerge stores at most this share of the device's memory per denoiser call (unmerge_cache_gb unset).
CACHE_MEMORY_SHARE = 0.1


def device_memory(device: torch.device) -> Optional[int]:
    """Total memory of a CUDA device, or of the machine for the CPU, in bytes; None where it is not known."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None
    return None


@dataclass
class StepState:
    """What one caller's current denoising step decided: its ratio and the key of its random draws."""

    ratio: float
    key: Key = 0
    index: int = 0  # steps since this caller's sampling run started
    timestep: Optional[float] = None
    guidance_pairs: bool = False  # the batch is [uncond; cond] of one latent (guidance.py): one plan for both
    call_in_step: int = 0  # 0 for a step's first denoiser call, 1 for the second (true CFG's separate calls), ...
    reuse: bool = False  # blocks reuse their plan of this call position's previous step (plan_reuse_steps)


class RunState:
    """State shared by all hooks of one patched denoiser; per-call parts are kept per caller (thread),
    so concurrent calls of one model never see each other's steps or plans."""

    def __init__(self, config: TokenFusionConfig, locator: Optional[StepLocator] = None):
        self.config = config
        self.locator = locator or StepLocator()
        self.warned_too_few = False  # "ratio removes no token" is said once per patch
        self.warned_no_steps = False  # "schedule read on the noise axis" is said once per patch
        self._fixed_partitions: dict = {}
        self._steps = PerCaller()  # of StepState
        self.blocks: list = []  # the reduced blocks' states (set by the adapter): new runs clear their updates
        self.warned_cache_limit = False  # "the cached unmerge would store too much" is said once per patch
        self._cache_limits: dict = {}
        self._upcoming = PerCaller()  # of Upcoming
        if config.unmerge_mode == "cached":
            self.cache_limit(torch.device("cpu"))
        self._clock = self.locator.clock() if self.needs_steps else None
        if self._clock is not None:
            self._clock.listen(self)
        kinds = len({ratio for _, ratio in config.schedule or ()}) * (2 if config.plan_interval > 1 else 1)
        if kinds > COMPILED_KINDS_OF_STEP:
            logger.warning("this schedule has %d kinds of step (ratios%s): under torch.compile each is a graph, past "
                           "dynamo's recompile limit of 8 a compiled denoiser falls back to eager; use at most %d "
                           "ratios", kinds, " x plan reuse" if config.plan_interval > 1 else "",
                           COMPILED_KINDS_OF_STEP)

    @property
    def needs_steps(self) -> bool:
        """Whether calls differ by step (a schedule, plan reuse, the cached unmerge), beyond their random key."""
        cfg = self.config
        return cfg.schedule is not None or cfg.plan_interval > 1 or cfg.unmerge_mode == "cached"

    def detach(self) -> None:
        """Stop following the scheduler's clock (the patch is removed)."""
        if self._clock is not None:
            self._clock.release(self)

    def prepare(self, position: StepPosition, starts_run: bool) -> None:
        """The scheduler moved to ``position`` (eagerly, outside any compiled region): decide the next calls."""
        cfg = self.config
        self._steps.set(self._steps.own() or StepState(cfg.ratio_at(None)))  # made here, not in a compiled call
        self._upcoming.set(Upcoming(cfg.ratio_at(position.progress(cfg.schedule_axis)),
                                    position.index % cfg.plan_interval != 0))
        if starts_run:
            self._start_run()

    def _start_run(self) -> None:
        """A new sampling run (seen by the clock, or by an eager call's step index): no update of the last run
        is a reference."""
        for block in self.blocks:
            block.forget_updates()

    def _begin_compiled_step(self, step: StepState) -> None:
        upcoming = self._upcoming.get()
        if upcoming is None or self._clock is None or self.locator.scheduler is not self._clock.scheduler():
            raise RuntimeError(_COMPILE_NEEDS_A_SCHEDULER)
        step.ratio, step.reuse, step.call_in_step = upcoming.ratio, upcoming.reuse, upcoming.calls
        upcoming.calls += 1

    @property
    def num_blocks(self) -> int:
        """Reduced blocks of this patch: the cached unmerge's memory estimate."""
        return len(self.blocks)

    def cache_limit(self, device: torch.device) -> Optional[int]:
        """The most bytes ``unmerge_mode="cached"`` stores per denoiser call on ``device`` (None: no limit known):
        ``unmerge_cache_gb``, else ``CACHE_MEMORY_SHARE`` of the device's memory."""
        if self.config.unmerge_cache_gb is not None:
            return int(self.config.unmerge_cache_gb * 2**30)
        if not self._cache_limits:  # every device's, read once at apply: a compiled call cannot ask the system
            devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
            self._cache_limits.update({d: self._share_of(d) for d in devices})
        if device not in self._cache_limits:  # per device: two GPUs of one machine may differ
            self._cache_limits[device] = self._share_of(device)
        return self._cache_limits[device]

    @staticmethod
    def _share_of(device: torch.device) -> Optional[int]:
        memory = device_memory(device)
        return None if memory is None else int(memory * CACHE_MEMORY_SHARE)

    def step(self) -> StepState:
        """The calling thread's current step (see ``PerCaller`` for threads that started none)."""
        state = self._steps.get()
        if state is None:
            state = self._steps.set(StepState(self.config.ratio_at(None), mix_key(self.config.seed)))
        return state

    @property
    def ratio(self) -> float:
        return self.step().ratio

    def begin_step(self, timestep, latent=None) -> None:
        """Derive this step's key from (seed, timestep): same call, same destinations. ``latent``: the
        denoiser's first input, whose batch says whether the call is a guidance pair (``guidance.py``).

        Only a schedule, plan reuse or the cached unmerge reads the timestep's value on the host, and only in an
        eager call: a compiled one reads the decision the scheduler's clock prepared (``prepare``), so that its
        graph has no sync and no per-step guard.
        """
        step = self._steps.set(self._steps.own() or StepState(self.config.ratio_at(None)))
        step.key = mix_key(self.config.seed, _step_key(timestep))
        cfg = self.config
        step.guidance_pairs = is_guidance_pair(cfg.share_guidance_plans, batch_of(latent),
                                               self.locator.prepared_batch())
        if not self.needs_steps:
            return
        if torch.compiler.is_compiling():
            return self._begin_compiled_step(step)
        value = None
        if timestep is not None:
            value = float(step_timestep(timestep).item() if isinstance(timestep, torch.Tensor) else timestep)
        position = self.locator.locate(value)
        previous = None if step.timestep is None else step.index
        same_step = value is not None and value == step.timestep
        if position.index is not None:
            same_step = same_step and position.index == step.index
            step.index = position.index
        elif not same_step:
            # No scheduler to ask: sampling runs go from high to low timesteps (in the scheduler's units; Z-Image
            # receives 1 - sigma, which rises), so a timestep that rises starts a new run and plan reuse never
            # carries a plan into the next call; an equal one is another call of the same step (true CFG).
            to_units = self.locator.to_scheduler_units
            new_run = value is None or step.timestep is None or to_units(value) > to_units(step.timestep)
            step.index = 0 if new_run and value is not None else step.index + 1
        step.call_in_step = step.call_in_step + 1 if same_step else 0
        if position.index is None:
            if cfg.schedule is not None and cfg.schedule_axis == "steps" and not self.warned_no_steps:
                self.warned_no_steps = True
                logger.warning("schedule_axis='steps' needs the pipeline's scheduler, and this denoiser was called "
                               "outside it (or patched without it): the schedule is read on the noise axis. Apply "
                               "to the pipeline, or pass scheduler= to apply")
        step.timestep = value
        step.ratio = cfg.ratio_at(position.progress(cfg.schedule_axis))
        # Decided here, once per call, so that the blocks read a few static values and never the step index
        # (under torch.compile every value a block reads is a guard: an index would recompile every step).
        step.reuse = step.index % cfg.plan_interval != 0
        if previous is None or step.index < previous or (step.index == previous and not same_step):
            self._start_run()

    @property
    def reuse_plans(self) -> bool:
        """Whether blocks reuse their previous step's plan in this step (``plan_reuse_steps``)."""
        return self.step().reuse

    def partition(self, grid: tuple[int, ...], device: torch.device, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.destination == "random":  # a draw per (seed, step, block): repeatable, also when recomputed
            return grid_partition(grid, cfg.stride, device=device, key=mix_key(self.step().key, salt))
        # Fixed destinations depend only on the grid: computed once per (grid, device).
        key = (grid, str(device))
        if key not in self._fixed_partitions:
            self._fixed_partitions[key] = grid_partition(grid, cfg.stride, position=cfg.destination_position,
                                                         device=device)
        return self._fixed_partitions[key]

    def reset(self) -> None:
        """Forget every caller's step (and the batch the pipeline prepared): the next call starts a sampling run."""
        self._steps.reset()
        self.locator.forget_batch()
