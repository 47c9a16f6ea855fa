"""Hooks on diffusers denoisers: exactness, repeatability, reduction, every family end to end."""

import pytest
import torch
from conftest import DENOISERS, denoiser_inputs, run_denoiser

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import (
    TEXT_DIM,
    dit_pipeline,
    dit_transformer,
    pixart_pipeline,
    prompt_embeds,
    sd_pipeline,
    sd_unet,
    sdxl_unet,
)

METHODS = ["tome", "tofu", "mctf"]


@pytest.fixture(params=list(DENOISERS))
def family(request):
    return request.param, DENOISERS[request.param]()


# ------------------------------------------------------------------ exactness
def test_ratio_zero_and_remove_are_bit_identical(family):
    kind, model = family
    args, kwargs = denoiser_inputs(kind)
    base = run_denoiser(model, args, kwargs)
    for method in METHODS:
        with tofu.fused(model, method=method, ratio=0.0):
            assert torch.equal(run_denoiser(model, args, kwargs), base)
    tofu.apply(model, method="tome", ratio=0.5)
    assert not torch.equal(run_denoiser(model, args, kwargs), base)
    tofu.remove(model)
    assert torch.equal(run_denoiser(model, args, kwargs), base)
    # nothing of ours is left on any module
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())


@pytest.mark.slow
def test_apply_twice_replaces_cleanly():
    model = sd_unet()
    args, kwargs = denoiser_inputs("sd")
    base = run_denoiser(model, args, kwargs)
    tofu.apply(model, method="tome", ratio=0.5)
    handle = tofu.apply(model, method="mctf", ratio=0.25)
    assert tofu.handle_of(model) is handle
    with_mctf = run_denoiser(model, args, kwargs)
    tofu.remove(model)
    tofu.apply(model, method="mctf", ratio=0.25)
    assert torch.equal(run_denoiser(model, args, kwargs), with_mctf)  # no leftover of the first apply
    tofu.remove(model)
    assert torch.equal(run_denoiser(model, args, kwargs), base)


def test_fused_restores_previous_configuration():
    model = sd_unet()
    args, kwargs = denoiser_inputs("sd")
    tofu.apply(model, method="tofu", ratio=0.5)
    with tofu.fused(model, method="mctf", ratio=0.5):
        assert tofu.handle_of(model).config.method == "mctf"
    assert tofu.handle_of(model).config.method == "tofu"
    tofu.remove(model)
    assert tofu.handle_of(model) is None


# ------------------------------------------------------------------ reduction happens, and is repeatable
def _tokens_entering_self_attention(model):
    """Count tokens reaching each attn1's query projection, independently of our own bookkeeping."""
    counts, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith("attn1"):
            handles.append(module.to_q.register_forward_pre_hook(
                lambda m, a, name=name: counts.__setitem__(name, a[0].shape[1])))
    return counts, handles


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_changes_output_and_tokens_fall_with_ratio(family, method):
    kind, model = family
    args, kwargs = denoiser_inputs(kind)
    base = run_denoiser(model, args, kwargs)
    counts, hooks = _tokens_entering_self_attention(model)
    per_ratio = {}
    for ratio in (0.0, 0.25, 0.5, 0.7):
        with tofu.fused(model, method=method, ratio=ratio) as handle:
            out = run_denoiser(model, args, kwargs)
            reduced = [b.name for b in handle.blocks]
            per_ratio[ratio] = {n: c for n, c in counts.items() if n.removesuffix(".attn1") in reduced}
        if ratio == 0.5:
            assert not torch.allclose(out, base), f"{method} at ratio 0.5 left the output unchanged"
            assert torch.isfinite(out).all()
    for h in hooks:
        h.remove()
    for name in per_ratio[0.0]:
        seq = [per_ratio[r][name] for r in (0.0, 0.25, 0.5, 0.7)]
        assert seq == sorted(seq, reverse=True) and len(set(seq)) == 4, (name, seq)
        assert seq[2] == seq[0] - int(seq[0] * 0.5)


def test_random_destinations_are_repeatable_and_seeded():
    model = sd_unet()
    args, kwargs = denoiser_inputs("sd")
    tofu.apply(model, method="tome", ratio=0.5, destination="random", seed=3)
    first = run_denoiser(model, args, kwargs)
    assert torch.equal(run_denoiser(model, args, kwargs), first)
    tofu.apply(model, method="tome", ratio=0.5, destination="random", seed=4)
    assert not torch.equal(run_denoiser(model, args, kwargs), first)
    tofu.remove(model)


