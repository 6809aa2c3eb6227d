"""Two ``jax.distributed`` processes on CPU (localhost coordinator, 2 x 4 simulated devices) against one process
with 8 devices: the same batch rows on the same devices, and the same training run."""

import json
import os
import sys

import jax
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from distributed_world import launch  # noqa: E402


def _wait(processes, timeout: float) -> None:
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except Exception:  # a hung peer: stop them all, then report
            for other in processes:
                other.kill()
            raise
    for process in processes:
        assert process.returncode == 0, process.stderr.read()[-4000:]


def test_two_processes_place_the_global_batch_once(tmp_path):
    """Every row of the global ``[8, 2]`` batch lands on exactly one of the 8 devices, as in one process."""
    out = str(tmp_path / "placed")
    _wait(launch(["place", out], num_processes=2, local_devices=4), timeout=300)
    records = [json.load(open(f"{out}.{rank}.json")) for rank in range(2)]
    rows = {}
    for record in records:
        assert record["devices"] == 8 and record["shape"] == [8, 2]
        assert record["replicated"] == [[1.0, 2.0, 3.0]] * 4
        rows.update({int(device): value for device, value in record["rows"].items()})
    assert sorted(rows) == list(range(8))
    # the device at position d of the 1-D mesh holds row d
    np.testing.assert_array_equal(np.concatenate([rows[d] for d in range(8)]), np.arange(16).reshape(8, 2))


@pytest.mark.slow
def test_two_process_training_equals_one_process(tiny_sd_path, tmp_path):
    """Two training steps: the logged metrics of every step and the final adaptor (parameters and EMA) agree."""
    from fairdiff_jax.checkpoints import restore_adaptor_item
    from fairdiff_jax.reporting import read_metrics

    workdirs = {name: str(tmp_path / name) for name in ("one", "two")}
    _wait(launch(["train", tiny_sd_path, workdirs["one"], "2"], num_processes=1, local_devices=8), timeout=900)
    _wait(launch(["train", tiny_sd_path, workdirs["two"], "2"], num_processes=2, local_devices=4), timeout=900)

    logged = {name: [row for row in read_metrics(folder) if "loss" in row] for name, folder in workdirs.items()}
    assert [row["step"] for row in logged["one"]] == [row["step"] for row in logged["two"]] == [1, 2]
    for one, two in zip(logged["one"], logged["two"]):
        for name in ("loss", "loss_align", "loss_img", "grad_norm", "confident/gender", "freq/gender/1"):
            np.testing.assert_allclose(two[name], one[name], rtol=2e-4, atol=1e-6, err_msg=name)

    (step_one, adaptor_one), (step_two, adaptor_two) = (restore_adaptor_item(w) for w in workdirs.values())
    assert step_one == step_two == 2
    for item in ("params", "ema"):
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(adaptor_one[item])])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(adaptor_two[item])])
        # AdamW's first steps are nearly sign(g): entries whose gradient is ~0 may flip on summation-order noise
        differing = np.abs(a - b) > 1e-5
        assert differing.mean() < 0.01, differing.sum()
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(a)
