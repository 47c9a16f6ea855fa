"""Named defaults: what ``apply`` does with the levers a user left unset, per model family.

A preset fills ``method``, the ratio ``schedule`` over denoising progress, the reduced ``blocks``, the
``unmerge_mode`` and ``plan_reuse_steps`` only where the user gave none of them; an explicit ``ratio`` or
``schedule`` is always used as given, planned every step and unmerged by copying unless asked otherwise (see
``TokenFusionConfig.resolve``). The figures behind
each choice are in docs/measurements.md (the sweeps on the bundled tiny-unet, tiny-dit and tiny-mmdit).

Why these shapes: the layout of an image forms in the first denoising steps and reducing tokens there
changes what is drawn; late steps refine detail that neighbouring tokens share, so they take a high
ratio at little cost. Sparing a DiT's first and last blocks (``blocks=slice(1, -1)``) also helps, but
at equal speed less than reducing fewer steps, so the presets reduce every eligible block.
"""

from __future__ import annotations

# family -> options; "unet": SD 1.x/2.x and SDXL UNets; "dit": DiT and PixArt; "sd3": SD3 / SD3.5 (measured
# on the bundled tiny-mmdit); "vit": classifiers. A family without an entry takes FALLBACK's.
PRESETS: dict[str, dict[str, dict]] = {
    # Faster with no visible loss: reduction only once the layout is set, then the highest ratio.
    # On the exploration sweeps the trajectory dominated the block choice at equal speed: on tiny-dit,
    # tome 0.75 in the last 30% of steps on every block beat 0.75 in the last 50% on the middle blocks.
    # A DiT reduces every block, so it is more sensitive than a UNet (which reduces one level): on the
    # better-trained tiny-dit only the last 20% of steps stayed within noise of the baseline. On tiny-unet,
    # starting at 0.3 instead of 0.4 bought 1.24x against 1.17x with FID still within noise (README).
    # Joint attention (tiny-mmdit) ranked the schedules as the DiT did, so SD3 takes the DiT's schedules.
    # Since 2026-12-03 the schedules unmerge "cached" (each merged token keeps its own offset from its group,
    # learnt at the last unreduced step): under SD3's shift 3 at 28 steps, 0.75 from 0.6 of the steps kept
    # tiny-mmdit's class accuracy (79.2% against 79.2%; copying: 68.8%) and tiny-dit's within 4.2 points, where
    # copying had to wait until 0.8 (5 of 28 steps, 1.1x) to stay within noise (docs/measurements.md).
    # The UNet plans every other step: at its 256-4,096 tokens a plan (matching, destinations, offsets) is a
    # large share of a reduced block's time, and consecutive steps' plans are alike (tiny-unet, 96 seeds: 74.0%
    # against 71.9% planning every step, 76.0% unreduced, at 50 steps; 70.8% both at 20; docs/measurements.md).
    "quality": {
        "unet": {"method": "tome", "schedule": ((0.0, 0.0), (0.3, 0.75)), "unmerge_mode": "cached",
                 "plan_reuse_steps": 2},
        "dit": {"method": "tome", "schedule": ((0.0, 0.0), (0.6, 0.75)), "unmerge_mode": "cached"},
        # (0.5 from 0.6, then 0.75 from 0.7 was a little kinder at 8 steps - 82.3% against 79.2%, baseline
        # 84.4%, 192 images - but timed 1.17x at 28 steps under shift 3: below the 1.2x this default promises.)
        "sd3": {"method": "tome", "schedule": ((0.0, 0.0), (0.6, 0.75)), "unmerge_mode": "cached"},
        # Video transformers take the DiT's schedule, measured on the bundled tiny-wan-2048 (24 clips, 2,048 tokens
        # each; FID floor 1.10): 0.75 from 0.6 with the cached unmerge kept FID within noise (20.27 against the
        # baseline's 19.69) and class accuracy (24.5% / 24.0%) where copying from 0.8 was already past it (22.63)
        # and from 0.65 far past (26.71). The stored updates are gigabytes at full size, so the cache has a
        # limit (unmerge_cache_gb; a tenth of the device's memory): past it a call unmerges by copying.
        "video": {"method": "tome", "schedule": ((0.0, 0.0), (0.6, 0.75)), "unmerge_mode": "cached"},
        # Classifiers: the share of each layer's tokens merged (MCTF's ratio form), measured on tiny-vit (2,000
        # held-out images): 0.1 is the largest within 1 point (87.35% -> 86.90%); at ViT-S/16 it leaves 1.77x
        # fewer FLOPs (ToMe's r=13 territory) and timed 1.56x on CPU.
        "vit": {"method": "tome", "ratio": 0.1},
    },
    # More speed for a small, measurable loss.
    "balanced": {
        "unet": {"method": "tome", "schedule": ((0.0, 0.0), (0.2, 0.75)), "unmerge_mode": "cached",
                 "plan_reuse_steps": 2},
        "dit": {"method": "tome", "schedule": ((0.0, 0.0), (0.5, 0.75)), "unmerge_mode": "cached"},
        "sd3": {"method": "tome", "schedule": ((0.0, 0.0), (0.5, 0.75)), "unmerge_mode": "cached"},
        "video": {"method": "tome", "schedule": ((0.0, 0.0), (0.5, 0.75)), "unmerge_mode": "cached"},  # FID +2.2
        "vit": {"method": "tome", "ratio": 0.15},  # tiny-vit -4.4 points; ViT-S/16 1.90x on CPU
    },
    # The most speed: the highest ratio the 2x2 stride allows at every step.
    "fast": {
        "unet": {"method": "tome", "ratio": 0.75},
        "dit": {"method": "tome", "ratio": 0.75},
        "sd3": {"method": "tome", "ratio": 0.75},
        # 0.5 (every layer's bipartite maximum) kept 26% on tiny-vit: 0.25 keeps 73% for 2.7x on ViT-S/16
        "vit": {"method": "tome", "ratio": 0.25},
    },
    # The count follows the content and the resolution: a token merges only when its best match has cosine
    # similarity above 0.8, at most 0.75 of them. On the 1,024-token tiny-unet-64 it was on the speed/FID
    # Pareto front beside "fast" (1.36x, FID 1.28 against the baseline's 1.11, floor 0.99) and removed 62% of
    # the tokens there but 48% at 256 tokens (docs/measurements.md). Denoisers only: a classifier has no
    # threshold.
    "adaptive": {
        "unet": {"method": "tome", "threshold": 0.8},
        "dit": {"method": "tome", "threshold": 0.8},
        "sd3": {"method": "tome", "threshold": 0.8},
    },
}

