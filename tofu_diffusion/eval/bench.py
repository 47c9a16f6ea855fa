"""Benchmark: denoiser time per step against the baseline, tomesd and the ideal (FLOP ratio).

    tofu-diffusion bench [--models sd15 pixart dit sdxl sd3 flux] [--ratios 0.1 0.5] [--methods tome tofu mctf]
                         [--scopes sublayers block] [--batch 2] [--dtype float32] [--device cpu]
                         [--depth 4] [--width 768]

Full-size architectures from their published configs, random weights (speed does not depend on weight
values). Variants run interleaved (baseline, A, B, ..., baseline, A, B, ...) after a warm-up; the table
gives the median, the speedup over the baseline of the same run, the ideal speedup (baseline FLOPs over
reduced FLOPs, planning excluded, counted with torch.utils.flop_counter), achieved/ideal, and the share
of the step spent planning (matching), merging and unmerging (torch.profiler, one extra pass).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import statistics
import types
from dataclasses import dataclass
from datetime import date
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

import tofu_diffusion as tofu
from tofu_diffusion.adapters import planning as _planning
from tofu_diffusion.eval import report
from tofu_diffusion.eval.compiled import compiled_variants
from tofu_diffusion.eval.flops import count_flops
from tofu_diffusion.eval.timing import interleaved_times, speedup_interval, speedups_of, with_baseline_again
from tofu_diffusion.eval.variants import Variant, tomesd, use_variant


@dataclass
class Workload:
    name: str
    build: Callable[..., torch.nn.Module]  # (depth[, width]) -> model
    inputs: Callable[[int, int, torch.dtype, torch.device], tuple[tuple, dict]]  # (batch, resolution, ...)
    resolution: int
    full_depth: int
    tomesd: bool
    scheduler: Optional[Callable[[], object]] = None  # the real pipeline's scheduler, for --trajectory
    scheduler_note: str = ""
    frames: int = 0  # video: frames of the clip (``--frames``); inputs then take frames=
    width_px: int = 0  # video: the frame's width in pixels (``resolution`` is its height); 0 = square


def _sd35_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # stable-diffusion-3.5-medium scheduler/scheduler_config.json


def _flux_dev_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev scheduler/scheduler_config.json: mu from the image size
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)


def _sd15(depth):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )


def _sdxl(depth):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def _pixart(depth):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(  # PixArt-alpha/PixArt-XL-2-1024-MS transformer/config.json
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=depth,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )


def _dit(depth):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(  # facebook/DiT-XL-2-256 transformer/config.json
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=depth,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
    )


def _sd3(depth, width=None):
    from diffusers import SD3Transformer2DModel

    width = width or 1536
    return SD3Transformer2DModel(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json (width 1536)
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=depth, attention_head_dim=64,
        num_attention_heads=width // 64, joint_attention_dim=4096, caption_projection_dim=width,
        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
    )


def _sd3_inputs(batch, resolution, dtype, device):
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    x = torch.randn(batch, 16, side, side, generator=g).to(device, dtype)
    text = torch.randn(batch, 333, 4096, generator=g).to(device, dtype)  # 77 CLIP + 256 T5 tokens
    pooled = torch.randn(batch, 2048, generator=g).to(device, dtype)
    return (x,), {"encoder_hidden_states": text, "pooled_projections": pooled,
                  "timestep": torch.full((batch,), 500.0, device=device)}


def _flux(depth, width=None):
    from diffusers import FluxTransformer2DModel

    width = width or 3072
    double = max(1, round(depth * 19 / 57))  # FLUX.1: 19 double-stream and 38 single-stream blocks
    return FluxTransformer2DModel(  # black-forest-labs/FLUX.1-dev transformer/config.json (width 3072)
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=depth - double, attention_head_dim=128,
        num_attention_heads=width // 128, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=False, axes_dims_rope=(16, 56, 56),
    )


def _grid_ids(side: int, axes: int) -> torch.Tensor:
    """Row-major (side * side, axes) position ids, the row in axis 1 and the column in axis 2 (Flux's layout)."""
    ids = torch.zeros(side, side, axes)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    return ids.reshape(-1, axes)


def _flux_inputs(batch, resolution, dtype, device):
    g = torch.Generator().manual_seed(0)
    side = resolution // 16  # the 2x2-packed latent of an 8x VAE
    ids = _grid_ids(side, 3)
    return (torch.randn(batch, side * side, 64, generator=g).to(device, dtype),), {
        "encoder_hidden_states": torch.randn(batch, 512, 4096, generator=g).to(device, dtype),  # 512 T5 tokens
        "pooled_projections": torch.randn(batch, 768, generator=g).to(device, dtype),
        "timestep": torch.full((batch,), 0.5, device=device), "img_ids": ids.to(device),
        "txt_ids": torch.zeros(512, 3, device=device),
    }


def _flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.2-dev scheduler/scheduler_config.json; Flux2Pipeline passes its empirical mu (size and steps)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096,
                                           time_shift_type="exponential")


