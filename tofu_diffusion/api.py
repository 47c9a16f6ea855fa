"""``apply`` / ``remove`` / ``fused``: attach token fusion to a diffusers pipeline or denoiser."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional

import torch

from .adapters import Site, adapter_for, vit
from .adapters.base import timestep_reader
from .adapters.hooks import (
    BlockHook,
    BlockState,
    KeyValueDownsampleHook,
    GridHook,
    GridRecord,
    MergeHook,
    RootHook,
    RunState,
    WholeBlockHook,
    BLOCK_HOOK,
    DOWNSAMPLE_HOOK,
    WHOLE_BLOCK_HOOK,
    GRID_HOOK,
    MERGE_HOOK,
    ROOT_HOOK,
    register,
    unregister_all,
)
from .config import TokenFusionConfig

logger = logging.getLogger("tofu_diffusion")

_HANDLE_ATTR = "_tofu_diffusion_handle"
_DENOISER_NAMES = ("unet", "transformer")
_SUBLAYERS = (
    ("attn1", "self_attention", "merge_self_attention"),
    ("attn2", "cross_attention", "merge_cross_attention"),
    ("ff", "feed_forward", "merge_feed_forward"),
)


class TokenFusionHandle:
    """What ``apply`` attached: the config, the reduced blocks, and per-block token counts."""

    def __init__(self, model: torch.nn.Module, config: TokenFusionConfig, family: str, blocks: list,
                 counts: Optional[Callable[[], dict]] = None, undo: Optional[Callable[[], None]] = None):
        self.model = model
        self.config = config
        self.family = family
        self.blocks = blocks
        self._counts = counts
        self._undo = undo

    def token_counts(self) -> dict[str, tuple[int, int]]:
        """(tokens in, tokens out) of each reduced block (classifiers: each layer) in its latest call."""
        if self._counts is not None:
            return dict(self._counts())
        return {b.name: b.last_tokens for b in self.blocks if b.last_tokens is not None}

    def last_plans(self) -> dict[str, tuple]:
        """Diffusion models: ``{block: (plan, (rows, cols))}``, each reduced block's merge plan of its latest
        call and the token grid it was computed on (plan None where nothing was merged; ``todo`` merges
        nothing). ``plan.assignment`` (B, N) maps every token, row-major on the grid, to its group."""
        if self.family == vit.FAMILY:
            raise ValueError("classifiers reduce tokens for good; their plans are not kept (see token_counts())")
        return {b.name: (b.last_plan, b.grid.latest) for b in self.blocks}

    @property
    def schedule(self) -> Optional[list[int]]:
        """Classifiers: the tokens each layer removes (after capping)."""
        return [b.removed for b in self.blocks] if self.family == vit.FAMILY else None

    def remove(self) -> None:
        """Remove this patch; a stale handle (token fusion was applied again since) is refused."""
        if getattr(self.model, _HANDLE_ATTR, None) is not self:
            raise ValueError("this handle is stale: token fusion was removed or applied again since; remove the "
                             "current patch with tofu.remove(model) or the handle the latest apply returned")
        remove(self.model)

    def __repr__(self) -> str:
        return (
            f"TokenFusionHandle({type(self.model).__name__}, family={self.family}, method={self.config.method}, "
            f"ratio={self.config.ratio}, schedule={self.config.schedule}, blocks={len(self.blocks)})"
        )


def denoiser_of(model_or_pipeline) -> torch.nn.Module:
    """The denoiser of a pipeline (``unet`` or ``transformer``), or the model itself."""
    if isinstance(model_or_pipeline, torch.nn.Module):
        return model_or_pipeline
    for name in _DENOISER_NAMES:
        denoiser = getattr(model_or_pipeline, name, None)
        if isinstance(denoiser, torch.nn.Module):
            return denoiser
    components = getattr(model_or_pipeline, "components", None)
    listed = ", ".join(f"{k}={type(v).__name__}" for k, v in (components or {}).items()) or "none"
    raise TypeError(
        f"{type(model_or_pipeline).__name__} is neither a torch module nor a pipeline with a `unet` or "
        f"`transformer` component (components: {listed}); pass the denoiser model itself"
    )


def family_of(model_or_pipeline) -> str:
    """The adapter family of a pipeline's denoiser or a model: "unet", "dit" or "vit" (presets are per family)."""
    if isinstance(model_or_pipeline, torch.nn.Module) and vit.backbone_of(model_or_pipeline) is not None:
        return vit.FAMILY
    return adapter_for(denoiser_of(model_or_pipeline)).family


def _reduced_sublayers(block: torch.nn.Module, config: TokenFusionConfig) -> tuple[str, ...]:
    """The sublayers of ``block`` that will run on reduced tokens."""
    return tuple(
        role for attr, role, flag in _SUBLAYERS
        if getattr(block, attr, None) is not None and (config.merge_scope == "block" or getattr(config, flag))
    )


