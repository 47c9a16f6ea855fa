"""What a sweep evaluates: a pipeline, the condition of each image, how to draw images, and how to score them.

Two kinds, one interface:

- the bundled models (``pipelines.EMBEDDED_GENERATORS``): class-conditional, scored by the shipped shapes
  classifier (its features for FID, its predictions for class accuracy) against real procedural images;
- a real checkpoint (hub id or local folder): text-to-image (prompts from a file, CLIP score with a local
  CLIP model) or class-conditional (DiT), FID with Inception features (or a user feature module)
  against a folder of reference images.

Every image ``i`` is drawn from its own generator seeded with ``seed + i``, so it is the same image
whatever the batch or process that draws it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from tofu_diffusion.eval import metrics

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Workload:
    name: str
    pipe: object
    conditions: list  # one per image index (class label or prompt), cycled
    draw: Callable[[list[int], list], torch.Tensor]  # (seeds, conditions) -> images in [-1, 1]
    real_images: Optional[Callable[[int], torch.Tensor]]  # n -> reference images in [-1, 1]
    fid_metric: Optional[Callable[[], object]]  # a fresh torchmetrics FID (its features define what FID means)
    score: Callable[[torch.Tensor, list], dict] = field(default=lambda images, conditions: {})
    kid_metric: Optional[Callable[[], object]] = None  # a fresh torchmetrics KID on the same features as FID

    def condition(self, index: int):
        return self.conditions[index % len(self.conditions)]

    @property
    def denoiser(self) -> torch.nn.Module:
        from tofu_diffusion.api import denoiser_of

        return denoiser_of(self.pipe)


def _generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the same noise on every device, and one per image.
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def with_shift(pipe, shift: Optional[float]):
    """``pipe`` sampling with its scheduler's timestep ``shift`` (SD3: 3.0; Flux-dev at 1024 px: e^1.15 = 3.16).

    A flow model can be sampled at any shift: the same sigmas, spent more at high noise. None keeps the
    pipeline's own scheduler.
    """
    if shift is None:
        return pipe
    if "shift" not in pipe.scheduler.config:
        raise ValueError(f"--shift needs a flow-matching scheduler with a shift; {type(pipe.scheduler).__name__} has "
                         f"none")
    config = {**pipe.scheduler.config, "shift": float(shift), "use_dynamic_shifting": False}
    pipe.scheduler = type(pipe.scheduler).from_config(config)
    return pipe


def embedded(name: str, device: torch.device, steps: int, guidance_scale: Optional[float] = None,
             shift: Optional[float] = None) -> Workload:
    from tofu_diffusion.pipelines import load_embedded, load_shapes_classifier
    from tofu_diffusion.pipelines.shapes import CLASSES, HELD_OUT_SEED, generate, generate_clips

    pipe = with_shift(load_embedded(name), shift).to(device)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_shapes_classifier().to(device)
    video = "num_frames" in pipe.config  # tiny-wan: clips (N, F, 3, H, W), every frame scored as an image

    options = {} if guidance_scale is None else {"guidance_scale": guidance_scale}

    def draw(seeds, labels):
        output = pipe(labels, num_inference_steps=steps, generator=_generators(seeds), **options)
        return output.frames if video else output.images

    def real_images(n):
        if not video:
            return generate(n, seed=HELD_OUT_SEED, size=pipe.image_size)[0].to(device)
        frames = pipe.config.num_frames  # n real frames, from as few clips as hold them
        clips = generate_clips(-(-n // frames), seed=HELD_OUT_SEED, frames=frames)[0]
        return clips.flatten(0, 1)[:n].to(device)

    def score(images, labels):
        wanted = torch.as_tensor(labels, device=images.device)
        if images.dim() == 5:  # each frame against its clip's class
            wanted = wanted.repeat_interleave(images.shape[1])
        with torch.no_grad():
            return {"class_accuracy": metrics.class_accuracy(classifier, metrics.as_frames(images).to(device), wanted)}

    extractor = metrics.FeatureExtractor(classifier, classifier.feature_dim)
    return Workload(name, pipe, list(range(len(CLASSES))), draw, real_images,
                    lambda: metrics.feature_fid(extractor), score, lambda: metrics.feature_kid(extractor))


def load_prompts(path: str) -> list[str]:
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path} has no prompts (one per line)")
    return prompts


def load_image_folder(path: str, size: int, limit: Optional[int] = None) -> torch.Tensor:
    """Images of a folder (recursively, sorted), centre-cropped and resized to ``size``, in [-1, 1]."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if len(files) < 2:
        raise ValueError(f"--reference-dir {path} holds {len(files)} images ({'/'.join(IMAGE_SUFFIXES)}); "
                         "FID needs a folder of real images, at least as many as --num-images")
    tensors = []
    for file in files[:limit]:
        image = Image.open(file).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        tensors.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return metrics.from_uint8(torch.stack(tensors))


