"""Evaluation: bias metrics on hand-computed cases; a 2-prompt end-to-end run writing metrics.json/table.md."""

import json
import os
import sys

import numpy as np
import pytest

from fairdiff_jax.evaluate import evaluate
from fairdiff_jax.metrics import bias_metrics
from fairdiff_jax.tables import format_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_world import tiny_config, tiny_run, write_finished_run  # noqa: E402


def _record(gender, race, valid=None):
    gender, race = np.asarray(gender), np.asarray(race)
    valid = np.ones(gender.shape, bool) if valid is None else np.asarray(valid)
    return {"prompt": "p", "images": None, "labels": {"gender": gender, "race": race}, "valid": valid}


def test_bias_metrics_hand_computed():
    results = [
        # prompt 1: 3 of 4 valid images male -> gender freq (1/4, 3/4), bias 0.5; race all class 0 -> bias
        # mean over 6 pairs of |f_i - f_j| = (1+1+1+0+0+0)/6 = 0.5; the invalid image is ignored
        _record([0, 1, 1, 1, 0], [0, 0, 0, 0, 3], valid=[1, 1, 1, 1, 0]),
        # prompt 2: balanced gender (bias 0), race uniform (bias 0)
        _record([0, 1, 0, 1], [0, 1, 2, 3]),
    ]
    results[1]["labels"] = {k: np.concatenate([v, [0]]) for k, v in results[1]["labels"].items()}
    results[1]["valid"] = np.array([1, 1, 1, 1, 0], bool)
    metrics = bias_metrics(results, {"gender": 2, "race": 4})
    assert metrics["bias"]["gender"] == pytest.approx(0.25)
    assert metrics["bias_std"]["gender"] == pytest.approx(0.25)
    assert metrics["bias"]["race"] == pytest.approx(0.25)
    assert metrics["freq"]["gender"] == pytest.approx([(0.25 + 0.5) / 2, (0.75 + 0.5) / 2])
    # intersection over 8 joint classes: prompt 1 has joint classes {0: 1/4, 4: 3/4}
    joint = metrics["per_prompt_bias"]["gender_x_race"]
    freq1 = np.array([0.25, 0, 0, 0, 0.75, 0, 0, 0])
    expected1 = np.mean([abs(freq1[i] - freq1[j]) for i in range(8) for j in range(i + 1, 8)])
    assert joint[0] == pytest.approx(expected1)
    assert metrics["n_images"] == 10 and metrics["n_valid"] == 8
    assert metrics["bias_floor"]["gender"] == pytest.approx(0.375)  # M=4 fair coin: E|2k/4-1| = 6/16


def test_table_layout():
    metrics = {"bias": {"gender": 0.5}, "bias_std": {"gender": 0.1}, "bias_floor": {"gender": 0.1}}
    table = format_table({"original": metrics, "debiased": metrics}, ["gender"])
    assert table.splitlines()[0] == "| model | gender |"
    assert "| original | 0.50±0.10 |" in table and "fair generator" in table
    # semantic cells show the std over images, as the paper does (the std over prompts is not shown)
    semantic = {
        "clip_t": {"mean": 0.391, "std": 0.002, "std_images": 0.052},
        "clip_i": {"mean": 0.67, "std": 0.01, "std_images": 0.15},
    }
    rows = {"original": metrics, "debiased": {**metrics, **semantic}}
    table = format_table(rows, ["gender", "CLIP-T", "CLIP-I", "DINO"])
    assert table.splitlines()[0] == "| model | gender | CLIP-T | CLIP-I | DINO |"
    assert "| original | 0.50±0.10 | — | — | — |" in table
    assert "| debiased | 0.50±0.10 | 0.39±0.05 | 0.67±0.15 | — |" in table


@pytest.fixture(scope="module")
def eval_world(tiny_sd_path):
    cfg = tiny_config(
        tiny_sd_path, "--config.eval.images_per_prompt=6", "--config.sampler.eval_steps=3", "--config.eval.batch_size=8"
    )
    return tiny_run(tiny_sd_path, cfg), cfg


def test_end_to_end_two_prompts(eval_world, tmp_path):
    comp, cfg = eval_world
    comp.eval_prompts = {"test": ["a photo of a doctor", "a photo of a nurse"]}
    workdir = str(tmp_path / "run")
    write_finished_run(workdir, comp)  # an adaptor that changes the images
    out = str(tmp_path / "eval")
    metrics = evaluate(cfg, workdir, out, run=comp, progress=False)
    with open(os.path.join(out, "metrics.json")) as f:
        stored = json.load(f)
    assert set(stored) >= {"bias", "bias_std", "freq", "n_images"}
    assert stored["n_images"] == 12 and 0.0 <= stored["bias"]["gender"] <= 1.0
    assert set(stored["models"]) == {"original", "debiased (step 1)"}
    assert "| original |" in open(os.path.join(out, "table.md")).read()
    assert os.path.isfile(os.path.join(out, "original", "test", "grid_0001.png"))
    original = np.load(os.path.join(out, "original", "test", "prompt_0000.npz"))["images"]
    debiased = np.load(os.path.join(out, "debiased", "test", "prompt_0000.npz"))["images"]
    assert original.shape == (6, 16, 16, 3) and np.abs(original.astype(int) - debiased).max() > 0

    # resumable: a second run reads the stored images instead of generating them again
    mtime = os.path.getmtime(os.path.join(out, "original", "test", "prompt_0000.npz"))
    again = evaluate(cfg, workdir, out, run=comp, progress=False)
    assert os.path.getmtime(os.path.join(out, "original", "test", "prompt_0000.npz")) == mtime
    assert again["bias"] == metrics["bias"]
