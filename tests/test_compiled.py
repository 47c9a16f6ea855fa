"""Token fusion under torch.compile as users run it: a pipeline's denoiser compiled whole
(``torch.compile(pipe.transformer, fullgraph=True)``) or by its repeated blocks (``compile_repeated_blocks``),
with the default (a schedule, the cached unmerge, plan reuse on the UNet) and with a constant ratio.

Each call gives the eager call's output; the graphs are bounded by design (a schedule's step is decided where the
scheduler moves, outside the graph, and reaches it as a ratio and a flag), and a second call compiles nothing.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import tofu_diffusion as tofu
from tofu_diffusion.pipelines import tiny, tiny_video

PIPELINES = {
    "dit": (tiny.dit_pipeline, lambda: {"class_labels": [1, 3]}),
    "sd": (tiny.sd_pipeline, lambda: {"prompt_embeds": tiny.prompt_embeds(),
                                      "negative_prompt_embeds": tiny.prompt_embeds(seed=2), "height": 32, "width": 32}),
    "sd3": (tiny.sd3_pipeline, lambda: {**tiny.sd3_prompt(), "height": 32, "width": 32}),
    "flux": (tiny.flux_pipeline, lambda: {**tiny.flux_prompt(), "height": 32, "width": 32}),
    "wan": (tiny_video.wan_pipeline, lambda: {**tiny_video.wan_prompt(), "height": 32, "width": 32, "num_frames": 5}),
}


def _pipeline(family, options):
    build, prompt = PIPELINES[family]
    pipe = build()
    tofu.apply(pipe, **options)

    def run(steps):
        out = pipe(**prompt(), num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0))
        return out.frames if hasattr(out, "frames") else out.images
    return pipe, run


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


TOME = {"method": "tome", "ratio": 0.5}


# (family, options, backend, steps, most graphs): the default's graphs are one per distinct step (unreduced,
# reduced; the UNet's plan reuse adds one), a constant ratio one; Wan calls guidance apart, which doubles them.
@pytest.mark.slow
@pytest.mark.parametrize("family, options, backend, steps, most", [
    ("dit", {}, "inductor", 28, 3),
    ("dit", TOME, "aot_eager", 28, 1),
    ("sd3", {}, "aot_eager", 6, 3),
    ("sd", {}, "aot_eager", 6, 4),
    ("wan", {}, "aot_eager", 6, 6),
    ("wan", TOME, "aot_eager", 4, 2),
])
def test_whole_model_compiled_gives_the_eager_output_with_bounded_graphs(family, options, backend, steps, most):
    pipe, run = _pipeline(family, options)
    eager = run(steps)
    name = "unet" if family == "sd" else "transformer"
    setattr(pipe, name, torch.compile(getattr(pipe, name), fullgraph=True, backend=backend))
    compiled = run(steps)
    graphs = _graphs()
    tolerance = 1e-4 if backend == "inductor" else 1e-6
    assert (compiled - eager).abs().max() <= tolerance
    assert 1 <= graphs <= most, graphs
    assert torch.allclose(run(steps), eager, atol=tolerance) and _graphs() == graphs  # a second call compiles none


@pytest.mark.slow
@pytest.mark.parametrize("options, most", [({}, 4), (TOME, 2)])
def test_regionally_compiled_blocks_give_the_eager_output(options, most):
    pipe, run = _pipeline("flux", options)
    eager = run(6)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    assert torch.equal(run(6), eager)
    graphs = _graphs()
    assert graphs <= 2 * most  # per block class (double- and single-stream): one per kind of step
    assert torch.equal(run(6), eager) and _graphs() == graphs


def test_a_grid_read_from_ids_asks_for_regional_compilation():
    pipe, run = _pipeline("flux", TOME)
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="compile_repeated_blocks"):
        run(2)


def test_a_bare_compiled_model_follows_the_scheduler_it_was_applied_with():
    pipe = tiny.dit_pipeline()
    model, scheduler = pipe.transformer, pipe.scheduler
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])

    def loop(denoiser):
        latents = x.clone()
        scheduler.set_timesteps(6)
        for t in scheduler.timesteps:
            out = denoiser(latents, timestep=t.expand(2), class_labels=labels, return_dict=False)[0]
            latents = scheduler.step(out[:, :4], t, latents).prev_sample
        return latents

    handle = tofu.apply(model, method="tome", schedule=((0.0, 0.0), (0.5, 0.5)), scheduler=scheduler)
    eager = loop(model)
    assert torch.equal(loop(torch.compile(model, fullgraph=True, backend="aot_eager")), eager)
    assert _graphs() <= 2  # unreduced and reduced steps
    handle.remove()
    assert "step" not in vars(scheduler)  # the scheduler's own methods are back
