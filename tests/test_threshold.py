"""Adaptive reduction: ``threshold=`` merges only similar tokens, so how many merge follows the content."""

import pytest
import torch
from conftest import run_denoiser

import tofu_diffusion as tofu
from tofu_diffusion.core import bipartite_soft_matching, count_above, grid_partition, threshold_granularity
from tofu_diffusion.pipelines.tiny import dit_transformer


def test_granularity_keeps_a_block_to_a_few_dozen_sizes():
    assert [threshold_granularity(n) for n in (64, 256, 1024, 4096, 32760)] == [8, 8, 16, 64, 256]
    assert all(n // threshold_granularity(n) <= 128 for n in (256, 1024, 4096, 16384, 32760))


def test_the_batch_merges_its_fewest_rounded_down_and_capped():
    best = torch.tensor([[0.95] * 20 + [0.1] * 4, [0.95] * 13 + [0.1] * 11])
    assert count_above(best, 0.9, cap=24, granularity=8) == 8  # 13 is the fewest, rounded down to 8
    assert count_above(best[:1], 0.9, cap=24, granularity=8) == 16
    assert count_above(best[:1], 0.9, cap=10, granularity=8) == 10  # the ratio's cap wins
    assert count_above(best, 0.99, cap=24, granularity=8) == 0


def test_only_near_duplicates_merge_under_a_high_threshold():
    """On an 8x8 grid, every source a copy of its cell's destination or unlike anything: the copies merge,
    rounded down, and nothing else."""
    g = torch.Generator().manual_seed(0)
    grid = (8, 8)
    src, dst = grid_partition(grid, (2, 2), generator=g)
    x = torch.randn(1, 64, 32, generator=g)
    copies = src[:24]
    nearest = dst[torch.randint(0, dst.numel(), (24,), generator=g)]
    x[0, copies] = x[0, nearest]
    plan = bipartite_soft_matching(x, src, dst, r=40, threshold=0.999)
    assert plan.num_kept == 64 - 24
    assert set(plan.src_idx[0].tolist()) == set(copies.tolist())
    assert bipartite_soft_matching(x, src, dst, r=40, threshold=-1.0).num_kept == 64 - 40  # all above: the cap


def _dit_call(model, x):
    return run_denoiser(model, (x,), {"timestep": torch.tensor([500] * x.shape[0]),
                                      "class_labels": torch.zeros(x.shape[0], dtype=torch.long)})


@pytest.fixture
def latents():
    g = torch.Generator().manual_seed(3)
    busy = torch.randn(1, 4, 32, 32, generator=g)
    flat = busy.mean(dim=(2, 3), keepdim=True).expand(1, 4, 32, 32) + 0.02 * torch.randn(1, 4, 32, 32, generator=g)
    return busy, flat.contiguous()


def test_a_flat_latent_merges_more_than_a_busy_one_and_a_batch_merges_its_fewest(latents):
    busy, flat = latents
    model = dit_transformer()
    handle = tofu.apply(model, method="tome", threshold=0.9)
    removed = {}
    for name, x in (("busy", busy), ("flat", flat)):
        handle.reset_counts()
        _dit_call(model, x)
        removed[name] = handle.removed_share()
    assert 0 <= removed["busy"] < removed["flat"] <= 0.75
    handle.reset_counts()
    _dit_call(model, torch.cat([flat, busy]))
    assert handle.removed_share() == pytest.approx(removed["busy"])  # one shape: the busier sample's count
    counts = handle.token_counts()
    assert all((n_in - n_out) % 8 == 0 for n_in, n_out in counts.values())


@pytest.mark.parametrize("cap", [None, 0.25, 0.5, 0.75])
def test_a_threshold_no_similarity_exceeds_removes_nothing_bit_for_bit(cap, latents):
    _, flat = latents  # the flat latent's tokens are the most alike, and still none is this alike
    model = dit_transformer()
    base = _dit_call(model, flat)
    handle = tofu.apply(model, method="tome", threshold=0.99999, ratio=cap)
    assert torch.equal(_dit_call(model, flat), base)
    assert handle.removed_share() == 0 and all(n_in == n_out for n_in, n_out in handle.token_counts().values())


def test_threshold_below_every_similarity_is_the_ratio_bit_for_bit(latents):
    busy, _ = latents
    model = dit_transformer()
    with tofu.fused(model, method="tome", ratio=0.5):
        fixed = _dit_call(model, busy)
    with tofu.fused(model, method="tome", ratio=0.5, threshold=-1.0):
        capped = _dit_call(model, busy)
    assert torch.equal(fixed, capped)


@pytest.mark.parametrize("method", ["tome", "tofu", "mctf"])
def test_every_matching_method_follows_the_threshold_and_repeats_exactly(method, latents):
    busy, flat = latents
    model = dit_transformer()
    base = _dit_call(model, flat)
    handle = tofu.apply(model, method=method, threshold=0.99999, ratio=0.5)
    assert torch.equal(_dit_call(model, flat), base) and handle.removed_share() == 0  # nothing that similar
    tofu.apply(model, method=method, threshold=0.3, ratio=0.5)
    first, second = _dit_call(model, flat), _dit_call(model, flat)
    assert torch.equal(first, second) and not torch.equal(first, base)
    assert 0 < tofu.handle_of(model).removed_share() <= 0.5
    tofu.remove(model)
    assert torch.equal(_dit_call(model, flat), base)


def test_threshold_alone_caps_at_the_stride_and_reduces_every_step():
    resolved = tofu.TokenFusionConfig(threshold=0.8).resolve("dit")
    assert resolved.ratio == 0.75 and resolved.schedule is None and resolved.blocks is None
    assert tofu.TokenFusionConfig(threshold=0.8, stride=(2, 2, 2)).resolve("wan").ratio == 0.875
    explanation = tofu.explain(dit_transformer(), threshold=0.8, num_inference_steps=4, height=256, width=256,
                               scheduler=_scheduler())
    assert "threshold 0.8" in str(explanation) and explanation.reduced_steps == 4


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


def test_bad_thresholds_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"cosine similarity: give one in \[-1, 1\)"):
        tofu.TokenFusionConfig(threshold=1.5)
    with pytest.raises(ValueError, match="todo matches no tokens"):
        tofu.TokenFusionConfig(method="todo", threshold=0.9)
    with pytest.raises(ValueError, match="threshold"):
        tofu.TokenFusionConfig(threshold="high")
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                              num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="threshold"):
        tofu.apply(vit, method="tome", r=2, threshold=0.9)


