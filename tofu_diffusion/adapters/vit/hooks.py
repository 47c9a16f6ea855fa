"""The hooks on a classifier's backbone and layers (see the package's docstring for where each sits)."""

from __future__ import annotations

import torch
from torch.profiler import record_function

from ...core import alternating_partition, bidirectional_matching, bipartite_soft_matching, mctf_scores
from ..hooks import SignedHook
from .state import LayerCall, LayerState, ViTRun

VIT_MODEL_HOOK = "tofu_diffusion_vit_model"
VIT_LAYER_HOOK = "tofu_diffusion_vit_layer"
VIT_KEY_HOOK = "tofu_diffusion_vit_key"
VIT_NORM_HOOK = "tofu_diffusion_vit_norm"
VIT_MLP_HOOK = "tofu_diffusion_vit_mlp"
VIT_SKIP_HOOK = "tofu_diffusion_vit_skip_projection"


class ViTModelHook(SignedHook):
    """On the backbone: every forward starts with unit sizes; a user attention mask cannot follow merges."""

    def __init__(self, run: ViTRun):
        super().__init__()
        self.run = run

    def pre_forward(self, module, *args, **kwargs):
        if self.signature.get(args, kwargs, "attention_mask") is not None:
            raise ValueError("token reduction cannot follow a user attention_mask through merges; "
                             "remove the mask or the token reduction (tofu.remove(model))")
        self.run.begin()
        return args, kwargs


class LayerHook(SignedHook):
    """On every layer: proportional attention in; for reducing layers, the reduced output out."""

    def __init__(self, state: LayerState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        run, state = self.state.run, self.state
        hidden = self.signature.first(args, kwargs)
        scratch = state.start(hidden.shape[1])
        n_in = hidden.shape[1]
        if state.removed > 0 and run.config.method == "mctf":
            hidden = self._fuse_at_start(module, hidden, scratch)
        run.token_counts[state.name] = (n_in, hidden.shape[1] if scratch.plan is not None else n_in)
        args, kwargs = self.signature.replace_first(args, kwargs, hidden)
        return self.signature.replace(args, kwargs, "attention_mask", run.size_bias(hidden))

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
                                          protected_rows=run.protected_sources, order=run.matching_order,
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


class KeyHook(SignedHook):
    """On ``attention.k_proj``: keep the keys, averaged over heads, as ToMe's similarity metric."""

    def __init__(self, state: LayerState, heads: int):
        super().__init__()
        self.state, self.heads = state, heads

    def post_forward(self, module, output):
        if self.state.removed > 0:
            b, n, _ = output.shape
            self.state.scratch().metric = output.detach().view(b, n, self.heads, -1).mean(dim=2)
        return output


class NormAfterHook(SignedHook):
    """On ``layernorm_after``: match on the keys and hand the norm (and so the MLP) the merged tokens."""

    def __init__(self, state: LayerState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        state, run = self.state, self.state.run
        if state.removed == 0:
            return args, kwargs
        scratch = state.scratch()
        hidden = self.signature.first(args, kwargs)
        n = hidden.shape[1]
        with record_function("tofu_diffusion::plan"):
            src, dst = alternating_partition(n, hidden.device)
            sizes = state.sizes_in(hidden)
            plan = bipartite_soft_matching(scratch.metric, src, dst, state.removed,
                                           protected=run.protected_mask(n, hidden.device),
                                           order=run.matching_order, weights=sizes,
                                           protected_sources=run.protected_sources)
        if plan is None:
            return args, kwargs
        with record_function("tofu_diffusion::merge"):
            scratch.plan, scratch.merged = plan, plan.merge(hidden, state.merge_mode)
            run.call().sizes = plan.merge_sizes(sizes)
        return self.signature.replace_first(args, kwargs, scratch.merged)


class MlpHook(SignedHook):
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


class SkipProjectionHook(SignedHook):
    """MCTF: the fused attention replaces q k^T, so the merged tokens' queries and keys are not projected."""

    def __init__(self, state: LayerState):
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        if not self.state.scratch().skip_projections:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = self.signature.first(args, kwargs)
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], module.out_features)
