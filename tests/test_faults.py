"""Fault injection: divergence and recovery, a changed adaptor on resume, stale evaluation images, a full disk,
unwritable folders, two runs in one workdir, Ctrl-C, damaged checkpoints, and the one-line errors of the CLI."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fairdiff_jax import cli
from fairdiff_jax.checkpoints import Checkpointer, restore_adaptor_item
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.run_folder import RunLock
from fairdiff_jax.train import train

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_world import tiny_config, tiny_run, training_process, write_finished_run  # noqa: E402

TINY = ("--config.checkpoint_every=1", "--config.keep_checkpoints=2", "--config.log_every=1")


@pytest.fixture(scope="module")
def tiny(tiny_sd_path):
    """The tiny training world (its classifier and features are built once)."""
    cfg = tiny_config(tiny_sd_path, *TINY)
    return tiny_run(tiny_sd_path, cfg)


def _cfg(tiny_sd_path, *overrides):
    return tiny_config(tiny_sd_path, *TINY, *overrides)


def test_divergence_keeps_the_last_good_checkpoint_and_names_the_resume_command(tiny, tiny_sd_path, tmp_path):
    workdir = str(tmp_path / "run")
    assert train(_cfg(tiny_sd_path, "--config.num_steps=3"), workdir, run=tiny, progress=False).finished
    # lr 1e30 makes every update overflow (parameters ~1e30 are still finite, their update norm is not)
    blown = _cfg(
        tiny_sd_path, "--config.num_steps=8", "--config.train.lr=1e30", "--config.train.max_skipped_in_a_row=2"
    )
    with pytest.raises(
        FairdiffError, match=r"diverged: 2 non-finite .* up to step 5; the last good checkpoint is step 3"
    ):
        train(blown, workdir, run=tiny, progress=False, resume_hint=lambda step: f"RESUME --resume-step {step}")
    assert Checkpointer(workdir, save_every=1).steps() == [2, 3]  # nothing saved from the skipped steps
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["finite"] for r in records if r["step"] > 3 and "finite" in r] == [0.0, 0.0]
    # the named recovery: resume from step 3 with a sane learning rate
    result = train(_cfg(tiny_sd_path, "--config.num_steps=4"), workdir, run=tiny, progress=False, resume_step=3)
    assert result.finished and result.step == 4
    step, adaptor = restore_adaptor_item(workdir)
    assert step == 4 and all(
        np.isfinite(np.asarray(x)).all() and np.abs(x).max() < 1e3 for x in jax.tree.leaves(adaptor)
    )
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    # the records of the abandoned steps 4 and 5 were dropped; step 4 is logged once, by the resumed run
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["finite"] for r in records if "loss" in r] == [1.0, 1.0, 1.0, 1.0]


def test_the_cli_names_the_exact_resume_command():
    from fairdiff_jax.cli.train import resume_command

    argv = ["--config", "configs/toy.py", "--workdir", "w", "--config.train.lr=0.01", "--resume-step", "7"]
    assert resume_command(argv, 0.01)(12) == (
        "fairdiff train --config configs/toy.py --workdir w --resume-step 12 --config.train.lr=0.001"
    )


def test_resume_with_another_adaptor_is_refused_before_anything_is_written(tiny, tiny_sd_path, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    train(_cfg(tiny_sd_path, "--config.num_steps=1"), workdir, run=tiny, progress=False)
    stored = {name: open(os.path.join(workdir, name)).read() for name in ("adaptor.json", "config.json")}
    changes = (
        ("--config.adaptor.rank=8", "adaptor.rank: 4 -> 8"),
        ("--config.adaptor.kind=unet_lora", "adaptor.kind: 'text_lora' -> 'unet_lora'"),
        ("--config.attributes.gender.target=(0.3, 0.7)", "attributes.gender.target: [0.5, 0.5] -> [0.3, 0.7]"),
    )
    for change, named in changes:
        cfg = _cfg(tiny_sd_path, "--config.num_steps=2", change)
        with pytest.raises(FairdiffError, match="holds checkpoints of another run") as info:
            train(cfg, workdir, run=tiny_run(tiny_sd_path, cfg), progress=False)
        assert named in str(info.value) and "start a new --workdir" in str(info.value)
        assert {name: open(os.path.join(workdir, name)).read() for name in stored} == stored
    caplog.set_level("INFO", logger="fairdiff_jax")
    result = train(
        _cfg(tiny_sd_path, "--config.num_steps=2", "--config.train.lr=0.005"), workdir, run=tiny, progress=False
    )
    assert result.finished and "train.lr: 0.01 -> 0.005" in caplog.text
    assert open(os.path.join(workdir, "adaptor.json")).read() == stored["adaptor.json"]


def test_stored_evaluation_images_are_keyed_by_the_model(tiny_sd_path, tmp_path):
    from fairdiff_jax import adaptors
    from fairdiff_jax.evaluate import evaluate

    cfg = _cfg(tiny_sd_path, "--config.eval.images_per_prompt=2", "--config.sampler.eval_steps=2")
    run = tiny_run(tiny_sd_path, cfg)
    run.eval_prompts = {"test": ["a photo of a doctor"]}
    workdir = str(tmp_path / "run")
    write_finished_run(workdir, run, shift=0.3)  # step 1
    params = adaptors.init_adaptor(jax.random.PRNGKey(0), run.spec, run.frozen["unet"], run.frozen["text_encoder"])
    with Checkpointer(workdir, save_every=1) as checkpointer:  # step 4: another adaptor
        shifted = jax.tree.map(lambda x: x - 0.3, params)
        checkpointer.save(4, {"params": shifted, "ema": shifted}, {"count": np.zeros(())}, {"prompts": {}})
    out, fresh = str(tmp_path / "eval"), str(tmp_path / "fresh")

    def images(folder):
        return np.load(os.path.join(folder, "debiased", "test", "prompt_0000.npz"))["images"]

    evaluate(cfg, workdir, out, step=1, run=run, include_original=False, progress=False)
    first = images(out)
    evaluate(cfg, workdir, out, step=4, run=run, include_original=False, progress=False)
    evaluate(cfg, workdir, fresh, step=4, run=run, include_original=False, progress=False)
    assert np.abs(first.astype(int) - images(fresh)).max() > 0
    np.testing.assert_array_equal(images(out), images(fresh))  # regenerated, not the stale step-1 images


def test_a_full_disk_is_one_line_naming_the_folder_and_the_size(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpointer = Checkpointer(str(tmp_path), save_every=1)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    tree = {"params": {"w": jnp.ones((256, 256))}, "ema": {"w": jnp.ones((256, 256))}}
    with pytest.raises(FairdiffError) as info:
        checkpointer.save(1, tree, {"mu": jnp.ones((256, 256))}, {"prompts": {}})
    message = str(info.value)
    assert "No space left on device" in message and str(tmp_path) in message and "0.8 MiB" in message
    assert "\n" not in message


def test_two_runs_in_one_workdir_and_a_stale_lock(tmp_path, caplog):
    with RunLock(str(tmp_path)):
        with pytest.raises(FairdiffError, match=rf"in use by another training run \(host .*, pid {os.getpid()}"):
            with RunLock(str(tmp_path)):
                pass
    assert not os.path.exists(os.path.join(tmp_path, "train.lock"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    with open(os.path.join(tmp_path, "train.lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "earlier"}, f)
    with RunLock(str(tmp_path)) as lock:
        assert lock.held and "taking over the stale lock" in caplog.text


def test_ctrl_c_saves_the_step_and_exits_130(tiny_sd_path, tmp_path):
    workdir = str(tmp_path / "run")
    proc = training_process(tiny_sd_path, workdir, 40)
    second = os.path.join(workdir, "checkpoints", "2")
    deadline = time.time() + 600
    while not os.path.isdir(second) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 128 + signal.SIGINT, proc.stderr.read()[-2000:]
    step, _ = restore_adaptor_item(workdir)  # the step it stopped at was saved completely
    assert 2 <= step < 40
    assert not os.path.exists(os.path.join(workdir, "train.lock"))


DAMAGE = """
import glob, os, sys
import jax.numpy as jnp
from fairdiff_jax.checkpoints import Checkpointer
workdir, how = sys.argv[1], sys.argv[2]
tree = {"params": {"a": jnp.ones(3)}, "ema": {"a": jnp.ones(3)}}
with Checkpointer(workdir, save_every=1, keep=3) as c:
    for s in (1, 2):
        c.save(s, tree, {"m": jnp.zeros(2)}, {"prompts": {}})
