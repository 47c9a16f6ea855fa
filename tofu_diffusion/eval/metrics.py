"""Quality metrics of generated images (torchmetrics where it has them) and memory probes.

Images everywhere here are float tensors (N, 3, H, W) in [-1, 1], the range diffusers pipelines work in.
Under several processes the sweep gathers images to the main process and scores them there, so the
torchmetrics metrics are built with ``sync_on_compute=False`` (the other processes never call compute).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; the cap keeps averages and JSON finite


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 (0..255), as a saved image would be."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


class FeatureExtractor(nn.Module):
    """Adapts a feature network to torchmetrics' FID: images in [-1, 1] in, (N, D) features out.

    ``network`` is any module with ``features(images)`` (the shipped classifier) or a plain callable module
    returning (N, D) features or (N, D, 1, 1) maps.
    """

    def __init__(self, network: nn.Module, num_features: int, input_size: Optional[int] = None):
        super().__init__()
        self.network = network.eval()
        self.num_features = num_features  # torchmetrics reads this instead of probing with a dummy image
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.input_size is not None and images.shape[-1] != self.input_size:
            images = nn.functional.interpolate(images, size=self.input_size, mode="bilinear", antialias=True)
        features = self.network.features(images) if hasattr(self.network, "features") else self.network(images)
        return features.flatten(1).double()


def inception_fid(weights_path: Optional[str] = None) -> FrechetInceptionDistance:
    """FID with torchmetrics' Inception-v3 features, for real checkpoints.

    It needs the ``torch-fidelity`` package and the Inception weights on disk (nothing can be downloaded
    here); both problems get an error that says how to provide them.
    """
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise RuntimeError(
            "Inception FID needs the torch-fidelity package (pip install torch-fidelity; note that it pulls "
            "torchvision). Without it, pass --feature-module MODULE:FUNCTION that returns an nn.Module with "
            "features(images) and num_features."
        )
    if weights_path is None or not os.path.isfile(weights_path):
        raise RuntimeError(
            f"Inception weights not found at {weights_path!r}: download pt_inception-2015-12-05-6726825d.pth "
            "(torch-fidelity's FID Inception) on a machine with internet and pass its path with --inception-weights."
        )
    return FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                    feature_extractor_weights_path=weights_path, sync_on_compute=False)


def feature_fid(extractor: FeatureExtractor) -> FrechetInceptionDistance:
    return FrechetInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False)


def feature_kid(extractor: FeatureExtractor) -> KernelInceptionDistance:
    """KID on the same features as :func:`feature_fid`: unbiased where FID at a few hundred images is not."""
    return KernelInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False)


def inception_kid(weights_path: Optional[str] = None) -> KernelInceptionDistance:
    inception_fid(weights_path)  # the same requirements, the same clear errors
    return KernelInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                   feature_extractor_weights_path=weights_path, sync_on_compute=False)


class FID:
    """FID of image sets against one real set, whose features are computed once.

    ``metric`` is a torchmetrics ``FrechetInceptionDistance`` built with ``reset_real_features=False``.
    """

    def __init__(self, metric: FrechetInceptionDistance, real: torch.Tensor, batch_size: int = 256):
        if metric.reset_real_features:
            raise ValueError("FID needs a metric built with reset_real_features=False to keep the real features")
        held = getattr(metric, "real_features_num_samples", None)
        if held is None:  # KID keeps a list of feature batches
            held = len(getattr(metric, "real_features", []))
        if int(held) != 0:
            raise ValueError("this metric already holds real features; pass a freshly built one")
        if real.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 real images; got {real.shape[0]}")
        self.metric, self.batch_size, self.num_real = metric, batch_size, real.shape[0]
        metric.reset()
        self._update(real, real=True)

    def _update(self, images: torch.Tensor, real: bool) -> None:
        # torchmetrics' own Inception takes [0, 1] floats (normalize=True); our extractors take [-1, 1].
        for chunk in images.split(self.batch_size):
            chunk = chunk.float()
            self.metric.update(chunk if self.metric.used_custom_model else (chunk + 1) / 2, real=real)

    def __call__(self, fake: torch.Tensor) -> float:
        if fake.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 generated images; got {fake.shape[0]}")
        self.metric.reset()  # drops the previous generated set only
        self._update(fake, real=False)
        return float(self.metric.compute())


class KID(FID):
    """Kernel Inception Distance of image sets against one real set: ``(mean, std)`` over random subsets.

    ``metric`` is a torchmetrics ``KernelInceptionDistance`` built with ``reset_real_features=False``; its
    subsets are as large as both sets allow (at most its ``subset_size``), drawn with a fixed seed so that
    the same images give the same KID.
    """

    def __call__(self, fake: torch.Tensor) -> tuple[float, float]:
        if fake.shape[0] < 2:
            raise ValueError(f"KID needs at least 2 generated images; got {fake.shape[0]}")
        self.metric.reset()
        self._update(fake, real=False)
        self.metric.subset_size = min(self.metric.subset_size, fake.shape[0], self.num_real)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mean, std = self.metric.compute()
        return float(mean), float(std)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) against ``reference``, capped at ``PSNR_CAP_DB``."""
    values = peak_signal_noise_ratio(images.float(), reference.float(), data_range=2.0, reduction="none", dim=(1, 2, 3))
    return values.nan_to_num(posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM against ``reference``."""
    size = min(11, images.shape[-1] - (1 - images.shape[-1] % 2))  # the window must fit small images
    return structural_similarity_index_measure(images.float(), reference.float(), data_range=2.0,
                                               kernel_size=size, reduction="none")


def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Share of images that ``classifier`` assigns to their requested class."""
    hits = 0
    for chunk, wanted in zip(images.split(batch_size), labels.split(batch_size)):
        hits += int((classifier(chunk.float()).argmax(-1) == wanted).sum())
    return hits / images.shape[0]


class _ProjectedFeatures(nn.Module):
    """A CLIP model whose ``get_*_features`` return tensors, as torchmetrics expects.

    transformers 5 returns an output object (projected embeddings in ``pooler_output``) where 4.x returned
    the tensor; torchmetrics 1.9 calls ``.norm`` on it directly.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score(model_path: str, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> float:
    """torchmetrics ``CLIPScore`` of images against their prompts, with a CLIP model from a local path or id."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        return _ProjectedFeatures(CLIPModel.from_pretrained(model_path)), CLIPProcessor.from_pretrained(model_path)

    try:
        # torchmetrics accepts only a few hub names as strings; a loader callable takes any local folder.
        metric = CLIPScore(model_name_or_path=load, sync_on_compute=False)
    except OSError as error:
        raise RuntimeError(f"cannot load the CLIP model {model_path!r} ({error}); pass a local folder saved with "
                           "CLIPModel.save_pretrained / CLIPProcessor.save_pretrained via --clip-model") from error
    for start in range(0, images.shape[0], batch_size):
        chunk = to_uint8(images[start:start + batch_size])
        metric.update(chunk, prompts[start:start + batch_size])
    return float(metric.compute())


# ---- video: clips (N, F, 3, H, W) in [-1, 1] ------------------------------------------------------------

def as_frames(images: torch.Tensor) -> torch.Tensor:
    """Clips (N, F, 3, H, W) as their frames (N * F, 3, H, W); images (N, 3, H, W) as they are.

    Every per-image measure (FID, class accuracy, PSNR) scores a video frame by frame."""
    return images.flatten(0, 1) if images.dim() == 5 else images


def temporal_error(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per clip: how far its frame-to-frame changes are from ``reference``'s, mean absolute (0: the same motion).

    A clip that matches the reference frame by frame scores 0; one that flickers or moves differently does not,
    even where each frame on its own looks as good (which PSNR per frame cannot tell apart).
    """
    if videos.dim() != 5 or videos.shape != reference.shape or videos.shape[1] < 2:
        raise ValueError(f"temporal_error takes two clips batches (N, F >= 2, 3, H, W) of one shape; got "
                         f"{tuple(videos.shape)} and {tuple(reference.shape)}")
    change, wanted = videos.float().diff(dim=1), reference.float().diff(dim=1)
    return (change - wanted).abs().mean(dim=(1, 2, 3, 4))


def moving_shape_track(videos: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The moving object's centre in each frame, (N, F, 2) as (x, y) pixels; NaN where nothing moves.

    The background is each pixel's median over the clip (a moving shape covers any one pixel in few frames);
    the object is what differs from it by more than ``threshold`` (summed over channels, [-1, 1] units), and
    its centre the centroid of that excess. Made for the moving-shapes clips (one shape, a still background).
    """
    videos = videos.float().contiguous()  # torch's median over a broadcast (stride-0) dim is wrong
    background = videos.median(dim=1, keepdim=True).values
    excess = ((videos - background).abs().sum(dim=2) - threshold).clamp(min=0)  # (N, F, H, W)
    h, w = excess.shape[-2:]
    ys = torch.arange(h, dtype=excess.dtype, device=excess.device).view(h, 1)
    xs = torch.arange(w, dtype=excess.dtype, device=excess.device).view(1, w)
    mass = excess.sum(dim=(2, 3))
    centre = torch.stack([(excess * xs).sum(dim=(2, 3)), (excess * ys).sum(dim=(2, 3))], dim=-1) / mass[..., None]
    return centre.masked_fill((mass < 1.0)[..., None], float("nan"))


def trajectory_error(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per clip: mean distance in pixels between its moving shape's track and ``reference``'s, over the frames
    where both have one (NaN for a clip with no such frame)."""
    distance = (moving_shape_track(videos) - moving_shape_track(reference)).norm(dim=-1)  # (N, F)
    return distance.nanmean(dim=1)