def test_the_adaptive_preset_is_a_threshold_capped_by_the_stride_and_an_explicit_ratio_overrides_it(latents):
    resolved = tofu.TokenFusionConfig(preset="adaptive").resolve("unet")
    assert (resolved.method, resolved.threshold, resolved.ratio, resolved.schedule) == ("tome", 0.8, 0.75, None)
    assert tofu.TokenFusionConfig(preset="adaptive", threshold=0.95).resolve("dit").threshold == 0.95
    explicit = tofu.TokenFusionConfig(preset="adaptive", ratio=0.5).resolve("dit")
    assert explicit.threshold is None and explicit.ratio == 0.5  # a ratio alone means that ratio everywhere
    model = dit_transformer()
    _, flat = latents
    with tofu.fused(model, preset="adaptive") as handle:
        _dit_call(model, flat)
        preset_share = handle.removed_share()
    with tofu.fused(model, method="tome", threshold=0.8) as handle:
        _dit_call(model, flat)
        assert handle.removed_share() == preset_share > 0


def test_the_adaptive_preset_is_refused_on_a_classifier_with_the_presets_it_takes():
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                              num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="'adaptive' is for diffusion denoisers.*'quality', 'balanced', 'fast'"):
        tofu.apply(vit, preset="adaptive")
    assert tofu.handle_of(vit) is None
