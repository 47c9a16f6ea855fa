"""Class-conditional generators of the procedural shapes, as diffusers pipelines.

Both work in pixel space and are trained with rectified flow (the model predicts the velocity
noise - image); both sample with diffusers' ``FlowMatchEulerDiscreteScheduler`` and classifier-free
guidance, where label ``num_classes`` means "no class".

``ShapesUNetPipeline`` (tiny-unet): a ``UNet2DConditionModel`` with self- and cross-attention at its
full resolution, conditioned through ``encoder_hidden_states``: each class is a few learned tokens
(``ClassTokens``), so the Stable Diffusion code path (cross-attention on text-like tokens) is
exercised. Its input is the image space-to-depth rearranged (2x2 pixel blocks become 12 channels,
``pixel_unshuffle``): an exact, parameter-free stand-in for Stable Diffusion's VAE that keeps
attention at 16x16 = 256 tokens.

``ShapesDiTPipeline`` (tiny-dit): a class-conditional ``DiTTransformer2DModel`` on the 32x32 RGB image,
patch 2 (256 tokens). diffusers' own ``DiTPipeline`` hard-codes ImageNet's null label 1000 and
epsilon/DDPM sampling, so it cannot drive a 6-class flow-matching model.

``ShapesMMDiTPipeline`` (tiny-mmdit): an ``SD3Transformer2DModel`` (joint attention over image and
"text" tokens) on the same 32x32 image, patch 2 (256 image tokens); each class is a few learned tokens
(``encoder_hidden_states``) and a learned pooled vector (``pooled_projections``), the two inputs SD3
takes from its text encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import (
    DiffusionPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import BaseOutput

from .shapes import CLASSES, FRAMES, IMAGE_SIZE

PATCH = 2  # tiny-unet: pixels per latent position along each side
# Strong guidance: the small generators follow their class far more often with it (measured 2 -> 5:
# 21% -> 44% class accuracy for tiny-dit early in training). A pipeline saves its own default
# (``default_guidance_scale`` in model_index.json): tiny-dit's is 8, tiny-mmdit's 16 (README, "The bundled
# models").
DEFAULT_GUIDANCE = 4.0


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 12, H/2, W/2)."""
    return F.pixel_unshuffle(images, PATCH)


def to_image(latents: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(latents, PATCH)


def to_video_latent(clips: torch.Tensor) -> torch.Tensor:
    """(N, F, 3, H, W) -> (N, 12, F, H/2, W/2): each frame space-to-depth, channels first as Wan takes them."""
    n, f = clips.shape[:2]
    return to_latent(clips.flatten(0, 1)).unflatten(0, (n, f)).transpose(1, 2)


def to_video(latents: torch.Tensor) -> torch.Tensor:
    n, f = latents.shape[0], latents.shape[2]
    return to_image(latents.transpose(1, 2).flatten(0, 1)).unflatten(0, (n, f))


class ClassTokens(ModelMixin, ConfigMixin):
    """Class label -> ``num_tokens`` learned tokens of width ``dim``; label ``num_classes`` is "no class".

    With ``pooled_dim`` > 0 each label also has a learned pooled vector (``pooled``), SD3's second input.
    With ``map_channels`` > 0 each label also has a learned vector of that many channels (``class_map``) that a
    pipeline concatenates to the latent on every position, as Wan's image-to-video concatenates its condition.
    """

    @register_to_config
    def __init__(self, num_classes: int = len(CLASSES), num_tokens: int = 4, dim: int = 64, pooled_dim: int = 0,
                 map_channels: int = 0):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_classes + 1, num_tokens * dim)
        torch.nn.init.normal_(self.embedding.weight, std=0.5)
        self.pooled_embedding = torch.nn.Embedding(num_classes + 1, pooled_dim) if pooled_dim else None
        if pooled_dim:
            torch.nn.init.normal_(self.pooled_embedding.weight, std=0.5)
        self.map_embedding = torch.nn.Embedding(num_classes + 1, map_channels) if map_channels else None
        if map_channels:
            torch.nn.init.normal_(self.map_embedding.weight, std=1.0)  # the latent's own scale

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return self.embedding(labels).view(labels.shape[0], cfg.num_tokens, cfg.dim)

    def pooled(self, labels: torch.Tensor) -> torch.Tensor:
        if self.pooled_embedding is None:
            raise ValueError("these class tokens have no pooled vector; build them with pooled_dim > 0")
        return self.pooled_embedding(labels)

    def class_map(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The labels' condition channels, broadcast over ``like``'s positions: (N, map_channels, *like[2:])."""
        if self.map_embedding is None:
            raise ValueError("these class tokens have no condition channels; build them with map_channels > 0")
        vectors = self.map_embedding(labels).to(like.dtype)
        return vectors.view(*vectors.shape, *[1] * (like.dim() - 2)).expand(-1, -1, *like.shape[2:])


def shapes_unet(token_dim: int = 64, image_size: int = IMAGE_SIZE) -> UNet2DConditionModel:
    """tiny-unet's layout; ``image_size=64`` gives the 1,024-token generator (tiny-unet-64: its top attention
    level is 32x32), the same weights shapes either way (a UNet has no position table)."""
    return UNet2DConditionModel(
        sample_size=image_size // PATCH,
        in_channels=3 * PATCH * PATCH,
        out_channels=3 * PATCH * PATCH,
        layers_per_block=1,
        block_out_channels=(48, 96, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=token_dim,
        attention_head_dim=2,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def shapes_dit(image_size: int = IMAGE_SIZE) -> DiTTransformer2DModel:
    """tiny-dit's layout; ``image_size=64`` gives the 1,024-token generator (tiny-dit-64), patch 2 either way."""
    return DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=3,
        out_channels=3,
        num_layers=4,
        sample_size=image_size,
        patch_size=2,
        num_embeds_ada_norm=len(CLASSES),  # the label embedding adds the null class at index len(CLASSES)
    )


