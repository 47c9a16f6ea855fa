"""eval.finetune: the before/after accuracies it reports are the model's, and the fine-tune changes it."""

import json

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.eval import finetune
from tofu_diffusion.pipelines.classifier import shapes_vit
from tofu_diffusion.pipelines.shapes import HELD_OUT_SEED, generate


@pytest.mark.slow
def test_finetune_reports_what_it_measured(tmp_path):
    torch.manual_seed(0)
    shapes_vit().save_pretrained(tmp_path / "vit")
    result = finetune.main(["--model", str(tmp_path / "vit"), "--r", "8", "--max-steps", "3", "--batch", "8",
                            "--num-images", "60", "--save", str(tmp_path / "tuned"), "--out", str(tmp_path / "out"),
                            "--threads", "1"])
    assert result["steps"] == 3
    from transformers import ViTForImageClassification

    images, labels = generate(60, seed=HELD_OUT_SEED)
    tuned = ViTForImageClassification.from_pretrained(tmp_path / "tuned").eval()
    before = ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    student = tofu.TokenFusionConfig(method="mctf", r=8)
    assert result["before"] == finetune.accuracies(before, images, labels, student)
    assert result["after"] == finetune.accuracies(tuned, images, labels, student)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), before.parameters()))
    lost = result["before"]["unreduced"] - result["before"]["reduced"]
    if lost > 0:
        assert result["recovered"] == (result["after"]["reduced"] - result["before"]["reduced"]) / lost
    assert json.loads((tmp_path / "out" / "results.json").read_text())["after"] == result["after"]
