"""Tiny random-weight diffusers models and pipelines built from configs (no download): for the tests and the demo."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    QwenImageEditPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)

TEXT_DIM = 32


def sd_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.x layout: cross-attention at full latent resolution and at 1/2."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL layout: no attention at full resolution, micro-conditioning through text_time embeddings."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8,
    ).eval()


def sdxl_added_cond(batch: int) -> dict:
    return {"text_embeds": torch.randn(batch, TEXT_DIM), "time_ids": torch.randn(batch, 6)}


def dit_transformer(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline uses label 1000 as the null class
    ).eval()


def pixart_transformer(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        cross_attention_dim=16,
        sample_size=16,
        patch_size=2,
        caption_channels=TEXT_DIM,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()


def tiny_vae(seed: int = 0, shift_factor: float | None = None) -> AutoencoderKL:
    """A 2x-downsampling VAE; ``shift_factor=0.0`` for the flow pipelines (SD3, Flux, Chroma, Z-Image)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        shift_factor=shift_factor,
    ).eval()


def sd_pipeline(unet: UNet2DConditionModel | None = None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet or sd_unet(),
        scheduler=DDIMScheduler(num_train_timesteps=1000),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_pipeline() -> DiTPipeline:
    pipe = DiTPipeline(transformer=dit_transformer(), vae=tiny_vae(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline() -> PixArtAlphaPipeline:
    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(),
        transformer=pixart_transformer(),
        scheduler=DDIMScheduler(num_train_timesteps=1000),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_transformer(seed: int = 0, sd35: bool = True) -> SD3Transformer2DModel:
    """SD3 layout (joint attention, last block context_pre_only); ``sd35`` adds SD3.5's q/k RMS norm and an
    image-only second attention (``attn2``) in the first block."""
    torch.manual_seed(seed)
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35 else {}
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
                                 pooled_projection_dim=TEXT_DIM, out_channels=4, pos_embed_max_size=32, **extra).eval()


def sd3_pipeline(sd35: bool = True) -> StableDiffusion3Pipeline:
    """Text encoders None: call it with prompt_embeds / pooled_prompt_embeds (see ``sd3_prompt``)."""
    vae = tiny_vae(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=sd3_transformer(sd35=sd35), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_prompt(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g),
            "pooled_prompt_embeds": torch.randn(1, TEXT_DIM, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(1, TEXT_DIM, generator=g)}


def flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """Flux layout: double- then single-stream blocks, rotary positions over [text; image] ids."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                                  axes_dims_rope=(2, 2, 4)).eval()


def flux_pipeline() -> FluxPipeline:
    """Text encoders None: call it with prompt_embeds / pooled_prompt_embeds (see ``flux_prompt``)."""
    vae = tiny_vae(shift_factor=0.0)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=flux_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_kontext_pipeline() -> FluxKontextPipeline:
    """Flux.1 Kontext: ``flux_pipeline``'s components; the reference image's tokens follow the target's.
    Call it with ``max_area=height * width`` (its default resizes to about 1024x1024)."""
    parts = flux_pipeline().components
    pipe = FluxKontextPipeline(**{k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_prompt(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g),
            "pooled_prompt_embeds": torch.randn(1, TEXT_DIM, generator=g)}


def prompt_embeds(batch: int = 1, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def demo_sd_unet(seed: int = 0) -> UNet2DConditionModel:
    """An SD 1.x-shaped UNet, narrowed so that a 512px (64x64 latent) step takes well under a second on CPU."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,  # diffusers' legacy name: this UNet's number of heads
        norm_num_groups=32,
    ).eval()


_WORDS = ("a", "red", "blue", "green", "disc", "square", "triangle", "ring", "cross", "diamond", "on", "stripes")


def tiny_tokenizer(folder):
    """A CLIP BPE tokenizer over a dozen words, written to ``folder`` (no download)."""
    import json
    import os

    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    vocab.update({f"{w}</w>": i + 3 for i, w in enumerate(_WORDS)})
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), unk_token="<unk>",
                         model_max_length=77)


def _text_config() -> dict:
    return {"vocab_size": len(_WORDS) + 3, "hidden_size": TEXT_DIM, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}


