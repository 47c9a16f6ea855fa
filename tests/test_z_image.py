"""Z-Image (main layers on one unified [image; caption] sequence per sample, image first, each part padded to a
multiple of 32; complex rotary over every token, one table per sample; a mask when captions differ in length):
only the main layers' image tokens are reduced (not the refiners'), caption and padding pass whole, the rotary
rows and the mask follow; exact at ratio 0 and after remove(); non-square latents and batch consistency; the
pipeline's rising t = 1 - sigma read as the step; ZImagePipeline end to end with batched CFG."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM, z_image_pipeline, z_image_prompt, z_image_transformer

METHODS = ["tome", "tofu", "mctf"]
BLOCKS = ["layers.0", "layers.1"]


def _inputs(batch=2, h=8, w=12, caption=(9, 40)):
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(4, 1, h, w, generator=g) for _ in range(batch)]
    captions = [torch.randn(caption[i % len(caption)], TEXT_DIM, generator=g) for i in range(batch)]
    return images, torch.full((batch,), 0.3), captions


def _run(model, inputs):
    return torch.stack(model(*inputs, return_dict=False)[0])


@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method):
    model = z_image_transformer()
    inputs = _inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5)
    assert handle.family == "z_image" and [b.name for b in handle.blocks] == BLOCKS  # not the refiners
    out = _run(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(_run(model, inputs), out)
    assert all(handle.token_counts()[name] == (24, 12) for name in BLOCKS)
    assert handle.blocks[0].grid.latest == (4, 6)
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_caption_and_padding_pass_whole_rotary_and_mask_follow_and_batch_consistency():
    model = z_image_transformer()
    inputs = _inputs()
    seen = []
    model.layers[0].attention.register_forward_pre_hook(lambda m, a, k: seen.append((a[0], k)) and None,
                                                        with_kwargs=True)
    handle = tofu.apply(model, method="tome", ratio=0.5)
    together = _run(model, inputs)
    plan = handle.last_plans()["layers.0"][0]
    tofu.remove(model)
    _run(model, inputs)
    (x, kwargs), (x0, kwargs0) = seen
    # image 24 tokens (+ 8 padding), captions 9 / 40 (+ padding to 32 / 64): 96 in all, 12 image tokens merged
    assert x0.shape[1] == 96 and x.shape[1] == 96 - 12 and kwargs["attention_mask"] is not None
    for b in range(2):
        rows = torch.cat([plan.kept_idx[b], torch.arange(24, 96)])
        assert torch.equal(kwargs["freqs_cis"][b], kwargs0["freqs_cis"][b][rows])
        assert torch.equal(kwargs["attention_mask"][b], kwargs0["attention_mask"][b][rows])
        assert torch.equal(x[b, 12:], x0[b, 24:])  # padding and caption enter as they are
    for i in range(2):
        one = ([inputs[0][i]], inputs[1][i:i + 1], [inputs[2][i]])
        with tofu.fused(model, method="tome", ratio=0.5):
            assert torch.allclose(_run(model, one)[0], together[i], atol=1e-5)


def test_todo_and_omni_mode_are_refused_clearly():
    with pytest.raises(ValueError, match="todo is not available for ZImageTransformer2DModel"):
        tofu.apply(z_image_transformer(), method="todo", ratio=0.5)
    model = z_image_transformer()
    images, t, captions = _inputs()
    with tofu.fused(model, method="tome", ratio=0.5):
        with pytest.raises(ValueError, match="omni mode"):
            model([[image] for image in images], t, [[c] for c in captions], return_dict=False)
        with pytest.raises(ValueError, match="different sizes"):
            model([images[0], torch.randn(4, 1, 8, 8)], t, captions, return_dict=False)


def _image(pipe, steps=3):
    return pipe(**z_image_prompt(), height=32, width=48, num_inference_steps=steps, output_type="pt",
                guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images


def test_z_image_pipeline_end_to_end_steps_from_its_rising_timestep():
    pipe = z_image_pipeline()
    base = _image(pipe)
    handle = tofu.apply(pipe, method="tome", schedule=((0.0, 0.0), (0.5, 0.5)))
    steps = []
    pipe.transformer.register_forward_hook(lambda *_: steps.append((handle.blocks[0].run.step().index,
                                                                    handle.blocks[0].run.step().ratio)))
    reduced = _image(pipe, steps=4)
    assert steps == [(0, 0.0), (1, 0.0), (2, 0.5), (3, 0.5)]  # batched CFG: one call per step
    assert handle.blocks[0].run.step().guidance_pairs  # [cond; uncond] of one latent share a plan
    assert reduced.shape == base.shape and torch.isfinite(reduced).all()
    assert torch.equal(_image(pipe, steps=4), reduced)
    tofu.remove(pipe)
    assert torch.equal(_image(pipe), base)


def test_bare_z_image_model_reads_its_rising_timestep_as_falling_noise():
    model = z_image_transformer()
    handle = tofu.apply(model, method="tome", schedule=((0.0, 0.0), (0.5, 0.5)))
    images, _, captions = _inputs()
    for t, (index, ratio) in zip((0.1, 0.4, 0.7), ((0, 0.0), (1, 0.0), (2, 0.5))):
        model(images, torch.full((2,), t), captions, return_dict=False)
        step = handle.blocks[0].run.step()
        assert (step.index, step.ratio) == (index, ratio)  # noise axis: progress = t here
