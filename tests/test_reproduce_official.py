"""``experiments/reproduce.py --official DIR --official-only``: the authors' imported adaptors beside the paper's
numbers, on tiny models (tiny SD folder, a tiny MobileNetV3 gender classifier, no training)."""

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="writing the authors' .pth files needs the torch extra")

from transformers import CLIPTextModel  # noqa: E402

from fairdiff_jax.attributes import MobileNetV3Large, init_variables, save_classifier  # noqa: E402
from fairdiff_jax.cli import main as cli_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import reproduce  # noqa: E402
from test_import_authors import _authors_text_lora  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def _images(out, which):
    return np.load(os.path.join(out, which, "test", "prompt_0000.npz"))["images"]


def test_table1_with_the_authors_gender_adaptor_only(tiny_sd_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAIRDIFF_CACHE", str(tmp_path / "cache"))
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder")
    source = str(tmp_path / "text_encoder_lora_EMA.pth")
    torch.save(_authors_text_lora(text_encoder, torch.Generator().manual_seed(0)), source)
    official = tmp_path / "official"
    args = ["import", "--kind", "text_lora", "--source", source, "--base", tiny_sd_path]
    assert cli_main(args + ["--out", str(official / "gender")]) == 0
    classifier = str(tmp_path / "gender_classifier")
    module = MobileNetV3Large({"gender": 2}, width_multiplier=0.25)
    save_classifier(
        classifier,
        init_variables(module, image_size=32, seed=0),
        classes={"gender": ("female", "male")},
        width_multiplier=0.25,
        input_size=32,
        face_crop=False,
    )
    prompts = str(tmp_path / "prompts.json")
    with open(prompts, "w") as f:
        json.dump(["a photo of a doctor", "a photo of a nurse"], f)
    root = str(tmp_path / "table1")
    code = reproduce.main(
        ["--table", "1", "--root", root, "--sd", tiny_sd_path, "--classifier", f"gender={classifier}"]
        + ["--official", str(official), "--official-only", f"--config.data.prompts={prompts}"]
        + ["--config.model.dtype=float32", "--config.sampler.eval_steps=2", "--config.eval.images_per_prompt=4"]
        + ["--config.eval.batch_size=8", "--config.loss.lambda_face=0.0", "--config.attributes.gender.factor2=1.0"]
        + ["--config.faces.detector=none"]  # the tiny model draws no faces
    )
    assert code == 0
    table = open(os.path.join(root, "table1.md")).read()
    assert "| original (ours) |" in table and "| gender (authors) |" in table and "gender (ours)" not in table
    assert "| gender (paper) | .23±.16 |" in table
    assert "no authors' adaptor for 'race'" in table and "no authors' adaptor for 'gender_race'" in table
    out = os.path.join(root, "gender", "eval_authors")
    with open(os.path.join(out, "metrics.json")) as f:
        assert set(json.load(f)["models"]) == {"original", "adaptor (gender)"}
    assert not os.path.exists(os.path.join(root, "gender", "checkpoints"))  # nothing was trained
    original, adapted = (
        np.load(os.path.join(out, w, "test", "prompt_0000.npz"))["images"] for w in ("original", "debiased")
    )
    assert np.abs(original.astype(int) - adapted).max() > 0
    assert "gender (authors)" in capsys.readouterr().out
