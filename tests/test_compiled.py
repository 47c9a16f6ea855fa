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


def _embeds():
    return {"prompt_embeds": tiny.prompt_embeds(), "negative_prompt_embeds": tiny.prompt_embeds(seed=2)}


# Every registered diffusion family's tiny pipeline and a call of it (test_every_family_has_a_compiled_case).
PIPELINES = {
    "dit": (tiny.dit_pipeline, lambda: {"class_labels": [1, 3]}),
    "unet": (tiny.sd_pipeline, lambda: {**_embeds(), "height": 32, "width": 32}),
    "sd3": (tiny.sd3_pipeline, lambda: {**tiny.sd3_prompt(), "height": 32, "width": 32}),
    "flux": (tiny.flux_pipeline, lambda: {**tiny.flux_prompt(), "height": 32, "width": 32}),
    "flux2": (tiny.flux2_pipeline, lambda: {**tiny.flux2_prompt(), "height": 32, "width": 32}),
    "chroma": (tiny.chroma_pipeline, lambda: {**tiny.chroma_prompt(), "height": 32, "width": 32}),
    "qwen_image": (tiny.qwen_image_pipeline, lambda: {**tiny.qwen_image_prompt(), "height": 32, "width": 48}),
    "z_image": (tiny.z_image_pipeline, lambda: {**tiny.z_image_prompt(), "height": 32, "width": 48}),
    "wan": (tiny_video.wan_pipeline, lambda: {**tiny_video.wan_prompt(), "height": 32, "width": 32, "num_frames": 5}),
    "ltx": (tiny_video.ltx_pipeline, lambda: {**tiny_video.ltx_prompt(), "height": 32, "width": 32, "num_frames": 9}),
    "cogvideox": (tiny_video.cogvideox_pipeline,
                  lambda: {**tiny_video.cogvideox_prompt(), "height": 64, "width": 64, "num_frames": 9}),
    "hunyuan_video": (tiny_video.hunyuan_video_pipeline,
                      lambda: {**tiny_video.hunyuan_video_prompt(), "height": 32, "width": 32, "num_frames": 9}),
    "hunyuan_video15": (tiny_video.hunyuan_video15_pipeline,
                        lambda: {**tiny_video.hunyuan_video15_prompt(), "height": 64, "width": 96, "num_frames": 9}),
    "pixart": (tiny.pixart_pipeline, lambda: {**_embeds(), "prompt_attention_mask": torch.ones(1, 7),
                                              "negative_prompt_attention_mask": torch.ones(1, 7),
                                              "use_resolution_binning": False, "negative_prompt": None, "height": 32,
                                              "width": 32}),
}
# compiled by blocks: the grid is read from img_ids (Flux, Flux.2, Chroma), or the model itself branches on a
# tensor's value (HunyuanVideo 1.5's torch.all(image_embeds == 0): no whole graph even unpatched)
BY_BLOCKS = {"flux", "flux2", "chroma", "hunyuan_video15"}


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
    ("sd3", {}, "aot_eager", 4, 3),
    ("unet", {}, "aot_eager", 4, 4),
    ("wan", {}, "aot_eager", 4, 6),
    ("wan", TOME, "aot_eager", 4, 2),
])
def test_whole_model_compiled_gives_the_eager_output_with_bounded_graphs(family, options, backend, steps, most):
    pipe, run = _pipeline(family, options)
    eager = run(steps)
    name = "unet" if family == "unet" else "transformer"
    setattr(pipe, name, torch.compile(getattr(pipe, name), fullgraph=True, backend=backend))
    compiled = run(steps)
    graphs = _graphs()
    tolerance = 1e-4 if backend == "inductor" else 1e-6
    assert (compiled - eager).abs().max() <= tolerance
    assert 1 <= graphs <= most, graphs
    assert torch.allclose(run(steps), eager, atol=tolerance) and _graphs() == graphs  # a second call compiles none


def test_every_family_has_a_compiled_case():
    from tofu_diffusion.adapters import FAMILIES

    assert {family.split(":")[0] for family in PIPELINES} - {"pixart"} == {a.family for a in FAMILIES} - {"vit"}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(PIPELINES) - {"dit", "unet", "sd3", "wan", "flux"}))  # those: above
def test_every_family_compiles_its_default_to_the_eager_output(family):
    pipe, run = _pipeline(family, {})
    eager = run(3)
    # dynamo's own backend: the whole graph is traced (fullgraph), its guards and side effects checked; lowering
    # is the tests above' (aot_eager, inductor)
    if family in BY_BLOCKS:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    else:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="eager")
    assert torch.equal(run(3), eager)
    graphs = _graphs()
    assert graphs <= 12  # at most 6 per compiled code (guidance called apart doubles), see the guide
    assert torch.equal(run(3), eager) and _graphs() == graphs


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


def test_removing_a_copys_patch_leaves_the_originals_scheduler_clock():
    import copy

    pipe = tiny.dit_pipeline()
    tofu.apply(pipe.transformer, method="tome", schedule=((0.0, 0.0), (0.5, 0.5)), scheduler=pipe.scheduler)
    ticking = vars(pipe.scheduler)["step"]
    tofu.remove(copy.deepcopy(pipe.transformer))
    assert vars(pipe.scheduler)["step"] is ticking  # the original patch still follows its scheduler
    tofu.remove(pipe.transformer)
    assert "step" not in vars(pipe.scheduler)


def test_a_schedule_of_many_ratios_is_warned_of(caplog):
    model = tiny.dit_transformer()
    many = tuple((i / 10, i / 20) for i in range(10))
    with caplog.at_level("WARNING", logger="tofu_diffusion"):
        tofu.apply(model, method="tome", schedule=((0.0, 0.0), (0.5, 0.5)))
        assert "kinds of step" not in caplog.text
        tofu.apply(model, method="tome", schedule=many)
    assert "10 kinds of step" in caplog.text and "recompile limit" in caplog.text
    tofu.remove(model)
