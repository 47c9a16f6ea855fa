"""What the diffusion families share: reduce transformer blocks on a token grid of any rank.

A family gives three functions (``sites``: its blocks in execution order with the module whose input
defines their grid; ``grid_of``: that grid from the input; ``default_levels``: the resolution levels
reduced by default) and ``BlockAdapter`` does the rest: choose the blocks, check the request, and
register the hooks of ``hooks.py`` on them. ``BlockAdapter.attach_block`` composes the hooks of a
``BasicTransformerBlock``-style block (``attn1`` / ``attn2`` / ``ff``); a family whose blocks differ
overrides it (and ``refuse``, for what it cannot do) in its own file, from the same pieces.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import CLASSIFIER_OPTIONS, TokenFusionConfig
from . import todo
from .base import Adapter, Patch, Site
from .hooks import (
    BLOCK_HOOK,
    GRID_HOOK,
    MERGE_HOOK,
    ROOT_HOOK,
    WHOLE_BLOCK_HOOK,
    BlockHook,
    Followers,
    GridHook,
    MergeHook,
    RootHook,
    WholeBlockHook,
)
from .planning import BlockState
from .registry import register
from .state import GridRecord, ImageLayout, RunState
from .steps import StepLocator, linear_dynamic_shift

logger = logging.getLogger("tofu_diffusion")

# (attribute of the block, role for the cost model, config flag that selects it)
SUBLAYERS = (
    ("attn1", "self_attention", "merge_self_attention"),
    ("attn2", "cross_attention", "merge_cross_attention"),
    ("ff", "feed_forward", "merge_feed_forward"),
)


# Joint-attention blocks name their parts differently ("attn"; single-stream blocks: "proj_mlp"; Z-Image:
# "attention", "feed_forward"); they are
# reduced whole, so these only feed the cost model.
_WHOLE_BLOCK_PARTS = (("self_attention", ("attn1", "attn", "attention")), ("cross_attention", ("attn2",)),
                      ("feed_forward", ("ff", "ffn", "proj_mlp", "feed_forward")))


def block_parts(block: torch.nn.Module) -> tuple[str, ...]:
    """The sublayers ``block`` has, by role (a parallel attention that fuses the MLP into its projections,
    Flux.2's single-stream blocks, has a feed-forward too)."""
    fused_mlp = getattr(getattr(block, "attn", None), "mlp_hidden_dim", None) is not None
    return tuple(role for role, attrs in _WHOLE_BLOCK_PARTS
                 if any(getattr(block, attr, None) is not None for attr in attrs)
                 or (role == "feed_forward" and fused_mlp))


def attention_width(attention: Optional[torch.nn.Module]) -> int:
    """The channels an attention reads (0 without one): its query projection's inputs."""
    if attention is None:
        return 0
    to_q = getattr(attention, "to_q", None)
    if to_q is not None:
        return to_q.in_features
    return int(getattr(attention, "query_dim", 0))


def reduced_sublayers(block: torch.nn.Module, config: TokenFusionConfig,
                      attributes: tuple = SUBLAYERS) -> tuple[str, ...]:
    """The sublayers of ``block`` that will run on reduced tokens (``attributes``: as in ``SUBLAYERS``)."""
    if config.merge_scope == "block":
        return block_parts(block)
    return tuple(role for attr, role, flag in attributes
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


def self_attention(block: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The block's self-attention (joint blocks: their joint attention), for mctf's informativeness."""
    for attr in ("attn1", "attn", "attention"):
        if getattr(block, attr, None) is not None:
            return getattr(block, attr)
    return None


@dataclass(frozen=True)
class BlockGeometry:
    """A transformer block at one resolution, for ``tofu.explain``: its token grid, width and sublayers."""

    name: str
    grid: tuple[int, ...]
    channels: int
    parts: tuple[str, ...]  # every sublayer it has (what its unreduced cost counts)
    sublayers: tuple[str, ...]  # those that run on reduced tokens
    reduced: bool
    leading: int = 0  # tokens before the grid's that are always kept whole (``ImageLayout.leading``)

    @property
    def tokens(self) -> int:
        """Every token the block runs on: the grid's and the leading ones."""
        return math.prod(self.grid) + self.leading


@dataclass(frozen=True)
class BlockAdapter(Adapter):
    """A diffusion family whose blocks are reduced on the token grid of a grid-owning module."""

    sites: Callable[[torch.nn.Module], list[Site]]  # the blocks, in execution order
    grid_of: Callable[[torch.nn.Module, torch.Tensor, dict], tuple[int, int]]  # (owner, input, kwargs) -> grid
    default_levels: Callable[[list[Site]], set[int]]  # the resolution levels reduced by default
    timestep_argument: str = "timestep"  # the denoiser's forward parameter that carries the timestep
    grid_rank: int = 2  # axes of the token grid: (rows, cols), or (frames, rows, cols) for video
    sublayer_attributes: tuple = SUBLAYERS  # (attribute, role, config flag) of the sublayers, as SUBLAYERS
    # Arguments with a row per token that follow the merged tokens (``hooks.follow``), of the self-attention
    # (merge_scope="sublayers") and of the block (merge_scope="block"); e.g. a rotary table.
    self_attention_followers: Optional[Followers] = None
    block_followers: Optional[Followers] = None
    # The attention applies one rotary table to queries and keys together: ToDo cannot shrink the keys alone.
    rotary_attention: bool = False
    timestep_unit: float = 1.0  # the denoiser's timestep per scheduler timestep (Flux: 1/1000)
    packing: int = 1  # latent positions per token side beyond config.patch_size (Flux packs 2x2 in the pipeline)
    # The family's pipelines pass the scheduler sigmas = linspace(1, 1/N, N) (Flux, Flux.2, Chroma, Qwen-Image,
    # LTX) rather than letting it space its own: the steps ``explain`` previews must be those.
    pipeline_sigmas: bool = False
    # The family's edit pipelines append reference images' tokens (``ImageLayout.references``): what
    # ``reduce_references`` reduces; elsewhere that option is refused rather than ignored.
    reference_images: bool = False

    def token_grid(self, model: torch.nn.Module, latent: tuple[int, ...]) -> tuple[int, ...]:
        """The full-resolution token grid of a (height, width) latent, or of a (frames, height, width) one."""
        sides = patch_sides(model, len(latent))
        sides = sides[:-2] + tuple(side * self.packing for side in sides[-2:])
        if any(size % side for size, side in zip(latent[-2:], sides[-2:])):
            raise ValueError(f"a {latent[-2]}x{latent[-1]} latent does not tile into {type(model).__name__}'s tokens "
                             f"of {sides[-2]}x{sides[-1]} latent positions; use a size whose latent is a multiple "
                             f"of {sides[-1]}")
        # frames a temporal patch does not divide are padded by the pipeline (CogVideoX 1.5)
        return tuple(-(-size // side) for size, side in zip(latent[:-2], sides[:-2])) + tuple(
            size // side for size, side in zip(latent[-2:], sides[-2:]))

    def geometry(self, model: torch.nn.Module, config: TokenFusionConfig, reduced: list[Site],
                 latent: tuple[int, int]) -> list[BlockGeometry]:
        """Every block of ``model`` on a (height, width) latent, those in ``reduced`` marked."""
        layout = self.planned_layout(model, self.token_grid(model, latent))
        full = layout.grid
        chosen = {id(site.block) for site in reduced}
        out = []
        for site in self.sites(model):
            channels = attention_width(self_attention(site.block))
            # each downsampler halves the spatial sides, rounding up
            grid = tuple(full[:-2]) + tuple(-(-side // site.level) for side in full[-2:])
            out.append(BlockGeometry(site.name, grid, channels, block_parts(site.block),
                                     reduced_sublayers(site.block, config, self.sublayer_attributes),
                                     id(site.block) in chosen, layout.leading))
        return out

    def planned_layout(self, model: torch.nn.Module, grid: tuple[int, ...]) -> ImageLayout:
        """What the blocks plan on for a full token ``grid``: the grid itself, unless the family keeps some of its
        tokens whole (HunyuanVideo's token-replace first frame). What ``explain`` previews."""
        return ImageLayout(grid)

    def dynamic_shift(self, scheduler, image_tokens: int, num_steps: int) -> float:
        """The ``mu`` the family's pipelines pass a dynamically shifting scheduler (Flux.1's linear rule;
        a family whose pipeline computes it otherwise says so)."""
        return linear_dynamic_shift(scheduler, image_tokens)

    def to_scheduler_units(self, timestep: float) -> float:
        """The family's timestep convention: what the denoiser receives -> the scheduler's timestep."""
        return timestep / self.timestep_unit

    def check(self, model: torch.nn.Module, config: TokenFusionConfig) -> list[Site]:
        if config.r is not None or config.layers is not None:
            raise ValueError("r and layers schedule the layers of ViT/DeiT classifiers; diffusion models take "
                             "ratio (and levels / max_downsample to choose blocks)")
        other = config.options_set(CLASSIFIER_OPTIONS)
        if other:
            raise ValueError(f"{', '.join(other)} {'is an option' if len(other) == 1 else 'are options'} of ViT/DeiT "
                             f"classifiers, which {type(model).__name__} does not read; remove it")
        model_name = type(model).__name__
        config.check_grid_ratio()
        if len(config.stride) > self.grid_rank:
            raise ValueError(f"stride {config.stride} has {len(config.stride)} axes but {model_name}'s token grid has "
                             f"{self.grid_rank} ({'frames, ' if self.grid_rank == 3 else ''}rows, cols); give at "
                             f"most {self.grid_rank} values")
        if config.reduce_references and not self.reference_images:
            raise ValueError(f"reduce_references=True: {model_name} takes no reference images (Flux.1 Kontext, "
                             f"Flux.2 and Qwen-Image-Edit do); leave it False")
        self.refuse(model_name, config)
        all_sites = self.sites(model)
        if not all_sites:
            raise ValueError(f"{model_name} has no transformer block to reduce")
        sites = select_levels(all_sites, config, self.default_levels(all_sites), model_name)
        sites = pick_blocks(sites, config.blocks, model_name)
        if not sites:
            raise ValueError(f"blocks={config.blocks!r} selects none of the eligible blocks of {model_name}")
        if config.method != "todo" and not any(reduced_sublayers(site.block, config, self.sublayer_attributes)
                                               for site in sites):
            raise ValueError(f"nothing to reduce: the selected sublayers (merge_self_attention / "
                             f"merge_cross_attention / merge_feed_forward) exist in none of {model_name}'s blocks "
                             f"(e.g. DiT blocks have no cross-attention); select another sublayer or use "
                             f"merge_scope='block'")
        return sites

    def refuse(self, model_name: str, config: TokenFusionConfig) -> None:
        """Raise for what this family's blocks cannot do (a family with other blocks adds its own)."""
        if self.rotary_attention and config.method == "todo":
            raise ValueError(f"todo is not available for {model_name}: its attention applies one rotary table to "
                             f"queries and keys together, so the keys cannot be downsampled alone; use tome, tofu "
                             f"or mctf")

    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        """Register the hooks that run ``block`` (or its selected sublayers) on reduced tokens."""
        if config.method == "todo":
            todo.attach_self_attention(block.attn1, state)
            return
        if config.merge_scope == "block":
            attention = self_attention(block) if config.method == "mctf" else None
            register(block, WholeBlockHook(state, attention, followers=self.block_followers), WHOLE_BLOCK_HOOK)
            return
        register(block, BlockHook(state), BLOCK_HOOK)
        for attr, role, _ in self.sublayer_attributes:
            if role in state.sublayers:
                followers = self.self_attention_followers if role == "self_attention" else None
                register(getattr(block, attr), MergeHook(state, role, followers), MERGE_HOOK)

    def attach(self, model: torch.nn.Module, config: TokenFusionConfig, sites: list[Site],
               scheduling=None) -> Patch:
        run = RunState(config, StepLocator(scheduling, self.to_scheduler_units))
        try:  # the caller takes the hooks out of a failed attach; the scheduler's clock is let go here
            register(model, RootHook(run, self.timestep_argument), ROOT_HOOK)
            grids: dict[int, GridRecord] = {}
            blocks = []
            for depth, site in enumerate(sites):
                owner_key = id(site.grid_owner)
                if owner_key not in grids:
                    grids[owner_key] = GridRecord(config.reduce_references)
                    register(site.grid_owner, GridHook(grids[owner_key], self.grid_of), GRID_HOOK)
                state = BlockState(site.name, depth, config.merge_mode_for(depth, len(sites)), grids[owner_key], run,
                                   sublayers=reduced_sublayers(site.block, config, self.sublayer_attributes))
                self.attach_block(site.block, state, config)
                blocks.append(state)
            run.blocks = list(blocks)
        except Exception:
            run.detach()
            raise
        return Patch(blocks, undo=run.detach)


def stream_sites(model: torch.nn.Module, double, single) -> list[Site]:
    """A Flux-style model's ``transformer_blocks`` of class ``double``, then its ``single_transformer_blocks`` of
    class ``single`` (each a class or a tuple of them), at full resolution."""
    sites = [Site(f"transformer_blocks.{i}", block, model, 1) for i, block in enumerate(model.transformer_blocks)
             if isinstance(block, double)]
    sites += [Site(f"single_transformer_blocks.{i}", block, model, 1)
              for i, block in enumerate(model.single_transformer_blocks) if isinstance(block, single)]
    return sites


def all_levels(sites: list[Site]) -> set[int]:
    """Every block is reduced by default (transformers whose blocks share one grid)."""
    return {site.level for site in sites}


def patch_grid(model: torch.nn.Module, hidden: torch.Tensor, arguments: dict) -> tuple[int, int]:
    """The token grid of a (B, C, H, W) latent patchified by ``model.config.patch_size``."""
    if hidden.dim() != 4:
        raise ValueError(f"expected a (batch, channels, height, width) latent, got {tuple(hidden.shape)}")
    p = model.config.patch_size
    if hidden.shape[-2] % p or hidden.shape[-1] % p:
        raise ValueError(
            f"latent {hidden.shape[-2]}x{hidden.shape[-1]} is not divisible by the patch size {p}; "
            f"use a resolution that is a multiple of {p * 8} pixels"
        )
    return hidden.shape[-2] // p, hidden.shape[-1] // p


def patch_sides(model: torch.nn.Module, rank: int) -> tuple[int, ...]:
    """Latent positions per token along each of a ``rank``-axis latent: ``config.patch_size`` as a tuple, or one
    spatial size (with ``patch_size_t`` for a video's frames)."""
    patch = getattr(model.config, "patch_size", None) or 1
    if isinstance(patch, int):
        patch = (getattr(model.config, "patch_size_t", None) or 1, patch, patch)[-rank:]
    return tuple(int(p) for p in patch)


def video_latent_grid(model: torch.nn.Module, hidden: torch.Tensor, arguments: dict) -> tuple[int, int, int]:
    """(frames, rows, cols) of a (B, C, F, H, W) latent patchified by ``model.config.patch_size``: a (pt, ph, pw)
    tuple, or one spatial size with ``patch_size_t`` for the frames."""
    if hidden.dim() != 5:
        raise ValueError(f"expected a (batch, channels, frames, height, width) latent, got {tuple(hidden.shape)}")
    patch = patch_sides(model, 3)
    sizes = tuple(hidden.shape[2:])
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"latent {sizes[0]}x{sizes[1]}x{sizes[2]} (frames x height x width) does not tile into "
                         f"patches of {tuple(patch)}; use a frame count and size the patch divides")
    return tuple(s // p for s, p in zip(sizes, patch))


def packed_ids_grid(model: torch.nn.Module, hidden: torch.Tensor, arguments: dict) -> ImageLayout:
    """The (rows, cols) grid of packed image tokens from their ``img_ids`` ((N, 3): image, row, col; Flux.2's
    (N, 4): image, row, col, layer), which must tile it row-major (Flux-style pipelines' latent ids).

    Reference images (Flux.1 Kontext, Flux.2) follow the target's tokens with another image index in column 0
    (Kontext 1; Flux.2 10, 20, ...): the grid is the target's, the references' tokens are kept whole."""
    ids = arguments.get("img_ids")
    if ids is None:
        raise ValueError(f"token fusion reads {type(model).__name__}'s token grid from img_ids; pass img_ids "
                         f"(as its pipeline does)")
    if torch.compiler.is_compiling():
        raise RuntimeError(f"token fusion reads {type(model).__name__}'s token grid from the values of img_ids, "
                           f"which a graph of the whole model cannot read; compile its blocks instead: "
                           f"model.compile_repeated_blocks(fullgraph=True) (the grid is then read eagerly)")
    if ids.dim() == 3:
        ids = ids[0]
    total = hidden.shape[1]
    if ids.shape[0] != total:
        raise ValueError(f"img_ids has {ids.shape[0]} rows for {total} image tokens")
    image = ids[:, 0]
    other = (image != image[0]).nonzero()
    n = int(other[0, 0]) if len(other) else total  # the target: the leading tokens of the first image index
    if bool((image[n:] == image[0]).any()):
        raise ValueError("img_ids interleave the target image's tokens with another image's; token fusion needs the "
                         "target's tokens first and any reference image's after them (as diffusers' pipelines "
                         "order them)")
    grid = row_major_grid(ids[:n, 1], ids[:n, 2])
    if grid is None:
        raise ValueError(f"img_ids do not tile a grid row-major ({n} tokens); token fusion needs the packed "
                         f"latent's own ids (the pipeline's _prepare_latent_image_ids)")
    return ImageLayout(grid, total - n, reference_grids(ids[n:]))


def row_major_grid(rows: torch.Tensor, cols: torch.Tensor) -> Optional[tuple[int, int]]:
    """(h, w) when tokens at (rows, cols) tile an h x w grid row-major (from any corner offset), else None."""
    rows, cols = rows.long() - rows.min().long(), cols.long() - cols.min().long()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    if h * w != rows.numel() or not torch.equal(rows * w + cols, torch.arange(rows.numel(), device=rows.device)):
        return None
    return h, w


def reference_grids(ids: torch.Tensor) -> tuple:
    """The grids of the reference images whose ids ((M, 3+): image, row, col, ...) follow the target's: one per
    run of one image index; () when any of them does not tile (they can only be kept whole then)."""
    if ids.shape[0] == 0:
        return ()
    image = ids[:, 0]
    starts = [0] + (image[1:] != image[:-1]).nonzero().flatten().add(1).tolist() + [ids.shape[0]]
    grids = []
    for start, end in zip(starts[:-1], starts[1:]):
        grid = row_major_grid(ids[start:end, 1], ids[start:end, 2])
        if grid is None:
            return ()
        grids.append(grid)
    return tuple(grids)
