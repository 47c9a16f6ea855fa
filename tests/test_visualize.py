"""The merge-group picture: the handle's last plans on every family, and the drawing."""

import pytest
import torch
from conftest import DENOISERS, denoiser_inputs, run_denoiser

import tofu_diffusion as tofu
from tofu_diffusion.eval import visualize
from tofu_diffusion.pipelines.train_shapes import build_pipeline


@pytest.mark.parametrize("kind", list(DENOISERS))
def test_last_plans_cover_every_token_of_the_grid(kind):
    model = DENOISERS[kind]()
    args, kwargs = denoiser_inputs(kind)
    with tofu.fused(model, method="tome", ratio=0.5) as handle:
        run_denoiser(model, args, kwargs)
        plans = handle.last_plans()
    assert set(plans) == {b.name for b in handle.blocks}
    for plan, (rows, cols) in plans.values():
        assert plan.assignment.shape == (args[0].shape[0], rows * cols)
        assert plan.num_kept == rows * cols - int(0.5 * rows * cols)
        assert int(plan.group_count.sum(dim=1).unique()) == rows * cols


def test_group_colours_paint_each_group_its_mean_colour():
    from tofu_diffusion.core import plan_from_pairs

    # 2x2 grid: token 1 merges into token 0, tokens 2 and 3 stay alone
    plan = plan_from_pairs(4, torch.tensor([[1]]), torch.tensor([[0]]))
    image = torch.tensor([[[0.0, 1.0], [0.2, 0.4]]]).expand(3, 2, 2)
    picture = visualize.group_colours(image, plan, (2, 2), 0)
    assert torch.allclose(picture[0, 0], torch.full((3,), 0.5)) and torch.allclose(picture[0, 1], torch.full((3,), 0.5))
    assert torch.allclose(picture[1, 0], torch.full((3,), 0.2)) and torch.allclose(picture[1, 1], torch.full((3,), 0.4))
    assert visualize.group_borders(plan, (2, 2), 0).tolist() == [[True, True], [False, False]]


@pytest.mark.slow
def test_visualize_writes_the_picture_for_a_dit(tmp_path):
    folder = tmp_path / "dit"
    torch.manual_seed(0)
    build_pipeline("dit").save_pretrained(folder)
    out = tmp_path / "groups.png"
    visualize.main(["--model", str(folder), "--method", "mctf", "--ratio", "0.5", "--step", "1", "--steps", "3",
                    "--out", str(out)])
    assert out.stat().st_size > 5000
    with pytest.raises(SystemExit):  # a step the generation never reaches
        visualize.parse_args(["--step", "5", "--steps", "3"])
