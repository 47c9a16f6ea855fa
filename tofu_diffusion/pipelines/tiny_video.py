"""Tiny random-weight video transformers and pipelines built from configs (no download), for the tests."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    ClassifierFreeGuidance,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
)

from .tiny import TEXT_DIM


def wan_transformer(seed: int = 0, image_dim: int | None = None) -> WanTransformer3DModel:
    """Wan 2.1's layout: 2 blocks, 3-D rotary self-attention, cross-attention to the text, patch (1, 2, 2)."""
    torch.manual_seed(seed)
    extra = {"image_dim": image_dim, "added_kv_proj_dim": 16} if image_dim else {}
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32, **extra).eval()


def wan_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4).eval()


def wan_pipeline(two_stages: bool = False) -> WanPipeline:
    """Text encoder None: call it with prompt_embeds (``wan_prompt``). ``two_stages``: Wan 2.2 A14B's layout, a
    second transformer for the low-noise steps (``boundary_ratio`` 0.5)."""
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=wan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(
        shift=3.0), transformer=wan_transformer(), transformer_2=wan_transformer(seed=1) if two_stages else None,
        boundary_ratio=0.5 if two_stages else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_prompt(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g)}


def ltx_transformer(seed: int = 0) -> LTXVideoTransformer3DModel:
    """LTX-Video's layout: 2 blocks, rotary self-attention over (frames, rows, cols), cross-attention, patch 1."""
    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                      num_layers=2, caption_channels=TEXT_DIM).eval()


def ltx_vae(seed: int = 0) -> AutoencoderKLLTXVideo:
    torch.manual_seed(seed)
    return AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()


def ltx_pipeline() -> LTXPipeline:
    """Text encoder None: call it with prompt embeddings and masks (``ltx_prompt``)."""
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=ltx_vae(), text_encoder=None, tokenizer=None,
                       transformer=ltx_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ltx_prompt(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, 9, dtype=torch.long)
    return {"prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g), "prompt_attention_mask": mask,
            "negative_prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g), "negative_prompt_attention_mask": mask}


COGVIDEOX_TEXT = 16  # the text length its positional embedding is built for


def cogvideox_transformer(seed: int = 0, rotary: bool = True, patch_size_t: int | None = None):
    """CogVideoX's layout: 2 joint [text; video] blocks, patch 2; ``rotary`` as the 5B models (video-only
    rotary table), else the 2B's sin-cos positions; ``patch_size_t=2`` as 1.5."""
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=COGVIDEOX_TEXT,
        use_rotary_positional_embeddings=rotary, use_learned_positional_embeddings=False).eval()


def cogvideox_vae(seed: int = 0) -> AutoencoderKLCogVideoX:
    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                  up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                  latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                  temporal_compression_ratio=4).eval()


def cogvideox_pipeline(rotary: bool = True) -> CogVideoXPipeline:
    """Text encoder None: call it with prompt embeddings (``cogvideox_prompt``)."""
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=cogvideox_vae(),
                             transformer=cogvideox_transformer(rotary=rotary), scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogvideox_prompt(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(1, COGVIDEOX_TEXT, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(1, COGVIDEOX_TEXT, TEXT_DIM, generator=g)}


def hunyuan_video_transformer(seed: int = 0) -> HunyuanVideoTransformer3DModel:
    """HunyuanVideo's layout: a dual- and a single-stream block, [video; text] joint attention under a mask,
    rotary over (frames, rows, cols), patch 1, embedded guidance."""
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                          patch_size_t=1, guidance_embeds=True, text_embed_dim=TEXT_DIM,
                                          pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()


def hunyuan_video_vae(seed: int = 0) -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True).eval()


def hunyuan_video_pipeline() -> HunyuanVideoPipeline:
    """Text encoders None: call it with prompt embeddings (``hunyuan_video_prompt``)."""
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=hunyuan_video_transformer(),
                                vae=hunyuan_video_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_video_prompt(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, 9, dtype=torch.long)
    mask[:, 7:] = 0  # padded text: the mask over [video; text] must follow the reduction
    return {"prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g), "prompt_attention_mask": mask,
            "pooled_prompt_embeds": torch.randn(1, 8, generator=g)}


def hunyuan_video15_transformer(seed: int = 0) -> HunyuanVideo15Transformer3DModel:
    """HunyuanVideo 1.5's layout: dual-stream blocks only, [video; text] joint attention under a text-only mask,
    rotary over (frames, rows, cols), patch 1, the input latent + condition latent + mask on channels (4 + 4 + 1)."""
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                            num_layers=2, num_refiner_layers=1, text_embed_dim=TEXT_DIM,
                                            text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 4, 4),
                                            target_size=64, task_type="t2v").eval()


def hunyuan_video15_pipeline() -> HunyuanVideo15Pipeline:
    """Text encoders None: call it with prompt embeddings (``hunyuan_video15_prompt``); CFG through its guider, one
    denoiser call per condition."""
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1).eval()
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=hunyuan_video15_transformer(),
                                  vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None,
                                  tokenizer_2=None, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_video15_prompt(seed: int = 1) -> dict:
    """The MLLM's and byT5's embeddings and masks for a prompt and its negative (padded: the mask must follow)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix in ("", "negative_"):
        mask = torch.ones(1, 9, dtype=torch.long)
        mask[:, 7:] = 0
        out.update({f"{prefix}prompt_embeds": torch.randn(1, 9, TEXT_DIM, generator=g),
                    f"{prefix}prompt_embeds_mask": mask,
                    f"{prefix}prompt_embeds_2": torch.randn(1, 5, 8, generator=g),
                    f"{prefix}prompt_embeds_mask_2": torch.ones(1, 5, dtype=torch.long)})
    return out
