"""``fairdiff evaluate --adaptor DIR``: an exported or imported adaptor folder evaluates like the run it came from.

An exported folder must give the very images and metrics of evaluating its training run (same noise, same
adaptor), a soft-token folder must change the images, and misuse is refused in one line.
"""

import os
import sys

import jax
import numpy as np
import pytest

from fairdiff_jax import adaptors
from fairdiff_jax.adaptors.export import export_adaptor, export_run
from fairdiff_jax.cli import main as cli_main
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.evaluate import evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_world import tiny_config, tiny_run, write_finished_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo of a doctor", "a photo of a nurse"]


@pytest.fixture(scope="module")
def eval_config(tiny_sd_path):
    return tiny_config(
        tiny_sd_path, "--config.eval.images_per_prompt=4", "--config.sampler.eval_steps=2", "--config.eval.batch_size=8"
    )


@pytest.fixture(scope="module")
def lora_run(tiny_sd_path, eval_config):
    run = tiny_run(tiny_sd_path, eval_config)
    run.eval_prompts = {"test": list(PROMPTS)}
    return run


def _images(out, which, index=0):
    return np.load(os.path.join(out, which, "test", f"prompt_{index:04d}.npz"))["images"]


def test_an_exported_folder_evaluates_like_its_training_run(lora_run, eval_config, tmp_path):
    workdir, folder = str(tmp_path / "run"), str(tmp_path / "export")
    write_finished_run(workdir, lora_run)
    export_run(workdir, folder)
    from_run = evaluate(eval_config, workdir, str(tmp_path / "eval_run"), run=lora_run, progress=False)
    from_folder = evaluate(
        eval_config, None, str(tmp_path / "eval_folder"), adaptor=folder, run=lora_run, progress=False
    )
    assert set(from_folder["models"]) == {"original", "adaptor (export)"}
    assert from_folder["bias"] == from_run["bias"] and from_folder["freq"] == from_run["freq"]
    for index in range(len(PROMPTS)):
        ours, theirs = (_images(str(tmp_path / name), "debiased", index) for name in ("eval_folder", "eval_run"))
        np.testing.assert_array_equal(ours, theirs)
    original = _images(str(tmp_path / "eval_folder"), "original")
    assert np.abs(original.astype(int) - _images(str(tmp_path / "eval_folder"), "debiased")).max() > 0


@pytest.mark.slow
def test_a_soft_token_folder_is_evaluated_with_its_tokens(tiny_sd_path, tiny_sd, eval_config, lora_run, tmp_path):
    spec = adaptors.make_adaptor_spec(
        tiny_sd.unet_params, tiny_sd.text_encoder_params, base_model=tiny_sd_path, num_soft_tokens=3, soft_token="<x>"
    )
    tokens = 0.5 * jax.random.normal(jax.random.PRNGKey(3), (3, 32))
    folder = str(tmp_path / "tokens")
    export_adaptor(spec, {"soft_tokens": tokens}, folder)
    with pytest.raises(FairdiffError, match="has 3 soft token") as err:  # a run built for the config's LoRA
        evaluate(eval_config, None, str(tmp_path / "wrong"), adaptor=folder, run=lora_run, progress=False)
    assert "\n" not in str(err.value)
    run = tiny_run(tiny_sd_path, eval_config, adaptors.read_adaptor_metadata(folder))
    run.eval_prompts = {"test": PROMPTS[:1]}
    out = str(tmp_path / "eval")
    metrics = evaluate(eval_config, None, out, adaptor=folder, run=run, progress=False)
    assert set(metrics["models"]) == {"original", "adaptor (tokens)"}
    assert np.abs(_images(out, "original").astype(int) - _images(out, "debiased")).max() > 0


def test_the_command_refuses_mixed_sources_in_one_line(tiny_sd_path, tmp_path, capsys):
    base = ["evaluate", "--config", os.path.join(ROOT, "configs", "toy.py"), "--out", str(tmp_path / "o")]
    assert cli_main(base + ["--adaptor", str(tmp_path), "--no-ema"]) == 2
    assert "an --adaptor folder holds one adaptor" in capsys.readouterr().err
    assert cli_main(base + ["--adaptor", str(tmp_path), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("not both") and "\n" not in err