def _feature_module(spec: str) -> metrics.FeatureExtractor:
    """``module:function`` returning an ``nn.Module`` (images in [-1, 1] -> features) with ``num_features``."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--feature-module {spec!r}: expected MODULE:FUNCTION")
    network = getattr(importlib.import_module(module_name), attr)()
    if not hasattr(network, "num_features"):
        raise ValueError(f"--feature-module {spec!r} returned a module without `num_features`")
    return metrics.FeatureExtractor(network, int(network.num_features))


def checkpoint(args, device: torch.device, dtype: torch.dtype) -> Workload:
    """A diffusers pipeline from a hub id or local folder (``DiffusionPipeline.from_pretrained``)."""
    from diffusers import DiffusionPipeline

    pipe = with_shift(DiffusionPipeline.from_pretrained(args.model, dtype=dtype), args.shift).to(device)
    pipe.set_progress_bar_config(disable=True)
    accepted = inspect.signature(pipe.__call__).parameters
    if "prompt" in accepted:
        if not args.prompts:
            raise ValueError(f"{args.model} is text-to-image: pass --prompts FILE (one prompt per line)")
        conditions, key = load_prompts(args.prompts), "prompt"
    elif "class_labels" in accepted:
        conditions, key = list(range(args.num_classes)), "class_labels"
    else:
        raise ValueError(f"{type(pipe).__name__} takes neither `prompt` nor `class_labels`; the sweep cannot drive it")

    def draw(seeds, conds):
        kwargs = {key: conds, "generator": _generators(seeds), "num_inference_steps": args.steps,
                  "output_type": "np" if key == "class_labels" else "pt"}
        if args.guidance_scale is not None:
            kwargs["guidance_scale"] = args.guidance_scale
        if args.resolution and key == "prompt":
            kwargs["height"] = kwargs["width"] = args.resolution
        images = pipe(**kwargs).images
        if isinstance(images, np.ndarray):  # (N, H, W, 3) in [0, 1]
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        return images.float() * 2 - 1

    real_images = fid_metric = kid_metric = None
    if args.reference_dir:
        if args.feature_module:
            extractor = _feature_module(args.feature_module)
            fid_metric = functools.partial(metrics.feature_fid, extractor)
            kid_metric = functools.partial(metrics.feature_kid, extractor)
        else:
            metrics.inception_fid(args.inception_weights)  # fail early, before any image is drawn
            fid_metric = functools.partial(metrics.inception_fid, args.inception_weights)
            kid_metric = functools.partial(metrics.inception_kid, args.inception_weights)
        size = args.resolution or pipe.default_sample_size * getattr(pipe, "vae_scale_factor", 1)
        real_images = functools.partial(load_image_folder, args.reference_dir, size)  # n -> at most n images

    def score(images, conds):
        if key == "prompt" and args.clip_model:
            return {"clip_score": metrics.clip_score(args.clip_model, images, conds)}
        return {}

    return Workload(args.model, pipe, conditions, draw, real_images, fid_metric, score, kid_metric)
