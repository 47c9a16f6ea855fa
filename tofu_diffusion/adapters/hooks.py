"""The diffusers hooks that reduce a block's tokens, shared by every diffusion family.

All are registered through ``registry.register`` (diffusers' ``HookRegistry``) and no block forward is
re-implemented; ``registry.unregister_all`` takes out exactly these hooks, in any order of registration
with other hooks. A family composes them in its adapter (``blocks.BlockAdapter.attach_block``):

* ``RootHook`` on the denoiser: derives the step's random key from (seed, timestep), so a seeded
  pipeline call is repeatable, a recomputed forward (gradient checkpointing) makes the same plans, and
  no RNG state leaks between calls.
* ``GridHook`` on the module whose input defines the token grid: records the grid of the current call.
* ``WholeBlockHook`` (``merge_scope="block"``) runs a block's own forward on merged tokens and returns
  ``x + unmerge(out - merged)``; with ``image_output`` it does so for the image stream of a block that
  returns ``(text, image)``.
* ``BlockHook`` + ``MergeHook`` (``merge_scope="sublayers"``): the block remembers its input; each
  selected sublayer returns ``unmerge(original_forward(merge(x)))``, all by one plan computed by the first
  sublayer that needs it.

Hooks read their module's forward signature once (``initialize_hook``); those that hold per-call state
are diffusers-stateful (``reset_state``), so a pipeline's ``maybe_free_model_hooks`` ends a run cleanly.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from diffusers.hooks import ModelHook
from torch.profiler import record_function

from ..core import MergePlan
from .arguments import Signature
from .planning import BlockState
from .state import GridRecord, RunState

ROOT_HOOK = "tofu_diffusion_root"
GRID_HOOK = "tofu_diffusion_grid"
BLOCK_HOOK = "tofu_diffusion_block"
MERGE_HOOK = "tofu_diffusion_merge"
WHOLE_BLOCK_HOOK = "tofu_diffusion_whole_block"

# Arguments with a row per token (a rotary table, per-token conditioning) that must follow the merged tokens:
# argument name -> (its value, the plan) -> its value for the kept tokens.
Followers = Mapping[str, Callable[[object, MergePlan], object]]


def follow(signature: Signature, args: tuple, kwargs: dict, followers: Optional[Followers],
           plan: MergePlan) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with every follower argument that was passed (and is not None) made to fit the plan."""
    for name, fit in (followers or {}).items():
        value = signature.get(args, kwargs, name)
        if value is not None:
            args, kwargs = signature.replace(args, kwargs, name, fit(value, plan))
    return args, kwargs


def rows_of_kept(value, plan: MergePlan):
    """A follower for tables with the tokens on dim 1 (batch 1 or B), or tuples of them (rotary cos, sin)."""
    if isinstance(value, (tuple, list)):
        return type(value)(rows_of_kept(v, plan) for v in value)
    return plan.take(value)


def key_mask_of_kept(value, plan: MergePlan):
    """A follower for a mask (or bias) over the block's tokens on its last axis ((B or 1, ..., N)): the kept
    tokens' entries (a merged group keeps its destination's)."""
    if not isinstance(value, torch.Tensor) or value.shape[-1] != plan.num_tokens:
        return value
    kept = plan.kept_idx.to(value.device)
    b, middle = kept.shape[0], value.shape[1:-1]
    index = kept.view(b, *([1] * len(middle)), -1).expand(b, *middle, kept.shape[1])
    return value.expand(b, *value.shape[1:]).gather(-1, index)


def per_token_rows(value, plan: MergePlan):
    """A follower for conditioning that is per token only sometimes (a 4-D (B, N, k, D) modulation): its kept
    rows; a per-sample one ((B, k, D)) as given."""
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[1] == plan.num_tokens:
        return plan.take(value)
    return value


class SignedHook(ModelHook):
    """A hook that reads its module's arguments by name (``self.signature``, read when registered)."""

    signature: Signature

    def initialize_hook(self, module):
        self.signature = Signature(module)
        return module


class RootHook(SignedHook):
    """On the denoiser: each call begins a step of the run (its ratio, its random key, its guidance pairs)."""

    _is_stateful = True

    def __init__(self, run: RunState, timestep_argument: str = "timestep"):
        super().__init__()
        self.run = run
        self.timestep_argument = timestep_argument

    def pre_forward(self, module, *args, **kwargs):
        timestep = self.signature.get(args, kwargs, self.timestep_argument)
        self.run.begin_step(timestep, self.signature.first(args, kwargs))
        return args, kwargs

    def reset_state(self, module):
        self.run.reset()
        return module


