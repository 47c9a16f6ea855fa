"""Typed, validated configuration, in the style of diffusers' ``*Config`` accelerators."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Union

from .core import DESTINATIONS, MERGE_MODES, grid_text, max_grid_ratio

METHODS = ("tome", "tofu", "mctf", "todo")
SCHEDULE_AXES = ("steps", "noise")  # see TokenFusionConfig.schedule_axis
UNMERGE_MODES = ("copy", "cached")  # see TokenFusionConfig.unmerge_mode
# Options that only one kind of model reads: set on the other kind, they are refused (not silently ignored).
DIFFUSION_OPTIONS = ("schedule", "schedule_axis", "blocks", "stride", "destination", "destination_position",
                     "max_downsample", "levels", "merge_self_attention", "merge_cross_attention",
                     "merge_feed_forward", "merge_scope", "info_queries", "plan_reuse_steps", "share_guidance_plans",
                     "threshold", "reduce_references", "unmerge_mode", "unmerge_cache_gb")
CLASSIFIER_OPTIONS = ("r", "layers", "proportional_attention", "token_order")
CLASSIFIER_METHODS = ("tome", "tofu", "mctf")  # todo needs a 2-D grid of every layer's tokens
MERGE_SCOPES = ("sublayers", "block")
CLASSIFIER_TOKEN_ORDERS = ("reference", "original")  # see TokenFusionConfig.token_order

# A ratio schedule over denoising progress: ((progress, ratio), ...), each ratio holding from its progress
# on; progress runs from 0 (pure noise) to 1 (the clean image) on the config's schedule_axis.
Schedule = Sequence[tuple[float, float]]
Blocks = Union[Sequence[int], slice]


def _as_float(value, name: str) -> float:
    """Python, NumPy and 0-d torch numbers alike (a bool is not a ratio)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        return float(value.item())
    raise ValueError(f"{name} must be a number, got {value!r}")


