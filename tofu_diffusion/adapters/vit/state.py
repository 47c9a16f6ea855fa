"""Per-call state of a patched classifier: the schedule, the token sizes so far, each layer's scratch."""

from __future__ import annotations

from typing import Optional

import torch

from ...config import TokenFusionConfig
from ...core import MergePlan, layer_schedule
from ..callers import PerCaller

MCTF_MIN_TOKENS = 10


class ViTCall:
    """One caller's forward pass: the schedule for its token count, the sizes so far, the sizes each layer
    saw first (a layer recomputed by gradient checkpointing starts from them again) and each layer's
    scratch (``LayerCall``)."""

    def __init__(self):
        self.schedule: Optional[list[int]] = None
        self.sizes: Optional[torch.Tensor] = None  # (B, N) tokens each token stands for; None = all ones
        self.sizes_in: dict[int, Optional[torch.Tensor]] = {}
        self.layers: dict[int, LayerCall] = {}


class LayerCall:
    """What the hooks of one layer pass to each other within one forward pass."""

    def __init__(self):
        self.metric: Optional[torch.Tensor] = None
        self.plan: Optional[MergePlan] = None
        self.merged: Optional[torch.Tensor] = None
        self.mlp_out: Optional[torch.Tensor] = None
        self.skip_projections = False
        # mctf: the attention on the unmerged tokens, which (fused through the plan) serves the merged ones
        self.unmerged_attention: Optional[torch.Tensor] = None


class ViTRun:
    """State shared by the hooks of one patched classifier. Per-forward state is kept per caller (thread),
    so threads can share a model; the schedule follows each input's token count (``interpolate_pos_encoding``
    at another image size), computed once per count."""

    def __init__(self, config: TokenFusionConfig, protected: int, num_layers: int, num_tokens: int):
        self.config = config
        self.protected = protected
        self.num_layers = num_layers
        # the reference order: protected, then one bipartite set, then the other (core.TOKEN_ORDERS "sets")
        self.matching_order = "sets" if config.token_order == "reference" else "original"
        self.token_counts: dict[str, tuple[int, int]] = {}
        self._schedules: dict[int, list[int]] = {}
        self.last_schedule = self.schedule_for(num_tokens)  # of the latest forward (at first: the model's size)
        self._calls = PerCaller()  # of ViTCall

    def schedule_for(self, num_tokens: int) -> list[int]:
        if num_tokens not in self._schedules:
            cfg = self.config
            # MCTF never fuses below 10 tokens (its reference's floor)
            floor = MCTF_MIN_TOKENS if cfg.method == "mctf" else 0
            self._schedules[num_tokens] = layer_schedule(num_tokens, self.num_layers, r=cfg.r, ratio=cfg.ratio,
                                                         protected=self.protected, layers=cfg.layers, min_tokens=floor)
        return self._schedules[num_tokens]

    def counts(self) -> dict[str, tuple[int, int]]:
        return dict(self.token_counts)

    def begin(self) -> None:
        self._calls.set(ViTCall())

    def current(self) -> Optional[ViTCall]:
        """The calling thread's forward pass (see ``PerCaller`` for threads that started none), or None."""
        return self._calls.get()

    def call(self) -> ViTCall:
        call = self.current()
        if call is None:
            raise RuntimeError("a ViT layer ran outside its model's forward; token fusion cannot follow it")
        return call

    @property
    def sizes(self) -> Optional[torch.Tensor]:
        """The current (or latest) forward's token sizes."""
        return self.call().sizes

    @sizes.setter
    def sizes(self, value: Optional[torch.Tensor]) -> None:
        if self.current() is None:
            self.begin()
        self.call().sizes = value

    def size_bias(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Proportional attention: log(size) of each key, as an additive (B, 1, 1, N) mask."""
        sizes = self.call().sizes
        if sizes is None or not self.config.proportional_attention:
            return None
        return sizes.log().to(hidden.dtype)[:, None, None, :]

    def sizes_for(self, hidden: torch.Tensor) -> torch.Tensor:
        return _or_unit(self.call().sizes, hidden)

    @property
    def protected_sources(self) -> int:
        """Protected tokens in the A set of ``core.alternating_partition`` (the even positions): known on the
        host, so matching needs no count from the device (and runs on the meta device)."""
        return (self.protected + 1) // 2

    def protected_mask(self, n: int, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[: self.protected] = True
        return mask


def _or_unit(sizes: Optional[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """``sizes``, or every token of ``hidden`` standing for one (None: nothing merged yet)."""
    if sizes is None:
        return torch.ones(hidden.shape[:2], device=hidden.device, dtype=torch.float32)
    return sizes


class LayerState:
    """One layer: its name, index and merge mode; ``removed`` and ``scratch()`` are of the current call."""

    def __init__(self, name: str, index: int, run: ViTRun, merge_mode: str):
        self.name, self.index, self.run, self.merge_mode = name, index, run, merge_mode

    @property
    def removed(self) -> int:
        """Tokens this layer removes in the current (or, outside a call, the latest) forward."""
        call = self.run.current()
        schedule = call.schedule if call is not None and call.schedule is not None else self.run.last_schedule
        return schedule[self.index]

    def start(self, num_tokens: int) -> LayerCall:
        """Enter the layer: fix the schedule (first layer) and the sizes it starts from."""
        call = self.run.call()
        if call.schedule is None:
            call.schedule = self.run.last_schedule = self.run.schedule_for(num_tokens)
        if self.index in call.sizes_in:  # recomputed by gradient checkpointing: start where it first started
            call.sizes = call.sizes_in[self.index]
        else:
            call.sizes_in[self.index] = call.sizes
        scratch = call.layers[self.index] = LayerCall()
        return scratch

    def sizes_in(self, hidden: torch.Tensor) -> torch.Tensor:
        """The sizes of the tokens entering this layer (also when only its body is recomputed)."""
        return _or_unit(self.run.call().sizes_in.get(self.index), hidden)

    def scratch(self) -> LayerCall:
        """This layer's scratch in the current call (a fresh one for a part called outside its layer)."""
        return self.run.call().layers.setdefault(self.index, LayerCall())

    def finish(self) -> None:
        self.run.call().layers.pop(self.index, None)
