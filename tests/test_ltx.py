"""LTX-Video (packed video tokens, grid from num_frames/height/width, rotary (B, N, D) tables, cross-attention
to text): only video tokens are reduced, rotary rows follow the kept tokens, exact at ratio 0 and after
remove(); odd frame counts, non-square frames, batch consistency; LTXPipeline end to end."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM
from tofu_diffusion.pipelines.tiny_video import ltx_pipeline, ltx_prompt, ltx_transformer

METHODS = ["tome", "tofu", "mctf"]


def _inputs(batch=2, frames=3, h=4, w=6, t=500.0, per_token=False):
    g = torch.Generator().manual_seed(3)
    n = frames * h * w
    timestep = torch.full((batch, n) if per_token else (batch,), t)
    return {"hidden_states": torch.randn(batch, n, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g), "timestep": timestep,
            "encoder_attention_mask": torch.ones(batch, 9), "num_frames": frames, "height": h, "width": w}


def _run(model, kwargs):
    return model(**kwargs, return_dict=False)[0]


@pytest.mark.parametrize("scope", ["sublayers", "block"])
@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method, scope):
    model = ltx_transformer()
    inputs = _inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0, merge_scope=scope):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5, merge_scope=scope)
    assert handle.family == "ltx"
    out = _run(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(_run(model, inputs), out)
    assert handle.token_counts()["transformer_blocks.0"] == (72, 36)
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_rotary_rows_follow_the_kept_tokens_and_text_stays():
    model = ltx_transformer()
    inputs = _inputs()
    seen = {}
    block = model.transformer_blocks[0]
    block.attn1.register_forward_pre_hook(lambda m, a, k: seen.update(attn1=k) and None, with_kwargs=True)
    block.attn2.register_forward_pre_hook(lambda m, a, k: seen.update(attn2=(a, k)) and None, with_kwargs=True)
    full = {}
    model.rope.register_forward_hook(lambda m, a, out: full.update(rotary=out) and None)
    handle = tofu.apply(model, method="tome", ratio=0.5)
    _run(model, inputs)
    assert handle.blocks[0].grid.latest == (3, 4, 6)
    plan = handle.last_plans()["transformer_blocks.0"][0]
    cos, sin = seen["attn1"]["image_rotary_emb"]
    for b in range(2):
        assert torch.equal(cos[b], full["rotary"][0][b, plan.kept_idx[b]])
        assert torch.equal(sin[b], full["rotary"][1][b, plan.kept_idx[b]])
    args, kwargs = seen["attn2"]
    assert args[0].shape[1] == 36 and kwargs["encoder_hidden_states"].shape[1] == 9


@pytest.mark.parametrize("frames,h,w", [(1, 4, 4), (5, 2, 6)])
def test_odd_frames_non_square_and_a_sample_alone_equals_itself_in_a_batch(frames, h, w):
    model = ltx_transformer()
    inputs = _inputs(batch=3, frames=frames, h=h, w=w)
    tofu.apply(model, method="tome", ratio=0.5)
    together = _run(model, inputs)
    for i in range(3):
        one = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        assert torch.allclose(_run(model, one)[0], together[i], atol=1e-5)


def test_per_token_temb_follows_in_block_scope_and_errors_are_clear():
    model = ltx_transformer()
    inputs = _inputs(per_token=True)
    base = _run(model, inputs)
    with tofu.fused(model, method="tome", ratio=0.0, merge_scope="block"):
        assert torch.equal(_run(model, inputs), base)
    with tofu.fused(model, method="tome", ratio=0.5, merge_scope="block") as handle:
        assert torch.isfinite(_run(model, inputs)).all()
        assert handle.token_counts()["transformer_blocks.0"] == (72, 36)
    with pytest.raises(ValueError, match="todo is not available for LTXVideoTransformer3DModel"):
        tofu.apply(model, method="todo", ratio=0.5)
    tofu.apply(model, method="tome", ratio=0.5)
    with pytest.raises(ValueError, match="does not match the 72 tokens"):
        _run(model, {**inputs, "width": 5})


def _video(pipe):
    return pipe(**ltx_prompt(), height=32, width=32, num_frames=9, num_inference_steps=3, output_type="pt",
                generator=torch.Generator().manual_seed(0)).frames


def test_ltx_pipeline_end_to_end():
    pipe = ltx_pipeline()
    base = _video(pipe)
    tofu.apply(pipe, method="tome", ratio=0.5)
    reduced = _video(pipe)
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    assert torch.equal(_video(pipe), reduced)
    tofu.remove(pipe)
    assert torch.equal(_video(pipe), base)