def sd_pipeline_with_text(folder, seed: int = 0) -> StableDiffusionPipeline:
    """A tiny Stable Diffusion pipeline with its own tokenizer and CLIP text encoder, as a hub folder has."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    pipe = sd_pipeline()
    encoder = CLIPTextModel(CLIPTextConfig(**_text_config())).eval()
    pipe.register_modules(tokenizer=tiny_tokenizer(folder), text_encoder=encoder)
    return pipe


def save_tiny_clip(folder, seed: int = 0) -> None:
    """A tiny random CLIP model and processor saved in ``folder``, for CLIP-score plumbing."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
              "num_attention_heads": 4}
    CLIPModel(CLIPConfig(text_config=_text_config(), vision_config=vision, projection_dim=16)).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tiny_tokenizer(folder))
    processor.save_pretrained(folder)


def chroma_transformer(seed: int = 0) -> ChromaTransformer2DModel:
    """Chroma's layout: a double- and a single-stream block (the single one on the joint [text; image]
    sequence), rotary positions over [text; image] ids, per-layer modulation from the approximator."""
    torch.manual_seed(seed)
    return ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                    axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                    approximator_hidden_dim=16, approximator_layers=1).eval()


def chroma_pipeline() -> ChromaPipeline:
    """Text encoder None: call it with prompt embeddings and masks (see ``chroma_prompt``)."""
    vae = tiny_vae(shift_factor=0.0)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                          transformer=chroma_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chroma_prompt(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, 9)  # float, as ChromaPipeline's own text encoding returns it
    mask[:, 7:] = 0  # padded text: the mask over [text; image] must follow the reduction
    return {"prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g), "prompt_attention_mask": mask,
            "negative_prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g), "negative_prompt_attention_mask": mask}


def qwen_image_transformer(seed: int = 0) -> QwenImageTransformer2DModel:
    """Qwen-Image's layout: 2 dual-stream blocks, complex rotary (image, text) tables, packed 2x2 latent."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()


def qwen_image_pipeline() -> QwenImagePipeline:
    """Text encoder None: call it with prompt embeddings and masks (see ``qwen_image_prompt``)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=None,
                             tokenizer=None, transformer=qwen_image_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_image_controlnet_pipeline():
    """QwenImageControlNetPipeline: ``qwen_image_pipeline``'s components and a one-block ControlNet (call it with
    ``control_image``); it passes ``img_shapes`` flat, one ``(1, rows, cols)`` per sample."""
    from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline

    parts = qwen_image_pipeline().components
    torch.manual_seed(1)
    controlnet = QwenImageControlNetModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                          axes_dims_rope=(8, 4, 4)).eval()
    pipe = QwenImageControlNetPipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_image_prompt(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, 9, dtype=torch.long)
    return {"prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g), "prompt_embeds_mask": mask,
            "negative_prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g), "negative_prompt_embeds_mask": mask}


def flux2_transformer(seed: int = 0) -> Flux2Transformer2DModel:
    """Flux.2's layout: a double- and a single-stream block (the single one on the joint [text; image] sequence),
    4-axis rotary ids (image, row, col, layer), one modulation per sample shared by the blocks."""
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                   timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2)).eval()


def flux2_pipeline() -> Flux2Pipeline:
    """Text encoder None: call it with ``prompt_embeds`` (see ``flux2_prompt``); ``image=`` adds reference images
    (at least 64 px on each side, as Flux2Pipeline requires)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                             sample_size=32).eval()
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=flux2_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux2_prompt(seed: int = 1) -> dict:
    return {"prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=torch.Generator().manual_seed(seed))}


def qwen_image_edit_pipeline() -> QwenImageEditPipeline:
    """Qwen-Image-Edit: the reference image's tokens follow the target's (``img_shapes`` lists both). The pipeline
    resizes the reference to about 1024x1024, so its VAE downsamples 8x (4,096 reference tokens)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4)
    pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=None,
                                 tokenizer=None, processor=None, transformer=qwen_image_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def z_image_transformer(seed: int = 0) -> ZImageTransformer2DModel:
    """Z-Image's layout: refiners on the image and the caption apart, then main layers on the unified
    [image; caption] sequence (each padded to a multiple of 32), complex rotary over every token."""
    torch.manual_seed(seed)
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_DIM,
                                    axes_dims=[8, 12, 12], axes_lens=[256, 64, 64]).eval()


def z_image_pipeline() -> ZImagePipeline:
    """Text encoder None: call it with lists of prompt embeddings (see ``z_image_prompt``)."""
    vae = tiny_vae(shift_factor=0.0)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                          text_encoder=None, tokenizer=None, transformer=z_image_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def z_image_prompt(seed: int = 1) -> dict:
    """Captions of different lengths for the prompt and the negative: the unified sequence is padded per sample."""
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": [torch.randn(9, TEXT_DIM, generator=g)],
            "negative_prompt_embeds": [torch.randn(40, TEXT_DIM, generator=g)]}
