"""What the diffusion families share: reduce ``BasicTransformerBlock``-style blocks on a 2-D token grid.

A family gives three functions (``sites``: its blocks in execution order with the module whose input
defines their grid; ``grid_of``: that grid from the input; ``default_levels``: the resolution levels
reduced by default) and ``BlockAdapter`` does the rest: choose the blocks, check the request, and
register the hooks of ``hooks.py`` on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import TokenFusionConfig
from .base import Adapter, Patch, Site, timestep_reader
from .steps import StepLocator
from .hooks import (
    BLOCK_HOOK,
    DOWNSAMPLE_HOOK,
    GRID_HOOK,
    MERGE_HOOK,
    ROOT_HOOK,
    ROTARY_BLOCK_HOOK,
    WHOLE_BLOCK_HOOK,
    BlockHook,
    BlockState,
    GridHook,
    GridRecord,
    KeyValueDownsampleHook,
    MergeHook,
    ProjectionDownsampleHook,
    RootHook,
    RotaryJointBlockHook,
    RunState,
    WholeBlockHook,
    register,
)

logger = logging.getLogger("tofu_diffusion")

# (attribute of the block, role for the cost model, config flag that selects it)
SUBLAYERS = (
    ("attn1", "self_attention", "merge_self_attention"),
    ("attn2", "cross_attention", "merge_cross_attention"),
    ("ff", "feed_forward", "merge_feed_forward"),
)


# Joint-attention blocks name their parts differently (SD3/Flux: "attn"; Flux single blocks: "proj_mlp");
# they are reduced whole, so these only feed the cost model.
_WHOLE_BLOCK_PARTS = (("self_attention", ("attn1", "attn")), ("cross_attention", ("attn2",)),
                      ("feed_forward", ("ff", "proj_mlp")))


def block_parts(block: torch.nn.Module) -> tuple[str, ...]:
    """The sublayers ``block`` has, by role."""
    return tuple(role for role, attrs in _WHOLE_BLOCK_PARTS if any(getattr(block, attr, None) is not None
                                                                   for attr in attrs))


def reduced_sublayers(block: torch.nn.Module, config: TokenFusionConfig) -> tuple[str, ...]:
    """The sublayers of ``block`` that will run on reduced tokens."""
    if config.merge_scope == "block":
        return block_parts(block)
    return tuple(role for attr, role, flag in SUBLAYERS
                 if getattr(block, attr, None) is not None and getattr(config, flag))


def select_levels(sites: list[Site], config: TokenFusionConfig, default_levels: set[int],
                  model_name: str) -> list[Site]:
    available = sorted({s.level for s in sites})
    if config.levels is not None:
        wanted = set(config.levels)
    elif config.max_downsample is not None:
        wanted = {level for level in available if level <= config.max_downsample}
    else:
        wanted = default_levels
    chosen = [s for s in sites if s.level in wanted]
    if not chosen:
        raise ValueError(
            f"no attention block of {model_name} is at the requested resolution level(s) "
            f"(levels={config.levels}, max_downsample={config.max_downsample}); this model has attention at "
            f"downsampling factors {available}: pass levels=[...] or a max_downsample from those"
        )
    skipped = sorted(set(available) - wanted)
    if skipped:
        logger.debug("%s: levels %s are not reduced", model_name, skipped)
    return chosen


def pick_blocks(sites: list[Site], blocks, model_name: str) -> list[Site]:
    """The eligible blocks selected by ``blocks`` (indices, negative from the end, or a slice)."""
    if blocks is None:
        return sites
    if isinstance(blocks, slice):
        return sites[blocks]
    bad = [i for i in blocks if not -len(sites) <= i < len(sites)]
    if bad:
        raise ValueError(f"blocks {bad} out of range: {model_name} has {len(sites)} eligible blocks "
                         f"(indices 0..{len(sites) - 1}, or negative from the end)")
    wanted = {i % len(sites) for i in blocks}
    return [site for i, site in enumerate(sites) if i in wanted]


def _self_attention(block: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The block's self-attention (joint blocks: their joint attention), for mctf's informativeness."""
    for attr in ("attn1", "attn"):
        if getattr(block, attr, None) is not None:
            return getattr(block, attr)
    return None


def attach_block(block: torch.nn.Module, state: BlockState, config: TokenFusionConfig,
                 image_output: Optional[int] = None, rotary: bool = False) -> None:
    """Register the hooks that run ``block`` (or its selected sublayers) on reduced tokens."""
    attention = _self_attention(block) if config.method == "mctf" else None
    if rotary:
        register(block, RotaryJointBlockHook(state, attention), ROTARY_BLOCK_HOOK)
        return
    if config.method == "todo" and image_output is not None:  # joint attention: image keys/values only
        for joint in (getattr(block, "attn", None), getattr(block, "attn2", None)):
            if joint is not None:
                register(joint.to_k, ProjectionDownsampleHook(state), DOWNSAMPLE_HOOK)
                register(joint.to_v, ProjectionDownsampleHook(state), DOWNSAMPLE_HOOK)
        return
    if config.method == "todo":
        register(block.attn1, KeyValueDownsampleHook(state), DOWNSAMPLE_HOOK)
        return
    if config.merge_scope == "block":
        register(block, WholeBlockHook(state, attention, image_output), WHOLE_BLOCK_HOOK)
        return
    register(block, BlockHook(state), BLOCK_HOOK)
    for attr, role, _ in SUBLAYERS:
        if role in state.sublayers:
            register(getattr(block, attr), MergeHook(state, role), MERGE_HOOK)


