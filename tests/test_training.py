"""The training scripts learn: a few dozen steps lower the loss, and what they save loads back."""

import json
import os
from argparse import Namespace

import torch

from pipelines.shapes_pipeline import ShapesUNetPipeline
from pipelines.train_shapes import load_classifier, train_classifier, train_unet


def test_classifier_training_lowers_the_loss(tmp_path):
    out = str(tmp_path / "clf")
    train_classifier(Namespace(steps=101, batch=32, seed=0, out=out))
    log = json.load(open(os.path.join(out, "training_log.json")))
    assert log["log"][-1]["loss"] < log["log"][0]["loss"] * 0.9
    model = load_classifier(out)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 6)


def test_unet_training_lowers_the_loss_and_saves_a_pipeline(tmp_path):
    out = str(tmp_path / "unet")
    train_unet(Namespace(minutes=5, max_steps=101, batch=16, lr=1e-3, warmup=20, ema=0.99, seed=0,
                         classifier=None, out=out))
    log = json.load(open(os.path.join(out, "training_log.json")))
    assert log["steps"] == 101 and log["log"][-1]["loss"] < log["log"][0]["loss"]
    pipe = ShapesUNetPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe([1], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images.shape == (1, 3, 32, 32)
