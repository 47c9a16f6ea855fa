"""ToMe / ToFu / MCTF on transformers' ViT and DeiT classifiers."""

import math

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import tofu_diffusion as tofu
from tofu_diffusion.core import fuse_attention, layer_schedule, plan_from_pairs, requested_r

SMALL = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
             intermediate_size=64, num_labels=6)
CLASSIFIERS = [
    (ViTForImageClassification, ViTConfig, 1),
    (DeiTForImageClassification, DeiTConfig, 2),
    (DeiTForImageClassificationWithTeacher, DeiTConfig, 2),
]


def _model(cls=ViTForImageClassification, config=ViTConfig):
    torch.manual_seed(0)
    return cls(config(**SMALL)).eval()


def _images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls,config,_", CLASSIFIERS)
@pytest.mark.parametrize("method", tofu.CLASSIFIER_METHODS)
def test_r_zero_and_removal_are_bit_identical(cls, config, _, method):
    model, x = _model(cls, config), _images()
    base = model(x).logits
    with tofu.fused(model, method=method, r=0):
        assert torch.equal(model(x).logits, base)
    handle = tofu.apply(model, method=method, r=6)
    assert not torch.equal(model(x).logits, base)
    assert handle.schedule == [6, 6, 6, 6]
    tofu.remove(model)
    assert torch.equal(model(x).logits, base)
    assert model.config._attn_implementation == "sdpa"  # mctf's fused-attention switch is undone
    assert not any("_diffusers_hook" in vars(m) or "_tofu_diffusion" in " ".join(vars(m)) for m in model.modules())


@pytest.mark.parametrize("cls,config,protected", CLASSIFIERS)
@pytest.mark.parametrize("method", tofu.CLASSIFIER_METHODS)
def test_sizes_sum_to_the_token_count_and_protected_tokens_stay_whole(cls, config, protected, method):
    model, x = _model(cls, config), _images()
    handle = tofu.apply(model, method=method, r=8)
    run = handle.blocks[0].run
    seen = []

    def check(layer, args, kwargs):
        hidden = args[0]
        sizes = run.sizes_for(hidden)
        seen.append(hidden.shape[1])
        assert sizes.shape == hidden.shape[:2]
        assert torch.allclose(sizes.sum(dim=1), torch.full((3,), 64.0 + protected))

    for layer in model.base_model.layers:
        layer.register_forward_pre_hook(check, with_kwargs=True)
    model(x)
    n0 = 64 + protected
    assert seen == [n0, n0 - 8, n0 - 16, n0 - 24]
    assert torch.allclose(run.sizes.sum(dim=1), torch.full((3,), float(n0)))
    # CLS (and the distillation token) were never merged: size 1, still at the front
    assert torch.equal(run.sizes[:, :protected], torch.ones(3, protected))
    counts = handle.token_counts()
    assert [counts[f"layers.{i}"] for i in range(4)] == [(n0 - 8 * i, n0 - 8 * (i + 1)) for i in range(4)]


def test_proportional_attention_equals_the_explicit_softmax():
    model = _model()
    handle = tofu.apply(model, method="tome", r=8)
    run, attention = handle.blocks[0].run, model.vit.layers[0].attention
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 32, generator=g)
    run.sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 1.0, 1.0]])
    out, _ = attention(hidden, run.size_bias(hidden))
    # explicit: softmax_j(q_i k_j / sqrt(d) + log s_j) = s_j exp(q_i k_j / sqrt(d)) / sum_k s_k exp(q_i k_k / sqrt(d))
    q = attention.q_proj(hidden).view(2, 5, 2, 16).transpose(1, 2)
    k = attention.k_proj(hidden).view(2, 5, 2, 16).transpose(1, 2)
    v = attention.v_proj(hidden).view(2, 5, 2, 16).transpose(1, 2)
    weights = run.sizes[:, None, None, :] * torch.exp(q @ k.transpose(-1, -2) / 4.0)
    probs = weights / weights.sum(dim=-1, keepdim=True)
    expected = attention.o_proj((probs @ v).transpose(1, 2).reshape(2, 5, 32))
    assert torch.allclose(out, expected, atol=1e-5)
    tofu.remove(model)


