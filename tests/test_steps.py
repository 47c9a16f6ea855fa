"""Where each denoiser call sits in the pipeline's run (the schedule's axis), and ``tofu.explain``."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import (
    dit_pipeline,
    flux_pipeline,
    flux_prompt,
    pixart_pipeline,
    prompt_embeds,
    sd3_pipeline,
    sd3_prompt,
    sd_pipeline,
)
from tofu_diffusion.pipelines.tiny_video import (
    cogvideox_pipeline,
    cogvideox_prompt,
    hunyuan_video15_pipeline,
    hunyuan_video15_prompt,
    hunyuan_video_pipeline,
    hunyuan_video_prompt,
    ltx_pipeline,
    ltx_prompt,
    wan_pipeline,
    wan_prompt,
)

SCHEDULE = ((0.0, 0.0), (0.7, 0.5))


def _sd3_call(pipe, steps):
    return pipe(**sd3_prompt(), num_inference_steps=steps, height=32, width=32, output_type="pt",
                guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images


def _flux_call(pipe, steps):
    return pipe(**flux_prompt(), num_inference_steps=steps, height=32, width=32, output_type="pt",
                guidance_scale=0.0, generator=torch.Generator().manual_seed(0)).images


def _sd_call(pipe, steps):
    return pipe(prompt_embeds=prompt_embeds(), negative_prompt_embeds=prompt_embeds(seed=2), num_inference_steps=steps,
                height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images


def _dit_call(pipe, steps):
    return pipe(class_labels=[1, 2], num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _pixart_call(pipe, steps):
    e, m = prompt_embeds(), torch.ones(1, 7)
    return pipe(prompt=None, negative_prompt=None, prompt_embeds=e, prompt_attention_mask=m,
                negative_prompt_embeds=torch.zeros_like(e), negative_prompt_attention_mask=m,
                use_resolution_binning=False, num_inference_steps=steps, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def _video_call(prompt, size=32):
    def call(pipe, steps):
        return pipe(**prompt(), num_inference_steps=steps, height=size, width=size, num_frames=9, guidance_scale=1.0,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    return call


def _hunyuan_video15_call(pipe, steps):  # guidance by the pipeline's guider: no guidance_scale argument
    return pipe(**hunyuan_video15_prompt(), num_inference_steps=steps, height=64, width=64, num_frames=9,
                output_type="pt", generator=torch.Generator().manual_seed(0)).frames


IMAGE = {"height": 32, "width": 32}
VIDEO = {"height": 32, "width": 32, "num_frames": 9}
# kind: (make the pipeline, call it for a number of steps, the call's size as explain takes it)
PIPELINES = {"sd": (sd_pipeline, _sd_call, IMAGE), "dit": (dit_pipeline, _dit_call, IMAGE),
             "pixart": (pixart_pipeline, _pixart_call, IMAGE), "sd3": (sd3_pipeline, _sd3_call, IMAGE),
             "flux": (flux_pipeline, _flux_call, IMAGE),
             "wan": (wan_pipeline, _video_call(wan_prompt), VIDEO),
             "ltx": (ltx_pipeline, _video_call(ltx_prompt), VIDEO),
             "hunyuan_video": (hunyuan_video_pipeline, _video_call(hunyuan_video_prompt), VIDEO),
             "hunyuan_video15": (hunyuan_video15_pipeline, _hunyuan_video15_call, {**VIDEO, "height": 64, "width": 64}),
             "cogvideox": (cogvideox_pipeline, _video_call(cogvideox_prompt, 64), {**VIDEO, "height": 64, "width": 64})}


class RatioLog:
    """The ratio each denoiser call ran with, and the token counts of its first reduced block."""

    def __init__(self, pipe, handle):
        self.handle, self.ratios, self.tokens = handle, [], []
        denoiser = tofu.api.denoiser_of(pipe)
        self._hook = denoiser.register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.ratios.append(self.handle.blocks[0].run.ratio)
        self.tokens.append(self.handle.token_counts().get(self.handle.blocks[0].name))

    def close(self):
        self._hook.remove()


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PIPELINES))
def test_steps_axis_counts_the_calls_steps_and_explain_says_so(kind):
    make, call, size = PIPELINES[kind]
    pipe = make()
    handle = tofu.apply(pipe, method="tome", schedule=SCHEDULE)
    log = RatioLog(pipe, handle)
    call(pipe, 10)
    log.close()
    calls = len(log.ratios) // 10  # HunyuanVideo 1.5's guider calls the denoiser twice per step
    assert len(log.ratios) == 10 * calls and log.ratios[::calls] == log.ratios[calls - 1::calls]
    log.ratios, log.tokens = log.ratios[::calls], log.tokens[::calls]
    # steps 7, 8, 9 of 10 are at progress >= 0.7, whatever the scheduler's timesteps
    assert log.ratios == [0.0] * 7 + [0.5] * 3
    plan = tofu.explain(pipe, num_inference_steps=10, **size)
    assert [s.ratio for s in plan.steps] == log.ratios
    assert plan.reduced_steps == 3 and 0 < plan.flops_saved < 1
    # the explained token counts are the ones the first reduced block had
    first = next(b for b in plan.blocks if b.reduced)
    assert first.name == handle.blocks[0].name
    assert [s.tokens for s in plan.steps][-1] == log.tokens[-1]
    assert plan.steps[0].tokens[0] == plan.steps[0].tokens[1] == log.tokens[0][0]
    text = str(plan)
    assert "7-9" in text and "3 of 10 steps reduced" in text
    tofu.remove(pipe)


@pytest.mark.slow
def test_steps_axis_follows_the_steps_noise_axis_the_noise_level():
    pipe = sd3_pipeline()
    counts = {}
    for shift in (1.0, 3.0):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
        for axis in ("steps", "noise"):
            handle = tofu.apply(pipe, method="tome", schedule=((0.0, 0.0), (0.8, 0.5)), schedule_axis=axis)
            log = RatioLog(pipe, handle)
            _sd3_call(pipe, 20)
            log.close()
            counts[shift, axis] = sum(r > 0 for r in log.ratios)
            assert counts[shift, axis] == tofu.explain(pipe, num_inference_steps=20).reduced_steps
    assert counts[1.0, "steps"] == counts[3.0, "steps"] == 4  # the last 20% of the steps
    assert counts[3.0, "noise"] < counts[1.0, "noise"]  # a shifted scheduler reaches low noise late
    tofu.remove(pipe)


def _loop(pipe, steps, calls_per_step, scheduler):
    """A sampling loop that calls the denoiser ``calls_per_step`` times per step (true CFG: separate calls)."""
    model = pipe.transformer
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        outs = [model(x, timestep=t.expand(1), class_labels=torch.tensor([1]), return_dict=False)[0][:, :4]
                for _ in range(calls_per_step)]
        x = scheduler.step(outs[-1], t, x).prev_sample


@pytest.mark.slow
def test_true_cfg_calls_are_one_step_and_heun_does_not_restart():
    pipe = dit_pipeline()
    handle = tofu.apply(pipe, method="tome", schedule=SCHEDULE, plan_reuse_steps=1)
    log = RatioLog(pipe, handle)
    _loop(pipe, 10, 2, pipe.scheduler)  # two denoiser calls per step
    assert log.ratios == [0.0] * 14 + [0.5] * 6
    # Heun evaluates twice per step at repeated timesteps: the step count must not restart at a repeat
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    log.ratios.clear()
    _loop(pipe, 10, 1, pipe.scheduler)
    n = len(pipe.scheduler.timesteps)
    expected = [0.5 if i / n >= 0.7 else 0.0 for i in range(n)]
    assert log.ratios == expected and expected.count(0.5) > 2
    log.close()
    tofu.remove(pipe)


def test_a_bare_denoiser_reads_steps_from_the_scheduler_it_is_given(caplog):
    pipe = dit_pipeline()
    handle = tofu.apply(pipe.transformer, method="tome", schedule=SCHEDULE, scheduler=pipe.scheduler)
    log = RatioLog(pipe, handle)
    _loop(pipe, 10, 1, pipe.scheduler)
    assert log.ratios == [0.0] * 7 + [0.5] * 3
    log.close()
    with pytest.raises(TypeError, match="scheduler= takes a diffusers scheduler"):
        tofu.apply(pipe.transformer, scheduler="euler")
    tofu.remove(pipe)


def test_explain_follows_a_dynamic_shift_and_refuses_what_it_cannot_say():
    pipe = flux_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    low = tofu.explain(pipe, num_inference_steps=28, height=64, width=64, schedule_axis="noise",
                       schedule=SCHEDULE, method="tome")
    high = tofu.explain(pipe, num_inference_steps=28, height=64, width=64, schedule_axis="noise",
                        schedule=SCHEDULE, method="tome", mu=1.15)
    assert high.reduced_steps < low.reduced_steps  # a larger shift spends fewer steps at low noise
    with pytest.raises(ValueError, match="multiples of the VAE's factor"):
        tofu.explain(pipe, num_inference_steps=4, height=35, width=35)
    with pytest.raises(ValueError, match="does not tile"):
        tofu.explain(pipe, num_inference_steps=4, height=34, width=34)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        tofu.explain(pipe, num_inference_steps=0)
    with pytest.raises(ValueError, match="explain needs the pipeline"):
        tofu.explain(pipe.transformer, num_inference_steps=4, height=32, width=32)


def test_a_guidance_batch_shares_the_conditional_plan():
    from tofu_diffusion.pipelines.tiny import sd3_transformer

    model = sd3_transformer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(2, 9, 32, generator=g)  # unconditional and conditional prompts differ
    pooled = torch.randn(2, 32, generator=g)
    call = dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=text, pooled_projections=pooled,
                timestep=torch.tensor([500.0, 500.0]), return_dict=False)
    plans = {}
    for share in (True, False):
        handle = tofu.apply(model, method="tome", ratio=0.5, share_guidance_plans=share)
        out = model(**call)[0]
        plans[share] = {name: plan.assignment for name, (plan, _) in handle.last_plans().items()}
        if share:
            # the conditional half alone plans as it does inside the guidance batch
            alone = model(hidden_states=x, encoder_hidden_states=text[1:], pooled_projections=pooled[1:],
                          timestep=torch.tensor([500.0]), return_dict=False)[0]
            assert torch.allclose(out[1:], alone, atol=1e-5)
    last = f"transformer_blocks.{len(model.transformer_blocks) - 1}"
    assert all(torch.equal(a[0], a[1]) for a in plans[True].values())
    assert not torch.equal(plans[False][last][0], plans[False][last][1])  # the text streams differ by then
    # distinct latents are no guidance batch: each sample keeps its own plan
    handle = tofu.apply(model, method="tome", ratio=0.5)
    model(**{**call, "hidden_states": torch.randn(2, 4, 16, 16, generator=g)})
    assert not torch.equal(*handle.last_plans()[last][0].assignment)
    tofu.remove(model)


@pytest.mark.slow
@pytest.mark.parametrize("with_scheduler", [True, False])
def test_true_cfg_calls_reuse_their_own_plans(with_scheduler):
    """With plan reuse, the conditional call gives the same result whether or not an unconditional call
    runs between its steps (each call position within a step keeps its own plan)."""
    pipe = dit_pipeline()
    scheduler = pipe.scheduler
    options = {"scheduler": scheduler} if with_scheduler else {}
    tofu.apply(pipe.transformer, method="tome", ratio=0.5, plan_reuse_steps=2, **options)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    scheduler.set_timesteps(6)

    def call(label, shift):
        return lambda t: pipe.transformer(x + shift, timestep=t.expand(1), class_labels=torch.tensor([label]),
                                          return_dict=False)[0]

    unconditional, conditional = call(1000, 1.0), call(3, 0.0)

    def outputs(*calls):  # one step = these calls in order, at one timestep; the outputs of each, per step
        out = [[] for _ in calls]
        for t in scheduler.timesteps:
            for results, fn in zip(out, calls):
                results.append(fn(t))
        return out

    (uncond_alone,), (cond_alone,) = outputs(unconditional), outputs(conditional)
    uncond_paired, cond_paired = outputs(unconditional, conditional)
    assert all(torch.equal(a, b) for a, b in zip(uncond_alone, uncond_paired))
    assert all(torch.equal(a, b) for a, b in zip(cond_alone, cond_paired))
    tofu.remove(pipe.transformer)


@pytest.mark.slow
def test_explain_previews_the_timesteps_a_flux_pipeline_really_runs():
    # Flux's pipeline passes its own sigmas, linspace(1, 1/N, N), and a mu from the image size
    pipe = flux_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(kwargs["timestep"][0]) * 1000), with_kwargs=True)
    _flux_call(pipe, 7)
    hook.remove()
    plan = tofu.explain(pipe, num_inference_steps=7, height=32, width=32)
    assert [s.timestep for s in plan.steps] == pytest.approx(seen, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wan", "ltx", "hunyuan_video", "hunyuan_video15", "cogvideox"])
def test_explain_previews_the_timesteps_and_latent_a_video_pipeline_really_runs(kind):
    make, call, size = PIPELINES[kind]
    pipe = make()
    if kind == "ltx":  # LTX's pipeline shifts by the video's token count
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    seen, shapes = [], []

    def record(module, args, kwargs):
        seen.append(float(kwargs["timestep"].flatten()[0]))
        shapes.append(tuple(kwargs["hidden_states"].shape))

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    call(pipe, 6)
    hook.remove()
    plan = tofu.explain(pipe, num_inference_steps=6, **size)
    calls = len(seen) // 6  # HunyuanVideo 1.5's guider: a call per condition
    assert [s.timestep for s in plan.steps] == pytest.approx(seen[::calls], abs=1e-3) == seen[calls - 1::calls]
    frames, height, width = plan.latent
    assert frames == 3  # 9 frames through a VAE that keeps the first and compresses the rest 4x
    if kind == "ltx":  # LTX's pipeline packs the latent into tokens before the transformer
        assert shapes[0][1] == frames * height * width
    elif kind == "cogvideox":  # (B, F, C, H, W)
        assert (shapes[0][1],) + shapes[0][3:] == plan.latent
    else:
        assert shapes[0][2:] == plan.latent


def test_explain_refuses_frames_it_cannot_place():
    with pytest.raises(ValueError, match="num_frames - 1 must be a multiple of the VAE's temporal factor 4"):
        tofu.explain(wan_pipeline(), num_inference_steps=4, height=32, width=32, num_frames=8)
    with pytest.raises(ValueError, match="num_frames is for video pipelines"):
        tofu.explain(sd3_pipeline(), num_inference_steps=4, height=32, width=32, num_frames=9)
    with pytest.raises(ValueError, match="does not tile"):
        tofu.explain(wan_pipeline(), num_inference_steps=4, height=40, width=32, num_frames=9)
