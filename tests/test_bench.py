"""The benchmark's accounting: the ideal speedup comes from FLOPs with planning excluded."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.eval.bench import _count_flops, _overhead_shares, shares_of
from tofu_diffusion.pipelines.tiny import dit_transformer


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
    # each part took time, and together they are a part of the step, not more than it
    assert all(value > 0 for value in shares.values()) and sum(shares.values()) < 1


def test_on_cuda_the_shares_are_of_device_time_not_launch_time():
    from types import SimpleNamespace

    def event(key, cpu, cpu_self, device, device_self):
        return SimpleNamespace(key=key, cpu_time_total=cpu, self_cpu_time_total=cpu_self,
                               device_time_total=device, self_device_time_total=device_self)

    # a merge that launches quickly (10 of 100 host units) but runs long on the GPU (60 of 120 device units)
    events = [event("tofu_diffusion::merge", 10, 2, 60, 0), event("aten::index_add_", 8, 8, 60, 60),
              event("aten::mm", 90, 90, 60, 60), event("tofu_diffusion::plan", 0, 0, 0, 0),
              event("tofu_diffusion::unmerge", 0, 0, 0, 0)]
    host, device = shares_of(events, on_device=False), shares_of(events, on_device=True)
    assert host["merge"] == 10 / 100 and device["merge"] == 60 / 120
    assert host["plan"] == device["plan"] == 0


def test_speedup_interval_pairs_interleaved_rounds():
    from tofu_diffusion.eval.timing import speedup_interval

    # a slow drift hits both variants alike: the paired ratios stay at 2 where unpaired medians would not
    base, fast = [1.0, 2.0, 4.0], [0.5, 1.0, 2.0]
    assert speedup_interval(base, fast) == (2.0, 2.0, 2.0)
    median, low, high = speedup_interval([1.0] * 10, [1.0, 0.5] * 5)
    assert (median, low, high) == (1.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="no timed rounds"):
        speedup_interval([], [])


def test_the_baseline_interval_is_its_own_noise_and_contains_one():
    from tofu_diffusion.eval.timing import BASELINE_AGAIN, noise_interval, ratio_interval, speedups_of

    # the second timing of each round was slower every time: one-sided ratios would exclude 1
    rounds = [1.1, 1.2, 1.05]
    assert ratio_interval(rounds)[1] > 1
    speedup, low, high = noise_interval(rounds)
    assert speedup == 1.0 and low < 1 < high and (low, high) == (1 / 1.2, 1.2)
    times = {"baseline": [1.0, 1.0, 1.0], "tome": [0.5, 0.5, 0.4], BASELINE_AGAIN: [0.9, 1.1, 1.0]}
    speedups = speedups_of(times)
    assert set(speedups) == {"baseline", "tome"}
    base, tome = speedups["baseline"], speedups["tome"]
    assert base["speedup"] == 1.0 and base["speedup_low"] == pytest.approx(0.9) and base["speedup_high"] > 1.1
    assert (tome["speedup"], tome["speedup_low"], tome["speedup_high"]) == (2.0, 2.0, 2.5)


# Wan's text is attended across; HunyuanVideo's 256 text tokens join every attention and are never merged,
# and its text refiner runs unreduced, so less of a call is saved.
@pytest.mark.parametrize("model,ideal", [("wan", (1.5, 2.2)), ("hunyuan_video", (1.3, 1.6))])
def test_video_workloads_reduce_the_video_tokens_to_half_at_their_geometry(model, ideal, tmp_path):
    """The real Wan2.1 / HunyuanVideo configs cut to one narrow block, at a small clip: tome 0.5 halves the
    video tokens of every block and the FLOP ideal says how much that saves."""
    import json

    from tofu_diffusion.eval import bench

    out = tmp_path / "bench.json"
    bench.main(["--models", model, "--depth", "1", "--width", "128", "--resolution", "64", "--frames", "5",
                "--ratios", "0.5", "--methods", "tome", "--scopes", "block", "--flops-only", "--batch", "1",
                "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    reduced = rows["tome block r=0.5"]
    width = 832 if model == "wan" else 1280
    per_frame = (64 // 16) * (width // 16)  # the 8x VAE, then 2x2 patches
    assert reduced["frames"] == 5 and reduced["tokens"] == 2 * per_frame  # (5 - 1) / 4 + 1 = 2 latent frames
    assert ideal[0] < reduced["ideal_speedup"] < ideal[1]


@pytest.mark.slow
def test_the_trajectory_bench_times_the_defaults_cached_unmerge_inside_a_run(tmp_path):
    """--trajectory under SD3's shift-3 scheduler: the default's reduced steps (unmerge_mode="cached") are timed
    after an unreduced step of the same run, and that step's cost is taken off again."""
    import json

    from tofu_diffusion.eval import bench

    out = tmp_path / "bench.json"
    bench.main(["--models", "sd3", "--trajectory", "--depth", "1", "--width", "128", "--resolution", "256",
                "--steps", "10", "--repeats", "1", "--warmup", "0", "--batch", "1", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    default, tome = rows["default, whole call"], rows["tome 0.5 every step"]
    assert default["reduced_steps"] == 4  # steps 6-9 of 10: progress >= 0.6
    # 4 of 10 steps at 0.75 of the tokens: more than nothing, less than every step at 0.5
    assert 1.05 < default["ideal_speedup"] < tome["ideal_speedup"]
    assert default["ms_per_call"] > 0


@pytest.mark.slow
def test_compiled_variants_each_run_their_own_compiled_copy():
    import functools

    from test_properties import _family_inputs

    from tofu_diffusion.eval.compiled import compiled_variants
    from tofu_diffusion.eval.variants import use_variant
    from tofu_diffusion.pipelines.tiny import flux_transformer

    torch._dynamo.reset()
    model = flux_transformer()
    args, kwargs = _family_inputs("flux", 1, 16, 16, torch.float32)

    def step(net=model):
        return net(*args, **kwargs, return_dict=False)[0]

    configs = {"baseline": None, "tome 0.5": tofu.TokenFusionConfig(method="tome", ratio=0.5)}
    eager = {}
    for name, config in configs.items():
        use_variant(model, config)
        eager[name] = step()
    setups = {name: functools.partial(use_variant, model, config) for name, config in configs.items()}
    timed, no_setups = compiled_variants(model, {name: step for name in configs}, setups, "regional", "aot_eager")
    assert tofu.handle_of(model) is None  # the model itself is left unpatched
    for name in configs:
        no_setups[name]()
        assert torch.equal(timed[name](), eager[name])
    assert not torch.equal(eager["baseline"], eager["tome 0.5"])
    torch._dynamo.reset()
