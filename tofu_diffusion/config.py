"""Typed, validated configuration, in the style of diffusers' ``*Config`` accelerators."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Union

from .core import DESTINATIONS, MERGE_MODES, max_grid_ratio

METHODS = ("tome", "tofu", "mctf")
MERGE_SCOPES = ("sublayers", "block")


@dataclass
class TokenFusionConfig:
    """How tokens are reduced in each transformer block.

    Args:
        method: ``"tome"`` (ToMe/tomesd: bipartite matching, mean merge), ``"tofu"`` (ToMe matching;
            prune in blocks before ``switch_depth``, MLERP after) or ``"mctf"`` (multi-criteria
            score, bidirectional matching, fusion weighted by attention received times size).
        ratio: share of each reduced block's tokens removed, in [0, 1). 0 is exactly the original model.
        merge_mode: override the method's merge mode for every block: ``"mean"``, ``"size_weighted"``,
            ``"mlerp"`` or ``"prune"``.
        stride: ``(sy, sx)`` cell of the 2-D token grid that holds one destination token.
        destination: ``"random"`` (a random position per cell, drawn from a generator seeded with
            ``seed`` and the step's timestep, so a seeded pipeline call is repeatable) or ``"fixed"``
            (``destination_position`` in every cell; 0 = top-left).
        max_downsample: UNets: reduce the attention levels whose downsampling factor is at most
            this (1 = full latent resolution, 2, 4, 8). None: the highest-resolution level that has
            attention (1 on SD 1.x/2.x, 2 on SDXL). Patchified transformers have one level (1).
        levels: explicit downsampling factors to reduce; takes precedence over ``max_downsample``.
        merge_self_attention / merge_cross_attention / merge_feed_forward: which sublayers of a
            block run on the reduced tokens (one matching per block serves all of them).
        merge_scope: ``"block"`` (default; measured fastest with eval.bench on every architecture):
            merge once at the block input, run the whole block (norms, attention,
            cross-attention, feed-forward) on the reduced tokens, and return
            ``x + unmerge(block(merge(x)) - merge(x))``, so every token keeps its own residual stream.
            Fewer merges and more reduced work per block; the sublayer flags are then ignored.
            ``"sublayers"``: merge/unmerge around each selected sublayer (tomesd's way; with
            ``method="tome", destination="fixed"`` it reproduces tomesd 0.1.3 exactly).
        switch_depth: ``tofu``: index (among the reduced blocks, in execution order) of the first
            block that merges with MLERP instead of pruning. None: half of the reduced blocks.
        tau_sim / tau_info / tau_size: ``mctf`` temperatures; 0 switches a criterion off.
        info_queries: ``mctf`` on diffusion models: the attention each token receives is estimated
            from this many evenly spaced queries (their mean is an unbiased estimate of the mean over
            all queries; with tau_info = 20 the criterion is soft, so a few queries are enough).
        plan_reuse_steps: compute each block's plan every this many denoising steps and reuse it in
            between (1 = every step). Consecutive steps see similar tokens; reuse saves the matching.
        seed: base seed of the random destinations.

    Vision-transformer classifiers (ViT, DeiT) reduce tokens for good, layer by layer:

        r: tokens removed per layer: an int (every layer), ``(r, inflection)`` (a linear ramp from
            ``r * (1 - inflection)`` to ``r * (1 + inflection)``), or a per-layer list. None: ``ratio``
            of each layer's current tokens. Each layer is capped at half of its unprotected tokens.
        layers: indices of the layers that reduce (default: all).
        proportional_attention: add ``log(size)`` of each key to the attention logits, so a merged token
            weighs as much as the tokens it stands for.
    """

    method: str = "tome"
    ratio: float = 0.5
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
    switch_depth: Optional[int] = None
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    info_queries: int = 16
    plan_reuse_steps: int = 1
    seed: int = 0
    r: Optional[Union[int, tuple, Sequence[int]]] = None
    layers: Optional[Sequence[int]] = None
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stride, int):
            self.stride = (self.stride, self.stride)
        self.stride = tuple(int(s) for s in self.stride)
        if self.levels is not None:
            self.levels = tuple(int(level) for level in self.levels)
        if self.layers is not None:
            self.layers = tuple(int(layer) for layer in self.layers)
        if self.r is not None and not isinstance(self.r, (int, tuple)):
            self.r = list(self.r)
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1) (the share of tokens removed), got {self.ratio!r}")
        if self.merge_mode is not None and self.merge_mode not in MERGE_MODES:
            raise ValueError(f"unknown merge_mode {self.merge_mode!r}; choose one of {MERGE_MODES} or None")
        if len(self.stride) != 2 or min(self.stride) < 1:
            raise ValueError(f"stride must be two positive ints (sy, sx), got {self.stride!r}")
        if self.destination not in DESTINATIONS:
            raise ValueError(f"unknown destination {self.destination!r}; choose one of {DESTINATIONS}")
        cell = self.stride[0] * self.stride[1]
        if not 0 <= self.destination_position < cell:
            raise ValueError(f"destination_position must be in [0, {cell}) for a {self.stride} stride")
        cap = max_grid_ratio(self.stride)
        if self.ratio > cap:
            raise ValueError(
                f"ratio {self.ratio} removes more tokens than a {self.stride[0]}x{self.stride[1]} stride allows "
                f"(one destination per cell caps it at {cap:.3f}); lower the ratio or use a larger stride, "
                f"e.g. stride=(4, 4)"
            )
        for name in ("tau_sim", "tau_info", "tau_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 switches the criterion off), got {getattr(self, name)}")
        if self.max_downsample is not None and self.max_downsample < 1:
            raise ValueError(f"max_downsample must be >= 1, got {self.max_downsample}")
        if self.levels is not None and (not self.levels or min(self.levels) < 1):
            raise ValueError(f"levels must be a non-empty list of downsampling factors >= 1, got {self.levels!r}")
        if self.switch_depth is not None and self.switch_depth < 0:
            raise ValueError(f"switch_depth must be >= 0, got {self.switch_depth}")
        if self.plan_reuse_steps < 1:
            raise ValueError(f"plan_reuse_steps must be >= 1 (1 = plan every step), got {self.plan_reuse_steps}")
        if self.info_queries < 1:
            raise ValueError(f"info_queries must be >= 1, got {self.info_queries}")
        self._validate_r()
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
        if self.merge_scope not in MERGE_SCOPES:
            raise ValueError(f"unknown merge_scope {self.merge_scope!r}; choose one of {MERGE_SCOPES}")
        if self.merge_scope == "sublayers" and not (
            self.merge_self_attention or self.merge_cross_attention or self.merge_feed_forward
        ):
            raise ValueError(
                "nothing to reduce: set at least one of merge_self_attention, merge_cross_attention, merge_feed_forward"
            )

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
        if self.method == "tofu":
            switch = num_blocks // 2 if self.switch_depth is None else self.switch_depth
            return "prune" if depth < switch else "mlerp"
        if self.method == "mctf":
            return "size_weighted"
        return tome_mode

    @classmethod
    def from_kwargs(cls, config: Optional["TokenFusionConfig"] = None, **kwargs) -> "TokenFusionConfig":
        """A config from keyword arguments, or ``config`` with those fields replaced."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown TokenFusionConfig option(s) {unknown}; valid options: {sorted(known)}")
        if config is None:
            return cls(**kwargs)
        return replace(config, **kwargs) if kwargs else config
