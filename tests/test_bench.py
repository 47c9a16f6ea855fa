"""The benchmark's accounting: the ideal speedup comes from FLOPs with planning excluded."""

import pytest
import torch

import tofu_diffusion as tofu
from eval.bench import _count_flops, _overhead_shares
from pipelines.tiny import dit_transformer


def _step(model):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return lambda: model(x, timestep=torch.tensor([1, 1]), class_labels=torch.tensor([0, 1]))


def test_flops_fall_with_reduction_and_exclude_planning():
    model = dit_transformer()
    step = _step(model)
    base = _count_flops(step)
    with tofu.fused(model, ratio=0.0):
        assert _count_flops(step) == base
    with tofu.fused(model, method="tome", ratio=0.5, merge_scope="block"):
        half = _count_flops(step)
    with tofu.fused(model, method="mctf", ratio=0.5, merge_scope="block"):
        # mctf's informativeness estimate uses matmuls; they are planning, so not counted
        assert _count_flops(step) == half
    assert half < 0.75 * base


def test_overhead_shares_are_attributed():
    model = dit_transformer()
    with tofu.fused(model, method="tome", ratio=0.5):
        shares = _overhead_shares(_step(model))
    assert set(shares) == {"plan", "merge", "unmerge"}
    assert all(0 < value < 1 for value in shares.values())


def test_speedup_interval_pairs_interleaved_rounds():
    from eval.timing import speedup_interval

    # a slow drift hits both variants alike: the paired ratios stay at 2 where unpaired medians would not
    base, fast = [1.0, 2.0, 4.0], [0.5, 1.0, 2.0]
    assert speedup_interval(base, fast) == (2.0, 2.0, 2.0)
    median, low, high = speedup_interval([1.0] * 10, [1.0, 0.5] * 5)
    assert (median, low, high) == (1.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="no timed rounds"):
        speedup_interval([], [])
