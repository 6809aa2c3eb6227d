"""``experiments/toy_tables.py --seeds``: trained rows run once per seed and report the mean ± std over seeds."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import toy_tables  # noqa: E402
from test_toy_tables import TINY  # noqa: E402


def _row(seed, gender, cue):
    split = {
        "bias": {"gender": gender, "race": 0.2, "gender_x_race": 0.1},
        "bias_std": {"gender": 0.5, "race": 0.5, "gender_x_race": 0.5},  # per-occupation spread: not carried over
        "bias_floor": {"gender": 0.056, "race": 0.04, "gender_x_race": 0.028},
        "cue_accuracy": cue,
    }
    return {"name": "n", "kind": "text_lora", "target": "gender", "mode": "adjusted", "seed": seed,
            "debiased": split, "held_out": split}  # fmt: skip


def test_over_seeds_is_the_mean_and_population_std_of_the_seeds():
    merged = toy_tables.over_seeds([_row(0, 0.1, 0.9), _row(1, 0.3, 0.8), _row(2, 0.2, 0.7)])
    assert merged["seeds"] == [0, 1, 2]
    for split in ("debiased", "held_out"):
        assert merged[split]["bias"]["gender"] == pytest.approx(0.2)
        assert merged[split]["bias_std"]["gender"] == pytest.approx(np.sqrt((0.01 + 0.01 + 0.0) / 3))
        assert merged[split]["bias_std"]["race"] == pytest.approx(0.0)
        assert merged[split]["cue_accuracy"] == pytest.approx(0.8)
    single = _row(0, 0.1, 0.9)
    assert toy_tables.over_seeds([single]) is single
    line = toy_tables.table_markdown(single, [merged], "debiased").splitlines()[3]
    assert line == "| gender | `text_lora` | 0.200±0.082 | 0.200±0.000 | 0.100±0.000 | 0.800 | 3 |"


def test_seeds_train_separate_runs(tiny_toy_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAIRDIFF_TOY_WORLD", tiny_toy_world)
    root = str(tmp_path / "tables")
    args = ["--root", root, "--kinds", "unet_lora", "--targets", "gender", "--modes", "--methods", "--seeds", "0", "1"]
    assert toy_tables.main(args + ["--no-progress"] + TINY) == 0
    markdown = capsys.readouterr().out
    assert markdown.count("| gender | `unet_lora` |") == 2 and "| 2 |" in markdown
    rows = []
    for name, seed in (("gender_unet_lora_adjusted", 0), ("gender_unet_lora_adjusted_seed1", 1)):
        with open(os.path.join(root, name, "train", "config.json")) as f:
            assert json.load(f)["seed"] == seed
        with open(os.path.join(root, name, "row.json")) as f:
            rows.append(json.load(f))
    merged = toy_tables.over_seeds(rows)
    assert f"{merged['held_out']['bias']['gender']:.3f}±{merged['held_out']['bias_std']['gender']:.3f}" in markdown
