"""The bundled shapes pipeline: folder round trip, seeded determinism, and token fusion on it."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import tofu_diffusion as tofu
from pipelines.classifier import ShapesClassifier
from pipelines.shapes_pipeline import ClassTokens, ShapesUNetPipeline, shapes_unet, to_image, to_latent


def _pipe():
    torch.manual_seed(0)
    pipe = ShapesUNetPipeline(shapes_unet(), ClassTokens(), FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, seed=0):
    return pipe([0, 3, 5], num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images


def test_latent_is_an_exact_rearrangement():
    images = torch.randn(2, 3, 32, 32)
    assert to_latent(images).shape == (2, 12, 16, 16)
    assert torch.equal(to_image(to_latent(images)), images)


def test_save_and_load_folder_round_trip(tmp_path):
    pipe = _pipe()
    pipe.save_pretrained(tmp_path)
    loaded = ShapesUNetPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    images = _sample(pipe)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(_sample(loaded), images)
    assert not torch.equal(_sample(pipe, seed=1), images)


def test_token_fusion_on_the_shapes_unet():
    pipe = _pipe()
    base = _sample(pipe)
    handle = tofu.apply(pipe, method="tofu", ratio=0.5)
    reduced = _sample(pipe)
    assert not torch.equal(reduced, base) and torch.equal(_sample(pipe), reduced)
    assert {n for n, _ in handle.token_counts().values()} == {256}  # attention at full (16x16) resolution
    tofu.remove(pipe)
    assert torch.equal(_sample(pipe), base)


def test_classifier_features_and_logits():
    model = ShapesClassifier().eval()
    images = torch.randn(4, 3, 32, 32)
    assert model.features(images).shape == (4, ShapesClassifier.feature_dim)
    assert model(images).shape == (4, 6)
