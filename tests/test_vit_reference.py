"""The classifier defaults reproduce ToMe and MCTF as their authors run them.

The reference forwards below are written from the papers and ../shared/REFERENCE.md as plain tensor code
on the same transformers weights (no hooks): each layer's attention, merge and MLP, the token order the
authors' code continues in (one bipartite set, then the other), ToMe's ``parse_r`` schedule and r cap, and
MCTF's floor of 10 tokens. The library's hooked model must give the same final tokens, in the same order.
"""

import math

import pytest
import torch
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

import tofu_diffusion as tofu
from tofu_diffusion.core import requested_r

SMALL = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
             intermediate_size=64, num_labels=6)


def _model(cls=ViTForImageClassification, config=ViTConfig, seed=0):
    torch.manual_seed(seed)
    return cls(config(**SMALL)).eval()


def _images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _backbone(model):
    return getattr(model, "vit", None) or model.deit


def _heads(layer, h):
    att = layer.attention
    b, n, _ = h.shape
    split = lambda t: t.view(b, n, att.num_attention_heads, -1).transpose(1, 2)  # noqa: E731
    return split(att.q_proj(h)), split(att.k_proj(h)), split(att.v_proj(h))


def _attend(layer, probs, v):
    b, _, n, _ = probs.shape
    return layer.attention.o_proj((probs @ v).transpose(1, 2).reshape(b, n, -1))


def _probs(layer, q, k, size):
    logits = q @ k.transpose(-1, -2) * layer.attention.scaling
    if size is not None:  # proportional attention
        logits = logits + size.log()[:, None, None, :]
    return logits.softmax(-1)


def _gather(x, idx):
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _scatter_add(x, idx, src):
    return x.scatter_add(1, idx[..., None].expand(-1, -1, x.shape[-1]), src)


def _head_logits(model, tokens):
    if isinstance(model, DeiTForImageClassificationWithTeacher):
        return (model.cls_classifier(tokens[:, 0]) + model.distillation_classifier(tokens[:, 1])) / 2
    return model.classifier(tokens[:, 0])


