"""``tofu-diffusion``: the evaluation's one command, one subcommand per job.

    tofu-diffusion demo                     # the three bundled generators' sweeps and results/index.html
    tofu-diffusion sweep --model tiny-dit   # quality against speed over methods and ratios
    tofu-diffusion SUBCOMMAND --help

Each subcommand is its module's ``main`` (``python -m tofu_diffusion.eval.<module>`` runs the same); a
module is imported only when its subcommand runs, so ``--help`` is quick.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from importlib import metadata

COMMANDS = {  # subcommand: (module, what it does)
    "demo": ("demo", "the main job: sweeps of the three bundled generators and results/index.html"),
    "sweep": ("sweep", "quality (FID, KID, class accuracy or CLIP score) against speed over methods and ratios"),
    "bench": ("bench", "denoiser time per step at real model geometries, beside the FLOP ideal and tomesd"),
    "classify": ("classify", "ViT/DeiT classifiers: accuracy against throughput"),
    "visualize": ("visualize", "which tokens merge where, drawn over a generated image"),
    "explain": ("explain", "what a configuration does in one pipeline call, step by step, before it runs"),
    "references": ("references", "edit pipelines: keep the reference image whole or reduce it too, measured"),
    "axis": ("axis", "does a reduced step's damage follow its noise level or its place among the steps"),
    "finetune": ("finetune", "a short fine-tune of a reduced classifier, accuracy before and after"),
    "unet-speed": ("unet_speed", "one minute: an SD-shaped UNet at 512 px, each method against the baseline"),
}
PROG = "tofu-diffusion"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} SUBCOMMAND [options]   ({PROG} SUBCOMMAND --help for its options)", "",
             "Token reduction (ToMe, ToFu, MCTF, ToDo) for diffusers pipelines and vision transformers:",
             "its evaluation and benchmarks.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


@contextlib.contextmanager
def _program_name(name: str):
    """The subcommand's argparse usage and errors read ``tofu-diffusion sweep``, not the module's name."""
    saved = sys.argv[0]
    sys.argv[0] = name
    try:
        yield
    finally:
        sys.argv[0] = saved


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"{PROG} {metadata.version('tofu-diffusion')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{PROG}: unknown subcommand {command!r}; choose one of: {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"tofu_diffusion.eval.{COMMANDS[command][0]}")
    with _program_name(f"{PROG} {command}"):
        module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