def test_fused_attention_on_a_hand_checked_example():
    # 4 tokens; token 2 joins token 1. Weights (attention received x size) 1, 1, 3, 1.
    plan = plan_from_pairs(4, torch.tensor([[2]]), torch.tensor([[1]]), torch.tensor([[1.0, 1.0, 3.0, 1.0]]))
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                              [0.25, 0.25, 0.25, 0.25],
                              [0.4, 0.3, 0.2, 0.1],
                              [0.0, 0.5, 0.5, 0.0]]).view(1, 1, 4, 4)
    fused = fuse_attention(attention, plan)[0, 0]
    # columns 1 and 2 summed; rows 1 and 2 averaged with weights 1 and 3
    expected = torch.tensor([[0.1, 0.5, 0.4],
                             [(0.25 + 3 * 0.4) / 4, (0.5 + 3 * 0.5) / 4, (0.25 + 3 * 0.1) / 4],
                             [0.0, 1.0, 0.0]])
    assert torch.allclose(fused, expected)
    assert torch.allclose(fused.sum(dim=-1), torch.ones(3))


def test_fused_attention_is_applied_without_forming_it():
    from tofu_diffusion.core import apply_fused_attention

    g = torch.Generator().manual_seed(0)
    n, k = 9, 6
    plan = plan_from_pairs(n, torch.tensor([[2, 5, 8], [0, 1, 7]]), torch.tensor([[1, 4, 4], [3, 3, 6]]),
                           torch.rand(2, n, generator=g) + 0.1)
    attention = torch.randn(2, 3, n, n, generator=g).softmax(-1)
    value = torch.randn(2, 3, k, 4, generator=g)
    expected = fuse_attention(attention, plan) @ value
    torch.testing.assert_close(apply_fused_attention(attention, plan, value), expected)


def test_fused_attention_in_the_model_is_the_fused_matrix_times_the_values():
    model, x = _model(DeiTForImageClassificationWithTeacher, DeiTConfig), _images()
    checked = []
    from tofu_diffusion.adapters.vit import attention as vit

    original = vit.fused_attention

    def spy(module, query, key, value, mask, **kwargs):
        scratch = getattr(module, vit._STATE_ATTR).scratch()
        out, _ = original(module, query, key, value, mask, **kwargs)
        if scratch.unmerged_attention is not None:
            fused = fuse_attention(scratch.unmerged_attention, scratch.plan)
            assert torch.allclose(fused.sum(dim=-1), torch.ones(()), atol=1e-5)  # rows still sum to one
            torch.testing.assert_close(out, (fused @ value).transpose(1, 2), atol=1e-5, rtol=1e-5)
            checked.append(out.shape[1])
        return out, None

    from transformers import AttentionInterface

    with tofu.fused(model, method="mctf", r=8):
        AttentionInterface.register(vit.FUSED_ATTENTION, spy)
        try:
            model(x)
        finally:
            AttentionInterface.register(vit.FUSED_ATTENTION, original)
    assert checked == [58, 50, 42, 34]  # every layer fused: 66 tokens, 8 fewer each time


def test_schedule_forms_give_the_documented_token_counts():
    assert requested_r(4, 3) == [4, 4, 4]
    assert requested_r((8, 0.5), 5) == [4, 6, 8, 10, 12]  # ramp r(1 - i) .. r(1 + i)
    assert requested_r((8, -1.0), 3) == [16, 8, 0]
    # ToMe's parse_r: first layer int(13 * 0.7) = 9, last 2 * 13 - 9 = 17, steps of 8/11 truncated
    assert requested_r((13, 0.3), 12) == [9, 9, 10, 11, 11, 12, 13, 14, 14, 15, 16, 17]
    assert requested_r([3, 1], 4) == [3, 1, 0, 0]
    with pytest.raises(ValueError, match="lists 5 layers"):
        requested_r([1] * 5, 4)
    # MCTF's DeiT schedule: r = 16 in blocks 1..11 takes 197 tokens to 21
    schedule = layer_schedule(197, 12, r=[0] + [16] * 11, protected=1)
    assert schedule == [0] + [16] * 11 and 197 - sum(schedule) == 21
    # capped at half the unprotected tokens of each layer
    assert layer_schedule(17, 3, r=10, protected=1) == [8, 4, 2]
    # a ratio of each layer's current tokens
    assert layer_schedule(65, 3, ratio=0.25) == [16, 12, 9]
    assert layer_schedule(65, 3, r=4, layers=[1]) == [0, 4, 0]
    # MCTF's floor: never below 10 tokens (33 -> 17 -> 10 -> 10 at r=16)
    assert layer_schedule(33, 3, r=16, protected=1, min_tokens=10) == [16, 7, 0]


