"""The bundled shapes pipelines: folder round trip, seeded determinism, and token fusion on them."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines import load_embedded
from tofu_diffusion.pipelines.classifier import ShapesClassifier
from tofu_diffusion.pipelines.shapes_pipeline import to_image, to_latent
from tofu_diffusion.pipelines.train_shapes import build_pipeline


def _pipe(kind):
    torch.manual_seed(0)
    pipe = build_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, seed=0):
    return pipe([0, 3, 5], num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images


def test_latent_is_an_exact_rearrangement():
    images = torch.randn(2, 3, 32, 32)
    assert to_latent(images).shape == (2, 12, 16, 16)
    assert torch.equal(to_image(to_latent(images)), images)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet", "dit", "mmdit"])
def test_save_and_load_folder_round_trip(tmp_path, kind):
    pipe = _pipe(kind)
    pipe.register_to_config(default_guidance_scale=6.0)
    pipe.save_pretrained(tmp_path)
    loaded = load_embedded(str(tmp_path))
    assert type(loaded) is type(pipe)
    loaded.set_progress_bar_config(disable=True)
    images = _sample(pipe)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(_sample(loaded), images)
    assert not torch.equal(_sample(pipe, seed=1), images)
    # the saved default guidance is what a call without guidance_scale uses
    assert loaded.config.default_guidance_scale == 6.0
    explicit = loaded([0, 3, 5], num_inference_steps=2, guidance_scale=6.0,
                      generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(explicit, images)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet", "dit", "mmdit"])
def test_token_fusion_on_the_shapes_generators(kind):
    pipe = _pipe(kind)
    base = _sample(pipe)
    handle = tofu.apply(pipe, method="tofu", ratio=0.5)
    reduced = _sample(pipe)
    assert not torch.equal(reduced, base) and torch.equal(_sample(pipe), reduced)
    assert {n for n, _ in handle.token_counts().values()} == {256}  # attention on 16x16 tokens
    tofu.remove(pipe)
    assert torch.equal(_sample(pipe), base)


def test_per_image_generators_and_bad_labels():
    pipe = _pipe("dit")
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    pair = pipe([1, 2], num_inference_steps=2, generator=gens).images
    alone = pipe([2], num_inference_steps=2, generator=[torch.Generator().manual_seed(8)]).images
    assert torch.allclose(pair[1:], alone, atol=1e-5)  # an image depends on its own seed only
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 6\)"):
        pipe([6], num_inference_steps=2)
    with pytest.raises(ValueError, match="one per image"):
        pipe([1, 2], num_inference_steps=2, generator=gens[:1])


def test_classifier_features_and_logits():
    model = ShapesClassifier().eval()
    images = torch.randn(4, 3, 32, 32)
    assert model.features(images).shape == (4, ShapesClassifier.feature_dim)
    assert model(images).shape == (4, 6)