@dataclass(frozen=True)
class BlockGeometry:
    """A transformer block at one resolution, for ``tofu.explain``: its token grid, width and sublayers."""

    name: str
    grid: tuple[int, int]
    channels: int
    parts: tuple[str, ...]  # every sublayer it has (what its unreduced cost counts)
    sublayers: tuple[str, ...]  # those that run on reduced tokens
    reduced: bool

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class BlockAdapter(Adapter):
    """A diffusion family whose blocks are reduced on the token grid of a grid-owning module."""

    sites: Callable[[torch.nn.Module], list[Site]]  # the blocks, in execution order
    grid_of: Callable[[torch.nn.Module, torch.Tensor, dict], tuple[int, int]]  # (owner, input, kwargs) -> grid
    default_levels: Callable[[list[Site]], set[int]]  # the resolution levels reduced by default
    # Joint-attention blocks (text and image in one attention) return (text, image): the image stream's
    # index. They are reduced whole: only the image tokens are merged, every text token stays.
    image_output: Optional[int] = None
    rotary: bool = False  # the blocks take image_rotary_emb, whose image rows must follow the kept tokens
    timestep_unit: float = 1.0  # the denoiser's timestep per scheduler timestep (Flux: 1/1000)
    packing: int = 1  # latent positions per token side beyond config.patch_size (Flux packs 2x2 in the pipeline)

    def token_grid(self, model: torch.nn.Module, latent: tuple[int, int]) -> tuple[int, int]:
        """The full-resolution token grid of a (height, width) latent."""
        side = int(getattr(model.config, "patch_size", None) or 1) * self.packing
        if latent[0] % side or latent[1] % side:
            raise ValueError(f"a {latent[0]}x{latent[1]} latent does not tile into {type(model).__name__}'s tokens of "
                             f"{side}x{side} latent positions; use a size whose latent is a multiple of {side}")
        return latent[0] // side, latent[1] // side

    def geometry(self, model: torch.nn.Module, config: TokenFusionConfig, reduced: list[Site],
                 latent: tuple[int, int]) -> list[BlockGeometry]:
        """Every block of ``model`` on a (height, width) latent, those in ``reduced`` marked."""
        rows, cols = self.token_grid(model, latent)
        chosen = {id(site.block) for site in reduced}
        out = []
        for site in self.sites(model):
            attention = _self_attention(site.block)
            channels = attention.to_q.in_features if attention is not None else 0
            grid = (-(-rows // site.level), -(-cols // site.level))  # each downsampler halves, rounding up
            out.append(BlockGeometry(site.name, grid, channels, block_parts(site.block),
                                     reduced_sublayers(site.block, config),
                                     id(site.block) in chosen))
        return out

    def to_scheduler_units(self, timestep: float) -> float:
        """The family's timestep convention: what the denoiser receives -> the scheduler's timestep."""
        return timestep / self.timestep_unit

    def check(self, model: torch.nn.Module, config: TokenFusionConfig) -> list[Site]:
        if config.r is not None or config.layers is not None:
            raise ValueError("r and layers schedule the layers of ViT/DeiT classifiers; diffusion models take "
                             "ratio (and levels / max_downsample to choose blocks)")
        model_name = type(model).__name__
        if self.image_output is not None and config.merge_scope != "block":
            raise ValueError(f"{model_name}'s joint-attention blocks are reduced whole (image tokens merged, text "
                             f"tokens kept): use merge_scope='block'; merge_scope='sublayers' is not available "
                             f"for them")
        if self.rotary and config.method == "todo":
            raise ValueError(f"todo is not available for {model_name} yet: its attention applies one rotary table to "
                             f"queries and keys together, so image keys cannot be downsampled alone; use tome, "
                             f"tofu or mctf")
        all_sites = self.sites(model)
        if not all_sites:
            raise ValueError(f"{model_name} has no transformer block to reduce")
        sites = select_levels(all_sites, config, self.default_levels(all_sites), model_name)
        sites = pick_blocks(sites, config.blocks, model_name)
        if not sites:
            raise ValueError(f"blocks={config.blocks!r} selects none of the eligible blocks of {model_name}")
        if config.method != "todo" and not any(reduced_sublayers(site.block, config) for site in sites):
            raise ValueError(f"nothing to reduce: the selected sublayers (merge_self_attention / "
                             f"merge_cross_attention / merge_feed_forward) exist in none of {model_name}'s blocks "
                             f"(e.g. DiT blocks have no cross-attention); select another sublayer or use "
                             f"merge_scope='block'")
        return sites

    def attach(self, model: torch.nn.Module, config: TokenFusionConfig, sites: list[Site],
               scheduling=None) -> Patch:
        run = RunState(config, StepLocator(scheduling, self.to_scheduler_units))
        register(model, RootHook(run, timestep_reader(model)), ROOT_HOOK)
        grids: dict[int, GridRecord] = {}
        blocks = []
        for depth, site in enumerate(sites):
            owner_key = id(site.grid_owner)
            if owner_key not in grids:
                grids[owner_key] = GridRecord()
                register(site.grid_owner, GridHook(grids[owner_key], self.grid_of), GRID_HOOK)
            state = BlockState(site.name, depth, config.merge_mode_for(depth, len(sites)), grids[owner_key], run,
                               sublayers=reduced_sublayers(site.block, config))
            attach_block(site.block, state, config, self.image_output, self.rotary)
            blocks.append(state)
        return Patch(blocks)
