"""``experiments/toy_tables.py`` smoke test for the baseline rows and the OFT row on a tiny toy world."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pytest  # noqa: E402
import toy_tables  # noqa: E402
from test_toy_tables import TINY  # noqa: E402

FAST_BASELINES = [
    "--config.baselines.fair_diffusion.warmup_steps=1",
    "--config.baselines.uce.templates=('photo of {}',)",
    "--config.baselines.uce.measure_images=4",
    "--config.baselines.uce.measure_steps=2",
    "--config.baselines.uce.max_rounds=2",
]


@pytest.mark.slow  # ~4 min on 2 shared cores: five rows, each generated for both splits
def test_baseline_and_oft_rows(tiny_toy_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAIRDIFF_TOY_WORLD", tiny_toy_world)
    root = str(tmp_path / "tables")
    args = ["--root", root, "--kinds", "unet_oft", "--targets", "gender", "--modes", "--no-progress"]
    assert toy_tables.main(args + TINY + FAST_BASELINES) == 0
    markdown = capsys.readouterr().out
    for name in (*toy_tables.METHODS, "unet_oft"):
        assert markdown.count(f"| gender | `{name}` |") == 2  # one row in each split's table
    original = json.load(open(os.path.join(root, "original", "row.json")))
    for method in toy_tables.METHODS:
        row = json.load(open(os.path.join(root, f"gender_{method}", "row.json")))
        assert row["baseline"] and set(row["held_out"]["bias"]) == {"gender", "race", "gender_x_race"}
        assert all(0.0 <= v <= 1.0 for v in row["debiased"]["bias"].values())
        assert row["debiased"] != original["debiased"] or method == "uce"  # UCE may stop at round 0 when fair
    oft = json.load(open(os.path.join(root, "gender_unet_oft_adjusted", "row.json")))
    assert oft["kind"] == "unet_oft" and oft["steps"] == 2
