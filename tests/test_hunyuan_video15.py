"""HunyuanVideo 1.5 (54 dual-stream blocks over [video; text], a text-only mask the processor pads itself, one
video rotary table): only video tokens are reduced, every text token stays, the rotary rows follow the kept tokens
per sample; exact at ratio 0 and after remove(); odd frame counts and non-square frames; batch consistency;
HunyuanVideo15Pipeline end to end, its guider's separate calls one step."""

import pytest
import torch
from conftest import check_reduced_exactly, check_samples_alone, record_rotary_attention

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM
from tofu_diffusion.pipelines.tiny_video import (
    hunyuan_video15_pipeline,
    hunyuan_video15_prompt,
    hunyuan_video15_transformer,
)

METHODS = ["tome", "tofu", "mctf"]
BLOCKS = ["transformer_blocks.0", "transformer_blocks.1"]


def _inputs(batch=2, frames=3, h=4, w=6):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, 9, dtype=torch.long)
    mask[0, 6:] = 0  # the first sample's text is padded
    return {"hidden_states": torch.randn(batch, 9, frames, h, w, generator=g), "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g), "encoder_attention_mask": mask,
            "encoder_hidden_states_2": torch.randn(batch, 5, 8, generator=g),
            "encoder_attention_mask_2": torch.ones(batch, 5, dtype=torch.long),
            "image_embeds": torch.randn(batch, 4, 8, generator=g)}  # image-to-video: SigLIP tokens join the text


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method):
    model = hunyuan_video15_transformer()
    assert tofu.apply(model, ratio=0.5).family == "hunyuan_video15"
    tofu.remove(model)
    check_reduced_exactly(model, _run, _inputs(), method, {name: (72, 36) for name in BLOCKS})


def test_text_stays_rotary_rows_follow_the_kept_tokens_and_batch_consistency():
    model = hunyuan_video15_transformer()
    inputs = _inputs()
    seen, rotary, plan, together = record_rotary_attention(model, model.transformer_blocks[0].attn, _run, inputs,
                                                           "transformer_blocks.0")
    assert len(seen) == 2  # one reduced call per sample
    for b, kwargs in enumerate(seen):
        # 36 of 72 video tokens; all 4 + 5 + 9 text tokens (image, byT5, MLLM) under their own text-only mask
        assert kwargs["hidden_states"].shape[1] == 36 and kwargs["encoder_hidden_states"].shape[1] == 18
        assert kwargs["attention_mask"].shape[-1] == 18
        for got, table in zip(kwargs["image_rotary_emb"], rotary):
            assert torch.equal(got, table[plan.kept_idx[b]])
    check_samples_alone(model, _run, inputs, together)


@pytest.mark.parametrize("frames, h, w", [(5, 4, 6), (2, 6, 4)])
def test_odd_frame_counts_and_non_square_frames(frames, h, w):
    model = hunyuan_video15_transformer()
    inputs = _inputs(frames=frames, h=h, w=w)
    base = _run(model, inputs)
    handle = tofu.apply(model, method="tome", ratio=0.5, stride=(2, 2, 2))
    out = _run(model, inputs)
    n = frames * h * w
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert handle.token_counts()["transformer_blocks.0"] == (n, n - n // 2)
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_todo_is_refused_clearly():
    with pytest.raises(ValueError, match="todo is not available for HunyuanVideo15Transformer3DModel"):
        tofu.apply(hunyuan_video15_transformer(), method="todo", ratio=0.5)


def _video(pipe):
    return pipe(**hunyuan_video15_prompt(), height=64, width=96, num_frames=9, num_inference_steps=3,
                output_type="pt", generator=torch.Generator().manual_seed(0)).frames


def test_hunyuan_video15_pipeline_end_to_end_and_its_guider_calls_are_one_step():
    pipe = hunyuan_video15_pipeline()
    base = _video(pipe)
    handle = tofu.apply(pipe, method="tome", schedule=((0.0, 0.0), (0.6, 0.5)))
    steps = []
    pipe.transformer.register_forward_hook(lambda *_: steps.append((handle.blocks[0].run.step().index,
                                                                    handle.blocks[0].run.ratio)))
    reduced = _video(pipe)
    # the conditional and unconditional calls of each step: one step, read from the pipeline's scheduler
    assert steps == [(0, 0.0), (0, 0.0), (1, 0.0), (1, 0.0), (2, 0.5), (2, 0.5)]
    assert handle.token_counts()["transformer_blocks.0"] == (72, 36)  # 3 latent frames of 4x6
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    assert torch.equal(_video(pipe), reduced)
    tofu.remove(pipe)
    assert torch.equal(_video(pipe), base)
