"""HunyuanVideo (dual- and single-stream blocks over [video; text] under a mask, video-only rotary table):
only video tokens are reduced, every text token stays, the mask is rebuilt for the reduced length and the
rotary rows follow the kept tokens per sample; exact at ratio 0 and after remove(); batch consistency;
image-to-video's token replace keeps the first frame whole and first; HunyuanVideoPipeline end to end."""

import pytest
import torch
from conftest import check_reduced_exactly, check_samples_alone, record_rotary_attention

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
    assert tofu.apply(model, ratio=0.5).family == "hunyuan_video"
    tofu.remove(model)
    check_reduced_exactly(model, _run, _inputs(), method, {name: (72, 36) for name in BLOCKS})


def test_mask_and_rotary_rows_follow_the_kept_tokens_text_stays_and_batch_consistency():
    model = hunyuan_video_transformer()
    inputs = _inputs()
    seen, rotary, plan, together = record_rotary_attention(model, model.transformer_blocks[0].attn, _run, inputs,
                                                           "transformer_blocks.0")
    assert len(seen) == 2  # one reduced call per sample
    for b, kwargs in enumerate(seen):
        assert kwargs["hidden_states"].shape[1] == 36 and kwargs["encoder_hidden_states"].shape[1] == 9
        mask = kwargs["attention_mask"]
        assert mask.shape[-1] == 36 + 9 and mask[..., :36].all()
        assert mask[..., 36:].flatten().tolist() == ([True] * 6 + [False] * 3 if b == 0 else [True] * 9)
        for got, table in zip(kwargs["image_rotary_emb"], rotary):
            assert torch.equal(got, table[plan.kept_idx[b]])
    check_samples_alone(model, _run, inputs, together)


def _token_replace_transformer():
    """Image-to-video by token replace: the first frame is the clean image, modulated with t = 0 by position."""
    torch.manual_seed(0)
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                          patch_size_t=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=8,
                                          rope_axes_dim=(2, 4, 4), image_condition_type="token_replace")


@pytest.mark.parametrize("method", METHODS)
def test_image_to_video_token_replace_keeps_the_first_frame_whole_and_first(method):
    model = _token_replace_transformer()
    inputs = _inputs()  # 3 frames of 4x6: the first frame's 24 tokens lead
    # the ratio applies to the 48 tokens of the noisy frames; the first frame's 24 pass through
    out = check_reduced_exactly(model, _run, inputs, method, {name: (72, 48) for name in BLOCKS})
    counts = []
    model.single_transformer_blocks[0].norm.register_forward_pre_hook(  # (video + text, temb, t = 0 emb, count)
        lambda m, args: counts.append((args[0].shape[1], args[3])) and None)
    handle = tofu.apply(model, method=method, ratio=0.5)
    assert torch.equal(_run(model, inputs), out)
    assert counts[-1] == (48 + 9, 24)  # the block still modulates its first 24 tokens (the first frame's) with t = 0
    for name in BLOCKS:
        plan = handle.last_plans()[name][0]
        assert torch.equal(plan.kept_idx[:, :24], torch.arange(24).expand(2, 24))
        assert (plan.src_idx >= 24).all() and (plan.src_slot >= 24).all()  # nothing merges into the first frame
    check_samples_alone(model, _run, inputs, out)
    tofu.remove(model)


def test_a_stride_past_the_noisy_frames_names_the_first_frame_kept_whole():
    model = _token_replace_transformer()
    tofu.apply(model, method="tome", ratio=0.5, stride=(2, 2, 2))  # 2 latent frames: 1 noisy frame to reduce
    with pytest.raises(ValueError, match="the 24 tokens before the reduced grid .the conditioning first frame. are "
                                         "kept whole, so a 1x4x6 token grid is smaller than the 2x2x2 merge stride"):
        _run(model, _inputs(frames=2))
    tofu.remove(model)


def test_explain_counts_the_token_replace_first_frame_as_kept_whole():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = _token_replace_transformer()
    plan = tofu.explain(model, num_inference_steps=2, height=32, width=48, num_frames=3, ratio=0.5,
                        scheduler=FlowMatchEulerDiscreteScheduler())
    # what the blocks do (the test above): 72 tokens, half of the 48 noisy frames' merged, the first frame's 24 kept
    assert plan.steps[0].tokens == (72, 48)
    assert all(block.grid == (2, 4, 6) and block.leading == 24 for block in plan.blocks)
    plain = tofu.explain(hunyuan_video_transformer(), num_inference_steps=2, height=32, width=48, num_frames=3,
                         ratio=0.5, scheduler=FlowMatchEulerDiscreteScheduler())
    assert plain.steps[0].tokens == (72, 36) and plain.blocks[0].leading == 0  # text-to-video: every frame


def test_todo_is_refused_clearly():
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