@pytest.mark.parametrize("method", METHODS)
def test_tofu_and_mctf_use_their_merge_modes(method):
    model = dit_transformer()
    handle = tofu.apply(model, method=method, ratio=0.5)
    modes = [b.merge_mode for b in handle.blocks]
    expected = {"tome": ["mean"] * 4, "tofu": ["mlerp"] * 4, "mctf": ["size_weighted"] * 4}  # tofu: switch_depth 0
    assert modes == expected[method]
    handle = tofu.apply(model, method="tofu", ratio=0.5, switch_depth=1)
    assert [b.merge_mode for b in handle.blocks] == ["prune", "mlerp", "mlerp", "mlerp"]
    handle = tofu.apply(model, method="tofu", ratio=0.5, switch_depth=9)
    assert [b.merge_mode for b in handle.blocks] == ["prune"] * 4
    with pytest.raises(ValueError, match="switch_depth must be an int >= 0"):
        tofu.apply(model, method="tofu", ratio=0.5, switch_depth=-1)
    tofu.remove(model)


def test_tome_matches_tomesd_end_to_end():
    tomesd = pytest.importorskip("tomesd")
    model = sd_unet()
    args, kwargs = denoiser_inputs("sd")
    with tofu.fused(model, method="tome", ratio=0.5, destination="fixed", merge_scope="sublayers"):
        ours = run_denoiser(model, args, kwargs)
    tomesd.apply_patch(model, ratio=0.5, use_rand=False)
    try:
        theirs = run_denoiser(model, args, kwargs)
    finally:
        tomesd.remove_patch(model)
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------ levels, grids, sublayers
def test_levels_default_and_explicit():
    sd, xl = sd_unet(), sdxl_unet()
    stages = {b.name.split(".")[0] + b.name.split(".")[1] for b in tofu.apply(sd).blocks}
    assert stages == {"down_blocks0", "up_blocks1"}
    # SDXL's default reduces its highest-resolution attention level (1/2), not nothing
    handle = tofu.apply(xl)
    assert handle.blocks and all(b.name.startswith(("down_blocks.1", "up_blocks.1")) for b in handle.blocks)
    assert len(tofu.apply(sd, max_downsample=2).blocks) == 2 * len(tofu.apply(sd).blocks) + 1  # + mid block
    with pytest.raises(ValueError, match=r"downsampling factors \[2, 4\]"):
        tofu.apply(xl, max_downsample=1)
    # at 1/4: down (1 attention x 2 layers) + mid (2 layers) + up (2 attentions x 2 layers)
    assert len(tofu.apply(xl, levels=[4]).blocks) == 2 + 2 + 4
    tofu.remove(sd)
    tofu.remove(xl)


# UNets take any latent size; patchified models need multiples of the patch size, and diffusers'
# DiTTransformer2DModel itself only unpatchifies square latents.
LATENT_SIZES = [("sd", (16, 24)), ("sd", (18, 14)), ("sd", (22, 22)), ("sdxl", (16, 24)), ("sdxl", (18, 14)),
                ("sdxl", (22, 22)), ("dit", (12, 12)), ("dit", (20, 20)), ("pixart", (16, 24)), ("pixart", (20, 12))]


@pytest.mark.parametrize("kind,size", LATENT_SIZES)
def test_any_latent_size(kind, size):
    model = DENOISERS[kind]()
    args, kwargs = denoiser_inputs(kind, h=size[0], w=size[1])
    base = run_denoiser(model, args, kwargs)
    handle = tofu.apply(model, method="tome", ratio=0.5, merge_scope="sublayers", merge_cross_attention=kind != "dit",
                        merge_feed_forward=True)
    out = run_denoiser(model, args, kwargs)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert all(n_out < n_in for n_in, n_out in handle.token_counts().values())
    tofu.remove(model)


def test_sdxl_stride_not_dividing_grid():
    # 18x14 latent: the 1/2 level is 9x7, not divisible by the 2x2 stride
    model = sdxl_unet()
    args, kwargs = denoiser_inputs("sdxl", h=18, w=14)
    handle = tofu.apply(model, ratio=0.5)
    run_denoiser(model, args, kwargs)
    assert set(handle.token_counts().values()) == {(63, 32)}
    tofu.remove(model)


def test_keyword_call_equals_positional_call():
    model = sd_unet()
    (x, t, e), _ = denoiser_inputs("sd")
    tofu.apply(model, method="mctf", ratio=0.5)
    positional = model(x, t, e).sample
    keyword = model(sample=x, timestep=t, encoder_hidden_states=e).sample
    assert torch.equal(positional, keyword)
    tofu.remove(model)