def shapes_mmdit(token_dim: int = 64) -> SD3Transformer2DModel:
    """SD3's layout at tiny-dit's size: 4 joint blocks of width 128, patch 2 on the 32x32 image."""
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=token_dim,
        caption_projection_dim=128,
        pooled_projection_dim=token_dim,
        pos_embed_max_size=IMAGE_SIZE // 2,
    )


def shapes_wan(token_dim: int = 64, class_channels: int = 0, space_to_depth: bool = False) -> WanTransformer3DModel:
    """Wan 2.1's layout, tiny: 4 blocks of width 128 (self-attention with 3-D rotary, cross-attention on the
    class tokens), patch (1, 2, 2) on the RGB frames: 8 frames x 16 x 16 = 2,048 video tokens, each token 2x2
    pixels as tiny-dit's. Two heads of 64: a head's rotary table then has 10 frequencies per spatial axis
    (4 heads of 32 leave 5, of which only two turn measurably across a frame).

    ``space_to_depth=True`` is the first tiny-wan's layout: patch (1, 2, 2) on the space-to-depth clip (8 x 8 x 8
    = 512 tokens of 4x4 pixels each, 4 heads of 32, ffn 256); it never drew a recognisable frame
    (docs/measurements.md). ``class_channels`` > 0 widens the input by that many condition channels (the class,
    on every position), the way Wan's image-to-video models take their condition.
    """
    packed = 3 * PATCH * PATCH if space_to_depth else 3
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4 if space_to_depth else 2,
        attention_head_dim=32 if space_to_depth else 64,
        in_channels=packed + class_channels,
        out_channels=packed,
        text_dim=token_dim,
        freq_dim=64,
        ffn_dim=256 if space_to_depth else 512,
        num_layers=4,
        rope_max_seq_len=64,
    )


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)