def _as_int(value, name: str, what: str = "an int") -> int:
    """Python, NumPy and 0-d torch integers alike; a float, a bool or a string is refused, not truncated."""
    if not isinstance(value, bool) and isinstance(value, numbers.Integral):
        return int(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and isinstance(value.item(), int) \
            and not isinstance(value.item(), bool):
        return int(value.item())
    raise ValueError(f"{name} must be {what}, got {value!r}")


def _as_ints(values, name: str, what: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be {what}, got {values!r}")
    return tuple(_as_int(v, name, what) for v in values)


def _as_bool(value, name: str, optional: bool = False) -> Optional[bool]:
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # Python or NumPy booleans only
        return bool(value)
    if optional and value is None:
        return None
    raise ValueError(f"{name} must be True or False{' (or None)' if optional else ''}, got {value!r}")


@dataclass
class TokenFusionConfig:
    """How tokens are reduced in each transformer block.

    Args:
        method: ``"tome"`` (ToMe/tomesd: bipartite matching, mean merge), ``"tofu"`` (ToMe matching;
            MLERP merges, pruning in blocks before ``switch_depth``), ``"mctf"`` (multi-criteria
            score, bidirectional matching, fusion weighted by attention received times size) or
            ``"todo"`` (ToDo: queries keep every token, keys and values are downsampled on the 2-D grid;
            nothing to unmerge). None: the preset's.
        ratio: share of each reduced block's tokens removed (``todo``: of its keys and values), in [0, 1),
            at every step and in every eligible block. 0 is exactly the original model. None (and no
            ``schedule``): the preset's schedule and blocks.
        schedule: the ratio as a function of denoising progress: ``((progress, ratio), ...)`` with
            increasing progress in [0, 1]; each ratio holds from its progress on (0 before the first).
            Progress runs from 0 (pure noise) to 1 (the clean image) on ``schedule_axis``. Give ``ratio`` or
            ``schedule``, not both.
        threshold: adaptive reduction (denoisers; tome, tofu, mctf): a source token merges only when its cosine
            similarity to its best destination is above this, in [-1, 1), so the number merged follows the
            content and the resolution; ``ratio`` (or the schedule) is then a cap. Alone (no ratio, no
            schedule), the cap is the stride's maximum at every step on every eligible block. To keep shapes
            static, a batch merges its sample with the fewest such tokens' count, rounded down to a multiple
            of 8 (of N / 64 on larger grids, so torch.compile sees at most ~64 sizes per block).
        schedule_axis: what a schedule's progress counts. ``"steps"`` (default): the share of this call's
            denoising steps done, ``step_index / num_steps`` from the pipeline's scheduler, so ``(0.7, 0.75)``
            reduces the last 30% of the steps whatever the scheduler's shift or step count. ``"noise"``:
            ``1 - t / num_train_timesteps`` of the timestep the denoiser receives, which a shifted scheduler
            (SD3, Flux, Wan) reaches late: the same schedule then reduces far fewer of its steps.
        blocks: diffusion models: which of the eligible blocks (execution order, after ``levels``) are
            reduced: indices (negative ones count from the end) or a ``slice``, e.g. ``slice(1, -1)``
            for all but the first and the last. None: all, or the preset's when neither ``ratio`` nor
            ``schedule`` is given.
        preset: the named defaults (``tofu_diffusion.presets``) that fill ``method``, the schedule and the
            blocks when they are not given: ``"quality"`` (default: faster with no visible loss),
            ``"balanced"``, ``"fast"`` or, on denoisers, ``"adaptive"`` (a similarity ``threshold``: the count
            follows the content and the resolution); chosen per model family from measured sweeps.
        merge_mode: override the method's merge mode for every block: ``"mean"``, ``"size_weighted"``,
            ``"mlerp"`` or ``"prune"``.
        stride: the cell of the token grid that holds one destination token: ``(sy, sx)`` (on a video, a
            cell within one frame) or ``(sf, sy, sx)`` for video grids (``(2, 2, 2)`` merges across frames).
        destination: ``"random"`` (a random position per cell, drawn from a generator seeded with
            ``seed`` and the step's timestep, so a seeded pipeline call is repeatable) or ``"fixed"``
            (``destination_position`` in every cell; 0 = top-left).
        max_downsample: UNets: reduce the attention levels whose downsampling factor is at most
            this (1 = full latent resolution, 2, 4, 8). None: the highest-resolution level that has
            attention (1 on SD 1.x/2.x, 2 on SDXL). Patchified transformers have one level (1).
        levels: explicit downsampling factors to reduce; takes precedence over ``max_downsample``.
        merge_self_attention / merge_cross_attention / merge_feed_forward: which sublayers of a
            block run on the reduced tokens (one matching per block serves all of them).
        merge_scope: ``"block"`` (default; measured fastest with tofu-diffusion bench on every architecture):
            merge once at the block input, run the whole block (norms, attention,
            cross-attention, feed-forward) on the reduced tokens, and return
            ``x + unmerge(block(merge(x)) - merge(x))``, so every token keeps its own residual stream.
            Fewer merges and more reduced work per block; the sublayer flags are then ignored.
            ``"sublayers"``: merge/unmerge around each selected sublayer (tomesd's way; with
            ``method="tome", destination="fixed"`` it reproduces tomesd 0.1.3 exactly).
        switch_depth: ``tofu``: index (among the reduced blocks, classifiers: layers, in execution order)
            of the first block that merges with MLERP instead of pruning. Default 0 (MLERP everywhere):
            pruning first was worse at every depth measured on tiny-vit, tiny-unet and tiny-dit (README).
            ``tofu.calibrate_switch_depth(model, images)`` finds a classifier's own from ToFu's linearity
            criterion; ``len(blocks)`` or more prunes everywhere.
        tau_sim / tau_info / tau_size: ``mctf`` temperatures; 0 switches a criterion off. ``tau_info`` None:
            the family's default (``presets.METHOD_DEFAULTS``): MCTF's 20 on classifiers, where attention
            received marks what the class token reads; 0 on denoisers, where every token's own output
            matters (dense prediction) and the criterion only merges dissimilar tokens (see the README).
        info_queries: ``mctf`` on diffusion models: the attention each token receives is estimated
            from this many evenly spaced queries (their mean is an unbiased estimate of the mean over
            all queries; with tau_info = 20 the criterion is soft, so a few queries are enough).
        plan_reuse_steps: compute each block's plan every this many denoising steps and reuse it in
            between (1 = every step). Consecutive steps see similar tokens; reuse saves the matching (and, with
            the cached unmerge, the offsets). None (default): the preset's with the preset's schedule, else 1.
        share_guidance_plans: the halves of a classifier-free guidance batch (``cat([x, x])``) share one plan,
            made on the conditional half (guidance multiplies cond - uncond: one plan's errors cancel there, two
            plans' add). None (default): where the pipeline batches guidance (the denoiser gets twice the latents
            its ``prepare_latents`` made), never from equal latents alone (two prompts from one seed have them).
            True: every even batch is a pair (one's own guidance loop; ``DiTPipeline``). False: none.
        unmerge_mode: how a merged token's update reaches the tokens it stands for. ``"copy"`` (as ToMe):
            each takes its slot's. ``"cached"``: each also keeps its own offset from its group, as the block's
            (or sublayer's) last unreduced step computed it (``MergePlan.unmerge_with_offsets``): consecutive
            steps change a token's update little, so a merged token keeps most of its own detail. It needs
            unreduced steps before the reduced ones (a schedule); it costs one stored update per block (and
            per separate guidance call) and a merge and unmerge more per reduced block. None (default): the
            preset's with the preset's schedule, else ``"copy"``: an explicit ``ratio`` or ``schedule`` runs
            as ToMe does unless this is set (and a constant ratio has no unreduced step to learn from).
        unmerge_cache_gb: the most ``unmerge_mode="cached"`` may store per denoiser call, in GB (estimated as one
            block's update times the reduced blocks); None (default): a tenth of the device's memory. A call
            that would store more unmerges by copying, and a warning says so once: video at full size stores
            gigabytes (Wan2.1-14B at 720p and 81 frames: about 31 GB per call in bf16).
        seed: base seed of the random destinations.
        reduce_references: edit pipelines (Flux.1 Kontext, Flux.2 with reference images, Qwen-Image-Edit) append
            the reference images' tokens to the target's. False (default): they are kept whole, every block sees
            the references as the unreduced model does. True: each reference is reduced on its own grid at the
            block's ratio, as the target is (no token merges across images). Measured (tofu-diffusion
            references): at one ratio a little less faithful than whole references and faster; for the same
            tokens removed, more faithful than raising the target's ratio.

    Vision-transformer classifiers (ViT, DeiT) reduce tokens for good, layer by layer:

        r: tokens removed per layer: an int (every layer), ``(r, inflection)`` (a linear ramp from
            ``r * (1 - inflection)`` to ``r * (1 + inflection)``), or a per-layer list. None: ``ratio``
            of each layer's current tokens. Each layer is capped at half of its unprotected tokens.
        layers: indices of the layers that reduce (default: all).
        proportional_attention: add ``log(size)`` of each key to the attention logits, so a merged token
            weighs as much as the tokens it stands for.
        token_order: the order the kept tokens continue in. ``"reference"`` (default): the order of the
            method's reference code, which decides the next layer's alternating split, so results match
            the papers': ToMe keeps CLS (and DeiT's distillation token), then the unmerged tokens of one set,
            then the other set; MCTF the A tokens left after its first step, then the B tokens left after its
            second by decreasing score. ``"original"``: every token keeps its image position (the
            alternating split then pairs spatial neighbours in every layer).
    """

    method: Optional[str] = None
    ratio: Optional[float] = None
    schedule: Optional[Schedule] = None
    schedule_axis: str = "steps"
    blocks: Optional[Blocks] = None
    preset: str = "quality"
    merge_mode: Optional[str] = None
    stride: tuple[int, int] = (2, 2)
    destination: str = "random"
    destination_position: int = 0
    max_downsample: Optional[int] = None
    levels: Optional[Sequence[int]] = None
    merge_self_attention: bool = True
    merge_cross_attention: bool = False
    merge_feed_forward: bool = False
    merge_scope: str = "block"
    switch_depth: int = 0
    tau_sim: float = 1.0
    tau_info: Optional[float] = None
    tau_size: float = 40.0
    info_queries: int = 16
    plan_reuse_steps: Optional[int] = None
    share_guidance_plans: Optional[bool] = None
    reduce_references: bool = False
    unmerge_mode: Optional[str] = None
    unmerge_cache_gb: Optional[float] = None
    seed: int = 0
    r: Optional[Union[int, tuple, Sequence[int]]] = None
    layers: Optional[Sequence[int]] = None
    proportional_attention: bool = True
    token_order: str = "reference"
    threshold: Optional[float] = None

    def __post_init__(self) -> None:
        # Types first, each refusal naming the option: a float stride or a string seed would otherwise be
        # truncated or fail deep inside a reducer.
        stride_text = "two positive ints (sy, sx) or, for video, three (sf, sy, sx)"
        if not isinstance(self.stride, bool) and isinstance(self.stride, numbers.Integral):
            self.stride = (int(self.stride), int(self.stride))
        self.stride = _as_ints(self.stride, "stride", stride_text)
        if self.levels is not None:
            self.levels = _as_ints(self.levels, "levels", "a list of downsampling factors (ints), e.g. [1, 2]")
        if self.layers is not None:
            self.layers = _as_ints(self.layers, "layers", "a list of layer indices (ints)")
        for name in ("destination_position", "switch_depth", "info_queries", "seed"):
            setattr(self, name, _as_int(getattr(self, name), name))
        if self.plan_reuse_steps is not None:
            self.plan_reuse_steps = _as_int(self.plan_reuse_steps, "plan_reuse_steps")
        if self.max_downsample is not None:
            self.max_downsample = _as_int(self.max_downsample, "max_downsample", "an int (a downsampling factor)")
        for name in ("merge_self_attention", "merge_cross_attention", "merge_feed_forward", "proportional_attention",
                     "reduce_references"):
            setattr(self, name, _as_bool(getattr(self, name), name))
        self.share_guidance_plans = _as_bool(self.share_guidance_plans, "share_guidance_plans", optional=True)
        for name in ("tau_sim", "tau_info", "tau_size", "unmerge_cache_gb"):
            if getattr(self, name) is not None:
                setattr(self, name, _as_float(getattr(self, name), name))
        self.r = self._typed_r(self.r)
        if self.ratio is not None:
            self.ratio = _as_float(self.ratio, "ratio")
        if self.schedule is not None:
            self.schedule = tuple((_as_float(p, "schedule progress"), _as_float(r, "schedule ratio"))
                                  for p, r in self.schedule)
        if self.blocks is not None and not isinstance(self.blocks, slice):
            self.blocks = _as_ints(self.blocks, "blocks", "a list of block indices (ints) or a slice")
        if self.threshold is not None:
            self.threshold = _as_float(self.threshold, "threshold")
        self.validate()

    def validate(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.ratio is not None and self.schedule is not None:
            raise ValueError("give ratio (the same at every step) or schedule (a ratio per denoising progress), "
                             "not both")
        for ratio in self.ratios():
            self._check_ratio(ratio)
        if self.schedule is not None:
            progress = [p for p, _ in self.schedule]
            if not progress or any(not 0.0 <= p <= 1.0 for p in progress) or progress != sorted(set(progress)):
                raise ValueError(f"schedule must be ((progress, ratio), ...) with increasing progress in [0, 1], "
                                 f"e.g. ((0.0, 0.0), (0.5, 0.75)); got {self.schedule!r}")
        if self.unmerge_mode is not None and self.unmerge_mode not in UNMERGE_MODES:
            raise ValueError(f"unknown unmerge_mode {self.unmerge_mode!r}; choose one of {UNMERGE_MODES} or None")
        if self.unmerge_cache_gb is not None and not self.unmerge_cache_gb > 0:
            raise ValueError(f"unmerge_cache_gb is a memory limit in GB: give one > 0 (or None: a tenth of the "
                             f"device's memory), got {self.unmerge_cache_gb!r}")
        if self.schedule_axis not in SCHEDULE_AXES:
            raise ValueError(f"unknown schedule_axis {self.schedule_axis!r}; choose one of {SCHEDULE_AXES}")
        from .presets import PRESETS  # the presets are configs' defaults, validated against this class

        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {tuple(PRESETS)}")
        if self.merge_mode is not None and self.merge_mode not in MERGE_MODES:
            raise ValueError(f"unknown merge_mode {self.merge_mode!r}; choose one of {MERGE_MODES} or None")
        if len(self.stride) not in (2, 3) or min(self.stride) < 1:
            raise ValueError(f"stride must be two positive ints (sy, sx) or, for video, three (sf, sy, sx); "
                             f"got {self.stride!r}")
        if self.destination not in DESTINATIONS:
            raise ValueError(f"unknown destination {self.destination!r}; choose one of {DESTINATIONS}")
        cell = math.prod(self.stride)
        if not 0 <= self.destination_position < cell:
            raise ValueError(f"destination_position must be in [0, {cell}) for a {self.stride} stride")
        for name in ("tau_sim", "tau_info", "tau_size"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 switches the criterion off), got {getattr(self, name)}")
        if self.max_downsample is not None and self.max_downsample < 1:
            raise ValueError(f"max_downsample must be >= 1, got {self.max_downsample}")
        if self.levels is not None and (not self.levels or min(self.levels) < 1):
            raise ValueError(f"levels must be a non-empty list of downsampling factors >= 1, got {self.levels!r}")
        depth = self.switch_depth
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 0:
            raise ValueError(f"switch_depth must be an int >= 0 (the first block that merges), got {depth!r}")
        if self.plan_reuse_steps is not None and self.plan_reuse_steps < 1:
            raise ValueError(f"plan_reuse_steps must be >= 1 (1 = plan every step), got {self.plan_reuse_steps}")
        if self.info_queries < 1:
            raise ValueError(f"info_queries must be >= 1, got {self.info_queries}")
        self._validate_r()
        if self.threshold is not None:
            if not -1.0 <= self.threshold < 1.0:
                raise ValueError(f"threshold is a cosine similarity: give one in [-1, 1) (e.g. 0.9: merge only "
                                 f"near-duplicates), got {self.threshold!r}")
            if self.method == "todo":
                raise ValueError("threshold needs a matching to threshold; todo matches no tokens (it downsamples "
                                 "keys and values): use method='tome', 'tofu' or 'mctf'")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
        if self.token_order not in CLASSIFIER_TOKEN_ORDERS:
            raise ValueError(f"unknown token_order {self.token_order!r}; choose one of {CLASSIFIER_TOKEN_ORDERS}")
        if self.merge_scope not in MERGE_SCOPES:
            raise ValueError(f"unknown merge_scope {self.merge_scope!r}; choose one of {MERGE_SCOPES}")
        if self.merge_scope == "sublayers" and not (
            self.merge_self_attention or self.merge_cross_attention or self.merge_feed_forward
        ):
            raise ValueError(
                "nothing to reduce: set at least one of merge_self_attention, merge_cross_attention, merge_feed_forward"
            )

    def ratios(self) -> list[float]:
        """Every ratio this config can use (the constant one, or each of the schedule's)."""
        if self.schedule is not None:
            return [r for _, r in self.schedule]
        return [] if self.ratio is None else [self.ratio]

    def _check_ratio(self, ratio: float) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1) (the share of tokens removed), got {ratio!r}")

    def check_grid_ratio(self) -> None:
        """Refuse a ratio the stride cannot give on a denoiser's token grid (checked where the model is known:
        a classifier has no stride, and its own limit is half of each layer's tokens)."""
        if self.method == "todo":  # ToDo downsamples keys and values: no destination per cell to cap it
            return
        cap = max_grid_ratio(self.stride)
        for ratio in self.ratios():
            if ratio > cap:
                raise ValueError(
                    f"ratio {ratio} removes more tokens than a {grid_text(self.stride)} stride allows on a "
                    f"denoiser's token grid (one destination per cell caps it at {cap:.3f}); lower the ratio or "
                    f"use a larger stride, e.g. stride=(4, 4)"
                )

    def options_set(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` whose value differs from the field's default (what a user set)."""
        defaults = {f.name: f.default for f in fields(self)}
        return [name for name in names if getattr(self, name) != defaults[name]]

    @property
    def plan_interval(self) -> int:
        """Steps between two plans of a block (``plan_reuse_steps``, 1 when unset)."""
        return self.plan_reuse_steps or 1

    def ratio_at(self, progress: Optional[float]) -> float:
        """The ratio at a denoising progress in [0, 1] (None: unknown, the constant ratio or the schedule's start)."""
        if self.schedule is None:
            return self.ratio if self.ratio is not None else 0.0
        if progress is None:
            progress = 0.0
        current = 0.0
        for start, ratio in self.schedule:
            if progress + 1e-9 >= start:
                current = ratio
        return current

    def resolve(self, family: str) -> "TokenFusionConfig":
        """A config with every lever decided: what was not given comes from the preset for ``family``.

        An explicit ``ratio`` or ``schedule`` is used as given, on every eligible block unless ``blocks``
        says otherwise: the preset then only supplies ``method`` if that was not given.
        """
        from .presets import method_defaults, preset_options

        preset = preset_options(self.preset, family)
        explicit = self.ratio is not None or self.schedule is not None
        updates = {name: value for name, value in method_defaults(family).items() if getattr(self, name) is None}
        if self.method is None:
            updates["method"] = preset.get("method", "tome")
        if not explicit and self.threshold is None and preset.get("threshold") is not None:
            updates["threshold"] = preset["threshold"]  # an adaptive preset: the count follows the content
        if not explicit and (self.threshold is not None or "threshold" in updates):
            # a threshold alone decides how much merges: capped only by what the stride allows
            updates["ratio"] = max_grid_ratio(self.stride)
        elif not explicit:
            updates["ratio"] = preset.get("ratio")
            updates["schedule"] = preset.get("schedule")
            if self.blocks is None:
                updates["blocks"] = preset.get("blocks")
        if not explicit and updates.get("schedule") is not None:
            if self.unmerge_mode is None:
                updates["unmerge_mode"] = preset.get("unmerge_mode")  # None reads as "copy"
            if self.plan_reuse_steps is None:
                updates["plan_reuse_steps"] = preset.get("plan_reuse_steps")  # None reads as 1
        resolved = replace(self, **updates)
        if resolved.threshold is not None and resolved.method == "todo":
            resolved.validate()  # the preset's method may be todo: refused with the same message
        return resolved

    @staticmethod
    def _typed_r(r):
        """r as an int, an (int, float) tuple or a list of ints (NumPy / torch integers accepted)."""
        usage = "an int >= 0, an (r, inflection) tuple with inflection in [-1, 1], or a list of ints >= 0"
        if r is None or isinstance(r, tuple):
            return r if r is None or len(r) != 2 else (_as_int(r[0], "r", usage), _as_float(r[1], "r's inflection"))
        if isinstance(r, (str, bytes)) or not hasattr(r, "__iter__") or getattr(r, "ndim", 1) == 0:
            return _as_int(r, "r", usage)
        return [_as_int(v, "r", usage) for v in r]

    def _validate_r(self) -> None:
        r = self.r
        if r is None:
            return
        usage = "r must be an int >= 0, an (r, inflection) tuple with inflection in [-1, 1], or a list of ints >= 0"
        if isinstance(r, bool):
            raise ValueError(f"{usage}; got {r!r}")
        if isinstance(r, int):
            if r < 0:
                raise ValueError(f"{usage}; got {r!r}")
        elif isinstance(r, tuple):
            if len(r) != 2 or not isinstance(r[0], int) or r[0] < 0 or not -1 <= float(r[1]) <= 1:
                raise ValueError(f"{usage}; got {r!r}")
        elif not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
            raise ValueError(f"{usage}; got {r!r}")

    # ------------------------------------------------------------------ method presets
    def merge_mode_for(self, depth: int, num_blocks: int, tome_mode: str = "mean") -> str:
        """Merge mode of the ``depth``-th reduced block out of ``num_blocks``.

        ``tome_mode`` is what ``tome`` averages with: tomesd's plain ``mean`` on diffusion models,
        ToMe's ``size_weighted`` on classifiers, where sizes travel with the tokens.
        """
        if self.merge_mode is not None:
            return self.merge_mode
        if self.method == "todo":
            return "prune"  # nothing is merged: keys/values are subsampled
        if self.method == "tofu":
            return "prune" if depth < self.switch_depth else "mlerp"
        if self.method == "mctf":
            return "size_weighted"
        return tome_mode

    @classmethod
    def from_kwargs(cls, config: Optional["TokenFusionConfig"] = None, **kwargs) -> "TokenFusionConfig":
        """A config from keyword arguments, or ``config`` with those fields replaced."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"the second argument is a TokenFusionConfig, got {config!r}; pass options by keyword, "
                            f"e.g. apply(model, ratio=0.5) or apply(model, method='tome')")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown TokenFusionConfig option(s) {unknown}; valid options: {sorted(known)}")
        if config is None:
            return cls(**kwargs)
        return replace(config, **kwargs) if kwargs else config