def test_sublayer_options_reduce_cross_attention_and_feed_forward():
    model = sd_unet()
    args, kwargs = denoiser_inputs("sd")
    seen = {}
    block = model.down_blocks[0].attentions[0].transformer_blocks[0]
    block.attn2.to_q.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn2", a[0].shape[1]))
    block.ff.net[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("ff", a[0].shape[1]))
    with tofu.fused(model, ratio=0.5, merge_scope="sublayers"):
        run_denoiser(model, args, kwargs)
        assert seen == {"attn2": 256, "ff": 256}
    with tofu.fused(model, ratio=0.5, merge_scope="sublayers", merge_cross_attention=True, merge_feed_forward=True):
        run_denoiser(model, args, kwargs)
        assert seen == {"attn2": 128, "ff": 128}


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_sizes(batch):
    model = sd_unet()
    args, kwargs = denoiser_inputs("sd", batch=batch)
    with tofu.fused(model, method="mctf", ratio=0.5):
        out = run_denoiser(model, args, kwargs)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    # each item is reduced on its own: item 0 of a batch equals item 0 run alone
    single_args = tuple(a[:1] for a in args)
    with tofu.fused(model, method="mctf", ratio=0.5):
        single = run_denoiser(model, single_args, kwargs)
    assert torch.allclose(out[:1], single, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision(dtype, method):
    model = dit_transformer().to(dtype)
    args, kwargs = denoiser_inputs("dit", dtype=dtype)
    base = run_denoiser(model, args, kwargs)
    with tofu.fused(model, method=method, ratio=0.5):
        out = run_denoiser(model, args, kwargs)
    assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, base)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(run_denoiser(model, args, kwargs), base)


def test_feed_forward_chunking_gets_a_clear_error():
    model = sd_unet()
    for module in model.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(8, dim=1)
    args, kwargs = denoiser_inputs("sd")
    with tofu.fused(model, ratio=0.5, merge_scope="sublayers", merge_feed_forward=True):
        with pytest.raises(ValueError, match=r"set_chunk_feed_forward\(None\)"):
            run_denoiser(model, args, kwargs)


# ------------------------------------------------------------------ pipelines end to end
def _sd_call(pipe, seed=0):
    return pipe(prompt_embeds=prompt_embeds(), negative_prompt_embeds=prompt_embeds(seed=2), num_inference_steps=2,
                height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(seed)).images


def _pixart_call(pipe, seed=0):
    e, m = prompt_embeds(), torch.ones(1, 7)
    return pipe(prompt=None, negative_prompt=None, prompt_embeds=e, prompt_attention_mask=m,
                negative_prompt_embeds=torch.zeros_like(e), negative_prompt_attention_mask=m,
                use_resolution_binning=False, num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def _dit_call(pipe, seed=0):
    return torch.from_numpy(pipe(class_labels=[1, 2, 3], num_inference_steps=2, output_type="np",
                                 generator=torch.Generator().manual_seed(seed)).images)


@pytest.mark.parametrize("make,call",
                         [(sd_pipeline, _sd_call), (dit_pipeline, _dit_call), (pixart_pipeline, _pixart_call)],
                         ids=["stable-diffusion", "dit", "pixart-alpha"])
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_pipeline_end_to_end(make, call, method):
    pipe = make()
    base = call(pipe)
    handle = tofu.apply(pipe, tofu.TokenFusionConfig(method=method, ratio=0.5))
    first = call(pipe)
    assert torch.equal(call(pipe), first)  # same seed, same image, with reduction on
    assert not torch.equal(first, base) and torch.isfinite(first).all()
    assert handle.token_counts()
    tofu.remove(pipe)
    assert torch.equal(call(pipe), base)


@pytest.mark.slow
def test_sdxl_style_unet_in_pipeline_loop():
    # SDXL pipelines need two text encoders; drive its UNet through a CFG denoising loop directly.
    from diffusers import EulerDiscreteScheduler

    model = sdxl_unet()
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000)

    def sample():
        scheduler.set_timesteps(3)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 16, 16, generator=g) * scheduler.init_noise_sigma
        text = torch.cat([torch.zeros(1, 7, TEXT_DIM), prompt_embeds()])
        cond = {"text_embeds": torch.randn(2, TEXT_DIM, generator=g),
                "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond_out = model(inp, t, text, added_cond_kwargs=cond).sample.chunk(2)
            latents = scheduler.step(uncond + 5.0 * (cond_out - uncond), t, latents).prev_sample
        return latents

    base = sample()
    tofu.apply(model, method="tofu", ratio=0.5)
    reduced = sample()
    assert torch.equal(sample(), reduced) and not torch.equal(reduced, base)
    tofu.remove(model)
    assert torch.equal(sample(), base)


# ------------------------------------------------------------------ whole-block scope
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_whole_block_scope(family, method):
    kind, model = family
    args, kwargs = denoiser_inputs(kind)
    base = run_denoiser(model, args, kwargs)
    with tofu.fused(model, method=method, ratio=0.0, merge_scope="block"):
        assert torch.equal(run_denoiser(model, args, kwargs), base)
    seen = {}
    norms = [m for n, m in model.named_modules() if n.endswith("attn1")]
    hooks = [m.to_q.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0].shape[1]))
             for i, m in enumerate(norms)]
    with tofu.fused(model, method=method, ratio=0.5, merge_scope="block") as handle:
        out = run_denoiser(model, args, kwargs)
        counts = handle.token_counts()
    for h in hooks:
        h.remove()
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.equal(out, base)
    assert counts and all(k == n - n // 2 for n, k in counts.values())
    # attention inside the reduced blocks ran on the reduced tokens, never on the full count
    full, reduced = {n for n, _ in counts.values()}, {k for _, k in counts.values()}
    assert reduced <= set(seen.values()) and not full & set(seen.values())
    assert torch.equal(run_denoiser(model, args, kwargs), base)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["sublayers", "block"])
