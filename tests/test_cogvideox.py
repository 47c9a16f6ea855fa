"""CogVideoX (joint [text; video] blocks returning (video, text), frames-first latent, video-only rotary
table): only video tokens are reduced, text tokens all stay, rotary rows follow the kept tokens per sample;
exact at ratio 0 and after remove(); 1.5's temporal patch; CogVideoXPipeline end to end."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM
from tofu_diffusion.pipelines.tiny_video import (
    COGVIDEOX_TEXT,
    cogvideox_pipeline,
    cogvideox_prompt,
    cogvideox_transformer,
)

METHODS = ["tome", "tofu", "mctf"]


def _inputs(batch=2, frames=3, h=8, w=12):
    g = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(batch, frames, 4, h, w, generator=g),
            "encoder_hidden_states": torch.randn(batch, COGVIDEOX_TEXT, TEXT_DIM, generator=g),
            "timestep": torch.full((batch,), 500)}


def _rotary(model, frames, h, w):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p = model.config.patch_size
    grid = (h // p, w // p)
    return get_3d_rotary_pos_embed(model.config.attention_head_dim, ((0, 0), grid), grid, frames)


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("rotary", [True, False], ids=["5b-rotary", "2b-sincos"])
@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method, rotary):
    model = cogvideox_transformer(rotary=rotary)
    inputs = _inputs()
    if rotary:
        inputs["image_rotary_emb"] = _rotary(model, 3, 8, 12)
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5)
    assert handle.family == "cogvideox"
    out = _run(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(_run(model, inputs), out)
    assert handle.token_counts()["transformer_blocks.0"] == (72, 36)  # 3 x 4 x 6 video tokens
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_text_stays_rotary_rows_follow_and_a_sample_alone_equals_itself_in_a_batch():
    model = cogvideox_transformer()
    inputs = {**_inputs(batch=3), "image_rotary_emb": _rotary(model, 3, 8, 12)}
    seen = []
    model.transformer_blocks[0].attn1.register_forward_pre_hook(lambda m, a, k: seen.append(k) and None,
                                                                with_kwargs=True)
    handle = tofu.apply(model, method="tome", ratio=0.5)
    together = _run(model, inputs)
    plan = handle.last_plans()["transformer_blocks.0"][0]
    assert len(seen) == 3  # one reduced call per sample: the rotary table is one for the batch
    for b, kwargs in enumerate(seen):
        assert kwargs["hidden_states"].shape[1] == 36 and kwargs["encoder_hidden_states"].shape[1] == COGVIDEOX_TEXT
        for got, full in zip(kwargs["image_rotary_emb"], inputs["image_rotary_emb"]):
            assert torch.equal(got, full[plan.kept_idx[b]])
    for i in range(3):
        one = {k: v[i:i + 1] if k != "image_rotary_emb" else v for k, v in inputs.items()}
        assert torch.allclose(_run(model, one)[0], together[i], atol=1e-5)


def test_temporal_patches_odd_frames_and_clear_errors():
    model = cogvideox_transformer(patch_size_t=2)  # no rotary table passed: the batch runs in one call
    inputs = _inputs(batch=1, frames=4, h=8, w=8)
    handle = tofu.apply(model, method="mctf", ratio=0.5)
    assert torch.isfinite(_run(model, inputs)).all()
    assert handle.blocks[0].grid.latest == (2, 4, 4)
    with pytest.raises(ValueError, match="does not tile into patches of 2x2x2"):
        _run(model, _inputs(batch=1, frames=3, h=8, w=8))
    with pytest.raises(ValueError, match="todo is not available for CogVideoXTransformer3DModel"):
        tofu.apply(model, method="todo", ratio=0.5)
    with pytest.raises(ValueError, match="merge_scope='block'"):
        tofu.apply(model, method="tome", ratio=0.5, merge_scope="sublayers")


def _video(pipe):
    return pipe(**cogvideox_prompt(), height=64, width=64, num_frames=9, num_inference_steps=3, output_type="pt",
                generator=torch.Generator().manual_seed(0)).frames


def test_cogvideox_pipeline_end_to_end():
    pipe = cogvideox_pipeline()
    base = _video(pipe)
    tofu.apply(pipe, method="tome", ratio=0.5)
    reduced = _video(pipe)
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    assert torch.equal(_video(pipe), reduced)
    tofu.remove(pipe)
    assert torch.equal(_video(pipe), base)