def _flux2(depth, width=None):
    from diffusers import Flux2Transformer2DModel

    width = width or 6144
    double = max(1, round(depth * 8 / 56))  # FLUX.2-dev: 8 double-stream and 48 single-stream blocks
    return Flux2Transformer2DModel(  # black-forest-labs/FLUX.2-dev transformer/config.json (width 6144)
        patch_size=1, in_channels=128, num_layers=double, num_single_layers=depth - double, attention_head_dim=128,
        num_attention_heads=width // 128, joint_attention_dim=15360, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=True)


def _flux2_inputs(batch, resolution, dtype, device):
    g = torch.Generator().manual_seed(0)
    side = resolution // 16  # the 2x2-packed latent of Flux.2's 8x VAE
    ids = _grid_ids(side, 4)
    text_ids = torch.zeros(512, 4)
    text_ids[:, 3] = torch.arange(512)
    return (torch.randn(batch, side * side, 128, generator=g).to(device, dtype),), {
        "encoder_hidden_states": torch.randn(batch, 512, 15360, generator=g).to(device, dtype),  # 512 Mistral tokens
        "timestep": torch.full((batch,), 0.5, device=device), "guidance": torch.full((batch,), 4.0, device=device),
        "img_ids": ids[None].expand(batch, -1, -1).to(device),
        "txt_ids": text_ids[None].expand(batch, -1, -1).to(device),
    }


def _qwen_image_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image scheduler/scheduler_config.json
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")


def _qwen_image(depth, width=None):
    from diffusers import QwenImageTransformer2DModel

    width = width or 3072
    return QwenImageTransformer2DModel(  # Qwen/Qwen-Image transformer/config.json (width 3072)
        patch_size=2, in_channels=64, out_channels=16, num_layers=depth, attention_head_dim=128,
        num_attention_heads=width // 128, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))


def _qwen_image_inputs(batch, resolution, dtype, device):
    g = torch.Generator().manual_seed(0)
    side = resolution // 16
    return (torch.randn(batch, side * side, 64, generator=g).to(device, dtype),), {
        "encoder_hidden_states": torch.randn(batch, 256, 3584, generator=g).to(device, dtype),  # 256 Qwen2.5-VL tokens
        "encoder_hidden_states_mask": torch.ones(batch, 256, dtype=torch.long, device=device),
        "timestep": torch.full((batch,), 0.5, device=device), "img_shapes": [[(1, side, side)]] * batch,
    }


def _wan(depth, width=None):
    from diffusers import WanTransformer3DModel

    width = width or 1536
    return WanTransformer3DModel(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (width 1536)
        patch_size=(1, 2, 2), num_attention_heads=width // 128, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=depth, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)


def _video_latent(batch, height, width, frames, channels, g):
    """A Wan / HunyuanVideo VAE's latent: 8x in space, 4x in time (plus the first frame)."""
    return torch.randn(batch, channels, (frames - 1) // 4 + 1, height // 8, width // 8, generator=g)


def _wan_inputs(batch, resolution, dtype, device, frames=17, width_px=832):
    g = torch.Generator().manual_seed(0)
    x = _video_latent(batch, resolution, width_px, frames, 16, g)
    return (x.to(device, dtype),), {"encoder_hidden_states": torch.randn(batch, 512, 4096, generator=g).to(
        device, dtype), "timestep": torch.full((batch,), 500.0, device=device)}  # 512 umT5 tokens


def _hunyuan_video(depth, width=None):
    from diffusers import HunyuanVideoTransformer3DModel

    width = width or 3072
    double = max(1, round(depth * 20 / 60))  # HunyuanVideo: 20 dual-stream and 40 single-stream blocks
    return HunyuanVideoTransformer3DModel(  # hunyuanvideo-community/HunyuanVideo transformer/config.json
        in_channels=16, out_channels=16, num_attention_heads=width // 128, attention_head_dim=128,
        num_layers=double, num_single_layers=depth - double, num_refiner_layers=2, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56))


def _hunyuan_video_inputs(batch, resolution, dtype, device, frames=5, width_px=1280):
    g = torch.Generator().manual_seed(0)
    x = _video_latent(batch, resolution, width_px, frames, 16, g)
    return (x.to(device, dtype),), {
        "encoder_hidden_states": torch.randn(batch, 256, 4096, generator=g).to(device, dtype),  # 256 Llama tokens
        "encoder_attention_mask": torch.ones(batch, 256, device=device),
        "pooled_projections": torch.randn(batch, 768, generator=g).to(device, dtype),
        "guidance": torch.full((batch,), 6000.0, device=device), "timestep": torch.full((batch,), 500.0, device=device)}


def _wan_scheduler():
    from diffusers import UniPCMultistepScheduler

    # Wan2.1 480p: UniPC with flow_shift 3.0 (5.0 at 720p), as the model card's example sets it
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                   num_train_timesteps=1000)


def _unet_inputs(text_dim, text_len, added=False):
    def make(batch, resolution, dtype, device):
        g = torch.Generator().manual_seed(0)
        side = resolution // 8
        x = torch.randn(batch, 4, side, side, generator=g)
        e = torch.randn(batch, text_len, text_dim, generator=g)
        kwargs = {}
        if added:
            ids = [[resolution, resolution, 0, 0, resolution, resolution]] * batch
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
                                           "time_ids": torch.tensor(ids, dtype=dtype, device=device)}
        return (x.to(device, dtype), torch.tensor(500, device=device), e.to(device, dtype)), kwargs
    return make


def _transformer_inputs(text_dim=None):
    def make(batch, resolution, dtype, device):
        g = torch.Generator().manual_seed(0)
        side = resolution // 8
        x = torch.randn(batch, 4, side, side, generator=g).to(device, dtype)
        t = torch.full((batch,), 500, device=device)
        if text_dim is None:
            return (x,), {"timestep": t, "class_labels": torch.zeros(batch, dtype=torch.long, device=device)}
        e = torch.randn(batch, 120, text_dim, generator=g).to(device, dtype)
        return (x,), {"encoder_hidden_states": e, "timestep": t,
                      "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return make


WORKLOADS = {
    "sd15": Workload("SD1.5 UNet", _sd15, _unet_inputs(768, 77), 512, 0, True),
    "sdxl": Workload("SDXL UNet", _sdxl, _unet_inputs(2048, 77, added=True), 1024, 0, True),
    "pixart": Workload("PixArt-alpha", _pixart, _transformer_inputs(4096), 1024, 28, False),
    "dit": Workload("DiT-XL/2", _dit, _transformer_inputs(), 256, 28, True),
    "sd3": Workload("SD3.5-M", _sd3, _sd3_inputs, 1024, 24, False, _sd35_scheduler, "shift 3"),
    "flux": Workload("FLUX.1", _flux, _flux_inputs, 1024, 57, False, _flux_dev_scheduler,
                     "dynamic shift, mu from size"),
    "flux2": Workload("FLUX.2-dev", _flux2, _flux2_inputs, 1024, 56, False, _flux2_scheduler,
                      "dynamic shift, Flux.2's empirical mu"),
    "qwen_image": Workload("Qwen-Image", _qwen_image, _qwen_image_inputs, 1024, 60, False, _qwen_image_scheduler,
                           "dynamic shift, mu from size, shift_terminal 0.02"),
    "wan": Workload("Wan2.1-1.3B", _wan, _wan_inputs, 480, 30, False, _wan_scheduler, "UniPC, flow shift 3",
                    frames=17, width_px=832),
    "hunyuan_video": Workload("HunyuanVideo", _hunyuan_video, _hunyuan_video_inputs, 720, 60, False, None, "",
                              frames=5, width_px=1280),
}


def _count_flops(fn) -> int:
    """FLOPs of one call, without the planning (matching) work: that is the reducer's overhead."""
    original = _planning.BlockState._compute_plan

    def unplanned(self, *a, **k):
        with _disable_current_modes():
            return original(self, *a, **k)

    _planning.BlockState._compute_plan = unplanned
    try:
        return count_flops(fn)
    finally:
        _planning.BlockState._compute_plan = original


OVERHEAD_PARTS = ("plan", "merge", "unmerge")


def _overhead_shares(fn, device: torch.device | str = "cpu") -> dict[str, float]:
    """The shares of one call's time spent planning, merging and unmerging (the ``tofu_diffusion::*`` ranges).

    On CUDA the shares are of device time: the kernels each range launched, timed on the GPU by the
    profiler (CUPTI), over all kernels of the call. Host time there would measure launches, which return
    before the work is done, and make the reducer's parts look cheap or dear by how many kernels they queue.
    """
    on_device = torch.device(device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_device:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if on_device:
            torch.cuda.synchronize()
    return shares_of(prof.key_averages(), on_device)


def shares_of(events, on_device: bool) -> dict[str, float]:
    """Each ``tofu_diffusion::<part>`` range's total time over the call's: device time or host time."""
    total_key, self_key = ("device_time_total", "self_device_time_total") if on_device else \
        ("cpu_time_total", "self_cpu_time_total")
    total = sum(getattr(e, self_key) for e in events)
    return {part: sum(getattr(e, total_key) for e in events if e.key == f"tofu_diffusion::{part}") / max(total, 1)
            for part in OVERHEAD_PARTS}


def _geometry(spec: Workload, resolution: int, args) -> str:
    if not spec.frames:
        return f"{resolution}px"
    return f"{resolution}x{spec.width_px}px, {args.frames or spec.frames} frames"


def _tokens(model) -> Optional[int]:
    """Tokens per reduced block in the latest call (the first block's), for the table."""
    handle = tofu.handle_of(model)
    counts = handle.token_counts() if handle is not None else {}
    return next(iter(counts.values()))[0] if counts else None


def _build(spec: Workload, args):
    """(model, depth, resolution, positional inputs, keyword inputs, device) of a workload as the args ask."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    depth = args.depth if (spec.full_depth and args.depth) else spec.full_depth
    resolution = args.resolution or spec.resolution
    torch.manual_seed(0)
    model = (spec.build(depth, args.width) if args.width else spec.build(depth)).to(device, dtype).eval()
    video = {"frames": args.frames or spec.frames, "width_px": spec.width_px} if spec.frames else {}
    call_args, call_kwargs = spec.inputs(args.batch, resolution, dtype, device, **video)
    return model, depth, resolution, call_args, call_kwargs, device


def run_workload(key: str, args) -> list[dict]:
    spec = WORKLOADS[key]
    model, depth, resolution, call_args, call_kwargs, device = _build(spec, args)

    clock = iter(range(999, -1_000_000, -1))

    def step():
        # Falling timesteps, as in a sampling loop, so plan reuse across steps engages.
        t = torch.tensor(next(clock) % 1000, device=device)
        if "timestep" in call_kwargs:
            kwargs = {**call_kwargs, "timestep": t.expand(args.batch)}
            return model(*call_args, **kwargs)
        return model(call_args[0], t, *call_args[2:], **call_kwargs)

    variants: dict[str, dict] = {"baseline": {"method": "baseline", "ratio": 0.0, "scope": "-"}}
    for ratio in args.ratios:
        for method in args.methods:
            for scope in args.scopes:
                for reuse in args.plan_reuse:
                    suffix = f" reuse={reuse}" if reuse > 1 else ""
                    variants[f"{method} {scope} r={ratio}{suffix}"] = {
                        "method": method, "ratio": ratio, "scope": scope, "plan_reuse_steps": reuse}
        if tomesd is not None and spec.tomesd and not args.no_tomesd:
            variants[f"tomesd r={ratio}"] = {"method": "tomesd 0.1.3", "ratio": ratio, "scope": "attn1"}

    def config_of(v: dict) -> Variant:
        if v["method"] == "baseline":
            return None
        if v["method"] == "tomesd 0.1.3":
            return ("tomesd", v["ratio"])
        return tofu.TokenFusionConfig(method=v["method"], ratio=v["ratio"], merge_scope=v["scope"],
                                      plan_reuse_steps=v["plan_reuse_steps"], max_downsample=args.max_downsample)

    setups = {name: functools.partial(use_variant, model, config_of(v)) for name, v in variants.items()}
    cut = spec.full_depth and depth != spec.full_depth
    depth_note = f", depth cut to {depth} of {spec.full_depth} blocks" if cut else ""
    depth_note += f", width {args.width}" if args.width else ""
    print(f"\n{spec.name} @ {_geometry(spec, resolution, args)}, batch {args.batch}, {args.dtype}, {args.device}"
          f"{depth_note}: "
          f"{len(variants)} variants x {args.repeats} interleaved repeats", flush=True)
    # Each timed (and profiled) sample is `steps` consecutive denoising steps, so a plan can be reused
    # inside it; times are reported per step.
    steps = max(args.plan_reuse)

    def sample():
        for _ in range(steps):
            step()

    with torch.no_grad():
        if args.flops_only:
            seconds = {name: float("nan") for name in variants}
            speedups = {name: {"speedup": float("nan"), "speedup_low": None, "speedup_high": None}
                        for name in variants}
        else:
            rounds = interleaved_times(*with_baseline_again({n: sample for n in variants}, setups),
                                       repeats=args.repeats, warmup=args.warmup, device=device)
            seconds = {name: statistics.median(rounds[name]) / steps for name in variants}
            speedups = speedups_of(rounds)
        rows = []
        base_flops = None
        for name, v in variants.items():
            setups[name]()
            flops = _count_flops(step)
            base_flops = flops if name == "baseline" else base_flops
            timed = v["method"] not in ("baseline", "tomesd 0.1.3") and not args.flops_only
            shares = _overhead_shares(sample, device) if timed else {}
            speedup = speedups[name]["speedup"]
            ideal = base_flops / flops
            rows.append({
                "model": spec.name, "resolution": resolution, "depth": depth or None, "width": args.width,
                "frames": (args.frames or spec.frames) or None, "tokens": _tokens(model),
                "batch": args.batch,
                "dtype": args.dtype, "device": args.device, "variant": name, **v,
                "ms_per_step": seconds[name] * 1000, **speedups[name], "ideal_speedup": ideal,
                "achieved_over_ideal": speedup / ideal if ideal > 1.0001 else None,
                "share_plan": shares.get("plan"), "share_merge": shares.get("merge"),
                "share_unmerge": shares.get("unmerge"),
            })
        setups["baseline"]()
    return rows


def trajectory_rows(key: str, args) -> list[dict]:
    """The default's speedup over a whole call of ``args.steps`` steps under the model's real scheduler.

    ``tofu.explain`` gives each step's ratio under that scheduler; one step at each ratio the call uses is
    timed interleaved with the unreduced step, and the call's time is the sum over its steps. tome 0.5 at
    every step is timed beside it. The interval is the spread of the interleaved rounds' ratios.
    """
    spec = WORKLOADS[key]
    if spec.scheduler is None:
        raise ValueError(f"--trajectory: no real scheduler is recorded for {key}; choose from "
                         f"{[k for k, w in WORKLOADS.items() if w.scheduler]}")
    model, depth, resolution, call_args, call_kwargs, device = _build(spec, args)
    plan = tofu.explain(model, num_inference_steps=args.steps, height=resolution, width=resolution,
                        scheduler=spec.scheduler())
    default = plan.config
    per_step = [s.ratio for s in plan.steps]

    def step(net=model):
        return net(*call_args, **call_kwargs)

    setups = {name: functools.partial(use_variant, model, config) for name, config in
              (("baseline", None), ("tome 0.5", tofu.TokenFusionConfig(method="tome", ratio=0.5)))}
    steps = {name: step for name in setups}
    # An unmerge that learns offsets at the unreduced steps costs work in every reduced step and a stored update
    # in every unreduced one: such a step is timed as [the first step; that step] and the first step's time
    # taken off (the pair is one run: the second call finds the first call's updates).
    cached = default.unmerge_mode == "cached"
    for ratio in sorted({r for r in per_step if r > 0}):
        name = f"default at {ratio:g}"
        if cached:
            setups[name], steps[name] = _cached_step_pair(model, spec, default, plan, ratio, call_args, call_kwargs)
        else:
            config = tofu.TokenFusionConfig(method=default.method, ratio=ratio, blocks=default.blocks,
                                            stride=default.stride)
            setups[name], steps[name] = functools.partial(use_variant, model, config), step
    compiled = f", compiled ({args.compile}, against the compiled baseline)" if args.compile else ""
    print(f"\n{spec.name} @ {resolution}px: {args.steps}-step call ({spec.scheduler_note}), default "
          f"{plan.reduced_steps} steps reduced{compiled}", flush=True)
    with torch.no_grad():
        timed, timed_setups = (compiled_variants(model, steps, setups, args.compile) if args.compile else
                               (steps, setups))
        times = interleaved_times(timed, timed_setups, repeats=args.repeats, warmup=args.warmup, device=device)
        flops = {}
        for name in steps:
            setups[name]()
            flops[name] = _count_flops(steps[name])
        use_variant(model, None)
    if cached:  # the reduced step alone: the pair less its unreduced first step, round by round
        for name in times:
            if name.startswith("default at"):
                times[name] = [pair - base for pair, base in zip(times[name], times["baseline"])]
                flops[name] -= flops["baseline"]

    def call_of(series: dict) -> list[float]:  # the call's time in each round: its steps at their ratios
        return [sum(series[r][i] for r in per_step) for i in range(args.repeats)]

    base = times["baseline"]
    by_ratio = {0.0: base, **{float(n.split()[-1]): t for n, t in times.items() if n.startswith("default at")}}
    default_call = call_of(by_ratio)
    base_call = [b * len(per_step) for b in base]
    ideal = flops["baseline"] * len(per_step) / sum(flops["baseline"] if r == 0 else flops[f"default at {r:g}"]
                                                    for r in per_step)
    rows = []
    common = {"model": spec.name, "resolution": resolution, "depth": depth or None, "width": args.width,
              "batch": args.batch, "dtype": args.dtype, "device": args.device, "steps": args.steps,
              "scheduler": spec.scheduler_note, "compile": args.compile}
    for name, call, ideal_speedup, reduced in (
            ("default, whole call", default_call, ideal, plan.reduced_steps),
            ("tome 0.5 every step", [t * len(per_step) for t in times["tome 0.5"]],
             flops["baseline"] / flops["tome 0.5"], len(per_step))):
        speedup, low, high = speedup_interval(base_call, call)
        rows.append({**common, "variant": name, "reduced_steps": reduced, "ms_per_call": statistics.median(call) * 1000,
                     "speedup": speedup, "speedup_low": low, "speedup_high": high, "ideal_speedup": ideal_speedup})
    return rows


def _cached_step_pair(model, spec, default, plan, ratio: float, call_args: tuple, call_kwargs: dict):
    """(setup, step) that run the call's first step (unreduced: it stores the updates) and then its first step
    at ``ratio`` (which unmerges with them), read from the call's real timesteps by a scheduler given to apply."""
    from tofu_diffusion.adapters import adapter_for

    adapter = adapter_for(model)
    first = next(s for s in plan.steps if s.ratio == ratio)
    scheduler = spec.scheduler()
    scheduler.timesteps = torch.tensor([s.timestep for s in plan.steps])
    config = tofu.TokenFusionConfig(method=default.method, schedule=((0.0, 0.0), (first.progress, ratio)),
                                    blocks=default.blocks, stride=default.stride, unmerge_mode="cached")
    signature = inspect.signature(model.forward)

    def at(timestep: float):
        bound = signature.bind_partial(*call_args, **call_kwargs)
        value = bound.arguments[adapter.timestep_argument]
        bound.arguments[adapter.timestep_argument] = torch.full_like(value, timestep * adapter.timestep_unit)
        return bound.args, bound.kwargs

    calls = [at(plan.steps[0].timestep), at(first.timestep)]

    def setup():
        use_variant(model, None)
        tofu.apply(model, config, scheduler=scheduler)

    def pair(net=model):
        for args, kwargs in calls:
            out = net(*args, **kwargs)
        return out

    return setup, pair


def explain_full_size(key: str, args) -> str:
    """``tofu.explain`` of the default on the full-size model under its real scheduler."""
    spec = WORKLOADS[key]
    if spec.scheduler is None:
        raise ValueError(f"--explain: no real scheduler is recorded for {key}")
    with torch.device("meta"):  # geometry only: no weights are allocated
        model = spec.build(spec.full_depth, args.width) if args.width else spec.build(spec.full_depth)
    height = args.resolution or spec.resolution
    width = spec.width_px or height
    video = {"num_frames": args.frames or spec.frames} if spec.frames else {}
    # a pipeline's view (its scheduler and VAE factors): a video VAE compresses time too, as _video_latent does
    pipeline = types.SimpleNamespace(transformer=model, scheduler=spec.scheduler(), vae_scale_factor=8,
                                     vae_scale_factor_temporal=4 if spec.frames else 1)
    plan = tofu.explain(pipeline, num_inference_steps=args.steps, height=height, width=width, **video)
    clip = f", {video['num_frames']} frames" if video else ""
    return f"{spec.name} at {width}x{height}{clip} ({spec.scheduler_note}):\n{plan}"


def print_trajectory(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['model']:<10}{r['variant']:<24}{r['reduced_steps']:>3}/{r['steps']} steps  "
              f"{r['speedup']:.2f}x ({r['speedup_low']:.2f}-{r['speedup_high']:.2f}), ideal {r['ideal_speedup']:.2f}x")


def _fmt(value, pattern):
    return "-" if value is None else pattern.format(value)


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':<14}{'variant':<34}{'ms/step':>10}{'speedup (low-high)':>21}{'ideal':>8}{'ach/ideal':>10}"
              f"{'plan%':>7}{'merge%':>7}{'unm%':>6}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        shares = [_fmt(r[k] and 100 * r[k], "{:.1f}") for k in ("share_plan", "share_merge", "share_unmerge")]
        print(f"{r['model']:<14}{r['variant']:<34}{r['ms_per_step']:>10.0f}{report.format_speedup(r):>21}"
              f"{r['ideal_speedup']:>7.2f}x{_fmt(r['achieved_over_ideal'], '{:.2f}'):>10}"
              f"{shares[0]:>7}{shares[1]:>7}{shares[2]:>6}")


def markdown_table(rows: list[dict]) -> str:
    """The rows as the README's markdown table."""
    lines = ["| model | variant | ms/step | speedup | ideal | achieved/ideal | plan % | merge % | unmerge % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shares = [_fmt(r[k] and 100 * r[k], "{:.1f}") for k in ("share_plan", "share_merge", "share_unmerge")]
        lines.append(f"| {r['model']} | {r['variant']} | {r['ms_per_step']:.0f} | {report.format_speedup(r)} | "
                     f"{r['ideal_speedup']:.2f}x | {_fmt(r['achieved_over_ideal'], '{:.2f}')} | {' | '.join(shares)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "pixart"], choices=sorted(WORKLOADS))
    parser.add_argument("--resolution", type=int, default=None, help="pixels (video: the frame's height); default "
                        "per model")
    parser.add_argument("--frames", type=int, default=None, help="video models: frames of the clip (default: "
                        "17 for Wan, 5 for HunyuanVideo on a CPU)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.5])
    parser.add_argument("--methods", nargs="+", default=["tome"], choices=list(tofu.METHODS))
    parser.add_argument("--scopes", nargs="+", default=["sublayers", "block"], choices=["sublayers", "block"])
    parser.add_argument("--plan-reuse", nargs="+", type=int, default=[1],
                        help="plan every K denoising steps (1 = every step); one variant per value")
    parser.add_argument("--max-downsample", type=int, default=None, help="UNet levels to reduce (default: highest-res)")
    parser.add_argument("--batch", type=int, default=2, help="2 = classifier-free guidance")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depth", type=int, default=None,
                        help="transformer blocks of PixArt/DiT (default: 4 on CPU, full depth on GPU)")
    parser.add_argument("--width", type=int, default=None,
                        help="sd3 / flux: the transformer width (sd3: heads x 64, default 1536; flux: heads x 128, "
                             "default 3072)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-tomesd", action="store_true")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs (the ideal) without timing")
    parser.add_argument("--trajectory", action="store_true",
                        help="sd3 / flux: the default's speedup over a whole --steps call under the real scheduler")
    parser.add_argument("--steps", type=int, default=28, help="--trajectory / --explain: steps of the call")
    parser.add_argument("--compile", choices=["whole", "regional"], default=None,
                        help="--trajectory: time every variant (the baseline too) compiled with inductor, fullgraph: "
                             "the whole denoiser or its repeated blocks (compile_repeated_blocks); warm-up excluded")
    parser.add_argument("--explain", action="store_true",
                        help="print tofu.explain for the default at full size (model built on the meta device: "
                             "no memory, nothing timed)")
    parser.add_argument("--out", default="results/bench.json")
    parser.add_argument("--render", metavar="JSON", help="print an earlier run's results as a markdown table")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(markdown_table(json.load(f)["rows"]))
        return
    if args.depth is None and args.device == "cpu":
        args.depth = 4  # per-block cost is what matters; the table says when depth was cut
    if args.explain:
        for key in args.models:
            print(explain_full_size(key, args) + "\n")
        return
    rows = []
    for key in args.models:
        if args.trajectory:
            rows += trajectory_rows(key, args)
            print_trajectory(rows[-2:])
            continue
        rows += run_workload(key, args)
        print_table([r for r in rows if r["model"] == WORKLOADS[key].name])
    (print_trajectory if args.trajectory else print_table)(rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
