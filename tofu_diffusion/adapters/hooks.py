"""diffusers hooks that reduce the tokens of transformer blocks.

All are registered through ``diffusers.hooks.HookRegistry`` and no block forward is re-implemented;
``unregister_all`` takes out exactly these hooks, in any order of registration with other hooks:

* ``RootHook`` on the denoiser: derives the step's random key from (seed, timestep), so a seeded
  pipeline call is repeatable, a recomputed forward (gradient checkpointing) makes the same plans, and
  no RNG state leaks between calls.
* ``GridHook`` on the module whose input defines the token grid (a UNet's ``Transformer2DModel``, or
  a patchified transformer itself): records the grid of the current call.
* ``merge_scope="block"``: ``WholeBlockHook`` on each reduced block runs the block's own forward on
  merged tokens and returns ``x + unmerge(out - merged)``.
* ``merge_scope="sublayers"``: ``BlockHook`` on each reduced block remembers its input; ``MergeHook``
  on ``attn1`` / ``attn2`` / ``ff`` returns ``unmerge(original_forward(merge(x)))``. The block's plan is
  computed by the first sublayer that needs it and shared by all of them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.profiler import record_function

from ..config import TokenFusionConfig
from ..core.destinations import Key
from .steps import StepLocator
from ..core import (
    MergePlan,
    attention_received,
    bidirectional_matching,
    bipartite_soft_matching,
    grid_partition,
    mctf_scores,
    mix_key,
    mean_over_queries,
    reduction_pays,
    stratified_grid_queries,
)

logger = logging.getLogger("tofu_diffusion")

ROOT_HOOK = "tofu_diffusion_root"
GRID_HOOK = "tofu_diffusion_grid"
BLOCK_HOOK = "tofu_diffusion_block"
MERGE_HOOK = "tofu_diffusion_merge"
WHOLE_BLOCK_HOOK = "tofu_diffusion_whole_block"
ROTARY_BLOCK_HOOK = "tofu_diffusion_rotary_block"
DOWNSAMPLE_HOOK = "tofu_diffusion_downsample"
HOOK_PREFIX = "tofu_diffusion"  # every hook this library registers (here and in the classifier adapter)


def hidden_states_of(args: tuple, kwargs: dict, names: tuple[str, ...] = ("hidden_states",)) -> torch.Tensor:
    """The first positional argument, or the first of ``names`` passed by keyword."""
    if args:
        return args[0]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise TypeError(f"expected the input as the first positional argument or as one of {names}")


def _replace_hidden_states(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


class PerCaller:
    """A value per calling thread, so concurrent calls of one model never see each other's state.

    Values live in thread-local storage, so a thread's state goes when the thread ends (a server that runs
    each request on its own thread keeps nothing of finished requests). A thread that set none of its own
    (autograd's backward threads recomputing a checkpointed block on a GPU) reads the latest value any caller
    set. Inside a ``torch.compile`` graph the thread cannot be read: a compiled model keeps one shared slot
    (one call at a time).
    """

    def __init__(self):
        self._local = threading.local()
        self._compiled = None
        self.latest = None

    def own(self):
        """The calling thread's value, or None."""
        if torch.compiler.is_compiling():
            return self._compiled
        return getattr(self._local, "value", None)

    def get(self):
        """The calling thread's value, else the latest of any caller (None before the first)."""
        value = self.own()
        return self.latest if value is None else value

    def set(self, value):
        if torch.compiler.is_compiling():
            self._compiled = value
        else:
            self._local.value = value
        self.latest = value
        return value

    def __deepcopy__(self, memo):
        # Per-call state belongs to the calls of this model; a copy of the model starts with none.
        return PerCaller()


class GridRecord:
    """The token grid (rows, cols) of a grid-owning module's current call, per caller."""

    def __init__(self):
        self._grids = PerCaller()

    def set(self, height: int, width: int) -> None:
        self._grids.set((height, width))

    def get(self) -> tuple[Optional[int], Optional[int]]:
        return self._grids.get() or (None, None)

    @property
    def latest(self) -> tuple[Optional[int], Optional[int]]:
        """The grid of the latest call of any caller, for reports."""
        return self._grids.latest or (None, None)


def _step_key(timestep) -> Key:
    """An integer key of the step's timestep (x1000, rounded), read where it lives: no host sync."""
    if timestep is None:
        return 0
    if isinstance(timestep, torch.Tensor):
        return (timestep.flatten()[0].float() * 1000).round().long()
    return int(round(float(timestep) * 1000))


_COMPILE_NEEDS_CONSTANT_RATIO = (
    "token fusion with a ratio schedule (or plan_reuse_steps > 1) reads each step's timestep on the host, which "
    "torch.compile(fullgraph=True) cannot capture; compile with a constant ratio=..., or without fullgraph=True"
)


@dataclass
class StepState:
    """What one caller's current denoising step decided: its ratio and the key of its random draws."""

    ratio: float
    key: Key = 0
    index: int = 0  # steps since this caller's sampling run started
    timestep: Optional[float] = None
    guidance_pairs: bool = False  # the batch is [uncond; cond] of one latent: both halves share one plan
    call_in_step: int = 0  # 0 for a step's first denoiser call, 1 for the second (true CFG's separate calls), ...


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

    def step(self) -> StepState:
        """The calling thread's current step (see ``PerCaller`` for threads that started none)."""
        state = self._steps.get()
        if state is None:
            state = self._steps.set(StepState(self.config.ratio_at(None), mix_key(self.config.seed)))
        return state

    @property
    def ratio(self) -> float:
        return self.step().ratio

    def begin_step(self, timestep, latent: Optional[torch.Tensor] = None) -> None:
        """Derive this step's key from (seed, timestep): same call, same destinations.

        Only a schedule or plan reuse reads the timestep's value on the host; a constant ratio keeps the
        hot path free of syncs (and ``torch.compile(fullgraph=True)`` free of graph breaks).
        """
        step = self._steps.set(self._steps.own() or StepState(self.config.ratio_at(None)))
        step.key = mix_key(self.config.seed, _step_key(timestep))
        cfg = self.config
        step.guidance_pairs = cfg.share_guidance_plans and is_guidance_batch(latent)
        if cfg.schedule is None and cfg.plan_reuse_steps == 1:
            return
        if torch.compiler.is_compiling():
            raise RuntimeError(_COMPILE_NEEDS_CONSTANT_RATIO)
        value = None
        if timestep is not None:
            value = float(timestep.flatten()[0].item() if isinstance(timestep, torch.Tensor) else timestep)
        position = self.locator.locate(value)
        same_step = value is not None and value == step.timestep
        if position.index is not None:
            same_step = same_step and position.index == step.index
            step.index = position.index
        elif not same_step:
            # No scheduler to ask: sampling runs go from high to low timesteps, so a timestep that rises
            # starts a new run and plan reuse never carries a plan into the next call; an equal one is another
            # call of the same step (true CFG).
            new_run = value is None or step.timestep is None or value > step.timestep
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

    @property
    def reuse_plans(self) -> bool:
        """Whether blocks reuse their previous step's plan in this step (``plan_reuse_steps``)."""
        return self.step().index % self.config.plan_reuse_steps != 0

    def partition(self, height: int, width: int, device: torch.device, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.destination == "random":  # a draw per (seed, step, block): repeatable, also when recomputed
            return grid_partition(height, width, cfg.stride, device=device, key=mix_key(self.step().key, salt))
        # Fixed destinations depend only on the grid: computed once per (grid, device).
        key = (height, width, str(device))
        if key not in self._fixed_partitions:
            self._fixed_partitions[key] = grid_partition(
                height, width, cfg.stride, position=cfg.destination_position, device=device
            )
        return self._fixed_partitions[key]


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


@dataclass
class BlockState:
    """One reduced block: its settings, the grid it reads, and the plan of the current call."""

    name: str
    depth: int
    merge_mode: str
    grid: GridRecord
    run: RunState
    last_tokens: Optional[tuple[int, int]] = None  # (tokens in, tokens after merge) of the latest call
    sublayers: tuple[str, ...] = ("self_attention",)  # what runs on the reduced tokens, for the cost model
    plans_computed: int = 0
    last_plan: Optional[MergePlan] = None  # the plan of the latest call (None when it reduced nothing)
    _skipped: set = field(default_factory=set, repr=False)
    _calls: PerCaller = field(default_factory=PerCaller, repr=False)  # of BlockCall

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
            previous = call.reusable.get(slot)
            b, n = call.input.shape[:2]
            ratio = self.run.ratio
            if self.run.reuse_plans and previous is not None and previous[1:] == (ratio, (b, n)):
                call.plan = previous[0]
            else:
                # Labels let a profiler attribute time to planning / merge / unmerge (free when not profiling).
                with record_function("tofu_diffusion::plan"):
                    call.plan = self._shared_or_own_plan(call.input, ratio, attention, attention_input)
                if call.plan is not None:
                    self.plans_computed += 1
                call.reusable[slot] = (call.plan, ratio, (b, n))
            call.planned = True
            self.last_plan = call.plan
            self.last_tokens = (n, n if call.plan is None else call.plan.num_kept)
        return call.plan

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

    def checked_grid(self, n: int) -> tuple[int, int]:
        h, w = self.grid.get()
        if h is None or h * w != n:
            raise ValueError(
                f"{self.name}: the block has {n} tokens but its token grid is {h}x{w}; "
                f"token fusion cannot tile this input"
            )
        return h, w

    def _compute_plan(self, x, ratio, attention, attention_input) -> Optional[MergePlan]:
        cfg = self.run.config
        if x.dim() != 3:
            raise ValueError(f"{self.name}: expected block input (batch, tokens, channels), got {tuple(x.shape)}")
        n = x.shape[1]
        r = int(n * ratio)
        if r == 0:
            if ratio > 0 and not self.run.warned_too_few:
                self.run.warned_too_few = True
                logger.warning("%s: ratio %s of %d tokens removes no token; these calls run unreduced (raise the "
                               "ratio or reduce blocks with more tokens)", self.name, ratio, n)
            return None
        h, w = self.checked_grid(n)
        num_dst = (h // cfg.stride[0]) * (w // cfg.stride[1])
        if num_dst and not reduction_pays(n, x.shape[-1], r, num_dst, self.sublayers):
            if (h, w) not in self._skipped:
                self._skipped.add((h, w))
                logger.debug("%s: not reduced at %dx%d tokens, ratio %s: matching would cost more than it saves",
                             self.name, h, w, ratio)
            return None
        src, dst = self.run.partition(h, w, x.device, salt=self.depth)
        if cfg.method == "mctf":
            info = None
            if attention is not None and cfg.tau_info > 0:
                if attention_input is None:
                    # Whole-block scope: attn1's input (after the block's own, possibly conditioned,
                    # norm) is not available yet; a plain layer norm of the block input is the same up
                    # to a per-channel scale and shift, close enough to rank informativeness.
                    attention_input = torch.nn.functional.layer_norm(x, x.shape[-1:])
                info = estimate_attention_received(attention, attention_input, cfg.info_queries, (h, w),
                                                   key=mix_key(self.run.step().key, self.depth, 1))
            scores = mctf_scores(x, src, dst, info, None, cfg.tau_sim, cfg.tau_info, cfg.tau_size)
            return bidirectional_matching(scores, src, dst, n, r, weights=info)
        return bipartite_soft_matching(x, src, dst, r)


def estimate_attention_received(
    attention: torch.nn.Module,
    hidden: torch.Tensor,
    num_queries: int,
    grid: tuple[int, int],
    generator: Optional[torch.Generator] = None,
    key: Optional[Key] = None,
) -> torch.Tensor:
    """Attention each token receives in ``attention`` (a diffusers ``Attention``): (B, N), estimated
    from ``num_queries`` queries stratified over the ``grid`` (one per cell, at a random position drawn
    from ``key`` or ``generator``), weighted by their cell's share: an unbiased estimate of the mean over
    all queries.

    Keys of all N tokens would cost a full N x C x C projection, which the reduced block never needs.
    For head h, ``q . (W_k x + b) = (W_k^T q) . x + q . b``, and the second term is the same for every
    key, so it cancels in the softmax: the few queries are projected back to the input space instead
    (heads x queries x C x C) and dotted with the raw inputs. Models with a key norm (qk-norm) break
    this identity and get their keys projected.
    """
    for name in ("to_q", "to_k", "heads"):
        if not hasattr(attention, name):
            raise TypeError(
                f"mctf needs a diffusers Attention with to_q/to_k/heads to estimate informativeness; "
                f"{type(attention).__name__} has no {name}. Use tau_info=0 to switch that criterion off."
            )
    with torch.no_grad():
        b, n, c = hidden.shape
        heads = attention.heads
        index, weight = stratified_grid_queries(grid[0], grid[1], num_queries, generator, key=key)
        query = attention.to_q(hidden[:, index.to(hidden.device)])
        nq = query.shape[1]
        head_dim = query.shape[-1] // heads
        norm_q, norm_k = getattr(attention, "norm_q", None), getattr(attention, "norm_k", None)
        if norm_q is not None:
            query = norm_q(query.view(b, -1, heads, head_dim)).flatten(2)
        # (H x Nq x C x N logits against N x C x C for the keys: cheaper while H x Nq < C.)
        if norm_k is None and isinstance(attention.to_k, torch.nn.Linear) and heads * nq < c:
            w_k = attention.to_k.weight.view(heads, head_dim, c)
            q = query.view(b, nq, heads, head_dim).float() * head_dim**-0.5
            q_in = torch.einsum("bqhd,hdc->bhqc", q, w_k.float()).reshape(b, -1, c)  # (B, H*Nq, C)
            logits = torch.bmm(q_in, hidden.float().transpose(1, 2))  # (B, H*Nq, N): one matmul
            return mean_over_queries(logits.softmax(dim=-1).view(b, heads, nq, n), weight)
        keys = attention.to_k(hidden)
        if norm_k is not None:
            keys = norm_k(keys.view(b, n, heads, head_dim)).flatten(2)
        return attention_received(query, keys, heads, query_weights=weight)


# ---------------------------------------------------------------------------------------------- hooks
def is_guidance_batch(latent: Optional[torch.Tensor]) -> bool:
    """Whether a denoiser input is a classifier-free guidance batch: its two halves are the same latents
    (diffusers' pipelines run ``cat([x, x])`` for unconditional and conditional). Not read under
    ``torch.compile`` (a host comparison), where every sample plans on its own."""
    if not isinstance(latent, torch.Tensor) or latent.dim() < 2 or latent.shape[0] % 2 or torch.compiler.is_compiling():
        return False
    half = latent.shape[0] // 2
    return bool(torch.equal(latent[:half], latent[half:]))


class RootHook(ModelHook):
    def __init__(self, run: RunState, timestep_of: Callable[[tuple, dict], object]):
        super().__init__()
        self.run = run
        self.timestep_of = timestep_of

    def pre_forward(self, module, *args, **kwargs):
        latent = hidden_states_of(args, kwargs, ("hidden_states", "sample")) if self.run.config.share_guidance_plans \
            else None
        self.run.begin_step(self.timestep_of(args, kwargs), latent)
        return args, kwargs


class GridHook(ModelHook):
    def __init__(self, record: GridRecord, grid_of: Callable[[torch.nn.Module, torch.Tensor, dict], tuple[int, int]]):
        super().__init__()
        self.record = record
        self.grid_of = grid_of  # (module, its input, its keyword arguments) -> (rows, cols)

    def pre_forward(self, module, *args, **kwargs):
        hidden = hidden_states_of(args, kwargs, ("hidden_states", "sample"))
        self.record.set(*self.grid_of(module, hidden, kwargs))
        return args, kwargs


class BlockHook(ModelHook):
    def __init__(self, state: BlockState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        self.state.begin(hidden_states_of(args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        self.state.end()
        return output


# The hooks below only transform inputs (pre_forward) and outputs (post_forward), with no new_forward:
# diffusers then rewires them correctly when a hook registered before them is removed, and the
# original forward always runs between them.


class MergeHook(ModelHook):
    """``unmerge(original_forward(merge(x)))`` around one sublayer of a block."""

    def __init__(self, state: BlockState, role: str):
        super().__init__()
        self.state = state
        self.role = role  # "self_attention", "cross_attention" or "feed_forward"

    def pre_forward(self, module, *args, **kwargs):
        hidden = hidden_states_of(args, kwargs)
        plan = self.state.plan(module if self.role == "self_attention" else None, hidden)
        if plan is None:
            return args, kwargs
        if hidden.shape[:2] != (plan.batch_size, plan.num_tokens):
            raise ValueError(
                f"{self.state.name}.{self.role}: got {tuple(hidden.shape)} but the block has "
                f"{plan.batch_size}x{plan.num_tokens} tokens. Feed-forward chunking splits them: turn it off "
                f"(model.disable_forward_chunking() or block.set_chunk_feed_forward(None)) or set "
                f"merge_feed_forward=False."
            )
        if self.role == "self_attention" and kwargs.get("attention_mask") is not None:
            raise ValueError(
                f"{self.state.name}: self-attention was called with an attention_mask, which token fusion "
                f"cannot merge; set merge_self_attention=False for this model"
            )
        with record_function("tofu_diffusion::merge"):
            merged = plan.merge(hidden, self.state.merge_mode)
        return _replace_hidden_states(args, kwargs, merged)

    def post_forward(self, module, output):
        plan = self.state.call().plan
        if plan is None:
            return output
        with record_function("tofu_diffusion::unmerge"):
            return plan.unmerge(output)


class WholeBlockHook(ModelHook):
    """Run the whole block on merged tokens; unmerge its residual update: x + unmerge(f(m) - m).

    ``image_output``: for joint-attention blocks that return ``(text, image)``, the index of the image
    stream in the output (only it is unmerged; the text stream passes through); None when the block
    returns the image tokens alone.
    """

    def __init__(self, state: BlockState, attention: Optional[torch.nn.Module], image_output: Optional[int] = None):
        super().__init__()
        self.state = state
        self.attention = attention  # the block's self-attention, for mctf's informativeness
        self.image_output = image_output

    def pre_forward(self, module, *args, **kwargs):
        call = self.state.begin(hidden_states_of(args, kwargs))
        plan = self.state.plan(self.attention, None)
        if plan is None:
            return args, kwargs
        with record_function("tofu_diffusion::merge"):
            call.merged = plan.merge(call.input, self.state.merge_mode)
        return _replace_hidden_states(args, kwargs, call.merged)

    def post_forward(self, module, output):
        call = self.state.call()
        plan, hidden, merged = call.plan, call.input, call.merged
        self.state.end()
        if plan is None:
            return output
        with record_function("tofu_diffusion::unmerge"):
            if self.image_output is None:
                return hidden + plan.unmerge(output - merged)
            image = hidden + plan.unmerge(output[self.image_output] - merged)
            return type(output)(image if i == self.image_output else o for i, o in enumerate(output))


class RotaryJointBlockHook(ModelHook):
    """Flux: a joint block run on merged image tokens, each with the rotary row of the token it stands at.

    The block gets ``(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)``
    and returns ``(text, image)``; ``image_rotary_emb`` is ``(cos, sin)``, each (T + N, D) for [text; image].
    A kept token takes its own row and a merged group its destination's (``plan.kept_idx``). Plans are per
    sample, and diffusers' rotary takes one table for the whole batch, so a batch of B runs the reduced
    block once per sample: an image never depends on its batch-mates. (Flux-dev is guidance-distilled, so
    its batch is usually 1.)
    """

    ARGUMENTS = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")

    def __init__(self, state: BlockState, attention: Optional[torch.nn.Module]):
        super().__init__()
        self.state = state
        self.attention = attention

    def new_forward(self, module, *args, **kwargs):
        bound = {**dict(zip(self.ARGUMENTS, args)), **kwargs}
        hidden = bound["hidden_states"]
        self.state.begin(hidden)
        try:
            plan = self.state.plan(self.attention, None)
            if plan is None:
                return self.fn_ref.original_forward(*args, **kwargs)
            with record_function("tofu_diffusion::merge"):
                merged = plan.merge(hidden, self.state.merge_mode)
            text, rotary = bound["encoder_hidden_states"], bound.get("image_rotary_emb")
            batch, text_len = hidden.shape[0], text.shape[1]
            text_rows = torch.arange(text_len, device=plan.kept_idx.device)
            texts, images = [], []
            for b in range(batch):
                one = {name: _sample(value, b, batch) for name, value in bound.items()}
                one["hidden_states"] = merged[b:b + 1]
                if rotary is not None:
                    rows = torch.cat([text_rows, text_len + plan.kept_idx[b]])
                    one["image_rotary_emb"] = tuple(r.index_select(0, rows.to(r.device)) for r in rotary)
                out_text, out_image = self.fn_ref.original_forward(**one)
                texts.append(out_text)
                images.append(out_image)
            with record_function("tofu_diffusion::unmerge"):
                image = hidden + plan.unmerge(torch.cat(images) - merged)
            return torch.cat(texts), image
        finally:
            self.state.end()


def _sample(value, index: int, batch: int):
    """Sample ``index`` of a batched argument (tensors with the batch first, dicts of them); others as given."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[index:index + 1]
    if isinstance(value, dict):
        return {k: _sample(v, index, batch) for k, v in value.items()}
    return value


def downsample_on_grid(state: BlockState, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """ToDo's downsampling: ``tokens`` (B, N, C) on the block's grid, resized to ``sqrt(1 - ratio)`` of each
    side (nearest-exact, as ToDo's reference); None when that keeps every token. Records the token counts."""
    b, n, c = tokens.shape
    ratio = state.run.ratio
    size = None
    if ratio > 0:
        h, w = state.checked_grid(n)
        keep = (1.0 - ratio) ** 0.5
        size = (max(1, round(h * keep)), max(1, round(w * keep)))
    if size is None or size[0] * size[1] >= n:
        state.last_tokens = (n, n)
        return None
    with record_function("tofu_diffusion::downsample"):
        grid = tokens.transpose(1, 2).reshape(b, c, h, w)
        out = torch.nn.functional.interpolate(grid, size=size, mode="nearest-exact").flatten(2).transpose(1, 2)
    state.last_tokens = (n, out.shape[1])
    return out


class KeyValueDownsampleHook(ModelHook):
    """ToDo on a self-attention: every query attends to keys and values of a downsampled token grid.

    The attention's input is downsampled on its 2-D grid (``downsample_on_grid``) and passed as
    ``encoder_hidden_states``, which a diffusers ``Attention`` projects to keys and values; queries and
    outputs keep all N tokens, so there is nothing to unmerge.
    """

    def __init__(self, state: BlockState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        keys = downsample_on_grid(self.state, hidden_states_of(args, kwargs))
        if keys is None:
            return args, kwargs
        if kwargs.get("attention_mask") is not None:
            raise ValueError(f"{self.state.name}: self-attention was called with an attention_mask, which todo "
                             f"cannot downsample; use another method for this model")
        if len(args) > 1:
            return (args[0], keys) + tuple(args[2:]), kwargs
        return args, {**kwargs, "encoder_hidden_states": keys}


class ProjectionDownsampleHook(ModelHook):
    """ToDo inside a joint attention (SD3): on the image ``to_k`` / ``to_v`` projections, their outputs are
    downsampled on the grid. Keys and values of the image shrink while its queries and every text token
    stay; the processor joins [image; text] keys and values of any length. Strided (nearest) selection
    commutes with the per-token projection and q/k norm, so this equals downsampling the input."""

    def __init__(self, state: BlockState):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        reduced = downsample_on_grid(self.state, output)
        return output if reduced is None else reduced


# ------------------------------------------------------------------------------ registration and removal
class HookedForward:
    """A module's ``forward`` while one of our hooks is its outermost: what diffusers installs (pre_forward,
    the inner forward, post_forward), as an object. A function closure would keep pointing at the original
    module's hooks in a ``copy.deepcopy`` of the model; this object is copied with the module, so a copy is
    an independent patched model."""

    def __init__(self, module: torch.nn.Module, fn_ref, wrapped):
        self.module = module
        self.fn_ref = fn_ref
        self.__wrapped__ = wrapped  # inspect.signature follows it to the real signature

    def __call__(self, *args, **kwargs):
        fn_ref = self.fn_ref
        args, kwargs = fn_ref.pre_forward(self.module, *args, **kwargs)
        return fn_ref.post_forward(self.module, fn_ref.forward(*args, **kwargs))


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    wrapped = module.forward
    registry.register_hook(hook, name)
    hook.installed_forward = HookedForward(module, hook.fn_ref, wrapped)
    module.forward = hook.installed_forward
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def _unlink(module: torch.nn.Module, registry: HookRegistry, name: str) -> None:
    """Take one of our hooks out of ``module``'s forward chain, wherever it sits in it.

    ``HookRegistry.remove_hook`` assumes nothing wraps the registry from outside and that the next hook
    has no ``new_forward``; neither holds with accelerate's hooks or diffusers' caches registered after
    ours. Every reference to our installed forward (the module's ``forward``, the next hook's forward,
    accelerate's ``_old_forward``, a wrapper's ``__wrapped__``) is pointed at what ours wrapped instead.
    """
    index = registry._hook_order.index(name)
    fn_ref, hook = registry._fn_refs[index], registry.hooks[name]
    inner = fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward
    installed = getattr(hook, "installed_forward", None)
    for later in registry._fn_refs[index + 1:]:
        for attr in ("forward", "original_forward"):
            if getattr(later, attr) is installed:
                setattr(later, attr, inner)
    for attr, value in list(vars(module).items()):
        if value is installed:
            setattr(module, attr, inner)
    outer = vars(module).get("forward")
    if outer is not None and getattr(outer, "__wrapped__", None) is installed:
        outer.__wrapped__ = inner
    hook.deinitalize_hook(module)
    del registry.hooks[name]
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)


def unregister_all(model: torch.nn.Module) -> None:
    """Remove every tofu-diffusion hook under ``model``, leaving other hooks (diffusers' caches,
    accelerate's offload hooks) in place and working, and drop registries left empty."""
    for module in model.modules():
        registry = vars(module).get("_diffusers_hook")
        if registry is None:
            continue
        for name in [n for n in registry._hook_order if n.startswith(HOOK_PREFIX)]:
            _unlink(module, registry, name)
        if not registry.hooks:
            # Leave the module exactly as constructed: no registry, no instance-level forward.
            del module._diffusers_hook
            forward = vars(module).get("forward")
            if forward is not None and getattr(forward, "__func__", None) is type(module).forward:
                del module.__dict__["forward"]
        elif hasattr(registry, "invalidate_child_registries_cache"):
            registry.invalidate_child_registries_cache()
