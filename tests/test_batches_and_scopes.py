"""A sample never depends on its batch-mates, and a scoped patch gives the whole pipeline back.

* Two prompts drawn from one seed have equal latents, as the halves of a guidance batch do; only the pipeline
  knows which it built (``adapters/guidance.py``). Each image of such a batch equals the same prompt made alone,
  with and without guidance, whether the pipeline batches guidance (SD3, Z-Image), calls it apart (Wan) or has
  none (Flux, Z-Image Turbo).
* ``fused`` on one denoiser of a patched pipeline (one stage of Wan 2.2's two) restores every stage as applied,
  reading the pipeline's steps, nested or not.
* Qwen-Image's ``img_shapes`` flat (the ControlNet pipelines) or nested (the edit pipelines), as diffusers reads.
"""

import logging

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import (
    flux_pipeline,
    flux_prompt,
    sd3_pipeline,
    sd3_prompt,
    z_image_pipeline,
    z_image_prompt,
)
from tofu_diffusion.pipelines.tiny_video import wan_pipeline, wan_prompt


def _together(first: dict, second: dict) -> dict:
    """Two prompts in one call: tensors stacked on the batch, per-sample lists (Z-Image) joined."""
    return {k: first[k] + second[k] if isinstance(first[k], list) else torch.cat([first[k], second[k]])
            for k in first}


def _far(prompt: dict) -> dict:
    """A prompt far from the others (the tiny models hardly tell random prompts of one scale apart)."""
    return {k: [x * 16 for x in v] if isinstance(v, list) else v * 16 for k, v in prompt.items()}


def _output(result):
    return result.frames if hasattr(result, "frames") else result.images


# family: (pipeline, prompt, call options, guidance scales to try (the first batches guidance or calls it apart))
CASES = {
    "sd3": (sd3_pipeline, sd3_prompt, {"height": 32, "width": 32}, (5.0, 1.0)),
    "flux": (flux_pipeline, flux_prompt, {"height": 32, "width": 32}, (3.5,)),
    "wan": (wan_pipeline, wan_prompt, {"height": 32, "width": 32, "num_frames": 5}, (5.0, 1.0)),
    "z_image": (z_image_pipeline, z_image_prompt, {"height": 32, "width": 48}, (4.0, 0.0)),  # 0: Turbo
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_prompts_drawn_from_one_seed_each_give_their_image_made_alone(family):
    build, prompt, options, scales = CASES[family]
    pipe = build()
    first, second = prompt(seed=1), _far(prompt(seed=2))
    handle = tofu.apply(pipe, method="tome", ratio=0.5)
    for scale in scales:
        def make(prompts, n):
            return _output(pipe(**prompts, **options, guidance_scale=scale, num_inference_steps=2, output_type="pt",
                                generator=[torch.Generator().manual_seed(0) for _ in range(n)]))

        both = make(_together(first, second), 2)
        assert handle.removed_share() > 0.4  # reduced, at the explicit ratio
        for i, alone in enumerate((make(first, 1), make(second, 1))):
            assert torch.allclose(both[i], alone[0], atol=1e-4), (scale, i, (both[i] - alone[0]).abs().max())
    tofu.remove(pipe)


def test_a_batched_guidance_pair_still_shares_its_plan_and_a_separate_one_does_not():
    pipe, seen = sd3_pipeline(), []
    handle = tofu.apply(pipe, method="tome", ratio=0.5)
    pipe.transformer.register_forward_hook(lambda *_: seen.append(handle.blocks[0].run.step().guidance_pairs))
    pipe(**sd3_prompt(), height=32, width=32, guidance_scale=5.0, num_inference_steps=2, output_type="pt")
    pipe(**sd3_prompt(), height=32, width=32, guidance_scale=1.0, num_inference_steps=2, output_type="pt")
    assert seen == [True, True, False, False]
    tofu.remove(pipe)
    assert "prepare_latents" not in vars(pipe)  # the recorder went with the patch
    # a bare denoiser's doubled batch is no pair unless its caller says so
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16), encoder_hidden_states=torch.randn(2, 9, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.tensor([500.0, 500.0]), return_dict=False)
    for share in (None, True):
        handle = tofu.apply(pipe.transformer, method="tome", ratio=0.5, share_guidance_plans=share)
        pipe.transformer(**inputs)
    assert seen[-2:] == [False, True]
    tofu.remove(pipe)


def test_share_guidance_plans_takes_true_false_or_none():
    with pytest.raises(ValueError, match="share_guidance_plans must be True or False.*or None"):
        tofu.TokenFusionConfig(share_guidance_plans="yes")


def _video(pipe):
    return pipe(**wan_prompt(), height=32, width=32, num_frames=5, num_inference_steps=4, output_type="pt",
                generator=torch.Generator().manual_seed(0)).frames


SCHEDULE = ((0.0, 0.0), (0.5, 0.5))  # read on the pipeline's steps: wrong without them


@pytest.mark.slow
def test_a_scope_on_one_stage_gives_the_whole_two_stage_pipeline_back(caplog):
    pipe = wan_pipeline(two_stages=True)
    handle = tofu.apply(pipe, method="tome", schedule=SCHEDULE)
    stage = handle.stages[0]
    before = _video(pipe)
    with caplog.at_level(logging.WARNING, logger="tofu_diffusion"):
        for part in (pipe.transformer, pipe.transformer_2):
            with tofu.fused(part, method="tome", schedule=((0.0, 0.0), (0.5, 0.25))) as scoped:
                inside = _video(pipe)
                assert scoped.pipeline is pipe and not torch.equal(inside, before)
            assert tofu.handle_of(pipe.transformer) is handle and tofu.handle_of(pipe.transformer_2) is stage
            assert handle.stages == [stage] and stage.owner is handle and handle.pipeline is pipe
            assert torch.equal(_video(pipe), before)
        # nested: a pipeline scope, and in it a scope on one stage
        with tofu.fused(pipe, method="tome", ratio=0.25) as outer:
            middle = _video(pipe)
            with tofu.fused(pipe.transformer_2, method="tome", ratio=0.5):
                _video(pipe)
            assert tofu.handle_of(pipe.transformer_2) is outer.stages[0]
            assert torch.equal(_video(pipe), middle)
        assert torch.equal(_video(pipe), before)
    assert "schedule_axis='steps' needs" not in caplog.text  # every patch read the pipeline's steps
    handle.remove()
    assert tofu.handle_of(pipe.transformer_2) is None and "prepare_latents" not in vars(pipe)


def test_a_scope_gives_back_a_bare_denoisers_patch_with_its_scheduler():
    pipe = wan_pipeline()
    handle = tofu.apply(pipe.transformer, method="tome", schedule=SCHEDULE, scheduler=pipe.scheduler)
    before = _video(pipe)
    with tofu.fused(pipe.transformer, method="tome", ratio=0.5):
        _video(pipe)
    assert tofu.handle_of(pipe.transformer) is handle and handle.pipeline is None
    assert handle.blocks[0].run.locator.scheduler is pipe.scheduler
    assert torch.equal(_video(pipe), before)
    tofu.remove(pipe)