class GridHook(SignedHook):
    """On a grid-owning module: ``grid_of(module, its first input, every argument by name)`` -> the grid."""

    def __init__(self, record: GridRecord, grid_of: Callable[[torch.nn.Module, torch.Tensor, dict], tuple]):
        super().__init__()
        self.record = record
        self.grid_of = grid_of

    def pre_forward(self, module, *args, **kwargs):
        hidden = self.signature.first(args, kwargs)
        self.record.set(self.grid_of(module, hidden, self.signature.bind(args, kwargs)))
        return args, kwargs


class BlockStateHook(SignedHook):
    """A hook that keeps a block's per-call state: forgotten with diffusers' ``reset_stateful_hooks``."""

    _is_stateful = True

    def __init__(self, state: BlockState):
        super().__init__()
        self.state = state

    def reset_state(self, module):
        self.state.reset()
        return module


class BlockHook(BlockStateHook):
    def pre_forward(self, module, *args, **kwargs):
        self.state.begin(self.signature.first(args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        self.state.end()
        return output


# The hooks below only transform inputs (pre_forward) and outputs (post_forward), with no new_forward:
# diffusers then rewires them correctly when a hook registered before them is removed, and the
# original forward always runs between them.


class MergeHook(SignedHook):
    """``unmerge(original_forward(merge(x)))`` around one sublayer of a block."""

    def __init__(self, state: BlockState, role: str, followers: Optional[Followers] = None):
        super().__init__()
        self.state = state
        self.role = role  # "self_attention", "cross_attention" or "feed_forward"
        self.followers = followers

    def pre_forward(self, module, *args, **kwargs):
        hidden = self.signature.first(args, kwargs)
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
        if self.role == "self_attention" and self.signature.get(args, kwargs, "attention_mask") is not None:
            raise ValueError(
                f"{self.state.name}: self-attention was called with an attention_mask, which token fusion "
                f"cannot merge; set merge_self_attention=False for this model"
            )
        with record_function("tofu_diffusion::merge"):
            merged = plan.merge(hidden, self.state.merge_mode)
            args, kwargs = follow(self.signature, args, kwargs, self.followers, plan)
        return self.signature.replace_first(args, kwargs, merged)

    def post_forward(self, module, output):
        plan = self.state.call().plan
        if plan is None:
            if self.state.cached_unmerge:
                self.state.remember_update(output, self.role)
            return output
        with record_function("tofu_diffusion::unmerge"):
            return self.state.unmerged_update(plan, output, self.role)


class WholeBlockHook(BlockStateHook):
    """Run the whole block on merged tokens; unmerge its residual update: x + unmerge(f(m) - m).

    ``image_output``: for joint-attention blocks that return ``(text, image)``, the index of the image
    stream in the output (only it is unmerged; the text stream passes through); None when the block
    returns the image tokens alone.
    """

    def __init__(self, state: BlockState, attention: Optional[torch.nn.Module], image_output: Optional[int] = None,
                 followers: Optional[Followers] = None):
        super().__init__(state)
        self.attention = attention  # the block's self-attention, for mctf's informativeness
        self.image_output = image_output
        self.followers = followers

    def pre_forward(self, module, *args, **kwargs):
        call = self.state.begin(self.signature.first(args, kwargs))
        plan = self.state.plan(self.attention, None)
        if plan is None:
            return args, kwargs
        with record_function("tofu_diffusion::merge"):
            call.merged = plan.merge(call.input, self.state.merge_mode)
            args, kwargs = follow(self.signature, args, kwargs, self.followers, plan)
        return self.signature.replace_first(args, kwargs, call.merged)

    def post_forward(self, module, output):
        call = self.state.call()
        plan, hidden, merged = call.plan, call.input, call.merged
        image = output if self.image_output is None else output[self.image_output]
        if plan is None:
            if self.state.cached_unmerge:
                self.state.remember_update(image, minus=hidden)
            self.state.end()
            return output
        with record_function("tofu_diffusion::unmerge"):
            image = hidden + self.state.unmerged_update(plan, image - merged)
        self.state.end()
        if self.image_output is None:
            return image
        return type(output)(image if i == self.image_output else o for i, o in enumerate(output))


def sample_of(value, index: int, batch: int):
    """Sample ``index`` of a batched argument (tensors with the batch first, dicts of them); others as given."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[index:index + 1]
    if isinstance(value, dict):
        return {k: sample_of(v, index, batch) for k, v in value.items()}
    return value
