"""Wan (video, 3-D token grid, rotary self-attention, cross-attention to text): only video tokens are reduced,
the rotary rows follow the kept tokens, exact at ratio 0 and after remove(); odd frame counts, non-square
frames, batch consistency; WanPipeline end to end, its separate CFG calls one step, and both denoisers of a
two-stage (Wan 2.2 A14B) pipeline patched and removed by one line."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM
from tofu_diffusion.pipelines.tiny_video import wan_pipeline, wan_prompt, wan_transformer

METHODS = ["tome", "tofu", "mctf"]


def _inputs(batch=2, frames=3, h=8, w=12, t=500):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, frames, h, w, generator=g), torch.full((batch,), t),
            torch.randn(batch, 9, TEXT_DIM, generator=g))


def _run(model, inputs):
    return model(*inputs, return_dict=False)[0]


@pytest.mark.parametrize("scope", ["sublayers", "block"])
@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method, scope):
    model = wan_transformer()
    inputs = _inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0, merge_scope=scope):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5, merge_scope=scope)
    assert handle.family == "wan" and len(handle.blocks) == 2
    out = _run(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(_run(model, inputs), out)  # seeded: the same call gives the same video
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("options", [{}, {"merge_scope": "sublayers", "merge_cross_attention": True,
                                          "merge_feed_forward": True}], ids=["block", "sublayers"])
def test_video_tokens_halve_text_stays_and_rotary_rows_follow_the_kept_tokens(options):
    model = wan_transformer()
    inputs = _inputs(frames=3, h=8, w=12)  # 3 x 4 x 6 = 72 video tokens
    seen = {}

    class Spy:  # what each attention's processor receives: after every hook of ours has run
        def __init__(self, name, processor):
            self.name, self.processor = name, processor

        def __call__(self, attn, *args, **kwargs):
            seen.setdefault(self.name, []).append(args)
            return self.processor(attn, *args, **kwargs)

    block = model.blocks[0]
    for name in ("attn1", "attn2"):
        attention = getattr(block, name)
        attention.processor = Spy(name, attention.processor)
    ffn_tokens = []
    hooks = [block.ffn.net[0].register_forward_pre_hook(lambda m, a: ffn_tokens.append(a[0].shape[1]) and None)]
    full_rotary = model.rope(inputs[0])
    handle = tofu.apply(model, method="tome", ratio=0.5, **options)
    _run(model, inputs)
    for h in hooks:
        h.remove()
    assert handle.blocks[0].grid.latest == (3, 4, 6)
    (args,) = seen["attn1"]  # (hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
    assert args[0].shape[1] == 36  # half of the 72 video tokens
    plan = handle.last_plans()["blocks.0"][0]
    cos, sin = args[3]
    for b in range(2):
        assert torch.equal(cos[b, :, 0], full_rotary[0][0, plan.kept_idx[b], 0])
        assert torch.equal(sin[b, :, 0], full_rotary[1][0, plan.kept_idx[b], 0])
    (args,) = seen["attn2"]
    assert args[0].shape[1] == 36 and args[1].shape[1] == 9  # queries reduced, every text token kept
    assert ffn_tokens == [36]


@pytest.mark.parametrize("frames,h,w", [(1, 8, 8), (5, 6, 10), (2, 12, 4)])
def test_odd_frame_counts_and_non_square_frames(frames, h, w):
    model = wan_transformer()
    inputs = _inputs(batch=1, frames=frames, h=h, w=w)
    base = _run(model, inputs)
    handle = tofu.apply(model, method="mctf", ratio=0.5)
    out = _run(model, inputs)
    n = frames * (h // 2) * (w // 2)
    assert handle.token_counts()["blocks.0"] == (n, n - n // 2)
    assert out.shape == base.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("scope", ["sublayers", "block"])
def test_a_sample_alone_equals_itself_in_a_batch(scope):
    model = wan_transformer()
    x, t, e = _inputs(batch=3)
    tofu.apply(model, method="tome", ratio=0.5, merge_scope=scope)
    together = _run(model, (x, t, e))
    for i in range(3):
        alone = _run(model, (x[i:i + 1], t[i:i + 1], e[i:i + 1]))
        assert torch.allclose(alone[0], together[i], atol=1e-5)


def test_strides_within_and_across_frames():
    model = wan_transformer()
    inputs = _inputs(batch=1, frames=4, h=8, w=8)  # 4 x 4 x 4 tokens
    with pytest.raises(ValueError, match="stride allows"):
        tofu.apply(model, method="tome", ratio=0.8)  # one destination per 1x2x2 cell caps it at 0.75
    handle = tofu.apply(model, method="tome", ratio=0.875, stride=(2, 2, 2), destination="fixed")
    _run(model, inputs)
    plan = handle.last_plans()["blocks.0"][0]
    frames_of_kept = plan.kept_idx[0] // 16
    assert handle.token_counts()["blocks.0"] == (64, 8)  # every source merged: the 8 destinations are left
    # one destination per 2x2x2 cell at its first position: only even frames hold them
    assert set(frames_of_kept.tolist()) <= {0, 2}
    with pytest.raises(ValueError, match="3 axes but DiTTransformer2DModel's token grid has 2"):
        from tofu_diffusion.pipelines.tiny import dit_transformer
        tofu.apply(dit_transformer(), method="tome", ratio=0.5, stride=(2, 2, 2))


def test_todo_and_bad_latents_get_clear_errors():
    model = wan_transformer()
    with pytest.raises(ValueError, match="todo is not available for WanTransformer3DModel"):
        tofu.apply(model, method="todo", ratio=0.5)
    tofu.apply(model, method="tome", ratio=0.5)
    with pytest.raises(ValueError, match="does not tile into patches"):
        _run(model, _inputs(h=7, w=8))


def test_per_token_timesteps_follow_the_kept_tokens_in_block_scope():
    """Wan 2.2 TI2V gives every token its own timestep (a clean first frame at t=0): the block's (B, N, 6, D)
    modulation follows the merge, and the step is read at the noisiest token."""
    model = wan_transformer()
    x, _, e = _inputs(batch=1, frames=3)
    t = torch.full((1, 72), 700)
    t[:, :24] = 0  # the first frame is the clean condition
    base = _run(model, (x, t, e))
    with tofu.fused(model, method="tome", ratio=0.0, merge_scope="block"):
        assert torch.equal(_run(model, (x, t, e)), base)
    handle = tofu.apply(model, method="tome", schedule=((0.0, 0.0), (0.2, 0.5)), schedule_axis="noise",
                        merge_scope="block")
    out = _run(model, (x, t, e))
    assert handle.blocks[0].run.step().timestep == 700  # not the first token's 0: progress 0.3, reduced
    assert handle.token_counts()["blocks.0"] == (72, 36) and torch.isfinite(out).all()


def _video(pipe, **kwargs):
    return pipe(**wan_prompt(), height=32, width=32, num_frames=9, num_inference_steps=3, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kwargs).frames


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_wan_pipeline_end_to_end(method):
    pipe = wan_pipeline()
    base = _video(pipe)
    tofu.apply(pipe, method=method, ratio=0.5)
    reduced = _video(pipe)
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    assert torch.equal(_video(pipe), reduced)
    tofu.remove(pipe)
    assert torch.equal(_video(pipe), base)


def test_separate_cfg_calls_are_one_step():
    pipe = wan_pipeline()
    handle = tofu.apply(pipe, method="tome", schedule=((0.0, 0.0), (0.6, 0.5)))
    steps = []
    pipe.transformer.register_forward_hook(lambda *_: steps.append((handle.blocks[0].run.step().index,
                                                                    handle.blocks[0].run.ratio)))
    _video(pipe, guidance_scale=5.0)
    assert steps == [(0, 0.0), (0, 0.0), (1, 0.0), (1, 0.0), (2, 0.5), (2, 0.5)]


@pytest.mark.slow
def test_both_denoisers_of_a_two_stage_pipeline_are_patched_and_removed_by_one_line():
    pipe = wan_pipeline(two_stages=True)
    base = _video(pipe)
    handle = tofu.apply(pipe, method="tome", ratio=0.5)
    assert [stage.model for stage in handle.stages] == [pipe.transformer_2]
    assert tofu.handle_of(pipe.transformer_2) is handle.stages[0]
    calls = []
    pipe.transformer_2.register_forward_pre_hook(lambda *_: calls.append(1))
    reduced = _video(pipe)
    assert calls and handle.stages[0].token_counts()["blocks.0"][1] < handle.stages[0].token_counts()["blocks.0"][0]
    assert not torch.equal(reduced, base)
    tofu.remove(pipe)
    assert tofu.handle_of(pipe.transformer_2) is None
    assert torch.equal(_video(pipe), base)