class _ShapesPipeline(DiffusionPipeline):
    """The sampling loop the generators share; subclasses say how to call their denoiser."""

    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def null_class(self) -> int:
        raise NotImplementedError

    def _register(self, default_guidance_scale: float, **modules) -> None:
        """Register the components and the guidance a call without ``guidance_scale`` uses (saved with them)."""
        self.register_modules(**modules)
        self.register_to_config(default_guidance_scale=float(default_guidance_scale))

    def latent_shape(self) -> tuple[int, int, int]:
        config = self.denoiser.config
        return (config.in_channels, config.sample_size, config.sample_size)

    @property
    def image_size(self) -> int:
        """The side of the images it draws (32; 64 for tiny-dit-64)."""
        return self.denoiser.config.sample_size

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent position along each side (diffusers' pipelines name it so; no VAE here: 1)."""
        return 1

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def check_labels(self, class_labels) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.null_class:
            raise ValueError(f"class labels must lie in [0, {self.null_class}) ({', '.join(CLASSES)}); "
                             f"got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: Optional[float] = None,
        generator: Optional[torch.Generator | list[torch.Generator]] = None,
        output_type: str = "pt",
    ) -> ImagePipelineOutput:
        """Images for ``class_labels``, (N, 3, S, S) in [-1, 1] (``output_type="pt"``) or PIL (S: 32; tiny-dit-64: 64).

        ``guidance_scale`` None: the pipeline's ``default_guidance_scale`` (saved with it).

        ``generator`` may be a list with one generator per image: each image's noise then depends only
        on its own seed, so the same seed gives the same image whatever the batch it is drawn in.
        """
        if guidance_scale is None:
            guidance_scale = self.config.get("default_guidance_scale", DEFAULT_GUIDANCE)
        device, dtype = self.denoiser.device, self.denoiser.dtype
        labels = self.check_labels(class_labels).to(device)
        n = labels.shape[0]
        x = self.prepare_latents(n, generator, device, dtype)
        both = torch.cat([torch.full_like(labels, self.null_class), labels])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            uncond, cond = self.velocity(torch.cat([x, x]), t.expand(2 * n), both).chunk(2)
            x = self.scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
        return self.output(self.decode(x).float().clamp(-1, 1), output_type)

    def prepare_latents(self, n: int, generator, device, dtype) -> torch.Tensor:
        """The starting noise of ``n`` images (as diffusers' pipelines name it: token fusion reads the batch
        here to know that the denoiser's doubled batch is a guidance pair)."""
        shape = self.latent_shape()
        # Noise drawn on CPU: the same seed gives the same images on any device.
        if isinstance(generator, list):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images; pass one per image or a single one")
            x = torch.stack([torch.randn(shape, generator=g) for g in generator])
        else:
            x = torch.randn(n, *shape, generator=generator)
        return x.to(device, dtype)

    def output(self, images: torch.Tensor, output_type: str):
        if output_type == "pil":
            images = self.numpy_to_pil(((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
        return ImagePipelineOutput(images=images)


class ShapesUNetPipeline(_ShapesPipeline):
    model_cpu_offload_seq = "class_tokens->unet"

    def __init__(self, unet: UNet2DConditionModel, class_tokens: ClassTokens,
                 scheduler: FlowMatchEulerDiscreteScheduler, default_guidance_scale: float = DEFAULT_GUIDANCE):
        super().__init__()
        self._register(default_guidance_scale, unet=unet, class_tokens=class_tokens, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def null_class(self) -> int:
        return self.class_tokens.config.num_classes

    def velocity(self, x, t, labels):
        return self.unet(x, t, self.class_tokens(labels).to(x.dtype)).sample

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * PATCH

    @property
    def vae_scale_factor(self) -> int:
        return PATCH  # the space-to-depth stand-in for a VAE

    def decode(self, latents):
        return to_image(latents)


class ShapesDiTPipeline(_ShapesPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 default_guidance_scale: float = DEFAULT_GUIDANCE):
        super().__init__()
        self._register(default_guidance_scale, transformer=transformer, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def null_class(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    def velocity(self, x, t, labels):
        return self.transformer(x, timestep=t, class_labels=labels).sample


class ShapesMMDiTPipeline(_ShapesPipeline):
    model_cpu_offload_seq = "class_tokens->transformer"

    def __init__(self, transformer: SD3Transformer2DModel, class_tokens: ClassTokens,
                 scheduler: FlowMatchEulerDiscreteScheduler, default_guidance_scale: float = DEFAULT_GUIDANCE):
        super().__init__()
        self._register(default_guidance_scale, transformer=transformer, class_tokens=class_tokens, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def null_class(self) -> int:
        return self.class_tokens.config.num_classes

    def velocity(self, x, t, labels):
        tokens, pooled = self.class_tokens(labels).to(x.dtype), self.class_tokens.pooled(labels).to(x.dtype)
        return self.transformer(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                                timestep=t).sample


@dataclass
class ShapesVideoOutput(BaseOutput):
    """``frames``: (N, F, 3, H, W) in [-1, 1]."""

    frames: torch.Tensor


class ShapesWanPipeline(_ShapesPipeline):
    """tiny-wan: moving shapes from a ``WanTransformer3DModel``; returns ``.frames`` (N, F, 3, 32, 32)."""

    model_cpu_offload_seq = "class_tokens->transformer"

    def __init__(self, transformer: WanTransformer3DModel, class_tokens: ClassTokens,
                 scheduler: FlowMatchEulerDiscreteScheduler, default_guidance_scale: float = DEFAULT_GUIDANCE,
                 num_frames: int = FRAMES):
        super().__init__()
        self._register(default_guidance_scale, transformer=transformer, class_tokens=class_tokens, scheduler=scheduler)
        self.register_to_config(num_frames=int(num_frames))

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def null_class(self) -> int:
        return self.class_tokens.config.num_classes

    @property
    def image_size(self) -> int:
        return IMAGE_SIZE

    @property
    def vae_scale_factor_spatial(self) -> int:
        """Pixels per latent position: 2 for the space-to-depth layout (12 channels, tiny-unet's stand-in for a
        VAE), 1 for RGB frames."""
        return PATCH if self.transformer.config.out_channels == 3 * PATCH * PATCH else 1

    @property
    def vae_scale_factor_temporal(self) -> int:
        return 1  # frames are not compressed

    def latent_shape(self) -> tuple[int, ...]:
        side = IMAGE_SIZE // self.vae_scale_factor_spatial
        return (self.transformer.config.out_channels, self.config.num_frames, side, side)

    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips (N, F, 3, H, W) -> the transformer's latent (N, C, F, H', W'), the inverse of ``decode``."""
        if self.vae_scale_factor_spatial == 1:
            return clips.transpose(1, 2)
        return to_video_latent(clips)

    def velocity(self, x, t, labels):
        if self.class_tokens.config.get("map_channels", 0):  # the class also on every position (I2V-style)
            x = torch.cat([x, self.class_tokens.class_map(labels, x)], dim=1)
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=self.class_tokens(labels).to(x.dtype)
                                ).sample

    def decode(self, latents):
        return latents.transpose(1, 2) if self.vae_scale_factor_spatial == 1 else to_video(latents)

    def output(self, frames: torch.Tensor, output_type: str):
        if output_type != "pt":
            raise ValueError("ShapesWanPipeline returns tensors only (output_type='pt')")
        return ShapesVideoOutput(frames=frames)
