"""What a configuration will do in one call of a pipeline, before it runs: ``tofu.explain`` from the shell.

    tofu-diffusion explain --model tiny-mmdit --steps 28 --shift 3
    tofu-diffusion explain --model PATH_OR_ID --steps 28 --height 1024 --width 1024 --preset fast

Per step the schedule's ratio, the reduced blocks' token counts and the share of the blocks' multiply-adds
saved; then the whole call's. Only the pipeline's configs are read and nothing is drawn, so a checkpoint's
weights are loaded but never run.
"""

from __future__ import annotations

import argparse

import tofu_diffusion as tofu
from tofu_diffusion.eval.workloads import with_shift


def parse_args(argv=None) -> argparse.Namespace:
    from tofu_diffusion.pipelines import EMBEDDED_GENERATORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-dit",
                   help=f"a bundled generator ({', '.join(EMBEDDED_GENERATORS)}), a folder saved from one, or a "
                        "diffusers pipeline (hub id or local folder)")
    p.add_argument("--steps", type=int, default=28, help="num_inference_steps of the call")
    p.add_argument("--shift", type=float, default=None, help="sample with this timestep shift (flow schedulers)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    p.add_argument("--mu", type=float, default=None, help="a dynamically shifting scheduler's mu")
    p.add_argument("--preset", default=None, choices=list(tofu.PRESETS), help="default: the library's default")
    p.add_argument("--method", default=None, choices=tofu.METHODS)
    p.add_argument("--ratio", type=float, default=None, help="one ratio at every step (no schedule)")
    return p.parse_args(argv)


def load_pipeline(name_or_path: str):
    from tofu_diffusion.pipelines import load_embedded, shapes_pipeline_class

    if shapes_pipeline_class(name_or_path) is not None:
        return load_embedded(name_or_path)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(name_or_path)


def main(argv=None) -> tofu.Explanation:
    args = parse_args(argv)
    options = {key: value for key, value in (("preset", args.preset), ("method", args.method),
                                             ("ratio", args.ratio)) if value is not None}
    pipe = with_shift(load_pipeline(args.model), args.shift)
    explanation = tofu.explain(pipe, num_inference_steps=args.steps, height=args.height, width=args.width,
                               mu=args.mu, **options)
    print(explanation)
    return explanation


if __name__ == "__main__":
    main()
