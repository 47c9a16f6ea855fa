"""Planning a reduced block: which tokens it merges, computed once per call and shared by its sublayers.

``BlockState`` is one reduced block (its settings, the grid it reads, its plan); the plan follows the
config's method on a grid of any rank (``core.grid_partition``), shares one plan across a guidance batch's
halves and reuses plans across steps (``plan_reuse_steps``) per call position.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.profiler import record_function

from ..core import (
    MergePlan,
    best_similarity,
    bidirectional_matching,
    bipartite_soft_matching,
    cells,
    concat_plans,
    count_above,
    estimate_attention_received,
    grid_text,
    identity_plan,
    mctf_scores,
    mix_key,
    reduction_pays,
    threshold_granularity,
)
from .callers import PerCaller
from .state import GridRecord, RunState

logger = logging.getLogger("tofu_diffusion")


@dataclass
class BlockCall:
    """One caller's pass through a block: its input and plan, and the plan it may reuse next step."""

    input: Optional[torch.Tensor] = None
    plan: Optional[MergePlan] = None
    planned: bool = False
    merged: Optional[torch.Tensor] = None  # whole-block scope: the merged input, for the residual
    # call position within a step -> (plan, ratio, (B, N)) of its latest planning: true CFG's unconditional and
    # conditional calls each reuse their own plan, never each other's
    reusable: dict = field(default_factory=dict)
    # (call position, sublayer) -> the update of its latest unreduced step in this run: unmerge_mode="cached"
    updates: dict = field(default_factory=dict)
    # (call position, sublayer) -> (plan, reference, offsets): a plan reused over steps adds the same offsets
    offsets: dict = field(default_factory=dict)


