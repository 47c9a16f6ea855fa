"""Qwen-Image (dual-stream blocks returning (text, image), a complex (image, text) rotary pair, grid from
img_shapes): only image tokens are reduced, every text token stays, the image table's rows follow the kept
tokens per sample; exact at ratio 0 and after remove(); non-square grids and batch consistency; zero_cond_t's
per-token modulate_index; QwenImagePipeline end to end with true CFG as one step."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM, qwen_image_pipeline, qwen_image_prompt, qwen_image_transformer

METHODS = ["tome", "tofu", "mctf"]


def _inputs(batch=2, h=4, w=6):
    g = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(batch, h * w, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g),
            "timestep": torch.full((batch,), 0.5), "img_shapes": [[(1, h, w)]] * batch}


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method):
    model = qwen_image_transformer()
    inputs = _inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5)
    assert handle.family == "qwen_image" and handle.blocks[0].grid.latest is None
    out = _run(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(_run(model, inputs), out)
    assert handle.token_counts()["transformer_blocks.0"] == (24, 12) and handle.blocks[0].grid.latest == (4, 6)
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_image_table_rows_follow_text_stays_and_batch_consistency():
    model = qwen_image_transformer()
    inputs = _inputs()
    seen = []
    model.transformer_blocks[0].attn.register_forward_pre_hook(lambda m, a, k: seen.append(k) and None,
                                                               with_kwargs=True)
    full = {}
    model.pos_embed.register_forward_hook(lambda m, a, out: full.update(rotary=out) and None)
    handle = tofu.apply(model, method="tome", ratio=0.5)
    together = _run(model, inputs)
    plan = handle.last_plans()["transformer_blocks.0"][0]
    assert len(seen) == 2
    for b, kwargs in enumerate(seen):
        image, text = kwargs["image_rotary_emb"]
        assert torch.equal(image, full["rotary"][0][plan.kept_idx[b]]) and torch.equal(text, full["rotary"][1])
        assert kwargs["hidden_states"].shape[1] == 12 and kwargs["encoder_hidden_states"].shape[1] == 9
    for i in range(2):
        one = {**{k: inputs[k][i:i + 1] for k in ("hidden_states", "encoder_hidden_states", "timestep")},
               "img_shapes": inputs["img_shapes"][:1]}
        assert torch.allclose(_run(model, one)[0], together[i], atol=1e-5)


def test_zero_cond_t_modulate_index_follows():
    torch.manual_seed(0)
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                        axes_dims_rope=(8, 4, 4), zero_cond_t=True).eval()
    inputs = _inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method="tome", ratio=0.0):
        assert torch.equal(_run(model, inputs), base)
    with tofu.fused(model, method="tome", ratio=0.5) as handle:
        assert torch.isfinite(_run(model, inputs)).all()
        assert handle.token_counts()["transformer_blocks.0"] == (24, 12)
    with pytest.raises(ValueError, match="todo is not available for QwenImageTransformer2DModel"):
        tofu.apply(model, method="todo", ratio=0.5)


def _image(pipe):
    return pipe(**qwen_image_prompt(), height=32, width=48, num_inference_steps=3, output_type="pt",
                true_cfg_scale=4.0, generator=torch.Generator().manual_seed(0)).images


def test_qwen_image_pipeline_end_to_end_with_true_cfg_as_one_step():
    pipe = qwen_image_pipeline()
    base = _image(pipe)
    handle = tofu.apply(pipe, method="tome", schedule=((0.0, 0.5),))
    steps = []
    pipe.transformer.register_forward_hook(lambda *_: steps.append(handle.blocks[0].run.step().index))
    reduced = _image(pipe)
    assert steps == [0, 0, 1, 1, 2, 2]
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    assert torch.equal(_image(pipe), reduced)
    tofu.remove(pipe)
    assert torch.equal(_image(pipe), base)


def test_explain_says_what_a_qwen_image_call_does():
    # the pipeline packs 2x2 (the config's patch_size) and passes sigmas linspace(1, 1/N, N) with a dynamic mu
    pipe = qwen_image_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True,
                                                                 base_shift=0.5, max_shift=0.9, max_image_seq_len=8192)
    handle = tofu.apply(pipe, method="tome", schedule=((0.0, 0.0), (0.5, 0.5)))
    seen, counts = [], []

    def record(module, args, kwargs, output):
        seen.append(float(kwargs["timestep"][0]) * 1000)
        counts.append(handle.token_counts()[handle.blocks[0].name])

    hook = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    _image(pipe)
    hook.remove()
    plan = tofu.explain(pipe, num_inference_steps=3, height=32, width=48)
    steps = [s for s in plan.steps for _ in range(2)]  # true CFG: two calls per step
    assert [s.timestep for s in steps] == pytest.approx(seen, abs=1e-3)
    assert [s.tokens for s in steps] == counts
    tofu.remove(pipe)


def test_flat_img_shapes_read_as_diffusers_reads_them():
    # QwenImageControlNetPipeline passes one (1, rows, cols) per sample; the edit pipelines a list per sample
    model = qwen_image_transformer()
    nested = _inputs()
    flat = {**nested, "img_shapes": [(1, 4, 6)] * 2}
    handle = tofu.apply(model, method="tome", ratio=0.5)
    assert torch.equal(_run(model, flat), _run(model, nested))
    assert handle.last_plans()["transformer_blocks.0"][1] == (4, 6)
    with pytest.raises(ValueError, match="img_shapes differ between the samples"):
        _run(model, {**nested, "img_shapes": [(1, 4, 6), (1, 6, 4)]})
    tofu.remove(model)


@pytest.mark.slow
def test_controlnet_pipeline_makes_each_of_two_prompts_as_alone():
    from tofu_diffusion.pipelines.tiny import qwen_image_controlnet_pipeline

    pipe = qwen_image_controlnet_pipeline()
    first, second = qwen_image_prompt(seed=1), qwen_image_prompt(seed=2)
    control = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))

    def make(prompt, n):
        return pipe(**prompt, control_image=control, height=32, width=48, num_inference_steps=2, true_cfg_scale=4.0,
                    output_type="pt", generator=[torch.Generator().manual_seed(0) for _ in range(n)]).images

    base = make({k: torch.cat([first[k], second[k]]) for k in first}, 2)
    handle = tofu.apply(pipe, method="tome", ratio=0.5)
    both = make({k: torch.cat([first[k], second[k]]) for k in first}, 2)
    assert handle.token_counts()["transformer_blocks.0"] == (24, 12) and not torch.allclose(both, base)
    for i, prompt in enumerate((first, second)):
        assert torch.allclose(both[i], make(prompt, 1)[0], atol=1e-4)
    tofu.remove(pipe)
    assert torch.equal(make({k: torch.cat([first[k], second[k]]) for k in first}, 2), base)
