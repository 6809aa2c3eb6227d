"""``evaluate --method NAME``: every baseline runs through the evaluator on the tiny SD world and changes the images;
the CLI runs one on the (tiny) toy world."""

import json
import os
import sys

import numpy as np
import pytest

from fairdiff_jax import cli
from fairdiff_jax.baselines import METHODS
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.evaluate import evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_world import tiny_config, tiny_run  # noqa: E402

FAST = (
    "--config.eval.images_per_prompt=4",
    "--config.sampler.eval_steps=3",
    "--config.eval.batch_size=8",
    "--config.baselines.fair_diffusion.warmup_steps=1",  # active within the 3 steps
    "--config.baselines.uce.templates=('photo of {}',)",
    "--config.baselines.uce.measure_images=4",
    "--config.baselines.uce.measure_steps=2",
    "--config.baselines.uce.max_rounds=2",
)


@pytest.fixture(scope="module")
def eval_world(tiny_sd_path):
    cfg = tiny_config(tiny_sd_path, *FAST)
    run = tiny_run(tiny_sd_path, cfg)
    run.eval_prompts = {"test": ["a photo of a doctor", "a photo of a nurse"]}
    return run, cfg


@pytest.fixture(scope="module")
def original(eval_world, tmp_path_factory):
    run, cfg = eval_world
    out = str(tmp_path_factory.mktemp("original"))
    evaluate(cfg, None, out, run=run, progress=False)
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_evaluates_and_changes_the_images(eval_world, original, tmp_path, method):
    run, cfg = eval_world
    out = str(tmp_path / method)
    metrics = evaluate(cfg, None, out, run=run, progress=False, method=method, include_original=False)
    with open(os.path.join(out, "metrics.json")) as f:
        stored = json.load(f)
    assert set(stored["models"]) == {method} and stored["n_images"] == 8
    assert stored["baseline"]["method"] == method and stored["bias"] == metrics["bias"]
    ours = np.load(os.path.join(out, method, "test", "prompt_0000.npz"))
    base = np.load(os.path.join(original, "original", "test", "prompt_0000.npz"))
    assert str(ours["prompt"]) == "a photo of a doctor"  # stored under the user's prompt, for pairing and CLIP-T
    assert np.abs(ours["images"].astype(int) - base["images"]).max() > 0
    if method == "uce":
        assert stored["baseline"]["rounds"] >= 1
        assert os.path.isdir(os.path.join(out, "uce", "uce_rounds", "round_00"))


def test_method_and_workdir_together_are_refused(eval_world, tmp_path):
    run, cfg = eval_world
    with pytest.raises(FairdiffError, match="not both"):
        evaluate(cfg, str(tmp_path), str(tmp_path / "out"), run=run, method="uce", progress=False)


def test_cli_evaluates_a_baseline_on_the_toy_world(tiny_toy_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAIRDIFF_TOY_WORLD", tiny_toy_world)
    monkeypatch.setenv("FAIRDIFF_CACHE", str(tmp_path / "cache"))
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy.py")
    out = str(tmp_path / "out")
    argv = ["evaluate", "--config", config, "--method", "debiasvl", "--out", out, "--no-original"]
    argv += ["--config.eval.images_per_prompt=4", "--config.sampler.eval_steps=2", "--config.eval.batch_size=8"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["bias"]) == {"gender"}
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["baseline"]["num_pairs"] == 8  # one (female, male) pair per debiased toy occupation
