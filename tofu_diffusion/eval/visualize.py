"""Which tokens were merged together: a colour per group over the image, for each reduced block.

    tofu-diffusion visualize --model tiny-unet --method tome --ratio 0.5 --step 10 --out groups.png

The picture ToMe's authors show: it tells at a glance what a ratio merges (flat background first, then
edges). It draws one image (``--condition``: a class index for the bundled models and class-conditional
checkpoints, a prompt for text-to-image ones) with reduction on, records the merge plans of denoising
step ``--step`` through the public handle (``handle.last_plans()``), and writes the final image beside
one panel per reduced block. Works on every family the library patches; ``todo`` merges nothing and is
refused.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from types import SimpleNamespace

import torch

import tofu_diffusion as tofu


def parse_args(argv=None) -> argparse.Namespace:
    from tofu_diffusion.pipelines import EMBEDDED_GENERATORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-unet",
                   help=f"{', '.join(EMBEDDED_GENERATORS)} (bundled), or a diffusers pipeline id / folder")
    p.add_argument("--method", default="tome", choices=[m for m in tofu.METHODS if m != "todo"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--step", type=int, default=10, help="denoising step whose plans are drawn (0 = first)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the generation")
    p.add_argument("--condition", default="0", help="class index, or a prompt for text-to-image checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-blocks", type=int, default=8, help="panels drawn (the first reduced blocks)")
    p.add_argument("--out", default="groups.png")
    args = p.parse_args(argv)
    if not 0 <= args.step < args.steps:
        p.error(f"--step must be in [0, {args.steps}) (--steps {args.steps})")
    return args


def group_colours(image: torch.Tensor, plan, grid: tuple[int, int], item: int) -> torch.Tensor:
    """(rows, cols, 3) picture in which every token shows the mean colour of its group (ToMe's figure):
    merged regions become flat patches of one colour, tokens that stand alone keep their own."""
    rows, cols = grid
    tokens = torch.nn.functional.adaptive_avg_pool2d(image.float()[None], grid)[0].flatten(1).T  # (N, 3)
    assign = plan.assignment[item].cpu()
    sums = torch.zeros(plan.num_kept, 3).index_add_(0, assign, tokens)
    counts = torch.zeros(plan.num_kept).index_add_(0, assign, torch.ones(assign.numel()))
    return (sums / counts[:, None])[assign].view(rows, cols, 3)


def group_borders(plan, grid: tuple[int, int], item: int) -> torch.Tensor:
    """(rows, cols) bool: tokens that belong to a group of more than one."""
    assign = plan.assignment[item].cpu()
    return (plan.group_count[item].cpu()[assign] > 1).view(*grid)


def record_plans(handle, denoiser: torch.nn.Module, step: int) -> tuple[dict, callable]:
    """Copy ``handle.last_plans()`` right after the denoiser's ``step``-th call (one call per step)."""
    seen, calls = {}, [0]

    def after(module, args, output):
        if calls[0] == step:
            seen.update(handle.last_plans())
        calls[0] += 1

    hook = denoiser.register_forward_hook(after)
    return seen, hook.remove


def draw(image: torch.Tensor, plans: dict, item: int, path: str, max_blocks: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, plan, grid) for name, (plan, grid) in plans.items() if plan is not None][:max_blocks]
    if not panels:
        raise ValueError("no block merged anything at that step (ratio too low for the blocks' token counts?)")
    image = (image.float().clamp(-1, 1) + 1) / 2
    picture = image.permute(1, 2, 0).cpu().numpy()
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.9))
    axes[0].imshow(picture, interpolation="nearest")
    axes[0].set_title("image", fontsize=8)
    for ax, (name, plan, grid) in zip(axes[1:], panels):
        ax.imshow(group_colours(image.cpu(), plan, grid, item).numpy(), interpolation="nearest")
        # Outline the merged tokens, so that a group whose members look alike still shows.
        ax.contour(group_borders(plan, grid, item).float().numpy(), levels=[0.5], colors="white", linewidths=0.6)
        kept, total = plan.num_kept, plan.num_tokens
        ax.set_title(f"{name}\n{total} -> {kept} tokens", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def load(args):
    """(pipeline, draw(seed) -> image in [-1, 1]) for a bundled model or a checkpoint."""
    from tofu_diffusion.eval import workloads
    from tofu_diffusion.pipelines import shapes_pipeline_class

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shapes_pipeline_class(args.model) is not None:
        work = workloads.embedded(args.model, device, args.steps)
        condition = int(args.condition)
    else:
        prompts = os.path.join(tempfile.mkdtemp(), "prompt.txt")
        with open(prompts, "w") as f:
            f.write(args.condition + "\n")
        options = SimpleNamespace(model=args.model, prompts=prompts, steps=args.steps, guidance_scale=None,
                                  resolution=None, reference_dir=None, num_classes=1000)
        work = workloads.checkpoint(options, device, torch.float32)
        condition = work.conditions[0] if isinstance(work.conditions[0], str) else int(args.condition)
    return work, lambda seed: work.draw([seed], [condition])[0]


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    work, generate = load(args)
    denoiser = work.denoiser
    handle = tofu.apply(work.pipe, method=args.method, ratio=args.ratio)
    plans, stop = record_plans(handle, denoiser, args.step)
    try:
        image = generate(args.seed)
    finally:
        stop()
        tofu.remove(work.pipe)
    if not plans:
        raise ValueError(f"the denoiser ran fewer than {args.step + 1} times; lower --step")
    batch = next(plan.batch_size for plan, _ in plans.values() if plan is not None)
    item = batch // 2 if batch > 1 else 0  # with classifier-free guidance the conditional half comes second
    title = f"{args.model}: {args.method} ratio {args.ratio:g}, step {args.step} of {args.steps}"
    draw(image, plans, item, args.out, args.max_blocks, title)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