@pytest.mark.parametrize("r,expected", [(4, [4, 4, 4, 4]), ((4, 1.0), [0, 2, 5, 8]), ([8, 0, 2], [8, 0, 2, 0])])
def test_model_token_counts_follow_the_schedule(r, expected):
    model, x = _model(), _images()
    with tofu.fused(model, method="tofu", r=r) as handle:
        model(x)
        assert handle.schedule == expected
        n = 65
        for i, removed in enumerate(expected):
            assert handle.token_counts()[f"layers.{i}"] == (n, n - removed)
            n -= removed


def test_vit_model_without_head_and_bad_input():
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**SMALL), add_pooling_layer=False).eval()
    x = _images()
    base = model(x).last_hidden_state
    with tofu.fused(model, method="mctf", r=8):
        assert model(x).last_hidden_state.shape == (3, 65 - 32, 32)
    assert torch.equal(model(x).last_hidden_state, base)
    with pytest.raises(ValueError, match="out of range"):
        tofu.apply(model, method="tome", r=4, layers=[7])
    with pytest.raises(ValueError, match="r must be"):
        tofu.apply(model, method="tome", r=-2)
    from tofu_diffusion.pipelines.tiny import dit_transformer

    with pytest.raises(ValueError, match="ViT/DeiT classifiers"):
        tofu.apply(dit_transformer(), r=4)


def test_gradients_flow_through_every_method():
    model, x = _model(), _images()
    model.train()
    for method in tofu.CLASSIFIER_METHODS:
        with torch.enable_grad(), tofu.fused(model, method=method, r=8):
            model.zero_grad()
            model(x).logits.square().mean().backward()
            grad = model.vit.layers[0].attention.q_proj.weight.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_mctf_projects_no_query_or_key_for_merged_tokens():
    model, x = _model(), _images()
    calls = []
    projection = model.vit.layers[1].attention.q_proj
    projection.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    with tofu.fused(model, method="mctf", r=8):
        model(x)
    # the one-step-ahead attention projects the 57 unmerged tokens; the merged 49 are skipped (zeros)
    assert calls == [57, 49]
    assert math.isfinite(float(model(x).logits.sum()))


@pytest.mark.slow
def test_consistency_loss_decreases_over_a_few_steps():
    from tofu_diffusion.training import consistency_loss

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**SMALL)).train()
    images, labels = _images(16, seed=3), torch.arange(16) % 6
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    student = tofu.TokenFusionConfig(method="mctf", r=8)
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.enable_grad():
        for _ in range(15):
            loss, parts = consistency_loss(model, images, labels, student, teacher_max_r=4, generator=g)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            assert 0 <= parts["teacher_r"] < 4 and parts["mse"] >= 0
    assert losses[-1] < 0.5 * losses[0]
    assert tofu.handle_of(model) is None  # the passes leave the model unpatched
    with pytest.raises(ValueError, match="reduces nothing"):
        consistency_loss(model, images, labels, tofu.TokenFusionConfig(method="mctf", ratio=0.0))


def test_timm_models_get_a_clear_error():
    fake = type("VisionTransformer", (torch.nn.Module,), {"__module__": "timm.models.vision_transformer"})()
    with pytest.raises(TypeError, match="timm model.*transformers"):
        tofu.apply(fake, method="tome", r=4)


def test_mctf_never_fuses_below_ten_tokens():
    model, x = _model(), _images()
    with tofu.fused(model, method="mctf", r=16) as handle:
        model(x)
        # 65 -> 49 -> 33 -> 17 -> 10: the last layer stops at MCTF's floor (tome would go on to 9)
        assert handle.schedule == [16, 16, 16, 7]
        assert handle.token_counts()["layers.3"] == (17, 10)
    with tofu.fused(model, method="tome", r=16) as handle:
        assert handle.schedule == [16, 16, 16, 8]


def test_an_r_list_longer_than_the_model_is_refused_before_the_patch_is_touched():
    model = _model()
    images = _images()
    first = tofu.apply(model, method="tome", r=2)
    reduced = model(images).logits
    with pytest.raises(ValueError, match="r lists 9 layers but the model has 4"):
        tofu.apply(model, method="tome", r=[1] * 9)
    assert tofu.handle_of(model) is first and torch.equal(model(images).logits, reduced)
    tofu.remove(model)


@pytest.mark.parametrize("ratio", [0.6, 0.8])
def test_a_classifier_ratio_over_half_is_refused_in_a_classifiers_words(ratio):
    # a classifier has no stride: the limit is bipartite matching's half of each layer's tokens
    with pytest.raises(ValueError, match=rf"ratio {ratio} is more than a classifier layer can remove") as caught:
        tofu.apply(_model(), method="tome", ratio=ratio)
    assert "stride" not in str(caught.value)