# Presets made for diffusion denoisers only (no classifier entry): refused on a classifier.
DENOISER_PRESETS = ("adaptive",)


# Method parameters whose best value differs between classifiers and denoisers (None in the config).
METHOD_DEFAULTS: dict[str, dict] = {
    "vit": {"tau_info": 20.0},
    "unet": {"tau_info": 0.0},
    "dit": {"tau_info": 0.0},
}


# Flux.1/.2, Chroma, Qwen-Image and Z-Image are joint attention like SD3, with no bundled model of their own to
# measure; the video transformers take the "video" entries where a preset has them; anything else a DiT's.
FALLBACK = {"flux": "sd3", "flux2": "sd3", "chroma": "sd3", "qwen_image": "sd3", "z_image": "sd3",
            "wan": "video", "ltx": "video", "cogvideox": "video", "hunyuan_video": "video", "hunyuan_video15": "video"}


def preset_options(name: str, family: str) -> dict:
    """The options of preset ``name`` for a model ``family`` (through ``FALLBACK``, then "dit")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {tuple(PRESETS)}")
    options = PRESETS[name]
    if family == "vit" and family not in options:
        raise ValueError(f"preset {name!r} is for diffusion denoisers (a similarity threshold); classifiers take "
                         f"{', '.join(repr(n) for n, o in PRESETS.items() if 'vit' in o)}")
    key = family if family in options else FALLBACK.get(family, "dit")
    return dict(options[key if key in options else "dit"])


def method_defaults(family: str) -> dict:
    """The method parameters of a model ``family`` (classifiers and denoisers differ; others take a DiT's)."""
    return dict(METHOD_DEFAULTS.get(family, METHOD_DEFAULTS.get(FALLBACK.get(family, "dit"), METHOD_DEFAULTS["dit"])))
