"""HunyuanVideo (dual- and single-stream blocks over [video; text] under a mask, video-only rotary table):
only video tokens are reduced, every text token stays, the mask is rebuilt for the reduced length and the
rotary rows follow the kept tokens per sample; exact at ratio 0 and after remove(); batch consistency;
image-to-video's token-replace blocks refused; HunyuanVideoPipeline end to end."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM
from tofu_diffusion.pipelines.tiny_video import hunyuan_video_pipeline, hunyuan_video_prompt, hunyuan_video_transformer

METHODS = ["tome", "tofu", "mctf"]
BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0"]


def _inputs(batch=2, frames=3, h=4, w=6):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, 9, dtype=torch.long)
    mask[0, 6:] = 0  # the first sample's text is padded
    return {"hidden_states": torch.randn(batch, 4, frames, h, w, generator=g), "timestep": torch.full((batch,), 500),
            "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g), "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(batch, 8, generator=g), "guidance": torch.full((batch,), 6000.0)}


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method):
    model = hunyuan_video_transformer()
    inputs = _inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5)
    assert handle.family == "hunyuan_video" and [b.name for b in handle.blocks] == BLOCKS
    out = _run(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(_run(model, inputs), out)
    assert all(handle.token_counts()[name] == (72, 36) for name in BLOCKS)
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_mask_and_rotary_rows_follow_the_kept_tokens_text_stays_and_batch_consistency():
    model = hunyuan_video_transformer()
    inputs = _inputs()
    seen = []
    model.transformer_blocks[0].attn.register_forward_pre_hook(lambda m, a, k: seen.append(k) and None,
                                                               with_kwargs=True)
    full = {}
    model.rope.register_forward_hook(lambda m, a, out: full.update(rotary=out) and None)
    handle = tofu.apply(model, method="tome", ratio=0.5)
    together = _run(model, inputs)
    plan = handle.last_plans()["transformer_blocks.0"][0]
    assert len(seen) == 2  # one reduced call per sample
    for b, kwargs in enumerate(seen):
        assert kwargs["hidden_states"].shape[1] == 36 and kwargs["encoder_hidden_states"].shape[1] == 9
        mask = kwargs["attention_mask"]
        assert mask.shape[-1] == 36 + 9 and mask[..., :36].all()
        assert mask[..., 36:].flatten().tolist() == ([True] * 6 + [False] * 3 if b == 0 else [True] * 9)
        for got, table in zip(kwargs["image_rotary_emb"], full["rotary"]):
            assert torch.equal(got, table[plan.kept_idx[b]])
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        assert torch.allclose(_run(model, one)[0], together[i], atol=1e-5)


def test_image_to_video_token_replace_and_todo_are_refused_clearly():
    torch.manual_seed(0)
    from diffusers import HunyuanVideoTransformer3DModel

    i2v = HunyuanVideoTransformer3DModel(in_channels=8, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                         num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                         patch_size_t=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=8,
                                         rope_axes_dim=(2, 4, 4), image_condition_type="token_replace")
    with pytest.raises(ValueError, match="image-to-video model.*token-replace"):
        tofu.apply(i2v, method="tome", ratio=0.5)
    with pytest.raises(ValueError, match="todo is not available for HunyuanVideoTransformer3DModel"):
        tofu.apply(hunyuan_video_transformer(), method="todo", ratio=0.5)


def _video(pipe):
    return pipe(**hunyuan_video_prompt(), height=32, width=32, num_frames=9, num_inference_steps=3, output_type="pt",
                generator=torch.Generator().manual_seed(0)).frames


def test_hunyuan_video_pipeline_end_to_end():
    pipe = hunyuan_video_pipeline()
    base = _video(pipe)
    tofu.apply(pipe, method="tome", ratio=0.5)
    reduced = _video(pipe)
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    assert torch.equal(_video(pipe), reduced)
    tofu.remove(pipe)
    assert torch.equal(_video(pipe), base)