steps = ["2"] if how != "all" else ["1", "2"]
for step in steps:
    for f in glob.glob(f"{workdir}/checkpoints/{step}/adaptor/**", recursive=True):
        if os.path.isfile(f) and ("/d/" in f or "manifest" in f):
            if how == "garble":
                open(f, "wb").write(b"garbage" * 10)
            else:
                open(f, "r+b").truncate(3)
try:
    print("restored", Checkpointer(workdir, save_every=1).restore(tree, {"m": jnp.zeros(2)}).step)
except Exception as err:
    print("error", type(err).__name__)
"""


@pytest.mark.parametrize(
    "how, outcome", [("truncate", "restored 1"), ("garble", "restored 1"), ("all", "error FairdiffError")]
)
def test_damaged_checkpoints_fall_back_without_tracebacks(tmp_path, how, outcome):
    result = subprocess.run(
        [sys.executable, "-c", DAMAGE, str(tmp_path / "w"), how], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.strip() == outcome, result.stderr[-2000:]
    if how == "all":
        # when every checkpoint fails tensorstore may still report its closed event loop once while the interpreter
        # shuts down (the hooks are gone by then): 90-170 times before the filter; 0 in 20 runs with the unraisable
        # hook filtered too
        stray = result.stderr.count("RuntimeError: Event loop is closed")
        assert result.stderr.count("Traceback") == stray <= 1, result.stderr
    else:
        assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("case", ["syntax error", "negative lr", "workdir under a file", "export onto a file"])
def test_bad_paths_and_files_are_one_line(case, tmp_path, capsys):
    configs = os.path.join(os.path.dirname(HERE), "configs")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    return (\n")
    regular = tmp_path / "file.txt"
    regular.write_text("not a folder")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv, expected = {
        "syntax error": (
            ["train", "--config", str(broken), "--workdir", str(tmp_path / "w")],
            f"config file '{broken}' could not be loaded (line 2): SyntaxError",
        ),
        "negative lr": (
            ["train", "--config", f"{configs}/toy.py", "--config.train.lr=-1e-4", "--workdir", str(tmp_path / "w")],
            "train.lr=-0.0001 must be a positive number",
        ),
        "workdir under a file": (
            ["train", "--config", f"{configs}/toy.py", "--workdir", f"{regular}/run"],
            f"--workdir {regular}/run cannot be written",
        ),
        "export onto a file": (
            ["export", "--workdir", str(run_dir), "--out", str(regular)],
            f"--out {regular} is a file",
        ),
    }[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_export_accepts_the_demo_workdir(tiny, tmp_path, capsys):
    demo = tmp_path / "demo"
    write_finished_run(str(demo / "train"), tiny)
    out = str(tmp_path / "out")
    assert cli.main(["export", "--workdir", str(demo), "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert cli.main(["export", "--workdir", str(demo), "--out", out]) == 0
    assert f"replaced the earlier export in {out}" in capsys.readouterr().out
