"""``fairdiff demo`` end to end at tiny sizes: a tiny toy world, a few training steps, the full report."""

import json
import os

import pytest

from fairdiff_jax import cli
from fairdiff_jax.toyworld import build

TINY_TOY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"],
    "block_out_channels": [32],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}


@pytest.fixture(scope="module")
def tiny_world_cache(tmp_path_factory):
    """A tiny (untrained) toy world, used instead of the shipped one through ``FAIRDIFF_TOY_WORLD``."""
    folder = os.path.join(str(tmp_path_factory.mktemp("cache")), "toy")
    build.build_toy_world(
        folder,
        steps=2,
        seed=1,
        progress=False,
        batch_size=8,
        classifier_steps=2,
        classifier_width=8,
        images_per_prompt=0,
        unet_config=TINY_TOY_UNET,
    )
    return folder


@pytest.mark.parametrize("adaptor", ["text_lora"])
def test_demo_writes_the_report(tiny_world_cache, tmp_path, monkeypatch, capsys, adaptor):
    monkeypatch.setenv("FAIRDIFF_TOY_WORLD", tiny_world_cache)
    workdir = str(tmp_path / "demo")
    code = cli.main(
        [
            "demo",
            "--workdir",
            workdir,
            "--adaptor",
            adaptor,
            "--no-progress",
            "--config.num_steps=2",
            "--config.checkpoint_every=1",
            "--config.log_every=1",
            "--config.sampler.train_steps=(2, 2)",
            "--config.sampler.eval_steps=2",
            "--config.train.images_per_prompt=8",
            "--config.eval.images_per_prompt=8",
            "--config.eval.batch_size=8",
            "--config.attributes.gender.target=(0.3, 0.7)",
            "--config.sample_every=2",
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
    assert metrics["targets"]["gender"] == [0.3, 0.7]
    assert metrics["before"]["n_images"] == 8 * 8  # 8 debiased occupations, 8 images each
    for name in ("report.md", "training_curves.png", "frequencies.png", "grid_debiased_before.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0
    assert "gender: bias" in capsys.readouterr().out
    assert os.path.getsize(os.path.join(workdir, "train", "samples", "step_0000002.png")) > 0  # sample grid
