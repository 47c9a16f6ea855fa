"""The sweep end to end on a small shapes pipeline: outputs, seeds, and two processes equal to one."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.eval import sweep, workloads
from tofu_diffusion.pipelines.train_shapes import build_pipeline

pytestmark = pytest.mark.slow  # trainings, sweeps and the shipped models: minutes in all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num-images", "6", "--batch-size", "3", "--steps", "2", "--repeats", "1", "--num-reference", "32"]


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """A randomly initialised tiny-unet saved in diffusers' folder format (the sweep loads it by path)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-unet")
    build_pipeline("unet").save_pretrained(folder)
    return str(folder)


def test_sweep_writes_the_table_json_csv_plot_and_grids(unet_folder, tmp_path, capsys):
    out = tmp_path / "results"
    result = sweep.main(["--model", unet_folder, "--methods", "tome", "mctf", "--ratios", "0", "0.5",
                         "--out", str(out), *SMALL])
    rows = result["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("none", 0.0), ("tome", 0.5), ("mctf", 0.5)]
    base = rows[0]
    assert base["speedup"] == 1.0 and base["psnr"] == 100.0 and base["ssim"] == pytest.approx(1.0)
    # every speedup carries the spread of its interleaved rounds (one round here: low = high); the baseline's
    # is its second timing in the round against its first, both ways, so it contains 1
    assert all(0 < r["speedup_low"] <= r["speedup"] <= r["speedup_high"] for r in rows)
    assert all(r["samples"] == f"samples_{r['method']}_{r['ratio']:g}" + ".png" for r in rows)
    for row in rows[1:]:  # reduction changes the images, so fidelity drops below identical
        assert row["psnr"] < 100.0 and row["ssim"] < 1.0
        assert row["clip_score"] is None and 0.0 <= row["class_accuracy"] <= 1.0
        assert row["seconds_per_image"] > 0 and row["peak_memory_mb"] > 0
    assert result["noise_floor_fid"] > 0 and all(r["fid"] > 0 for r in rows)

    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == unet_folder and saved["rows"] == rows
    assert set(saved) >= {"model", "noise_floor_fid", "rows"}
    assert set(rows[0]) >= {"method", "ratio", "seconds_per_image", "speedup", "fid", "clip_score",
                            "class_accuracy", "psnr", "ssim", "peak_memory_mb"}
    with open(out / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["none", "tome", "mctf"]
    for name in ("quality_vs_speed.png", "samples_none_0.png", "samples_tome_0.5.png", "samples_mctf_0.5.png"):
        assert (out / name).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "noise floor" in printed and "mctf" in printed


def test_a_video_sweep_scores_frames_and_motion(tmp_path):
    """tiny-wan's layout (randomly initialised): frames scored as images, plus the two temporal measures."""
    torch.manual_seed(0)
    build_pipeline("wan").save_pretrained(tmp_path / "wan")
    out = tmp_path / "results"
    result = sweep.main(["--model", str(tmp_path / "wan"), "--methods", "tome", "--ratios", "0", "0.5",
                         "--out", str(out), "--num-images", "3", "--batch-size", "3", "--steps", "2",
                         "--repeats", "1", "--num-reference", "48"])
    base, reduced = result["rows"]
    assert base["temporal_error"] == 0 and base["psnr"] == 100.0
    assert reduced["temporal_error"] > 0 and reduced["psnr"] < 100.0
    frames = 3 * 8  # class accuracy counts every frame of the three clips
    assert reduced["class_accuracy"] * frames == pytest.approx(round(reduced["class_accuracy"] * frames))
    assert base["fid"] > 0 and result["noise_floor_fid"] > 0
    with open(out / "results.csv") as f:
        assert {"temporal_error", "trajectory_error"} <= set(next(csv.DictReader(f)))
    # the grid shows each clip as a row of its 8 frames (32 px enlarged 3x, 2 px borders)
    from PIL import Image

    assert Image.open(out / "samples_none_0.png").size == (8 * 34 * 3, 3 * 34 * 3)


def test_an_image_is_the_same_whatever_the_batch(unet_folder):
    work = workloads.embedded(unet_folder, torch.device("cpu"), steps=2, guidance_scale=2.0)
    indices = [0, 1, 2, 3, 4]

    class Bar:
        def update(self, n):
            pass

    one_by_one = dict(sweep.draw_images(work, indices, seed=0, batch_size=1, bar=Bar()))
    batched = dict(sweep.draw_images(work, indices, seed=0, batch_size=5, bar=Bar()))
    for i in indices:  # uint8 images: at most one level of rounding apart
        assert (one_by_one[i].int() - batched[i].int()).abs().max() <= 1
    assert not torch.equal(one_by_one[0], one_by_one[1])  # different seeds, different images


def test_bad_sweep_arguments_are_refused():
    with pytest.raises(SystemExit):
        sweep.parse_args(["--ratios", "0", "1.0"])
    with pytest.raises(ValueError, match="neither a bundled model"):
        workloads.embedded("no-such-model", torch.device("cpu"), steps=2, guidance_scale=2.0)


def test_two_processes_give_the_results_of_one(unet_folder, tmp_path):
    args = ["-m", "tofu_diffusion.eval.sweep", "--model", unet_folder, "--methods", "tofu", "--ratios", "0", "0.5",
            *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same kernels in both runs
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    quality = ("fid", "class_accuracy", "psnr", "ssim")
    assert [{k: r[k] for k in quality} for r in two["rows"]] == [{k: r[k] for k in quality} for r in one["rows"]]
    assert two["noise_floor_fid"] == one["noise_floor_fid"]


class MeanColour(torch.nn.Module):
    """A user-given FID feature network (--feature-module): per-channel means and deviations."""

    num_features = 6

    def forward(self, images):
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_sweep_on_a_text_to_image_checkpoint_folder(tmp_path):
    """The real-checkpoint path: from_pretrained(folder), prompts, a reference folder, a feature module, CLIP."""
    from PIL import Image

    from tofu_diffusion.pipelines.tiny import save_tiny_clip, sd_pipeline_with_text

    sd_pipeline_with_text(tmp_path / "tok").save_pretrained(tmp_path / "sd")
    save_tiny_clip(tmp_path / "clip")
    (tmp_path / "prompts.txt").write_text("a red disc\na blue square on stripes\n")
    (tmp_path / "real").mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(6):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(tmp_path / "real" / f"{k}.png")
    result = sweep.main(["--model", str(tmp_path / "sd"), "--prompts", str(tmp_path / "prompts.txt"),
                         "--reference-dir", str(tmp_path / "real"), "--feature-module", "test_sweep:MeanColour",
                         "--clip-model", str(tmp_path / "clip"), "--resolution", "32", "--methods", "tome",
                         "--ratios", "0", "0.5", "--guidance-scale", "3.0", "--out", str(tmp_path / "out"),
                         "--num-images", "4", "--batch-size", "2", "--steps", "2", "--repeats", "1"])
    base, reduced = result["rows"]
    assert base["class_accuracy"] is None and 0 <= base["clip_score"] <= 100
    assert reduced["psnr"] < 100 and reduced["fid"] >= 0 and result["noise_floor_fid"] > 0
    with pytest.raises(ValueError, match="--prompts"):
        sweep.main(["--model", str(tmp_path / "sd"), "--out", str(tmp_path / "x"), *SMALL])


def test_sweep_rows_for_peers_presets_and_variants(unet_folder, tmp_path):
    out = tmp_path / "peers"
    result = sweep.main(["--model", unet_folder, "--methods", "tome", "todo", "tomesd", "--ratios", "0", "0.5",
                         "--presets", "default", "--variants", "method=tome,schedule=0.5:0.75", "--out", str(out),
                         *SMALL])
    rows = result["rows"]
    assert [r["setting"] for r in rows] == ["baseline", "tome_0.5", "todo_0.5", "tomesd_0.5", "preset_default",
                                            "method=tome,schedule=0.5:0.75"]
    default = rows[4]
    assert default["method"] == tofu.PRESETS["quality"]["unet"]["method"] and default["ratio"] is None
    assert rows[5]["schedule"] == "0.75@0.5"
    for row in rows:
        assert row["kid"] is not None and row["kid_std"] >= 0
    for row in rows[1:]:
        assert row["psnr"] < 100.0  # every setting changed the images (tomesd and todo included)
    # a row is on the front exactly when no other row is at least as fast and as good, and better in one
    for row in rows:
        dominated = any(o["speedup"] >= row["speedup"] and o["fid"] <= row["fid"] and
                        (o["speedup"] > row["speedup"] or o["fid"] < row["fid"]) for o in rows if o is not row)
        assert row["pareto"] == (not dominated)
    assert (out / "samples_tomesd_0.5.png").exists() and (out / "samples_preset_default.png").exists()


def test_tomesd_on_a_dit_is_a_clear_error(tmp_path):
    folder = tmp_path / "dit"
    torch.manual_seed(0)
    build_pipeline("dit").save_pretrained(folder)
    with pytest.raises(ValueError, match="tomesd patches Stable Diffusion UNets .* DiTTransformer2DModel"):
        sweep.main(["--model", str(folder), "--methods", "tomesd", "--ratios", "0", "0.5", "--out",
                    str(tmp_path / "out"), *SMALL])


def test_pareto_marks():
    from tofu_diffusion.eval.report import mark_pareto

    rows = [{"speedup": 1.0, "fid": 1.0}, {"speedup": 1.5, "fid": 2.0}, {"speedup": 1.4, "fid": 2.5},
            {"speedup": 1.5, "fid": 2.0}, {"speedup": 2.0, "fid": 9.0}]
    mark_pareto(rows, "speedup", "fid", lower_is_better=True)
    assert [r["pareto"] for r in rows] == [True, True, False, True, True]  # ties dominate neither
    mark_pareto(rows, "speedup", "fid", lower_is_better=False)
    assert [r["pareto"] for r in rows] == [False, False, False, False, True]


def test_variant_specs_parse():
    options = sweep.parse_variant("method=tofu,schedule=0:0;0.5:0.75,blocks=1:-1,merge_mode=mlerp,seed=3")
    assert options == {"method": "tofu", "schedule": [(0.0, 0.0), (0.5, 0.75)], "blocks": slice(1, -1),
                       "merge_mode": "mlerp", "seed": 3}
    assert sweep.parse_variant("blocks=0;2")["blocks"] == [0, 2]
    with pytest.raises(ValueError, match="not OPTION=VALUE"):
        sweep.parse_variant("speed=fast")


def test_the_warm_up_round_is_not_in_the_denoiser_time():
    """The first call (compilation, allocation, caches) is slow; the per-step time is the steady state's."""
    import time
    from types import SimpleNamespace

    class SlowFirst(torch.nn.Module):
        calls = 0

        def forward(self, x):
            SlowFirst.calls += 1
            if SlowFirst.calls == 1:
                time.sleep(0.3)
            return x

    denoiser = SlowFirst()
    work = SimpleNamespace(name="w", pipe=denoiser, denoiser=denoiser, condition=lambda i: 0,
                           draw=lambda seeds, conditions: denoiser(torch.zeros(1)))
    args = SimpleNamespace(timing_batch=1, batch_size=1, seed=0, repeats=1)
    settings = [sweep.Setting("baseline", "none", 0.0, None, "baseline", "")]
    _, denoiser_ms, _, _ = sweep.time_settings(work, args, settings, torch.device("cpu"), show=False)
    assert denoiser_ms["baseline"] < 100
