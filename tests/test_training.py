"""The training scripts learn: a few dozen steps lower the loss, and what they save loads back."""

import json
import os
from argparse import Namespace

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines import load_embedded
from tofu_diffusion.pipelines.classifier import load_classifier
from tofu_diffusion.pipelines.shapes import generate_clips
from tofu_diffusion.pipelines.train_shapes import train_classifier, train_generator

pytestmark = pytest.mark.slow  # trainings, sweeps and the shipped models: minutes in all


def _log(out):
    with open(os.path.join(out, "training_log.json")) as f:
        return json.load(f)


def test_classifier_training_lowers_the_loss(tmp_path):
    out = str(tmp_path / "clf")
    train_classifier(Namespace(what="classifier", steps=101, batch=32, lr=2e-3, seed=0, out=out))
    log = _log(out)
    assert log["log"][-1]["loss"] < log["log"][0]["loss"]
    assert load_classifier(out)(torch.zeros(1, 3, 32, 32)).shape == (1, 6)


def test_vit_training_saves_a_transformers_classifier(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out = str(tmp_path / "vit")
    train_classifier(Namespace(what="vit", steps=101, batch=32, lr=1e-3, seed=0, out=out))
    log = _log(out)
    assert log["log"][-1]["loss"] < log["log"][0]["loss"]
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "ViTForImageClassification" and model.config.id2label[0] == "disc"
    assert AutoImageProcessor.from_pretrained(out).size == {"height": 32, "width": 32}


@pytest.mark.parametrize("what", ["unet", "dit"])
def test_generator_training_lowers_the_loss_and_saves_a_pipeline(tmp_path, what):
    out = str(tmp_path / what)
    train_generator(Namespace(what=what, minutes=60, max_steps=101, batch=16, lr=1e-3, warmup=20, ema=0.99, seed=0,
                              snapshot_every=0, classifier=None, out=out))
    log = _log(out)
    assert log["steps"] == 101 and log["log"][-1]["loss"] < log["log"][0]["loss"]
    pipe = load_embedded(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe([1], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images.shape == (1, 3, 32, 32)


def test_a_64_px_dit_warm_starts_from_a_32_px_one():
    from tofu_diffusion.pipelines.train_shapes import _warm_start, build_pipeline

    small = build_pipeline("dit")
    large = _warm_start(build_pipeline("dit", 64), small)
    assert large.latent_shape() == (3, 64, 64) and large.transformer.config.sample_size == 64
    small_state, large_state = small.transformer.state_dict(), large.transformer.state_dict()
    assert small_state.keys() == large_state.keys()
    assert all(torch.equal(small_state[k], large_state[k]) for k in small_state)
    large.set_progress_bar_config(disable=True)
    assert large([1], num_inference_steps=1).images.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="offered for the unet and the dit only"):
        build_pipeline("mmdit", 64)


def test_video_generator_trains_on_moving_shapes_and_saves_a_pipeline(tmp_path, monkeypatch):
    from tofu_diffusion.pipelines import train_shapes

    drawn = []

    def clips(count, seed, frames):
        drawn.append((count, frames))
        return generate_clips(count, seed=seed, frames=frames)

    monkeypatch.setattr(train_shapes, "generate_clips", clips)
    out = str(tmp_path / "wan")
    train_generator(Namespace(what="wan", minutes=60, max_steps=4, batch=2, lr=1e-3, warmup=1, ema=0.9, seed=0,
                              snapshot_every=0, classifier=None, out=out, stills_share=0.5))
    # half the steps train on single frames, eight times as many: the same tokens per step
    assert drawn == [(2, 8), (16, 1), (2, 8), (16, 1)]
    pipe = load_embedded(out)
    assert type(pipe).__name__ == "ShapesWanPipeline" and type(pipe.transformer).__name__ == "WanTransformer3DModel"
    pipe.set_progress_bar_config(disable=True)
    frames = pipe([1, 4], num_inference_steps=1, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (2, 8, 3, 32, 32) and frames.min() >= -1 and frames.max() <= 1
    # explain reads its size and frames from the pipeline: 8 frames of 16 x 16 tokens (2x2 pixels each)
    plan = tofu.explain(pipe, num_inference_steps=4, ratio=0.5)
    assert plan.blocks[0].grid == (8, 16, 16) and plan.steps[0].tokens == (2048, 1024)


def test_the_first_tiny_wan_layout_resumes_as_it_is():
    from tofu_diffusion.pipelines.shapes_pipeline import ClassTokens, ShapesWanPipeline, flow_scheduler, shapes_wan
    from tofu_diffusion.pipelines.train_shapes import _warm_start, build_pipeline

    old = ShapesWanPipeline(shapes_wan(class_channels=8, space_to_depth=True), ClassTokens(map_channels=8),
                            flow_scheduler())
    assert old.latent_shape() == (12, 8, 16, 16) and build_pipeline("wan").latent_shape() == (3, 8, 32, 32)
    assert _warm_start(build_pipeline("wan"), old) is old  # not widened into the new layout, nor refused
    clips = generate_clips(2, seed=0)[0]
    assert torch.equal(old.decode(old.encode(clips)), clips)


def test_a_resumed_run_never_overwrites_a_better_saved_model(tmp_path, monkeypatch):
    import json

    from tofu_diffusion.pipelines import train_shapes

    out = tmp_path / "generator"
    out.mkdir()
    (out / "training_log.json").write_text(json.dumps({"class_accuracy": 0.46}))
    monkeypatch.setattr(train_shapes, "class_accuracy", lambda *a, **k: 0.32)
    monkeypatch.setattr(train_shapes, "load_classifier", lambda path: None)
    monkeypatch.setattr(train_shapes, "save_half", lambda pipe, folder: os.makedirs(folder, exist_ok=True))
    args = Namespace(what="dit", seed=0, batch=16, lr=1e-3, out=str(out), classifier="c", keep_best=True,
                     score_per_class=1)
    best = train_shapes._save_generator(args, None, 200, 0.0, [{"loss": 1.0}])
    assert best == 0.46 and json.loads((out / "training_log.json").read_text())["class_accuracy"] == 0.46
    assert json.loads((tmp_path / "generator-last" / "training_log.json").read_text())["class_accuracy"] == 0.32