@dataclass
class BlockState:
    """One reduced block: its settings, the grid it reads, and the plan of the current call."""

    name: str
    depth: int
    merge_mode: str
    grid: GridRecord
    run: RunState
    last_tokens: Optional[tuple[int, int]] = None  # (tokens in, tokens after merge) of the latest call
    # every call's tokens in / out since apply (or reset_counts): what an adaptive threshold removed on average
    totals: list = field(default_factory=lambda: [0, 0])
    sublayers: tuple[str, ...] = ("self_attention",)  # what runs on the reduced tokens, for the cost model
    plans_computed: int = 0
    last_plan: Optional[MergePlan] = None  # the plan of the latest call (None when it reduced nothing)
    _skipped: set = field(default_factory=set, repr=False)
    _calls: PerCaller = field(default_factory=PerCaller, repr=False)  # of BlockCall
    _salt: Optional[torch.Tensor] = field(default=None, repr=False)

    def salt(self, device: torch.device) -> torch.Tensor:
        """The block's depth as a tensor on ``device``, the salt of its random draws. Compiled code reads a
        tensor as an input, an int as a constant: one graph then serves every block of a class (regional
        compilation) rather than one per depth."""
        if self._salt is None or self._salt.device != device:
            self._salt = torch.tensor(self.depth, dtype=torch.long, device=device)
        return self._salt

    def call(self) -> BlockCall:
        """The calling thread's pass through this block (a new thread starts from the latest caller's
        reusable plan, so a backward thread recomputing the block makes the forward's plan)."""
        state = self._calls.own()
        if state is None:
            latest = self._calls.latest
            state = self._calls.set(BlockCall(reusable={} if latest is None else dict(latest.reusable)))
        return state

    def begin(self, hidden_states: torch.Tensor) -> BlockCall:
        call = self._calls.set(self.call())
        call.input, call.plan, call.planned, call.merged = hidden_states, None, False, None
        return call

    def end(self) -> None:
        # Drop references so the block input and the plan can be freed between blocks.
        call = self.call()
        call.input, call.plan, call.planned, call.merged = None, None, False, None

    def plan(self, attention: Optional[torch.nn.Module],
             attention_input: Optional[torch.Tensor]) -> Optional[MergePlan]:
        """The plan of this call, computed on first use; None when nothing is removed."""
        call = self.call()
        if not call.planned:
            if call.input is None:
                raise RuntimeError(f"{self.name}: a sublayer ran outside its block's forward; "
                                   f"token fusion cannot plan it")
            slot = self.run.step().call_in_step
            # read only when reused: a compiled call guards on what it reads (the stored plan would recompile)
            previous = call.reusable.get(slot) if self.run.reuse_plans else None
            b, n = call.input.shape[:2]
            ratio = self.run.ratio
            if previous is not None and previous[1:] == (ratio, (b, n)):
                call.plan = previous[0]
            else:
                # Labels let a profiler attribute time to planning / merge / unmerge (free when not profiling).
                with record_function("tofu_diffusion::plan"):
                    call.plan = self._shared_or_own_plan(call.input, ratio, attention, attention_input)
                if call.plan is not None and not torch.compiler.is_compiling():  # (a count: see count_tokens)
                    self.plans_computed += 1
                if self.run.config.plan_interval > 1:
                    call.reusable[slot] = (call.plan, ratio, (b, n))
            call.planned = True
            self.last_plan = call.plan
            self.count_tokens(n, n if call.plan is None else call.plan.num_kept)
        return call.plan

    @property
    def cached_unmerge(self) -> bool:
        """``unmerge_mode="cached"``: unreduced steps store their updates (``remember_update``) for the next
        reduced ones; hooks ask first, so that the copying unmerge never computes an update it does not keep."""
        return self.run.config.unmerge_mode == "cached"

    def remember_update(self, output: torch.Tensor, part: str = "block", minus: Optional[torch.Tensor] = None) -> None:
        """Keep an unreduced step's per-token update (B, N, C) of ``part``, ``output - minus`` (only with
        ``cached_unmerge``), unless the patch's updates would pass the cache limit: then its reduced steps unmerge by
        copying, and the update is never computed."""
        step = self.run.step()
        needed = output.numel() * output.element_size() * max(1, self.run.num_blocks)
        limit = self.run.cache_limit(output.device)
        if limit is not None and needed > limit:
            self.call().updates.pop((step.call_in_step, part), None)  # an earlier, smaller call's is no reference
            if not self.run.warned_cache_limit:
                self.run.warned_cache_limit = True
                logger.warning("unmerge_mode='cached' would store about %.2f GB per denoiser call (%d blocks x %s), "
                               "more than its limit of %.2f GB (unmerge_cache_gb; by default a tenth of the device's "
                               "memory): these calls unmerge by copying, which costs quality at the cached "
                               "schedules. Raise unmerge_cache_gb where the memory is there, or reduce later steps "
                               "only, e.g. schedule=((0, 0), (0.8, 0.75)) with unmerge_mode='copy'",
                               needed / 2**30, max(1, self.run.num_blocks), tuple(output.shape), limit / 2**30)
            return
        update = output if minus is None else output - minus
        self.call().updates[step.call_in_step, part] = update.detach()

    def unmerged_update(self, plan: MergePlan, update: torch.Tensor, part: str = "block") -> torch.Tensor:
        """The reduced update (B, K, C) for all N tokens: copied from each slot, or with ``unmerge_mode="cached"``
        plus each token's own offset from its group at the last unreduced step of this run (when there was one
        for these tokens)."""
        if self.cached_unmerge:
            step, call = self.run.step(), self.call()
            reference = call.updates.get((step.call_in_step, part))  # a sampling run starts with none
            if reference is not None and reference.shape[:2] == (plan.batch_size, plan.num_tokens):
                return plan.unmerge(update) + self._offsets(call, (step.call_in_step, part), plan, reference,
                                                            update.dtype)
        return plan.unmerge(update)

    def _offsets(self, call: BlockCall, key: tuple, plan: MergePlan, reference: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
        """``plan.offsets(reference)``, kept while the plan is reused (``plan_reuse_steps`` > 1): the reference
        is the last unreduced step's, so a reused plan's offsets do not change until it is replanned."""
        cached = call.offsets.get(key)
        if cached is not None and cached[0] is plan and cached[1] is reference and cached[2].dtype == dtype:
            return cached[2]
        offsets = plan.offsets(reference.to(dtype), self.merge_mode)
        if self.run.config.plan_interval > 1:
            call.offsets[key] = (plan, reference, offsets)
        return offsets

    def forget_updates(self) -> None:
        """A new sampling run: no stored update of the last run is a reference. The keys stay (with None): a
        compiled call guards on the keys it writes, so that they change only in the first run."""
        updates = self.call().updates
        for key in updates:
            updates[key] = None

    def count_tokens(self, n_in: int, n_out: int) -> None:
        self.last_tokens = (n_in, n_out)
        if not torch.compiler.is_compiling():
            # a running total read inside a graph would be a guard on its value: a recompile at every call
            self.totals[0] += n_in
            self.totals[1] += n_out

    def _shared_or_own_plan(self, x, ratio, attention, attention_input) -> Optional[MergePlan]:
        """A guidance batch [uncond; cond] plans on its conditional half and gives both halves that plan:
        guidance amplifies cond - uncond (by 4-16x), and errors of one shared plan largely cancel in the
        difference where two plans' errors add. Otherwise every sample plans on its own tokens."""
        if not (self.run.step().guidance_pairs and x.shape[0] % 2 == 0):
            return self._compute_plan(x, ratio, attention, attention_input)
        half = x.shape[0] // 2
        plan = self._compute_plan(x[half:], ratio, attention,
                                  None if attention_input is None else attention_input[half:])
        return None if plan is None else plan.repeat(2)

    def checked_grids(self, n: int) -> tuple[tuple[int, ...], ...]:
        """The grids of this call's ``n`` planned tokens: the image's (and each reference's, when reduced)."""
        grids = self.grid.grids()
        if not grids or self.grid.planned_tokens() != n:
            shape = "unknown" if not grids else " + ".join(grid_text(g) for g in grids)
            raise ValueError(f"{self.name}: the block has {n} tokens but its token grid is {shape}; "
                             f"token fusion cannot tile this input")
        return grids

    def checked_grid(self, n: int) -> tuple[int, ...]:
        """The grid of this call's ``n`` tokens, for a reducer that works on one grid (ToDo's downsampling)."""
        grids = self.checked_grids(n)
        if self.grid.leading():
            raise ValueError(f"{self.name}: this reducer works on one image grid, and this model keeps "
                             f"{self.grid.leading()} tokens before it whole (its conditioning frame); use tome, tofu "
                             f"or mctf")
        if len(grids) > 1:
            raise ValueError(f"{self.name}: this reducer works on one image grid, not on the references' too; use "
                             f"reduce_references=False")
        return grids[0]

    def reset(self) -> None:
        """Forget every caller's pass (and the plans it could reuse)."""
        self._calls.reset()

    def _compute_plan(self, x, ratio, attention, attention_input) -> Optional[MergePlan]:
        if x.dim() != 3:
            raise ValueError(f"{self.name}: expected block input (batch, tokens, channels), got {tuple(x.shape)}")
        n = x.shape[1]
        if int(n * ratio) == 0:
            if ratio > 0 and not self.run.warned_too_few:
                self.run.warned_too_few = True
                logger.warning("%s: ratio %s of %d tokens removes no token; these calls run unreduced (raise the "
                               "ratio or reduce blocks with more tokens)", self.name, ratio, n)
            return None
        grids = self.checked_grids(n)
        leading = self.grid.leading()
        if len(grids) == 1 and not leading:
            return self._grid_plan(x, grids[0], ratio, attention, attention_input, 0)
        # An edit pipeline's target and references, each reduced on its own grid: no token merges into another
        # image, and every image keeps its share of the tokens. Leading tokens (a conditioning frame) stay whole.
        plans, start = [identity_plan(x.shape[0], leading, x.device)] if leading else [], leading
        for index, grid in enumerate(grids):
            size = math.prod(grid)
            part = slice(start, start + size)
            try:
                plan = self._grid_plan(x[:, part], grid, ratio, attention,
                                       None if attention_input is None else attention_input[:, part], index)
            except ValueError as error:
                if not leading:
                    raise
                # the user sees the whole latent; say that its first frame is not part of the grid reduced
                raise ValueError(f"{self.name}: the {leading} tokens before the reduced grid (the conditioning first "
                                 f"frame) are kept whole, so {error}") from None
            plans.append(identity_plan(x.shape[0], size, x.device) if plan is None else plan)
            start += size
        return None if all(p.num_merged == 0 for p in plans) else concat_plans(plans)

    def _grid_plan(self, x, grid, ratio, attention, attention_input, image: int) -> Optional[MergePlan]:
        """The plan of one image's tokens ``x`` (B, prod(grid), C); ``image`` salts its random draws."""
        cfg = self.run.config
        n = x.shape[1]
        r = int(n * ratio)
        if r == 0:
            return None
        num_dst = math.prod(cells(grid, cfg.stride))
        if num_dst and not reduction_pays(n, x.shape[-1], r, num_dst, self.sublayers):
            if grid not in self._skipped:
                self._skipped.add(grid)
                logger.debug("%s: not reduced at %s tokens, ratio %s: matching would cost more than it saves",
                             self.name, grid_text(grid), ratio)
            return None
        salt = self.salt(x.device) if image == 0 else mix_key(self.salt(x.device), image)
        src, dst = self.run.partition(grid, x.device, salt=salt)
        if cfg.method == "mctf" and cfg.threshold is not None:
            # the threshold is on similarity alone; MCTF's other criteria then pick among those sources
            r = count_above(best_similarity(x, src, dst), cfg.threshold, r, threshold_granularity(n))
            if r == 0:
                return None
        if cfg.method == "mctf":
            info = None
            if attention is not None and cfg.tau_info > 0:
                if attention_input is None:
                    # Whole-block scope: attn1's input (after the block's own, possibly conditioned,
                    # norm) is not available yet; a plain layer norm of the block input is the same up
                    # to a per-channel scale and shift, close enough to rank informativeness.
                    attention_input = torch.nn.functional.layer_norm(x, x.shape[-1:])
                info = estimate_attention_received(attention, attention_input, cfg.info_queries, grid,
                                                   key=mix_key(self.run.step().key, self.salt(x.device), 1 + image))
            scores = mctf_scores(x, src, dst, info, None, cfg.tau_sim, cfg.tau_info, cfg.tau_size)
            return bidirectional_matching(scores, src, dst, n, r, weights=info)
        return bipartite_soft_matching(x, src, dst, r, threshold=cfg.threshold)
