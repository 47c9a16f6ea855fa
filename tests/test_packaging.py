"""What ``pip install`` gives a user: the wheel built from this checkout, installed into a clean folder."""

import glob
import json
import os
import subprocess
import sys
import zipfile

import pytest

from tofu_diffusion.pipelines import EMBEDDED_GENERATORS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = (*EMBEDDED_GENERATORS, "shapes-classifier", "tiny-vit")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    ROOT], check=True, capture_output=True)
    (path,) = glob.glob(str(out / "*.whl"))
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> str:
    """The wheel alone in a folder (its dependencies are this environment's)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
                   check=True, capture_output=True)
    return str(target)


def test_the_wheel_holds_only_the_library_and_the_shipped_weights(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"tofu_diffusion", "tofu_diffusion-0.1.0.dist-info"}
    weights = {name.split("/")[3] for name in names if name.startswith("tofu_diffusion/pipelines/weights/")}
    assert weights == set(SHIPPED)  # the models still in training stay out
    assert sum(name.endswith(".safetensors") and "/weights/" in name for name in names) >= len(SHIPPED)
    entry_points = zipfile.ZipFile(wheel).read("tofu_diffusion-0.1.0.dist-info/entry_points.txt").decode()
    assert "tofu-diffusion = tofu_diffusion.eval.cli:main" in entry_points


def _run(installed, args, cwd):
    env = dict(os.environ, PYTHONPATH=installed, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


def test_the_installed_command_runs_from_another_folder(installed, tmp_path):
    command = os.path.join(installed, "bin", "tofu-diffusion")
    done = _run(installed, [command, "--help"], tmp_path)
    assert done.returncode == 0 and "sweep" in done.stdout and "demo" in done.stdout
    where = _run(installed, [sys.executable, "-c", "import tofu_diffusion; print(tofu_diffusion.__file__)"], tmp_path)
    assert where.stdout.startswith(installed)  # the installed copy, not this checkout

    done = _run(installed, [command, "sweep", "--model", "tiny-dit", "--methods", "tome", "--ratios", "0", "0.5",
                            "--num-images", "4", "--batch-size", "4", "--steps", "2", "--repeats", "2",
                            "--timing-batch", "2", "--num-reference", "16", "--grid", "4", "--out", "out"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["none", "tome"]
    assert all(row["speedup_low"] <= row["speedup"] <= row["speedup_high"] for row in rows)
    assert rows[0]["speedup_low"] <= 1.0 <= rows[0]["speedup_high"]
    assert rows[0]["class_accuracy"] is not None  # the bundled classifier came with the wheel
