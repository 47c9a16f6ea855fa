"""Vision-transformer classifiers: transformers' ViT and DeiT (CLS and distillation tokens protected).

Tokens are reduced for good, layer by layer, and their sizes travel with them; every layer after the
first merge uses proportional attention (``log(size)`` of each key added to the logits, passed as the
additive float mask the layer already forwards to SDPA, so fused kernels stay usable). All through
``diffusers.hooks``; no layer forward is re-implemented:

* ``tome`` / ``tofu`` merge between attention and MLP, as ToMe does. The layer adds its MLP output to
  an unmerged residual, so the hooks work around it: the metric (keys averaged over heads) is read from
  ``k_proj``; ``layernorm_after`` receives the merged tokens ``m``; the MLP's output is unmerged to keep
  the layer's own addition well-shaped, and the layer's output becomes ``m + mlp(norm(m))``, exactly
  ToMe's, on the reduced tokens.
* ``mctf`` merges at the start of the layer. The layer's attention on the unmerged tokens (one
  ``q k^T``) gives the informativeness; the tokens are fused (weights: attention received times size),
  the attention matrix is fused alongside (``core.apply_fused_attention``), and a registered transformers
  attention function applies it to the merged tokens' values: no second ``q k^T``, and the merged
  tokens' queries and keys are never projected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.hooks import ModelHook
from torch.profiler import record_function

from ..config import TokenFusionConfig
from ..core import (
    MergePlan,
    alternating_partition,
    bidirectional_matching,
    bipartite_soft_matching,
    apply_fused_attention,
    interpolation_gap,
    layer_schedule,
    mctf_scores,
)
from .base import Adapter, Patch
from .hooks import PerCaller, hidden_states_of, register

FAMILY = "vit"
VIT_MODEL_HOOK = "tofu_diffusion_vit_model"
VIT_LAYER_HOOK = "tofu_diffusion_vit_layer"
VIT_KEY_HOOK = "tofu_diffusion_vit_key"
VIT_NORM_HOOK = "tofu_diffusion_vit_norm"
VIT_MLP_HOOK = "tofu_diffusion_vit_mlp"
VIT_SKIP_HOOK = "tofu_diffusion_vit_skip_projection"
FUSED_ATTENTION = "tofu_diffusion_fused"
_STATE_ATTR = "_tofu_diffusion_layer_state"
_ORIGINAL_ATTR = "_tofu_diffusion_original_attention"
_LAYER_PARTS = ("attention", "layernorm_before", "layernorm_after", "mlp")
MCTF_MIN_TOKENS = 10


def backbone_of(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The ViTModel/DeiTModel inside ``model`` (or ``model`` itself); None if it is not one."""
    for candidate in (model, getattr(model, "vit", None), getattr(model, "deit", None)):
        if candidate is None:
            continue
        layers = getattr(candidate, "layers", None)
        embeddings = getattr(candidate, "embeddings", None)
        if (isinstance(layers, torch.nn.ModuleList) and len(layers) and embeddings is not None
                and hasattr(embeddings, "cls_token") and all(hasattr(layers[0], p) for p in _LAYER_PARTS)
                and hasattr(layers[0].attention, "k_proj")):
            return candidate
    return None