def test_plan_reuse_across_steps(scope):
    pipe = sd_pipeline()
    every = tofu.apply(pipe, method="tome", ratio=0.5, merge_scope=scope)
    _sd_call(pipe)  # 2 steps, CFG
    assert {b.plans_computed for b in every.blocks} == {2}
    handle = tofu.apply(pipe, method="tome", ratio=0.5, merge_scope=scope, plan_reuse_steps=2)
    first = _sd_call(pipe)
    assert {b.plans_computed for b in handle.blocks} == {1}  # step 2 reused step 1's plan
    # a new pipeline call starts planning afresh, so the same seed gives the same image
    assert torch.equal(_sd_call(pipe), first)
    assert {b.plans_computed for b in handle.blocks} == {2}
    tofu.remove(pipe)


@pytest.mark.slow
def test_unprofitable_blocks_are_skipped_with_a_debug_log(caplog):
    model = sd_unet()
    args, kwargs = denoiser_inputs("sd")
    base = run_denoiser(model, args, kwargs)
    with caplog.at_level("DEBUG", logger="tofu_diffusion"):
        with tofu.fused(model, method="tome", ratio=0.01) as handle:  # 2 of 256 tokens: matching costs more
            assert torch.equal(run_denoiser(model, args, kwargs), base)
            assert set(handle.token_counts().values()) == {(256, 256)}
    assert "matching would cost more than it saves" in caplog.text


def test_informativeness_estimate_equals_explicit_attention():
    from tofu_diffusion.core import attention_received, estimate_attention_received, stratified_grid_queries

    attn = sd_unet().down_blocks[0].attentions[0].transformer_blocks[0].attn1
    hidden = torch.randn(2, 256, 32, generator=torch.Generator().manual_seed(0))
    # 8 heads x 2 queries < 32 channels: the queries are projected to the input space
    fast = estimate_attention_received(attn, hidden, 2, (16, 16), torch.Generator().manual_seed(3))
    index, weight = stratified_grid_queries((16, 16), 2, torch.Generator().manual_seed(3))
    explicit = attention_received(attn.to_q(hidden[:, index]), attn.to_k(hidden), attn.heads, query_weights=weight)
    assert torch.allclose(fast, explicit, atol=1e-6)
    # one query per token: the exact mean attention (keys projected: more queries than pays)
    slow = estimate_attention_received(attn, hidden, 256, (16, 16), torch.Generator().manual_seed(3))
    assert torch.allclose(slow, attention_received(attn.to_q(hidden), attn.to_k(hidden), attn.heads), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("grid", [(16, 16), (12, 20), (7, 9)])
def test_informativeness_estimate_is_unbiased_over_the_image(grid):
    """Against the exact mean attention on inputs whose attention depends on where the query is: the
    mean of the estimate over seeds converges to the exact value, and a single estimate is close."""
    from tofu_diffusion.core import attention_received, estimate_attention_received

    h, w = grid
    attn = sd_unet().down_blocks[0].attentions[0].transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(1)
    # Tokens carry a smooth function of their column: queries in one column see a different image.
    cols = torch.arange(w).float().repeat(h) / w
    hidden = torch.randn(1, h * w, 32, generator=g) + 3 * torch.outer(cols, torch.randn(32, generator=g)).unsqueeze(0)
    exact = attention_received(attn.to_q(hidden), attn.to_k(hidden), attn.heads)
    draws = torch.stack([estimate_attention_received(attn, hidden, 16, grid, torch.Generator().manual_seed(s))
                         for s in range(300)])
    scale = exact.abs().mean()
    bias = (draws.mean(0) - exact).abs().mean() / scale
    error = (draws - exact).abs().mean() / scale
    assert bias < 0.03, bias
    assert error < 0.25, error
    # The old estimate (a 1-D stride over row-major tokens) was far off whenever the stride fit the width.
    strided = attention_received(attn.to_q(hidden[:, :: (h * w) // 16]), attn.to_k(hidden), attn.heads)
    if w == 16:
        assert (strided - exact).abs().mean() / scale > 2 * error