def _attach(block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
    """Register the hooks that run ``block`` (or its selected sublayers) on reduced tokens."""
    if config.method == "todo":
        register(block.attn1, KeyValueDownsampleHook(state), DOWNSAMPLE_HOOK)
        return
    if config.merge_scope == "block":
        attention = getattr(block, "attn1", None) if config.method == "mctf" else None
        register(block, WholeBlockHook(state, attention), WHOLE_BLOCK_HOOK)
        return
    register(block, BlockHook(state), BLOCK_HOOK)
    for attr, role, _ in _SUBLAYERS:
        if role in state.sublayers:
            register(getattr(block, attr), MergeHook(state, role), MERGE_HOOK)


def _select(sites: list[Site], config: TokenFusionConfig, default_levels: set[int], model_name: str) -> list[Site]:
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


def _pick_blocks(sites: list[Site], blocks, model_name: str) -> list[Site]:
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


def _num_train_timesteps(model_or_pipeline) -> int:
    """The scale of the timesteps the denoiser receives (progress = 1 - t / T): the pipeline scheduler's."""
    scheduler = getattr(model_or_pipeline, "scheduler", None)
    value = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    return int(value) if value else 1000


def apply(model_or_pipeline, config: Optional[TokenFusionConfig] = None, **options) -> TokenFusionHandle:
    """Attach token fusion to a diffusers pipeline or denoiser. Returns a handle.

    ``config`` is a :class:`TokenFusionConfig`; keyword ``options`` build one or override its fields.
    Levers left unset come from the config's preset for the model's family (``TokenFusionConfig.resolve``);
    ``handle.config`` is the resolved config. Applying again replaces the previous configuration cleanly.
    """
    config = TokenFusionConfig.from_kwargs(config, **options)
    if isinstance(model_or_pipeline, torch.nn.Module):
        vit.check_supported(model_or_pipeline)
        if vit.backbone_of(model_or_pipeline) is not None:
            return _apply_classifier(model_or_pipeline, config)
    if config.r is not None or config.layers is not None:
        raise ValueError("r and layers schedule the layers of ViT/DeiT classifiers; diffusion models take "
                         "ratio (and levels / max_downsample to choose blocks)")
    model = denoiser_of(model_or_pipeline)
    adapter = adapter_for(model)
    config = config.resolve(adapter.family)
    model_name = type(model).__name__
    # Everything that can reject the request is checked before an existing patch is touched.
    all_sites = adapter.sites(model)
    if not all_sites:
        raise ValueError(f"{model_name} has no transformer block to reduce (no BasicTransformerBlock found)")
    sites = _select(all_sites, config, adapter.default_levels(all_sites), model_name)
    sites = _pick_blocks(sites, config.blocks, model_name)
    if not sites:
        raise ValueError(f"blocks={config.blocks!r} selects none of the eligible blocks of {model_name}")
    if config.method != "todo" and not any(_reduced_sublayers(site.block, config) for site in sites):
        raise ValueError(f"nothing to reduce: the selected sublayers (merge_self_attention / merge_cross_attention / "
                         f"merge_feed_forward) exist in none of {model_name}'s blocks (e.g. DiT blocks have no "
                         f"cross-attention); select another sublayer or use merge_scope='block'")
    if getattr(model, _HANDLE_ATTR, None) is not None:
        logger.info("token fusion was already applied to %s; replacing it", model_name)
        remove(model)

    run = RunState(config, _num_train_timesteps(model_or_pipeline))
    grids: dict[int, GridRecord] = {}
    blocks = []
    try:
        register(model, RootHook(run, timestep_reader(model)), ROOT_HOOK)
        for depth, site in enumerate(sites):
            owner_key = id(site.grid_owner)
            if owner_key not in grids:
                grids[owner_key] = GridRecord()
                register(site.grid_owner, GridHook(grids[owner_key], adapter.grid_of), GRID_HOOK)
            state = BlockState(site.name, depth, config.merge_mode_for(depth, len(sites)), grids[owner_key], run,
                               sublayers=_reduced_sublayers(site.block, config))
            _attach(site.block, state, config)
            blocks.append(state)
    except Exception:
        unregister_all(model)
        raise
    handle = TokenFusionHandle(model, config, adapter.family, blocks)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def _apply_classifier(model: torch.nn.Module, config: TokenFusionConfig) -> TokenFusionHandle:
    """ViT/DeiT: tokens reduced for good, layer by layer (see ``adapters.vit``)."""
    config = config.resolve(vit.FAMILY)
    if config.method == "todo" or config.schedule is not None or config.blocks is not None:
        raise ValueError("todo, schedule and blocks are for diffusion denoisers; classifiers take method "
                         "tome/tofu/mctf with ratio or r, and layers")
    if getattr(model, _HANDLE_ATTR, None) is not None:
        logger.info("token fusion was already applied to %s; replacing it", type(model).__name__)
        remove(model)
    try:
        run, states, undo = vit.attach(model, config)
    except Exception:
        unregister_all(model)
        raise
    handle = TokenFusionHandle(model, config, vit.FAMILY, states, counts=run.counts, undo=undo)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def _target_of(model_or_pipeline) -> torch.nn.Module:
    if isinstance(model_or_pipeline, torch.nn.Module) and getattr(model_or_pipeline, _HANDLE_ATTR, None) is not None:
        return model_or_pipeline
    return denoiser_of(model_or_pipeline)


def remove(model_or_pipeline) -> None:
    """Remove token fusion; the model behaves exactly as before ``apply``."""
    model = _target_of(model_or_pipeline)
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError(f"token fusion is not applied to this {type(model).__name__}; nothing to remove")
    unregister_all(model)
    if handle._undo is not None:
        handle._undo()
    delattr(model, _HANDLE_ATTR)


def handle_of(model_or_pipeline) -> Optional[TokenFusionHandle]:
    """The active handle, or None when token fusion is not applied."""
    return getattr(_target_of(model_or_pipeline), _HANDLE_ATTR, None)


@contextlib.contextmanager
def fused(model_or_pipeline, config: Optional[TokenFusionConfig] = None, **options) -> Iterator[TokenFusionHandle]:
    """Scoped token fusion: ``with fused(pipe, method="mctf", ratio=0.5): ...``.

    On exit the model returns to what it was: unpatched, or patched with its previous config.
    """
    previous = handle_of(model_or_pipeline)
    handle = apply(model_or_pipeline, config, **options)
    try:
        yield handle
    finally:
        remove(model_or_pipeline)
        if previous is not None:
            apply(model_or_pipeline, previous.config)
