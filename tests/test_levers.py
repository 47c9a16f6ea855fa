"""The quality levers: ratio schedules over denoising progress, block selection, presets, and todo."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DENOISERS, denoiser_inputs, run_denoiser

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import dit_transformer, sd_unet


def _at(kind, t):
    args, kwargs = denoiser_inputs(kind)
    if "timestep" in kwargs:
        kwargs = {**kwargs, "timestep": torch.tensor([t] * args[0].shape[0])}
    else:
        args = (args[0], torch.tensor([t] * args[0].shape[0])) + args[2:]
    return args, kwargs


# ------------------------------------------------------------------ schedules
def test_ratio_at_follows_the_schedule():
    config = tofu.TokenFusionConfig(schedule=[(0.2, 0.25), (0.6, 0.75)])
    assert [config.ratio_at(p) for p in (0.0, 0.19, 0.2, 0.5, 0.6, 1.0)] == [0.0, 0.0, 0.25, 0.25, 0.75, 0.75]
    assert tofu.TokenFusionConfig(ratio=0.5).ratio_at(0.0) == tofu.TokenFusionConfig(ratio=0.5).ratio_at(1.0) == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_schedule_reduces_only_late_steps(kind):
    model = DENOISERS[kind]()
    early, late = _at(kind, 900), _at(kind, 100)  # progress 0.1 and 0.9 of 1000 training timesteps
    base_early, base_late = run_denoiser(model, *early), run_denoiser(model, *late)
    handle = tofu.apply(model, method="tome", schedule=[(0.0, 0.0), (0.5, 0.75)])
    assert torch.equal(run_denoiser(model, *early), base_early)  # no reduction while the layout forms: exact
    assert all(n_in == n_out for n_in, n_out in handle.token_counts().values())
    assert not torch.allclose(run_denoiser(model, *late), base_late)
    assert all(n_out == n_in - int(0.75 * n_in) for n_in, n_out in handle.token_counts().values())
    tofu.remove(model)


def test_explicit_ratio_means_every_step_and_every_eligible_block():
    model = dit_transformer()
    handle = tofu.apply(model, ratio=0.5)
    assert handle.config.schedule is None and len(handle.blocks) == 4
    for t in (999, 500, 1):
        run_denoiser(model, *_at("dit", t))
        assert set(handle.token_counts().values()) == {(64, 32)}
    tofu.remove(model)


def test_no_options_is_the_family_preset():
    from tofu_diffusion.presets import PRESETS

    dit, unet = dit_transformer(), sd_unet()
    dit_handle, unet_handle = tofu.apply(dit), tofu.apply(unet)
    for handle, family in ((dit_handle, "dit"), (unet_handle, "unet")):
        preset = PRESETS["quality"][family]
        assert handle.config.method == preset["method"]
        assert handle.config.schedule == preset.get("schedule")
        assert handle.config.unmerge_mode == preset.get("unmerge_mode")
        assert handle.config.plan_interval == preset.get("plan_reuse_steps", 1)
    assert unet_handle.config.plan_interval == 2  # the UNet plans every other step (its preset)
    chosen = PRESETS["quality"]["dit"].get("blocks", slice(None))
    assert [b.name for b in dit_handle.blocks] == [f"transformer_blocks.{i}" for i in range(4)][chosen]
    # the preset's blocks apply only with the preset's schedule: an explicit ratio reduces every block
    spared = tofu.apply(dit, schedule=[(0.5, 0.5)], preset="quality")
    assert len(spared.blocks) == 4
    assert spared.config.unmerge_mode is None  # and its unmerge mode: an explicit schedule unmerges as ToMe
    planned = tofu.apply(unet, ratio=0.5).config  # and plans every step
    assert planned.plan_reuse_steps is None and planned.plan_interval == 1
    assert tofu.apply(unet, plan_reuse_steps=3).config.plan_interval == 3  # the preset's schedule, the user's reuse
    assert tofu.apply(dit, schedule=[(0.5, 0.5)], unmerge_mode="cached").config.unmerge_mode == "cached"
    fast = tofu.apply(dit, preset="fast")
    assert fast.config.ratio == PRESETS["fast"]["dit"]["ratio"]
    with pytest.raises(ValueError, match="unknown preset 'fastest'"):
        tofu.apply(dit, preset="fastest")
    tofu.remove(dit)
    tofu.remove(unet)


def test_joint_attention_families_share_the_sd3_preset(monkeypatch):
    from tofu_diffusion.pipelines.tiny import chroma_transformer, flux_transformer, sd3_transformer
    from tofu_diffusion.presets import PRESETS

    # a distinct sd3 entry, so the test sees which entry each family took
    monkeypatch.setitem(PRESETS["quality"], "sd3", {"method": "mctf", "schedule": ((0.0, 0.0), (0.5, 0.5))})
    for model in (sd3_transformer(), flux_transformer(), chroma_transformer()):
        handle = tofu.apply(model)
        assert handle.config.method == "mctf" and handle.config.schedule == ((0.0, 0.0), (0.5, 0.5))
        tofu.remove(model)
    dit = dit_transformer()
    assert tofu.apply(dit).config.schedule == PRESETS["quality"]["dit"]["schedule"]
    tofu.remove(dit)


def test_video_families_take_the_video_presets_and_the_dits_where_there_is_none():
    from tofu_diffusion.pipelines.tiny_video import wan_transformer
    from tofu_diffusion.presets import PRESETS

    model = wan_transformer()
    handle = tofu.apply(model)
    assert handle.config.schedule == PRESETS["quality"]["video"]["schedule"]
    assert handle.config.unmerge_mode == PRESETS["quality"]["video"]["unmerge_mode"] == "cached"
    assert tofu.apply(model, preset="fast").config.ratio == PRESETS["fast"]["dit"]["ratio"]
    tofu.remove(model)


def test_num_train_timesteps_come_from_the_pipeline():
    from tofu_diffusion.pipelines.tiny import dit_pipeline

    pipe = dit_pipeline()
    pipe.scheduler.register_to_config(num_train_timesteps=500)
    handle = tofu.apply(pipe, schedule=[(0.0, 0.0), (0.5, 0.5)], schedule_axis="noise")
    run_denoiser(pipe.transformer, *_at("dit", 400))  # progress 0.2 of 500 timesteps: not yet reduced
    assert all(a == b for a, b in handle.token_counts().values())
    run_denoiser(pipe.transformer, *_at("dit", 200))  # progress 0.6
    assert all(a > b for a, b in handle.token_counts().values())
    tofu.remove(pipe)


@pytest.mark.parametrize("options,message", [
    ({"ratio": 0.5, "schedule": [(0.0, 0.5)]}, "not both"),
    ({"schedule": [(0.5, 0.5), (0.2, 0.75)]}, "increasing progress"),
    ({"schedule": [(0.0, 1.0)]}, r"ratio must be in \[0, 1\)"),
    ({"ratio": True}, "must be a number"),
])
def test_schedule_errors(options, message):
    with pytest.raises(ValueError, match=message):
        tofu.TokenFusionConfig(**options)


def test_numpy_and_torch_ratios_are_accepted():
    for ratio in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 0.5):
        assert tofu.TokenFusionConfig(ratio=ratio).ratio == 0.5


# ------------------------------------------------------------------ blocks
def test_blocks_select_among_the_eligible_ones():
    model = dit_transformer()
    args, kwargs = denoiser_inputs("dit")
    with tofu.fused(model, ratio=0.5, blocks=slice(1, -1)) as handle:
        assert [b.name for b in handle.blocks] == ["transformer_blocks.1", "transformer_blocks.2"]
        run_denoiser(model, args, kwargs)
        assert set(handle.token_counts()) == {"transformer_blocks.1", "transformer_blocks.2"}
    with tofu.fused(model, ratio=0.5, blocks=[0, -1]) as handle:
        assert [b.name for b in handle.blocks] == ["transformer_blocks.0", "transformer_blocks.3"]
    with pytest.raises(ValueError, match=r"blocks \[7\] out of range: DiTTransformer2DModel has 4 eligible"):
        tofu.apply(model, ratio=0.5, blocks=[7])
    with pytest.raises(ValueError, match="selects none"):
        tofu.apply(model, ratio=0.5, blocks=slice(4, None))
    assert tofu.handle_of(model) is None


# ------------------------------------------------------------------ todo
@pytest.mark.parametrize("kind", list(DENOISERS))
def test_todo_ratio_zero_exact_and_shapes_kept(kind):
    model = DENOISERS[kind]()
    args, kwargs = denoiser_inputs(kind)
    base = run_denoiser(model, args, kwargs)
    with tofu.fused(model, method="todo", ratio=0.0):
        assert torch.equal(run_denoiser(model, args, kwargs), base)
    with tofu.fused(model, method="todo", ratio=0.75) as handle:
        out = run_denoiser(model, args, kwargs)
        counts = handle.token_counts()
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    # queries keep every token; keys/values are a quarter of them (2x2 downsampling)
    assert counts and all(keys == n // 4 for n, keys in counts.values())
    assert torch.equal(run_denoiser(model, args, kwargs), base)


def test_todo_is_attention_on_strided_keys_and_values():
    """One self-attention with todo against the formula: softmax(q k'^T / sqrt(d)) v' with k', v' from the
    2x2-downsampled grid (nearest-exact: the odd rows and columns)."""
    model = dit_transformer()
    block = model.transformer_blocks[0]
    attn = block.attn1
    x = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    got = {}
    attn.register_forward_hook(lambda m, a, k, o: got.setdefault("out", o), with_kwargs=True)
    handle = tofu.apply(model, method="todo", ratio=0.75)
    state = handle.blocks[0]
    state.grid.set((8, 8))
    out = attn(x)
    tofu.remove(model)
    grid = x.view(2, 8, 8, -1)[:, 1::2, 1::2].reshape(2, 16, -1)
    h, d = attn.heads, attn.to_q.out_features // attn.heads
    q = attn.to_q(x).view(2, 64, h, d).transpose(1, 2)
    k = attn.to_k(grid).view(2, 16, h, d).transpose(1, 2)
    v = attn.to_v(grid).view(2, 16, h, d).transpose(1, 2)
    expected = attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 64, h * d))
    assert torch.allclose(out, expected, atol=1e-5)


def test_todo_refused_on_classifiers():
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="todo, schedule and blocks are for diffusion denoisers"):
        tofu.apply(vit, method="todo", ratio=0.5)


def test_mctf_informativeness_defaults_per_family_and_is_wired_on_denoisers():
    model = sd_unet()
    args, kwargs = denoiser_inputs("sd")
    with tofu.fused(model, method="mctf", ratio=0.5) as handle:
        assert handle.config.tau_info == 0.0  # denoisers: the criterion is off by default
        plain = run_denoiser(model, args, kwargs)
    with tofu.fused(model, method="mctf", ratio=0.5, tau_info=20.0) as handle:
        assert handle.config.tau_info == 20.0
        informed = run_denoiser(model, args, kwargs)
    assert not torch.allclose(plain, informed)  # the estimate reaches the matching
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=8))
    assert tofu.apply(vit, method="mctf", r=2).config.tau_info == 20.0  # MCTF's own value on classifiers