def is_timm_vit(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def num_protected(backbone: torch.nn.Module) -> int:
    """CLS, plus DeiT's distillation token: they sit first and are never merged."""
    return 2 if hasattr(backbone.embeddings, "distillation_token") else 1


def num_tokens(backbone: torch.nn.Module) -> int:
    patches = backbone.embeddings.patch_embeddings.num_patches
    return patches + num_protected(backbone)


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

    def protected_mask(self, n: int, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[: self.protected] = True
        return mask


def _or_unit(sizes: Optional[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """``sizes``, or every token of ``hidden`` standing for one (None: nothing merged yet)."""
    if sizes is None:
        return torch.ones(hidden.shape[:2], device=hidden.device, dtype=torch.float32)
    return sizes


class ViTModelHook(ModelHook):
    """On the backbone: every forward starts with unit sizes; a user attention mask cannot follow merges."""

    def __init__(self, run: ViTRun):
        super().__init__()
        self.run = run

    def pre_forward(self, module, *args, **kwargs):
        if kwargs.get("attention_mask") is not None or (len(args) > 3 and args[3] is not None):
            raise ValueError("token reduction cannot follow a user attention_mask through merges; "
                             "remove the mask or the token reduction (tofu.remove(model))")
        self.run.begin()
        return args, kwargs


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


def _with_mask(args: tuple, kwargs: dict, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[tuple, dict]:
    """Replace the layer's (hidden_states, attention_mask) arguments."""
    rest = args[2:] if len(args) > 2 else ()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "attention_mask")}
    return (hidden, mask) + tuple(rest), kwargs


class LayerHook(ModelHook):
    """On every layer: proportional attention in; for reducing layers, the reduced output out."""

    def __init__(self, state: LayerState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        run, state = self.state.run, self.state
        hidden = hidden_states_of(args, kwargs)
        scratch = state.start(hidden.shape[1])
        n_in = hidden.shape[1]
        if state.removed > 0 and run.config.method == "mctf":
            hidden = self._fuse_at_start(module, hidden, scratch)
        run.token_counts[state.name] = (n_in, hidden.shape[1] if scratch.plan is not None else n_in)
        return _with_mask(args, kwargs, hidden, run.size_bias(hidden))

    def _fuse_at_start(self, layer, hidden: torch.Tensor, scratch: LayerCall) -> torch.Tensor:
        """MCTF: attention on the unmerged tokens, then fuse the tokens and the attention matrix."""
        run, state, attention = self.state.run, self.state, layer.attention
        with record_function("tofu_diffusion::plan"):
            b, n, _ = hidden.shape
            normed = layer.layernorm_before(hidden)
            heads, head_dim = attention.num_attention_heads, attention.head_dim
            q = attention.q_proj(normed).view(b, n, heads, head_dim).transpose(1, 2)
            k = attention.k_proj(normed).view(b, n, heads, head_dim).transpose(1, 2)
            logits = (q @ k.transpose(-1, -2)) * attention.scaling
            bias = run.size_bias(hidden)
            if bias is not None:
                logits = logits + bias
            probs = logits.softmax(dim=-1, dtype=torch.float32)
            received = probs.detach().mean(dim=(1, 2))  # (B, N) attention each token receives
            sizes = run.sizes_for(hidden)
            src, dst = alternating_partition(n, hidden.device)
            cfg = run.config
            scores = mctf_scores(hidden.detach(), src, dst, attention=received, sizes=sizes, tau_sim=cfg.tau_sim,
                                 tau_info=cfg.tau_info, tau_size=cfg.tau_size,
                                 protected=run.protected_mask(n, hidden.device))
            plan = bidirectional_matching(scores, src, dst, n, state.removed, weights=received * sizes,
                                          protected_rows=True, order=run.matching_order,
                                          protected=run.protected_mask(n, hidden.device))
        if plan is None:
            return hidden
        with record_function("tofu_diffusion::merge"):
            merged = plan.merge(hidden, state.merge_mode)
            scratch.unmerged_attention = probs
            run.call().sizes = plan.merge_sizes(sizes)
        scratch.plan, scratch.skip_projections = plan, True
        return merged

    def post_forward(self, module, output):
        run, state = self.state.run, self.state
        scratch = state.scratch()
        if run.config.method != "mctf" and scratch.merged is not None:
            # ToMe placement: the layer added unmerge(mlp) to the unmerged residual; what ToMe computes is
            # merged + mlp(norm(merged)) on the reduced tokens.
            dropout = getattr(module, "dropout", None)
            update = dropout(scratch.mlp_out) if dropout is not None else scratch.mlp_out
            output = scratch.merged + update
            run.token_counts[state.name] = (scratch.plan.num_tokens, output.shape[1])
        # transformers' gradient checkpointing recomputes the layer's body (not its hooks) in backward, with
        # this scratch; otherwise it is dropped now, so no plan or fused matrix leaks into the next call.
        if not (module.training and torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False)):
            state.finish()
        return output


class KeyHook(ModelHook):
    """On ``attention.k_proj``: keep the keys, averaged over heads, as ToMe's similarity metric."""

    def __init__(self, state: LayerState, heads: int):
        super().__init__()
        self.state, self.heads = state, heads

    def post_forward(self, module, output):
        if self.state.removed > 0:
            b, n, _ = output.shape
            self.state.scratch().metric = output.detach().view(b, n, self.heads, -1).mean(dim=2)
        return output


class NormAfterHook(ModelHook):
    """On ``layernorm_after``: match on the keys and hand the norm (and so the MLP) the merged tokens."""

    def __init__(self, state: LayerState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        state, run = self.state, self.state.run
        if state.removed == 0:
            return args, kwargs
        scratch = state.scratch()
        hidden = args[0]
        n = hidden.shape[1]
        with record_function("tofu_diffusion::plan"):
            src, dst = alternating_partition(n, hidden.device)
            sizes = state.sizes_in(hidden)
            plan = bipartite_soft_matching(scratch.metric, src, dst, state.removed,
                                           protected=run.protected_mask(n, hidden.device),
                                           order=run.matching_order, weights=sizes)
        if plan is None:
            return args, kwargs
        with record_function("tofu_diffusion::merge"):
            scratch.plan, scratch.merged = plan, plan.merge(hidden, state.merge_mode)
            run.call().sizes = plan.merge_sizes(sizes)
        return (scratch.merged,) + tuple(args[1:]), kwargs


class MlpHook(ModelHook):
    """On ``mlp``: keep its reduced output, return it unmerged so the layer's own addition fits."""

    def __init__(self, state: LayerState):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        scratch = self.state.scratch()
        if scratch.plan is None:
            return output
        scratch.mlp_out = output
        with record_function("tofu_diffusion::unmerge"):
            return scratch.plan.unmerge(output)


class SkipProjectionHook(ModelHook):
    """MCTF: the fused attention replaces q k^T, so the merged tokens' queries and keys are not projected."""

    def __init__(self, state: LayerState):
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        if not self.state.scratch().skip_projections:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = args[0] if args else kwargs["input"]
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], module.out_features)


def fused_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: MCTF's fused attention where one is pending, else the original.

    The fused matrix is applied without being formed (``core.apply_fused_attention``), so no attention
    weights are returned for it."""
    state = getattr(module, _STATE_ATTR, None)
    scratch = None if state is None else state.scratch()
    if scratch is None or scratch.unmerged_attention is None:
        original = getattr(module, _ORIGINAL_ATTR)
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    probs = torch.nn.functional.dropout(scratch.unmerged_attention, p=dropout, training=module.training)
    out = apply_fused_attention(probs, scratch.plan, value)  # (B, H, K, D)
    return out.transpose(1, 2).contiguous(), None


def _register_attention_function() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FUSED_ATTENTION, fused_attention)


def _original_attention(config) -> callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.vit.modeling_vit import eager_attention_forward

    name = config._attn_implementation
    return eager_attention_forward if name in (None, "eager") else ALL_ATTENTION_FUNCTIONS[name]


@dataclass(frozen=True)
class ClassifierAdapter(Adapter):
    """transformers' ViT and DeiT classifiers (and timm models, which it refuses with what to do instead)."""

    def matches(self, model: torch.nn.Module) -> bool:
        return backbone_of(model) is not None or is_timm_vit(model)

    def check(self, model: torch.nn.Module, config: TokenFusionConfig) -> torch.nn.Module:
        check_supported(model)
        if config.method == "todo" or config.schedule is not None or config.blocks is not None:
            raise ValueError("todo, schedule and blocks are for diffusion denoisers; classifiers take method "
                             "tome/tofu/mctf with ratio or r, and layers")
        backbone = backbone_of(model)
        n = len(backbone.layers)
        if config.layers is not None and max(config.layers) >= n:
            raise ValueError(f"layers {list(config.layers)} out of range: the model has {n} layers (0..{n - 1})")
        if isinstance(config.r, list) and len(config.r) > n:  # refused here, before a previous patch is removed
            raise ValueError(f"r lists {len(config.r)} layers but the model has {n}; give at most {n} values")
        return backbone

    def attach(self, model: torch.nn.Module, config: TokenFusionConfig, backbone: torch.nn.Module,
               scheduling=None) -> Patch:
        run, states, undo = attach(backbone, config)
        return Patch(states, counts=run.counts, undo=undo)

    @torch.no_grad()
    def linearity_profile(self, model: torch.nn.Module, sample_inputs: torch.Tensor) -> list[float]:
        """Interpolation gap of layers ``d..`` for each depth ``d``, between the hidden states of each sample image
        and the next one's (pixel values, at least two images). The final norm is left out: it is not linear
        on any input, so it would hide how linear the layers are."""
        check_supported(model)
        backbone = backbone_of(model)
        if not isinstance(sample_inputs, torch.Tensor) or sample_inputs.dim() != 4 or sample_inputs.shape[0] < 2:
            raise ValueError("sample_inputs must be pixel values (N, C, H, W) of at least two images")
        weight = backbone.embeddings.patch_embeddings.projection.weight
        hidden = backbone.embeddings(sample_inputs.to(weight.device, weight.dtype))
        entering = []
        for layer in backbone.layers:
            entering.append(hidden)
            hidden = layer(hidden)
        # Every suffix maps the states entering it to the same final states (layers act per image), so
        # only the interpolated inputs need new forward passes.
        outputs = (hidden, hidden.roll(1, dims=0))

        def suffix(depth):
            def run(h):
                for layer in backbone.layers[depth:]:
                    h = layer(h)
                return h
            return run

        return [interpolation_gap(suffix(d), h, h.roll(1, dims=0), outputs=outputs) for d, h in enumerate(entering)]


def attach(backbone: torch.nn.Module, config: TokenFusionConfig):
    """Register the hooks on ``backbone``; returns (run, layer states, what undoes the non-hook state)."""
    layers = backbone.layers
    run = ViTRun(config, num_protected(backbone), len(layers), num_tokens(backbone))
    register(backbone, ViTModelHook(run), VIT_MODEL_HOOK)
    # Every layer gets its hooks: which layers reduce depends on each input's token count.
    reduces = config.r is not None or (config.ratio or 0) > 0
    states = []
    for index, layer in enumerate(layers):
        # tome weighs by size; mctf by attention received times size (the plan's weights)
        mode = config.merge_mode_for(index, len(layers), tome_mode="size_weighted")
        state = LayerState(f"layers.{index}", index, run, mode)
        register(layer, LayerHook(state), VIT_LAYER_HOOK)
        if reduces and config.method == "mctf":
            for projection in (layer.attention.q_proj, layer.attention.k_proj):
                register(projection, SkipProjectionHook(state), VIT_SKIP_HOOK)
        elif reduces:
            register(layer.attention.k_proj, KeyHook(state, layer.attention.num_attention_heads), VIT_KEY_HOOK)
            register(layer.layernorm_after, NormAfterHook(state), VIT_NORM_HOOK)
            register(layer.mlp, MlpHook(state), VIT_MLP_HOOK)
        states.append(state)
    undo = None
    if reduces and config.method == "mctf":
        undo = FusedAttentionSwitch(backbone, layers, states).undo
    return run, states, undo


class FusedAttentionSwitch:
    """Switches a model to the fused-attention function (MCTF); ``undo`` switches it back. An object, not a
    closure, so that a deep copy of the model undoes its own copy."""

    def __init__(self, backbone: torch.nn.Module, layers, states: list[LayerState]):
        _register_attention_function()
        self.backbone, self.layers = backbone, layers
        config = backbone.config
        self.previous = config._attn_implementation
        original = _original_attention(config)
        for layer, state in zip(layers, states):
            setattr(layer.attention, _ORIGINAL_ATTR, original)
            setattr(layer.attention, _STATE_ATTR, state)
        backbone.set_attn_implementation(FUSED_ATTENTION)

    def undo(self) -> None:
        self.backbone.set_attn_implementation(self.previous)
        for layer in self.layers:
            for attr in (_ORIGINAL_ATTR, _STATE_ATTR):
                if hasattr(layer.attention, attr):
                    delattr(layer.attention, attr)


ADAPTER = ClassifierAdapter(FAMILY, ())


def check_supported(model: torch.nn.Module) -> None:
    if is_timm_vit(model):
        raise TypeError(
            f"{type(model).__name__} is a timm model; tofu-diffusion reduces transformers' ViT/DeiT "
            "(ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification[WithTeacher]). "
            "Load the checkpoint with transformers instead, e.g. ViTForImageClassification.from_pretrained."
        )
