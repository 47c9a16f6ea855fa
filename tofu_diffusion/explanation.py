"""``tofu.explain``: what a configuration will do in one pipeline call, before it runs.

Per step: the ratio the schedule gives (read on its axis exactly as the hooks read it), the token counts of
the reduced blocks, and the share of the transformer blocks' multiply-adds saved (``core.cost``, matching
included); then the whole call's share and the speedup it would give if time followed multiply-adds.
Nothing is attached and nothing runs: the scheduler's timesteps come from a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .adapters.blocks import BlockAdapter, BlockGeometry
from .adapters.steps import StepPosition, preview_timesteps
from .config import TokenFusionConfig
from .core import block_flops, cells, downsampled_size, grid_text, matching_flops, num_tokens, reduction_pays


@dataclass
class StepPlan:
    index: int
    timestep: float
    progress: float  # on the config's schedule axis
    ratio: float
    tokens: tuple[int, int]  # (in, out) of each reduced block at full resolution (todo: keys and values out)
    flops_saved: float  # share of the transformer blocks' multiply-adds saved in this step


@dataclass
class Explanation:
    model: str
    family: str
    config: TokenFusionConfig
    latent: tuple[int, ...]  # (height, width), or (frames, height, width) for video
    blocks: list[BlockGeometry]
    steps: list[StepPlan]
    stored_bytes: int = 0  # the cached unmerge's stored updates, per sample and denoiser call

    @property
    def reduced_steps(self) -> int:
        return sum(step.flops_saved > 0 for step in self.steps)

    @property
    def flops_saved(self) -> float:
        """Share of the call's transformer-block multiply-adds saved (every step costs the same unreduced)."""
        return sum(step.flops_saved for step in self.steps) / max(1, len(self.steps))

    @property
    def ideal_speedup(self) -> float:
        """The call's speedup if its time followed the transformer blocks' multiply-adds."""
        return 1.0 / max(1e-9, 1.0 - self.flops_saved)

    def __str__(self) -> str:
        cfg = self.config
        reduced = [b for b in self.blocks if b.reduced]
        axes = " (frames x height x width)" if len(self.latent) == 3 else ""
        lines = [
            f"{self.model} ({self.family}): {cfg.method}, "
            + (f"ratio {cfg.ratio:g} at every step" if cfg.schedule is None else
               "schedule " + ", ".join(f"{r:g} from {p:g}" for p, r in cfg.schedule) + f" (axis: {cfg.schedule_axis})")
            + (f", unmerge: cached ({_size(self.stored_bytes)} stored per sample and denoiser call)"
               if cfg.unmerge_mode == "cached" else "")
            + (f", a plan every {cfg.plan_interval} steps" if cfg.plan_interval > 1 else ""),
            f"{len(self.steps)} steps, latent {grid_text(self.latent)}{axes}; {len(reduced)} of {len(self.blocks)} "
            f"blocks reduced ({', '.join(sorted({grid_text(b.grid) for b in reduced}))} tokens)",
            "",
            f"{'steps':>9}  {'timestep':>17}  {'progress':>11}  {'ratio':>5}  "
            f"{'keys per block' if cfg.method == 'todo' else 'tokens per block':>16}  {'saved':>5}",
        ]
        for group in _runs(self.steps):
            first, last = group[0], group[-1]
            span = f"{first.index}" if first is last else f"{first.index}-{last.index}"
            times = f"{first.timestep:.1f}" if first is last else f"{first.timestep:.1f}-{last.timestep:.1f}"
            progress = f"{first.progress:.2f}" if first is last else f"{first.progress:.2f}-{last.progress:.2f}"
            n_in, n_out = first.tokens
            tokens = f"{n_in}" if n_in == n_out else f"{n_in} -> {n_out}"
            lines.append(f"{span:>9}  {times:>17}  {progress:>11}  {first.ratio:>5g}  {tokens:>16}  "
                         f"{first.flops_saved:>5.0%}")
        lines += ["", f"{self.reduced_steps} of {len(self.steps)} steps reduced; {self.flops_saved:.0%} of the "
                      f"transformer blocks' multiply-adds saved over the call (ideal speedup "
                      f"{self.ideal_speedup:.2f}x; measured speedups are lower: tofu-diffusion bench)"]
        if cfg.threshold is not None:
            lines.append(f"threshold {cfg.threshold:g}: the ratios and savings above are caps; how many tokens merge "
                         f"follows the content (handle.token_counts() after a call says what was removed)")
        return "\n".join(lines)


