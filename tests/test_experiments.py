"""The table-reproduction script end to end on tiny models: tiny SD folder, a tiny MobileNetV3 classifier, tiny
evaluation CLIP and DINOv2 encoders."""

import json
import os
import sys

import numpy as np

from fairdiff_jax.attributes import MobileNetV3Large, init_variables, save_classifier
from fairdiff_jax.attributes.tiny_encoders import write_tiny_clip_folder, write_tiny_dinov2_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import reproduce  # noqa: E402


def _save_tiny_classifier(folder, head_bias=None):
    """A tiny MobileNetV3 gender classifier; ``head_bias`` (e.g. (-50, 50)) makes it name one class always."""
    variables = init_variables(MobileNetV3Large({"gender": 2}, width_multiplier=0.25), image_size=32, seed=0)
    if head_bias is not None:
        variables["params"]["head_gender"]["kernel"] = np.zeros_like(variables["params"]["head_gender"]["kernel"])
        variables["params"]["head_gender"]["bias"] = np.asarray(head_bias, np.float32)
    save_classifier(
        folder, variables, classes={"gender": ("female", "male")}, width_multiplier=0.25, input_size=32, face_crop=False
    )
    return folder


def test_table1_gender_row_on_tiny_models(tiny_sd_path, tmp_path, capsys):
    classifier = _save_tiny_classifier(str(tmp_path / "gender_classifier"))
    # the separately trained evaluation classifier (here: one that calls everyone male, so its scoring shows)
    eval_classifier = _save_tiny_classifier(str(tmp_path / "gender_eval_classifier"), head_bias=(-50.0, 50.0))
    prompts = str(tmp_path / "prompts.json")
    with open(prompts, "w") as f:
        json.dump(["a photo of a doctor", "a photo of a nurse"], f)
    root = str(tmp_path / "table1")
    clip = write_tiny_clip_folder(str(tmp_path / "eval_clip"))
    dino = write_tiny_dinov2_folder(str(tmp_path / "eval_dino"))
    code = reproduce.main(
        [
            "--table",
            "1",
            "--root",
            root,
            "--sd",
            tiny_sd_path,
            "--classifier",
            f"gender={classifier}",
            "--eval-classifier",
            f"gender={eval_classifier}",
            "--steps",
            "1",
            "--rows",
            "gender",
            "--eval-clip",
            clip,
            "--eval-dino",
            dino,
            "--clip",  # the loss's encoders (L_img is on in the paper config; a config without them is refused)
            clip,
            "--dino",
            dino,
            f"--config.data.prompts={prompts}",
            "--config.model.dtype=float32",
            "--config.train.images_per_prompt=8",
            "--config.train.prompts_per_step=1",
            "--config.sampler.train_steps=(2, 2)",
            "--config.sampler.eval_steps=2",
            "--config.eval.images_per_prompt=8",
            "--config.eval.batch_size=8",
            "--config.adaptor.rank=2",
            # the tiny model draws no faces: no detector, no face terms (L_face needs a reference set)
            "--config.faces.detector=none",
            "--config.loss.lambda_face=0.0",
            "--config.attributes.gender.factor2=1.0",
        ]
    )
    assert code == 0
    table = open(os.path.join(root, "table1.md")).read()
    assert "| original (ours) |" in table and "| gender (ours) |" in table
    assert "| gender (paper) | .23±.16 |" in table
    lines = table.splitlines()
    assert lines[0] == "| run | gender | race | gender_x_race | CLIP-T | CLIP-I | DINO |"
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]] for line in lines[2:4]}
    assert "±" in cells["original (ours)"][3] and cells["original (ours)"][4:] == ["—", "—"]  # nothing to compare to
    assert all("±" in cell for cell in cells["gender (ours)"][3:])  # CLIP-T, CLIP-I, DINO
    with open(os.path.join(root, "gender", "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["n_images"] == 16 and set(metrics["models"]) == {"original", "debiased (step 1)"}
    assert {"clip_t", "clip_i", "dino"} <= set(metrics)
    # the evaluation classifier scored, and every record says so
    assert metrics["scored_by"] == {"gender": f"eval_classifier {eval_classifier}"}
    assert all(m["freq"]["gender"] == [0.0, 1.0] for m in metrics["models"].values())
    assert f"Scored by: gender: eval_classifier {eval_classifier}." in table
    assert "training classifier scored" not in table
    assert "gender (ours)" in capsys.readouterr().out
