"""Demo: wrap a small Stable Diffusion pipeline, print baseline vs reduced step time and output difference.

    tofu-diffusion unet-speed [--ratio 0.5] [--resolution 512] [--repeats 5]

The UNet is SD 1.x-shaped but narrow, with random weights (speed does not depend on weight values),
so the output difference says how far each method moves the result, not whether it looks good:
quality is the evaluation sweep's job, on trained models.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch

import tofu_diffusion as tofu
from tofu_diffusion.eval.timing import interleaved_median
from tofu_diffusion.eval.variants import tomesd, use_variant
from tofu_diffusion.pipelines.tiny import demo_sd_unet, prompt_embeds, sd_pipeline


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--resolution", type=int, default=512, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps for the image comparison")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    pipe = sd_pipeline(demo_sd_unet())
    unet = pipe.unet
    side = args.resolution // 8
    sample = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))  # CFG batch
    text = torch.cat([prompt_embeds(seed=2), prompt_embeds(seed=1)])
    timestep = torch.tensor(500)

    configs = {"baseline": None}
    for method in tofu.METHODS:
        configs[method] = tofu.TokenFusionConfig(method=method, ratio=args.ratio)
    if tomesd is not None:
        configs["tomesd 0.1.3"] = ("tomesd", args.ratio)

    image_side = side * pipe.vae_scale_factor  # the bundled tiny VAE downsamples less than SD's (x8)

    def image():
        return pipe(prompt_embeds=text[1:], negative_prompt_embeds=text[:1], num_inference_steps=args.steps,
                    height=image_side, width=image_side, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    setups = {name: functools.partial(use_variant, unet, config) for name, config in configs.items()}
    step = {name: (lambda: unet(sample, timestep, text)) for name in configs}
    print(f"SD-shaped UNet (random weights), {args.resolution}px ({side}x{side} latent), batch 2 (CFG), "
          f"ratio {args.ratio}, "
          f"{torch.get_num_threads()} threads; timing {args.repeats} interleaved repeats...")
    seconds = interleaved_median(step, setups, repeats=args.repeats)

    images = {}
    for name in configs:
        setups[name]()
        images[name] = image()
    setups["baseline"]()

    print(f"\n{'variant':<14}{'ms/step':>10}{'speedup':>10}{'PSNR vs baseline (dB)':>24}")
    for name in configs:
        print(f"{name:<14}{seconds[name] * 1000:>10.1f}{seconds['baseline'] / seconds[name]:>9.2f}x"
              f"{psnr(images[name], images['baseline']):>24.1f}")
    print("\nReduced by default: whole transformer blocks at the full-resolution level; tomesd reduces only "
          "their self-attention. See the README for options and the full-size benchmark (tofu-diffusion bench).")


if __name__ == "__main__":
    main()