def _runs(steps: list[StepPlan]) -> list[list[StepPlan]]:
    """Consecutive steps with the same ratio, as one row each."""
    groups: list[list[StepPlan]] = []
    for step in steps:
        if groups and groups[-1][-1].ratio == step.ratio:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def step_savings(blocks: list[BlockGeometry], config: TokenFusionConfig, ratio: float,
                 stride: tuple[int, ...]) -> tuple[tuple[int, int], float]:
    """(tokens in, out) of the largest reduced block, and the share of all blocks' multiply-adds saved."""
    total = saved = 0
    largest = max((b for b in blocks if b.reduced), key=lambda b: b.tokens)
    shown = (largest.tokens, largest.tokens)
    for block in blocks:
        n, c = block.tokens, block.channels
        full = block_flops(n, c, block.parts)
        total += full
        if not block.reduced or ratio <= 0:
            continue
        if config.method == "todo":
            keys = num_tokens(downsampled_size(block.grid, ratio))
            if keys >= n:
                continue
            saved += full - block_flops(n, c, block.parts, key_tokens=keys)
            out = keys
        else:
            planned = num_tokens(block.grid)  # leading tokens are kept whole: ratio and matching are the grid's
            r = int(planned * ratio)
            num_dst = num_tokens(cells(block.grid, stride))
            if r == 0 or not reduction_pays(planned, c, r, num_dst, block.sublayers):
                continue
            saved += block_flops(n, c, block.sublayers) - block_flops(n - r, c, block.sublayers)
            saved -= matching_flops(planned, c, num_dst)
            out = n - r
        if block is largest:
            shown = (n, out)
    return shown, saved / max(1, total)


def latent_size(pipeline, model: torch.nn.Module, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """The denoiser's latent (height, width) for an image of ``height`` x ``width`` pixels (None: the default)."""
    scale = getattr(pipeline, "vae_scale_factor", None)
    if scale is None:
        vae = getattr(pipeline, "vae", None)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    default = getattr(pipeline, "default_sample_size", None) or getattr(model.config, "sample_size", None)
    if isinstance(default, (tuple, list)):
        default = default[0]
    if height is None or width is None:
        if default is None:
            raise ValueError(f"give height and width: {type(model).__name__} has no default sample size")
        height, width = height or default * scale, width or default * scale
    if height % scale or width % scale:
        raise ValueError(f"height and width must be multiples of the VAE's factor {scale}; got {height}x{width}")
    return height // scale, width // scale


def _first_attribute(owner, names: tuple[str, ...], default=None):
    for name in names:
        value = getattr(owner, name, None)
        if value is not None:
            return value
    return default


def _call_default(pipeline, name: str):
    """The default of the pipeline's ``__call__`` argument ``name`` (its config's ``name`` first), None if unset."""
    import inspect

    config = getattr(pipeline, "config", None)
    if hasattr(config, "get") and config.get(name) is not None:
        return config.get(name)
    try:
        parameter = inspect.signature(type(pipeline).__call__).parameters.get(name)
    except (AttributeError, TypeError, ValueError):  # not a callable pipeline (explain's scheduler-only view)
        parameter = None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def video_latent_size(pipeline, model: torch.nn.Module, height: Optional[int], width: Optional[int],
                      num_frames: Optional[int]) -> tuple[int, int, int]:
    """The denoiser's latent (frames, height, width) for ``num_frames`` frames of ``height`` x ``width`` pixels
    (None: the pipeline's defaults), through its VAE's spatial and temporal compression."""
    spatial = int(_first_attribute(pipeline, ("vae_scale_factor_spatial", "vae_spatial_compression_ratio",
                                              "vae_scale_factor"), 8))
    temporal = int(_first_attribute(pipeline, ("vae_scale_factor_temporal", "vae_temporal_compression_ratio"), 1))
    side = getattr(pipeline, "image_size", None)  # a pipeline of one fixed size (the bundled tiny-wan)
    height = height or _call_default(pipeline, "height") or _sample_side(model, "sample_height", spatial) or side
    width = width or _call_default(pipeline, "width") or _sample_side(model, "sample_width", spatial) or side
    num_frames = num_frames or _call_default(pipeline, "num_frames") or getattr(model.config, "sample_frames", None)
    if height is None or width is None or num_frames is None:
        raise ValueError(f"give height, width and num_frames: {type(model).__name__}'s pipeline has no default for "
                         f"{'num_frames' if num_frames is None else 'its size'}")
    if height % spatial or width % spatial:
        raise ValueError(f"height and width must be multiples of the VAE's factor {spatial}; got {height}x{width}")
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames - 1 must be a multiple of the VAE's temporal factor {temporal} (e.g. "
                         f"{4 * temporal + 1}); got {num_frames}")
    return (num_frames - 1) // temporal + 1, height // spatial, width // spatial


