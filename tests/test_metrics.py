"""Metric plumbing on tiny inputs: FID, PSNR/SSIM, class accuracy, CLIP score, and their clear errors."""


import pytest
import torch
from torch import nn

from tofu_diffusion.eval import metrics


class MeanColour(nn.Module):
    """A feature network a person can reason about: per-channel means and standard deviations."""

    num_features = 6

    def features(self, images):
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def _fid(real):
    return metrics.FID(metrics.feature_fid(metrics.FeatureExtractor(MeanColour(), 6)), real)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    fid = _fid(real)
    assert fid(real) == pytest.approx(0.0, abs=1e-6)
    # shifting every image by 0.5 moves the 3 mean features by 0.5: FID = 3 * 0.25 (covariances unchanged)
    assert fid(real + 0.5) == pytest.approx(0.75, rel=1e-4)
    # the real features are kept between calls: the same set scores the same again
    assert fid(real) == pytest.approx(0.0, abs=1e-6)


def test_fid_rejects_too_few_images_and_a_resetting_metric():
    real = torch.rand(4, 3, 8, 8)
    fid = _fid(real)
    with pytest.raises(ValueError, match="at least 2 generated"):
        fid(real[:1])
    resetting = metrics.FrechetInceptionDistance(feature=metrics.FeatureExtractor(MeanColour(), 6))
    with pytest.raises(ValueError, match="reset_real_features=False"):
        metrics.FID(resetting, real)


def test_inception_fid_says_how_to_provide_what_is_missing(tmp_path):
    with pytest.raises(RuntimeError, match="torch-fidelity|--inception-weights"):
        metrics.inception_fid(str(tmp_path / "missing.pth"))


def test_psnr_of_identical_images_is_capped_and_known_offsets_are_exact():
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    assert torch.equal(metrics.psnr(images, images), torch.full((3,), metrics.PSNR_CAP_DB))
    # a constant error of 0.02 on a data range of 2: 10 log10(4 / 0.0004) = 40 dB
    shifted = images.clamp(-0.9, 0.9)
    assert metrics.psnr(shifted + 0.02, shifted) == pytest.approx(torch.full((3,), 40.0), abs=1e-3)


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert metrics.ssim(images, images) == pytest.approx(torch.ones(2), abs=1e-5)
    noisy = (images + 0.5 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    assert (metrics.ssim(noisy, images) < 0.9).all()


def test_class_accuracy_counts_hits():
    class Fixed(nn.Module):
        def forward(self, images):  # predicts class = round(mean pixel * 2) + 1, in {0, 1, 2}
            return nn.functional.one_hot((images.mean(dim=(1, 2, 3)) * 2).round().long() + 1, 3).float()

    images = torch.stack([torch.full((3, 4, 4), v) for v in (-0.5, 0.0, 0.5, 0.5)])
    assert metrics.class_accuracy(Fixed(), images, torch.tensor([0, 1, 2, 0])) == 0.75


def test_clip_score_with_a_local_clip_model(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from tofu_diffusion.pipelines.tiny import save_tiny_clip

    save_tiny_clip(tmp_path, seed=1)  # a tiny random CLIP in the format a user would point --clip-model at
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red disc", "a disc"]
    score = metrics.clip_score(str(tmp_path), images, prompts)
    # the definition: 100 * mean over pairs of max(cos(image embedding, text embedding), 0), on uint8 images
    model, processor = CLIPModel.from_pretrained(tmp_path), CLIPProcessor.from_pretrained(tmp_path)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    inputs = processor(text=prompts, images=list(pixels), return_tensors="pt", padding=True)
    image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image, text)
    assert (cosine > 0).all()
    assert score == pytest.approx(100 * cosine.mean().item(), rel=1e-4)
    with pytest.raises(RuntimeError, match="--clip-model"):
        metrics.clip_score(str(tmp_path / "nowhere"), images, ["a", "b"])


def test_temporal_error_is_zero_for_the_same_motion_and_grows_with_flicker():
    from tofu_diffusion.pipelines.shapes import generate_clips

    clips = generate_clips(4, seed=1)[0]
    assert torch.equal(metrics.temporal_error(clips, clips), torch.zeros(4))
    # the same clip brighter in every frame has the same frame-to-frame changes: no temporal error, though
    # every frame differs
    assert metrics.temporal_error(clips + 0.2, clips).abs().max() < 1e-6
    flicker = clips.clone()
    flicker[:, 1::2] += 0.2  # every other frame brighter: each change is off by 0.2
    assert metrics.temporal_error(flicker, clips) == pytest.approx(torch.full((4,), 0.2), abs=1e-5)
    with pytest.raises(ValueError, match="clips"):
        metrics.temporal_error(clips[:, 0], clips[:, 0])
    assert metrics.as_frames(clips).shape == (32, 3, 32, 32) and metrics.as_frames(clips[:, 0]).shape == (4, 3, 32, 32)


def test_moving_shape_track_follows_the_shape_and_trajectory_error_measures_a_shift():
    from tofu_diffusion.pipelines.shapes import generate_clips

    clips, _, centres = generate_clips(64, seed=3)
    track = metrics.moving_shape_track(clips)
    truth = (centres + 1) * clips.shape[-1] / 2 - 0.5  # [-1, 1] -> pixel index
    error = (track - truth).norm(dim=-1)
    assert error.isnan().float().mean() < 0.05  # a shape is found in nearly every frame
    assert error.nanmedian() < 2.0  # within two pixels of where the generator put it (measured 1.3)
    # the same clips three pixels to the right on a wider canvas: their track is three pixels off
    moved, placed = torch.nn.functional.pad(clips, (3, 5)), torch.nn.functional.pad(clips, (0, 8))
    shift = metrics.trajectory_error(moved, placed)
    assert shift.nanmean() == pytest.approx(3.0, abs=1e-3)
    assert metrics.trajectory_error(clips, clips).nan_to_num(0).abs().max() == 0
    still = clips[:, :1].expand(-1, 8, -1, -1, -1)  # nothing moves: no track, not a wrong one
    assert metrics.moving_shape_track(still).isnan().all()
