"""``experiments/toy_tables.py`` end to end on a tiny toy world: Table 1 rows, the ablation, resumption."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import toy_tables  # noqa: E402

TINY = [
    "--config.num_steps=2",
    "--config.checkpoint_every=2",
    "--config.log_every=1",
    "--config.sample_every=100",
    "--config.sampler.train_steps=(2, 2)",
    "--config.sampler.eval_steps=2",
    "--config.sampler.unroll=1",
    "--config.train.images_per_prompt=8",
    "--config.train.prompts_per_step=2",  # the toy text-LoRA default trains all 8 prompts a step
    "--config.eval.images_per_prompt=8",
    "--config.eval.batch_size=8",
]


def test_toy_tables_end_to_end(tiny_toy_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAIRDIFF_TOY_WORLD", tiny_toy_world)
    root = str(tmp_path / "tables")
    # the Table-1 row trains soft tokens (the frozen base encoder then runs in the grown module), the ablation LoRA
    args = ["--root", root, "--kinds", "soft_tokens", "--targets", "gender+race", "--modes", "exact", "detached"]
    args += ["--methods"]  # no baseline rows here (tests/test_toy_tables_baselines.py has them)
    assert toy_tables.main(args + ["--no-progress"] + TINY) == 0
    markdown = capsys.readouterr().out
    with open(os.path.join(root, "toy_tables.md")) as f:
        assert f.read() == markdown
    # two Table-1 splits, each with the original row and the gender×race text-LoRA row
    assert markdown.count("| — (original) | — |") == 2
    assert markdown.count("| gender×race | `soft_tokens` |") == 2
    assert "| exact |" in markdown and "| detached |" in markdown
    assert os.path.getsize(os.path.join(root, "ablation_curves.png")) > 0
    for name in ("original", "gender+race_soft_tokens_adjusted", "gender_text_lora_exact", "gender_text_lora_detached"):
        with open(os.path.join(root, name, "row.json")) as f:
            row = json.load(f)
        for split in ("debiased", "held_out"):
            assert set(row[split]["bias"]) == {"gender", "race", "gender_x_race"}
            assert all(0.0 <= v <= 1.0 for v in row[split]["bias"].values())
            assert abs(sum(row[split]["freq"]["race"]) - 1.0) < 1e-6
    exact = json.load(open(os.path.join(root, "gender_text_lora_exact", "row.json")))
    assert exact["mode"] == "exact" and exact["steps"] == 2
    with open(os.path.join(root, "gender_text_lora_exact", "train", "config.json")) as f:
        assert json.load(f)["sampler"]["gradient_mode"] == "exact"

    # a second call reuses every finished run: nothing is trained or generated again
    stamps = {
        name: os.path.getmtime(os.path.join(root, name, "row.json"))
        for name in os.listdir(root)
        if os.path.isdir(os.path.join(root, name))
    }
    assert toy_tables.main(args + ["--no-progress"] + TINY) == 0
    assert capsys.readouterr().out == markdown
    assert stamps == {name: os.path.getmtime(os.path.join(root, name, "row.json")) for name in stamps}

    # --finished-only tabulates what exists and trains nothing: the unet_lora row and the adjusted mode are absent
    # (seed 1 never ran: the rows show seed 0 alone, and say so in the seeds column)
    more = ["--kinds", "soft_tokens", "unet_lora", "--modes", "exact", "adjusted", "--finished-only", "--no-progress"]
    assert toy_tables.main(args[:2] + ["--targets", "gender+race", "--seeds", "0", "1"] + more + TINY) == 0
    partial = capsys.readouterr().out
    assert "`unet_lora`" not in partial and partial.count("| gender×race | `soft_tokens` |") == 2
    soft_lines = [line for line in partial.splitlines() if line.startswith("| gender×race | `soft_tokens` |")]
    assert soft_lines == [line for line in markdown.splitlines() if line.startswith("| gender×race | `soft_tokens`")]
    assert all(line.endswith("| 1 |") for line in soft_lines)
    assert "| exact |" in partial and "| adjusted |" not in partial and "| detached |" not in partial
    assert not os.path.exists(os.path.join(root, "gender+race_unet_lora_adjusted"))

    # a run that stopped before num_steps (SIGTERM) is not evaluated as if it were finished
    from fairdiff_jax.errors import FairdiffError
    from fairdiff_jax.run import build_run
    from fairdiff_jax.toyworld.demo import adapted_model, demo_config

    longer_cfg = demo_config("text_lora", ["gender"], TINY + ["--config.num_steps=3"])
    with pytest.raises(FairdiffError, match="stopped at step 2 of 3; run the same command again"):
        adapted_model(build_run(longer_cfg), longer_cfg, os.path.join(root, "gender_text_lora_exact", "train"))


def test_frozen_encoder_in_the_grown_soft_token_module_gives_the_base_output(tiny_toy_world, monkeypatch):
    import jax.numpy as jnp
    import numpy as np

    from fairdiff_jax.generation import embed, tokenize
    from fairdiff_jax.run import build_run
    from fairdiff_jax.toyworld.demo import demo_config

    monkeypatch.setenv("FAIRDIFF_TOY_WORLD", tiny_toy_world)
    soft_run = build_run(demo_config("soft_tokens"))
    plain_run = build_run(demo_config("text_lora"))
    soft, plain = soft_run.pipeline, plain_run.pipeline
    prompts = ["a photo of a doctor", ""]
    ids = jnp.asarray(tokenize(plain, prompts, soft_tokens=False))
    grown = int(soft_run.spec.num_soft_tokens)  # the demo config's soft tokens (5, the paper's)
    assert grown == 5 and soft.text_encoder.config.vocab_size == plain.text_encoder.config.vocab_size + grown
    np.testing.assert_allclose(
        np.asarray(embed(soft, soft_run.frozen["text_encoder"], ids)),
        np.asarray(embed(plain, plain_run.frozen["text_encoder"], ids)),
        rtol=0,
        atol=0,
    )