def tome_reference(model, pixels, schedule):
    """ToMe (timm patch): attention, merge (bipartite, size-weighted), MLP; CLS/DIST protected."""
    backbone = _backbone(model)
    distill = hasattr(backbone.embeddings, "distillation_token")
    protected = 2 if distill else 1
    x, size, counts = backbone.embeddings(pixels), None, []
    for layer, r in zip(backbone.layers, schedule):
        h = layer.layernorm_before(x)
        q, k, v = _heads(layer, h)
        x = x + _attend(layer, _probs(layer, q, k, size), v)
        t = x.shape[1]
        r = min(r, (t - protected) // 2)
        if r > 0:
            metric = k.mean(1)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
            scores[:, 0, :] = -math.inf  # CLS never leaves
            if distill:
                scores[:, :, 0] = -math.inf  # DIST never receives
            best, best_idx = scores.max(-1)
            edge = best.argsort(-1, descending=True)
            unmerged, merged = edge[:, r:].sort(-1).values, edge[:, :r]
            targets = best_idx.gather(1, merged)
            s = torch.ones_like(x[..., :1]) if size is None else size[..., None]

            def merge(t):  # sum of each group
                a, b = t[:, ::2], t[:, 1::2]
                b = _scatter_add(b, targets, _gather(a, merged))
                a = _gather(a, unmerged)
                if distill:
                    return torch.cat([a[:, :1], b[:, :1], a[:, 1:], b[:, 1:]], 1)
                return torch.cat([a, b], 1)

            new_size = merge(s)
            x, size = merge(x * s) / new_size, new_size[..., 0]
        counts.append((t, x.shape[1]))
        x = x + layer.mlp(layer.layernorm_after(x))
    tokens = backbone.layernorm(x)
    return tokens, _head_logits(model, tokens), counts


def mctf_reference(model, pixels, schedule, tau_sim=1.0, tau_info=20.0, tau_size=40.0):
    """MCTF (one-step-ahead, bidirectional, fusion weights = attention received x size), CLS protected."""
    backbone = _backbone(model)
    x, size, counts = backbone.embeddings(pixels), None, []
    for layer, r in zip(backbone.layers, schedule):
        t = x.shape[1]
        if r > 0 and t - r < 10:  # MCTF's floor
            r = t - 10
        r = min(r, (t - 1) // 2)
        h = layer.layernorm_before(x)
        q, k, v = _heads(layer, h)
        probs = _probs(layer, q, k, size)
        if r > 0:
            received = probs.mean((1, 2))
            s = torch.ones_like(received) if size is None else size
            unit = x / x.norm(dim=-1, keepdim=True)
            scores = ((unit[:, ::2] @ unit[:, 1::2].transpose(1, 2) + 1) / 2) ** (1 / tau_sim)
            for values, tau in ((received, tau_info), (s, tau_size)):
                rel = (1 / values) / (1 / values).amax(1, keepdim=True)
                scores = scores * (rel[:, ::2, None] * rel[:, None, 1::2]) ** (1 / tau)
            scores[:, 0, :] = -math.inf
            r1, r2 = r // 2, r - r // 2
            best, best_idx = scores.max(-1)
            edge = best.argsort(-1, descending=True)
            a_left, a_merged = edge[:, r1:].sort(-1).values, edge[:, :r1]
            a_target = best_idx.gather(1, a_merged)
            scores2 = scores.gather(1, a_left[..., None].expand(-1, -1, scores.shape[2])).transpose(1, 2)
            best2, best2_idx = scores2.max(-1)
            edge2 = best2.sort(-1, descending=True).indices
            b_left, b_merged = edge2[:, r2:], edge2[:, :r2]
            b_target = best2_idx.gather(1, b_merged)

            def merge(t):  # sum of each group along dim 1 (A->B, then B->A)
                a, b = t[:, ::2], t[:, 1::2]
                b = _scatter_add(b, a_target, _gather(a, a_merged))
                a = _gather(a, a_left)
                a = _scatter_add(a, b_target, _gather(b, b_merged))
                return torch.cat([a, _gather(b, b_left)], 1)

            w = (received * s)[..., None]
            norm = merge(w)
            bh, heads, n, _ = probs.shape
            # keys: columns of a group summed; queries: rows averaged with w
            cols = merge(probs.permute(0, 3, 1, 2).reshape(bh, n, heads * n))
            k_len = cols.shape[1]
            cols = cols.view(bh, k_len, heads, n).permute(0, 3, 2, 1).reshape(bh, n, heads * k_len)
            fused = (merge(cols * w) / norm).view(bh, k_len, heads, k_len).transpose(1, 2)
            x, size = merge(x * w) / norm, merge(s[..., None])[..., 0]
            _, _, v = _heads(layer, layer.layernorm_before(x))
            x = x + _attend(layer, fused, v)
        else:
            x = x + _attend(layer, probs, v)
        counts.append((t, x.shape[1]))
        x = x + layer.mlp(layer.layernorm_after(x))
    tokens = backbone.layernorm(x)
    return tokens, _head_logits(model, tokens), counts


def _library(model, x, **options):
    with torch.no_grad(), tofu.fused(model, **options) as handle:
        tokens = _backbone(model)(x).last_hidden_state
        logits = model(x).logits
        counts = [handle.token_counts()[f"layers.{i}"] for i in range(len(_backbone(model).layers))]
    return tokens, logits, counts


@pytest.mark.parametrize("cls,config", [(ViTForImageClassification, ViTConfig),
                                        (DeiTForImageClassificationWithTeacher, DeiTConfig)])
@pytest.mark.parametrize("r", [6, (8, -0.5), [3, 10, 0, 7]])
def test_tome_matches_its_reference_forward(cls, config, r):
    model, x = _model(cls, config), _images()
    with torch.no_grad():
        ref_tokens, ref_logits, ref_counts = tome_reference(model, x, requested_r(r, 4))
    tokens, logits, counts = _library(model, x, method="tome", r=r)
    assert counts == ref_counts
    assert tokens.shape == ref_tokens.shape
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-4, rtol=0)  # the same tokens in the same order
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("r,layers", [(6, None), (16, (1, 2, 3)), (20, None)])  # 20: the floor of 10 binds
def test_mctf_matches_its_reference_forward(r, layers):
    model, x = _model(seed=1), _images(seed=1)
    schedule = [r if layers is None or i in layers else 0 for i in range(4)]
    with torch.no_grad():
        ref_tokens, ref_logits, ref_counts = mctf_reference(model, x, schedule)
    tokens, logits, counts = _library(model, x, method="mctf", r=r, layers=layers)
    assert counts == ref_counts
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method,reference", [("tome", tome_reference), ("mctf", mctf_reference)])
def test_the_original_order_is_an_explicit_option_that_departs_from_the_reference(method, reference):
    model, x = _model(), _images()
    with torch.no_grad():
        _, ref_logits, ref_counts = reference(model, x, [8] * 4)
    _, logits, counts = _library(model, x, method=method, r=8, token_order="original")
    assert counts == ref_counts  # the same schedule: only which tokens pair up in later layers differs
    assert (logits - ref_logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="token_order"):
        tofu.TokenFusionConfig(token_order="sorted")


class _Sine(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x)


def _bent(early_nonlinear: bool):
    """A 6-layer ViT whose first two layers are far from linear (a fast sine as the MLP activation, a strong
    MLP branch) and whose other four are nearly the identity (tiny residual branches), or the other way round."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**{**SMALL, "num_hidden_layers": 6})).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.vit.layers):
            if (i < 2) == early_nonlinear:
                layer.mlp.activation_fn = _Sine()
                layer.mlp.fc1.weight.mul_(40.0)
                layer.mlp.fc2.weight.mul_(10.0)
            else:
                for linear in (layer.attention.o_proj, layer.mlp.fc2):
                    linear.weight.mul_(1e-3)
                    linear.bias.zero_()
    return model


def test_switch_depth_calibration_follows_where_the_network_is_linear():
    from tofu_diffusion.adapters.vit import ADAPTER

    x = _images(8, seed=3)
    early = _bent(early_nonlinear=True)
    gaps = ADAPTER.linearity_profile(early, x)
    assert min(gaps[:2]) > 0.5 and max(gaps[2:]) < 0.01  # past the two non-linear layers the rest is linear
    assert tofu.calibrate_switch_depth(early, x) == 2  # prune in the two non-linear layers, merge after
    late = _bent(early_nonlinear=False)
    assert tofu.calibrate_switch_depth(late, x) >= 5  # the late layers are not linear: prune (nearly) everywhere
    with tofu.fused(early, method="tofu", r=4):
        with pytest.raises(ValueError, match="unpatched"):
            tofu.calibrate_switch_depth(early, x)
    with pytest.raises(ValueError, match="two images"):
        tofu.calibrate_switch_depth(early, x[:1])


def test_interpolation_gap_is_zero_for_affine_maps_and_half_for_a_step():
    from tofu_diffusion.core import interpolation_gap, switch_depth_from_gaps

    x1, x2 = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    affine = torch.nn.Linear(3, 3)
    assert interpolation_gap(affine, x1, x2) < 1e-6
    # a hard switch answers one endpoint at the midpoint: the gap is half the spread, the break-even where
    # merging (an average) and pruning (one token) cost the same squared error
    step = lambda x: (x[..., :1] > 0).float() * 2  # noqa: E731
    ones = torch.ones(1, 1, 1)
    assert interpolation_gap(step, ones, -ones * 0.5) == pytest.approx(0.5)
    assert switch_depth_from_gaps([0.9, 0.6, 0.4, 0.1], tolerance=0.5) == 2
    assert switch_depth_from_gaps([0.9, 0.6], tolerance=0.5) == 2
