"""The training loop: the sharded step equals the single-device step; kill -9 and resume is exact; CLI errors."""

import os
import signal
import sys
import time

import jax
import numpy as np
import optax
import pytest

from fairdiff_jax import cli, parallel
from fairdiff_jax.checkpoints import restore_adaptor_item
from fairdiff_jax.reporting import read_metrics
from fairdiff_jax.train import BATCH_SPECS, make_batch, place_batch, train
from fairdiff_jax.train_step import init_state, make_train_step, step_model

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_world import PROMPTS, tiny_config, tiny_run, training_process  # noqa: E402


@pytest.fixture(scope="module")
def world(tiny_sd_path):
    cfg = tiny_config(tiny_sd_path)
    return tiny_run(tiny_sd_path, cfg), cfg


def _run_parallel(model, frozen, optimizer, state, batch, mode):
    mesh = parallel.make_mesh()
    per_device = make_train_step(model, optimizer)
    step = parallel.data_parallel(
        per_device,
        mesh,
        in_specs=(parallel.P(), parallel.P(), BATCH_SPECS),
        out_specs=(parallel.P(), parallel.P()),
        mode=mode,
    )
    return step(parallel.replicate(state, mesh), parallel.replicate(frozen, mesh), place_batch(batch, mesh))


def test_sharded_step_equals_single_device_step(world):
    assert jax.device_count() == 8
    optimizer = optax.sgd(1.0)  # the update is minus the gradient, so comparing updates compares gradients
    run, cfg = world
    model = step_model(run, cfg)
    state = init_state(run.spec, run.frozen, optimizer, jax.random.PRNGKey(1))
    # non-zero up-projections so the adaptor already changes the images and every gradient is non-trivial
    state = state._replace(params=jax.tree.map(lambda x: x + 0.05, state.params))
    batch = make_batch(run, cfg, PROMPTS[:2], step=1)
    single_state, single = jax.jit(make_train_step(model, optimizer, axis_name=None))(state, run.frozen, batch)
    single_grads = jax.tree.map(lambda a, b: a - b, single_state.params, state.params)
    assert float(optax.global_norm(single_grads)) > 1e-6
    assert 0 < float(single["confident/gender"]) <= 1
    for mode in ("shard_map", "pmap"):
        new_state, metrics = _run_parallel(model, run.frozen, optimizer, state, batch, mode)
        for name in ("loss", "loss_align", "loss_img", "grad_norm", "freq/gender", "bias/gender", "confident/gender"):
            np.testing.assert_allclose(np.asarray(metrics[name]), np.asarray(single[name]), rtol=1e-4, atol=1e-6)
        grads = jax.tree.map(lambda a, b: a - b, new_state.params, state.params)
        assert_gradients_close(grads, single_grads)


def assert_gradients_close(got, want, *, rtol: float = 1e-4):
    """Gradients equal up to float32 accumulation: their difference is small relative to the gradient's norm, as
    a whole and element by element (a per-element tolerance fails on tiny entries whose sums are reordered)."""
    scale = float(optax.global_norm(want))
    difference = float(optax.global_norm(jax.tree.map(lambda a, b: a - b, got, want)))
    assert difference <= rtol * scale, (difference, scale)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=rtol * scale / 10), got, want)


def test_kill_and_resume_gives_the_uninterrupted_adaptor(tiny_sd_path, tmp_path):
    steps = 5
    straight = str(tmp_path / "straight")
    proc = training_process(tiny_sd_path, straight, steps)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    killed = str(tmp_path / "killed")
    proc = training_process(tiny_sd_path, killed, steps)
    third = os.path.join(killed, "checkpoints", "3")
    deadline = time.time() + 600
    while not os.path.isdir(third) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.isdir(os.path.join(killed, "checkpoints", str(steps)))
    proc = training_process(tiny_sd_path, killed, steps)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    step_a, adaptor_a = restore_adaptor_item(straight)
    step_b, adaptor_b = restore_adaptor_item(killed)
    assert step_a == step_b == steps
    jax.tree.map(np.testing.assert_array_equal, adaptor_a, adaptor_b)
    logged = read_metrics(killed)
    assert logged and all(np.isfinite(row["loss"]) for row in logged if "loss" in row)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.lrr=1", "unknown config key 'train.lrr'"),
        ("--config.attributes.gender.target=(0.3, 0.6)", "sum"),
        ("--config.model.path=/nonexistent/sd15", "/nonexistent/sd15"),
    ],
)
def test_bad_input_gives_one_clear_line(override, message, tmp_path, capsys):
    config = os.path.join(os.path.dirname(HERE), "configs", "gender.py")
    code = cli.main(["train", "--config", config, override, "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err


def test_microbatched_gradient_equals_one_pass(world, tiny_sd_path):
    optimizer = optax.sgd(1.0)
    run, cfg = world
    chunked_cfg = tiny_config(tiny_sd_path, "--config.train.microbatch=4")
    state = init_state(run.spec, run.frozen, optimizer, jax.random.PRNGKey(1))
    state = state._replace(params=jax.tree.map(lambda x: x + 0.05, state.params))
    batch = make_batch(run, cfg, PROMPTS[:2], step=2)
    results = []
    for config in (cfg, chunked_cfg):
        step = make_train_step(step_model(run, config), optimizer, axis_name=None)
        new_state, metrics = jax.jit(step)(state, run.frozen, batch)
        results.append((jax.tree.map(lambda a, b: a - b, new_state.params, state.params), metrics))
    (one_pass, m1), (chunked, m2) = results
    assert float(optax.global_norm(one_pass)) > 1e-6
    for name in ("loss", "loss_align", "loss_img", "freq/gender", "confident/gender"):
        np.testing.assert_allclose(np.asarray(m2[name]), np.asarray(m1[name]), rtol=1e-4, atol=1e-6)
    assert_gradients_close(chunked, one_pass)


def test_a_microbatch_that_does_not_divide_the_device_images_is_refused_before_training(world, tiny_sd_path, tmp_path):
    from fairdiff_jax.errors import FairdiffError

    run, _ = world
    workdir = str(tmp_path / "w")
    message = r"train.microbatch=5 must be 0 .* or divide the 2 images each device"
    with pytest.raises(FairdiffError, match=message) as info:
        train(tiny_config(tiny_sd_path, "--config.train.microbatch=5"), workdir, run=run, progress=False)
    assert "\n" not in str(info.value) and not os.path.exists(os.path.join(workdir, "config.json"))
    # the rule is the device's: one device with N=8 x P=2 images takes a micro-batch of 16 (the old config rule,
    # which compared it with N alone, refused it)
    from fairdiff_jax.train_step import check_microbatch

    check_microbatch(16, 16)
