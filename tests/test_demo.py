"""``fairdiff demo`` end to end at tiny sizes: a tiny toy world, a few training steps, the full report."""

import json
import os

import pytest

from fairdiff_jax import cli
from fairdiff_jax.toyworld.demo import target_distance


def test_target_distance_by_hand():
    counts = {"a": {"gender": [3, 7]}, "b": {"gender": [5, 5]}, "c": {"gender": [0, 0]}}
    # a follows 30/70 exactly; b is ½(|.5-.3| + |.5-.7|) = 0.2 away; c has no valid image (all-zero freq: 0.5)
    assert target_distance(counts, {"gender": [0.3, 0.7]})["gender"] == pytest.approx((0.0 + 0.2 + 0.5) / 3)
    assert target_distance({"a": {"race": [1, 1, 1, 1]}}, {"race": [0.25] * 4}) == {"race": 0.0}


@pytest.mark.parametrize("adaptor", ["text_lora"])
def test_demo_writes_the_report(tiny_toy_world, tmp_path, monkeypatch, capsys, adaptor):
    monkeypatch.setenv("FAIRDIFF_TOY_WORLD", tiny_toy_world)
    monkeypatch.setenv("FAIRDIFF_CACHE", str(tmp_path / "cache"))
    workdir = str(tmp_path / "demo")
    code = cli.main(
        [
            "demo",
            "--workdir",
            workdir,
            "--adaptor",
            adaptor,
            "--attributes",
            "gender+race",
            "--no-progress",
            "--config.num_steps=2",
            "--config.checkpoint_every=1",
            "--config.log_every=1",
            "--config.sampler.train_steps=(2, 2)",
            "--config.sampler.eval_steps=2",
            "--config.train.images_per_prompt=8",
            "--config.train.prompts_per_step=2",  # the toy text-LoRA default trains all 8 prompts a step
            "--config.eval.images_per_prompt=8",
            "--config.eval.batch_size=8",
            "--config.attributes.gender.target=(0.3, 0.7)",
            "--config.sample_every=2",
            "--config.sampler.unroll=1",  # the demo's unrolled chain compiles slower; the tiny test keeps it rolled
        ]
    )
    assert code == 0
    report = os.path.join(workdir, "report")
    with open(os.path.join(report, "metrics.json")) as f:
        metrics = json.load(f)
    for section in ("before", "after"):
        assert {"bias", "bias_std", "freq", "n_images"} <= set(metrics[section])
        assert 0.0 <= metrics[section]["bias"]["gender"] <= 1.0
        assert 0.0 <= metrics[section]["cue_accuracy"] <= 1.0
        assert "held_out" in metrics[section]
    assert metrics["targets"] == {"gender": [0.3, 0.7], "race": [0.25] * 4}
    assert set(metrics["after"]["bias"]) == {"gender", "race", "gender_x_race"}
    assert set(metrics["after"]["target_distance"]) == {"gender", "race"}
    assert 0.0 <= metrics["after"]["held_out"]["target_distance"]["gender"] <= 1.0
    assert metrics["before"]["n_images"] == 8 * 8  # 8 debiased occupations, 8 images each
    for name in ("report.md", "training_curves.png", "frequencies.png", "grid_debiased_before.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0
    with open(os.path.join(report, "report.md")) as f:
        text = f.read()
    assert "| gender_x_race | — | held out |" in text and "| gender | 0.30/0.70 | debiased |" in text
    assert "Face terms: off: the toy world has no faces" in text and "no faces" in metrics["face_terms"]
    out = capsys.readouterr().out
    assert "gender: bias" in out and "race: bias" in out
    assert os.path.getsize(os.path.join(workdir, "train", "samples", "step_0000002.png")) > 0  # sample grid
    # the base model's evaluation is kept in the cache (one folder per world and settings) for the next run
    (key,) = os.listdir(tmp_path / "cache" / "toy_base_eval")
    stored = sorted(os.listdir(tmp_path / "cache" / "toy_base_eval" / key / "debiased"))
    assert stored == [f"prompt_{i:04d}.npz" for i in range(8)]


@pytest.mark.parametrize(
    "images, cores, flags, expected",
    [
        ((8, 200, 200), 2, "", 2),  # the demo on two cores
        ((8, 200, 200), 16, "", 8),  # the largest count up to the cores that divides every run's images
        ((6, 9), 4, "", 3),
        ((7, 200), 2, "", 0),  # 7 images cannot split: one device, nothing set
        ((8, 200), 1, "", 0),
        ((8, 200), 2, "--xla_force_host_platform_device_count=4", 0),  # the user's own count is kept
    ],
)
def test_demo_spreads_over_cpu_cores(monkeypatch, images, cores, flags, expected):
    from fairdiff_jax.toyworld.demo_cli import spread_over_cpu_cores

    monkeypatch.setenv("XLA_FLAGS", flags)
    assert spread_over_cpu_cores(images, cores) == expected
    if expected:
        assert os.environ["XLA_FLAGS"].split() == [f"--xla_force_host_platform_device_count={expected}"]
    else:
        assert os.environ["XLA_FLAGS"] == flags