def _sample_side(model: torch.nn.Module, name: str, scale: int) -> Optional[int]:
    side = getattr(model.config, name, None)
    return None if side is None else int(side) * scale


def explain_call(pipeline, model: torch.nn.Module, adapter: BlockAdapter, config: TokenFusionConfig, sites,
                 num_inference_steps: int, height: Optional[int], width: Optional[int],
                 mu: Optional[float] = None, num_frames: Optional[int] = None) -> Explanation:
    """The plan of one call (see ``tofu.explain``)."""
    scheduler = getattr(pipeline, "scheduler", None)
    if scheduler is None:
        raise ValueError("explain needs the pipeline (or scheduler=): the steps come from its scheduler")
    if adapter.grid_rank == 3:
        latent = video_latent_size(pipeline, model, height, width, num_frames)
    elif num_frames is not None:
        raise ValueError(f"num_frames is for video pipelines; {type(model).__name__} makes images")
    else:
        latent = latent_size(pipeline, model, height, width)
    blocks = adapter.geometry(model, config, sites, latent)
    if getattr(scheduler.config, "use_dynamic_shifting", False) and mu is None:
        mu = adapter.dynamic_shift(scheduler, num_tokens(adapter.token_grid(model, latent)), num_inference_steps)
    timesteps = preview_timesteps(scheduler, num_inference_steps, mu, adapter.pipeline_sigmas)
    scale = float(getattr(scheduler.config, "num_train_timesteps", None) or 1000)
    steps = []
    for index, t in enumerate(timesteps.tolist()):
        position = StepPosition(index, len(timesteps), min(1.0, max(0.0, 1.0 - t / scale)))
        progress = position.progress(config.schedule_axis)
        ratio = config.ratio_at(progress)
        tokens, saved = step_savings(blocks, config, ratio, config.stride)
        steps.append(StepPlan(index, t, progress, ratio, tokens, saved))
    stored = 0
    if config.unmerge_mode == "cached":  # one update (tokens x width) per reduced block, in the model's dtype
        parameter = next(model.parameters(), None)
        size = parameter.element_size() if parameter is not None else 4
        stored = sum(b.tokens * b.channels for b in blocks if b.reduced) * size
    return Explanation(type(model).__name__, adapter.family, config, latent, blocks, steps, stored)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MB"
