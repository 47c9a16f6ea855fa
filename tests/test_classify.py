"""eval.classify end to end on a small ViT and an ImageFolder, as a user with a real checkpoint runs it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tofu_diffusion as tofu
from tofu_diffusion.eval import classify
from tofu_diffusion.pipelines.classifier import shapes_vit, shapes_vit_processor
from tofu_diffusion.pipelines.shapes import CLASSES, generate


@pytest.fixture(scope="module")
def vit_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    torch.manual_seed(0)
    shapes_vit().save_pretrained(root / "model")
    shapes_vit_processor().save_pretrained(root / "model")
    images, labels = generate(12, seed=5)
    for k, (image, label) in enumerate(zip(images, labels)):
        folder = root / "data" / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{k}.png")
    return str(root / "model"), str(root / "data")


@pytest.mark.slow
def test_classify_on_an_image_folder(vit_and_data, tmp_path):
    model, data = vit_and_data
    out = tmp_path / "out"
    result = classify.main(["--model", model, "--data", data, "--methods", "none", "tome", "mctf", "--r", "4", "8",
                            "--repeats", "1", "--batch-size", "6", "--out", str(out)])
    rows = result["rows"]
    assert [(r["method"], r["r"]) for r in rows] == [("none", 0), ("tome", 4), ("tome", 8), ("mctf", 4), ("mctf", 8)]
    assert result["num_images"] == 12
    base = rows[0]
    assert base["speedup"] == 1.0 and base["tokens_per_layer"] == [65] * 7
    for row in rows[1:]:
        r = row["r"]
        assert row["tokens_per_layer"] == [65 - r * i for i in range(7)]
        assert row["gflops"] < base["gflops"] and 0 <= row["accuracy"] <= 1
    tome4, tome8 = rows[1], rows[2]
    assert tome8["gflops"] < tome4["gflops"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == rows
    assert (out / "results.csv").read_text().splitlines()[0].startswith("setting,method,r,ratio,accuracy")
    assert (out / "accuracy_vs_throughput.png").stat().st_size > 1000


def test_classify_rows_by_ratio_and_by_preset(vit_and_data, tmp_path):
    model, data = vit_and_data
    result = classify.main(["--model", model, "--data", data, "--methods", "none", "tome", "--r", "--ratios", "0.1",
                            "--presets", "default", "fast", "--repeats", "1", "--batch-size", "6",
                            "--out", str(tmp_path)])
    rows = {row["setting"]: row for row in result["rows"]}
    assert list(rows) == ["none", "tome ratio=0.1", "preset default", "preset fast"]
    # a tenth of each layer's patch tokens (the class token is kept), rounded down: 65 -> 59 -> 54 -> ...
    assert rows["tome ratio=0.1"]["tokens_per_layer"] == [65, 59, 54, 49, 45, 41, 37]
    expected = tofu.TokenFusionConfig(preset="fast").resolve("vit")
    assert (rows["preset fast"]["method"], rows["preset fast"]["ratio"]) == (expected.method, expected.ratio)
    quality = tofu.TokenFusionConfig().resolve("vit")
    assert rows["preset default"]["ratio"] == quality.ratio and rows["preset default"]["r"] == (quality.r or 0)


def test_classify_explains_bad_data(vit_and_data, tmp_path):
    model, _ = vit_and_data
    with pytest.raises(ValueError, match="not a folder"):
        classify.main(["--model", model, "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
    (tmp_path / "zebra").mkdir()
    with pytest.raises(ValueError, match="not labels of"):
        classify.main(["--model", model, "--data", str(tmp_path), "--out", str(tmp_path / "o")])


@pytest.mark.slow
def test_bench_reports_speed_beside_the_flop_ideal(monkeypatch, tmp_path):
    # the real geometries' 12 layers and 197 tokens, at a width small enough for a test
    narrow = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    monkeypatch.setitem(classify.GEOMETRIES, "narrow", narrow)
    result = classify.main(["--bench", "--geometries", "narrow", "--methods", "none", "tome", "mctf", "--r", "8", "13",
                            "--bench-batch", "2", "--repeats", "1", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [(r["method"], r["r"]) for r in rows] == [("none", 0), ("tome", 8), ("tome", 13), ("mctf", 8), ("mctf", 13)]
    base = rows[0]
    assert base["speedup"] == 1.0 and base["ideal_speedup"] == 1.0
    for row in rows[1:]:
        assert row["gflops"] < base["gflops"]
        assert row["ideal_speedup"] == pytest.approx(base["gflops"] / row["gflops"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
    assert rows[2]["ideal_speedup"] > rows[1]["ideal_speedup"] > 1.2  # r=13 removes more than r=8
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows


def test_the_cli_offers_only_the_methods_a_classifier_takes(capsys):
    with pytest.raises(SystemExit):
        classify.main(["--methods", "todo"])
    assert "invalid choice: 'todo'" in capsys.readouterr().err
