"""Data parallelism on 8 simulated CPU devices: shard_map, pmap and one unsharded device agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fairdiff_jax import FairdiffError
from fairdiff_jax.parallel import (
    all_gather_group,
    data_parallel,
    make_mesh,
    maybe_initialize_distributed,
    own_slice,
    pmean,
    replicate,
    shard_batch,
)

IMAGES, PROMPTS, DIM, HIDDEN = 16, 3, 5, 7


def mlp_scores(params, x):
    """A small MLP: ``[n, P, DIM] -> [n, P]`` scores."""
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return (hidden @ params["w2"])[..., 0]


def group_targets(scores):
    """Targets that depend on the whole prompt group ``[N, P]``: 1 above the group's mean score, else 0."""
    return (scores > scores.mean(axis=0, keepdims=True)).astype(scores.dtype)


def reference_step(params, x):
    """The step on one device, no sharding: mean squared error to group-dependent targets."""

    def loss_fn(p):
        scores = mlp_scores(p, x)
        targets = jax.lax.stop_gradient(group_targets(scores))
        return jnp.mean((scores - targets) ** 2 + 0.1 * scores**2)

    return jax.value_and_grad(loss_fn)(params)


def per_device_step(params, x):
    """The same step written per device: targets from all-gathered scores, loss and gradients pmean'ed."""
    local_size = x.shape[0]

    def loss_fn(p):
        scores = mlp_scores(p, x)
        group = all_gather_group(jax.lax.stop_gradient(scores))
        targets = own_slice(group_targets(group), local_size)
        return jnp.mean((scores - targets) ** 2 + 0.1 * scores**2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return pmean(loss), pmean(grads), all_gather_group(x)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(DIM, HIDDEN)).astype(np.float32),
        "b1": rng.normal(size=(HIDDEN,)).astype(np.float32),
        "w2": rng.normal(size=(HIDDEN, 1)).astype(np.float32),
    }
    x = rng.normal(size=(IMAGES, PROMPTS, DIM)).astype(np.float32)
    loss, grads = jax.jit(reference_step)(params, x)
    return params, x, float(loss), jax.tree.map(np.asarray, grads)


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8
    assert make_mesh().shape == {"data": 8}


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_data_parallel_matches_single_device(problem, mode):
    params, x, ref_loss, ref_grads = problem
    mesh = make_mesh()
    step = data_parallel(per_device_step, mesh, mode=mode, in_specs=(P(), P("data")), out_specs=(P(), P(), P()))
    loss, grads, gathered = step(replicate(params, mesh), shard_batch(x, mesh))
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    for name in ref_grads:
        np.testing.assert_allclose(np.asarray(grads[name]), ref_grads[name], rtol=1e-4, atol=1e-6)
    # The gathered group is the global batch in its original order.
    np.testing.assert_array_equal(np.asarray(gathered), x)
    # The targets really depend on other devices' images: a per-device mean would change the loss.
    local_only = np.mean(
        [float(reference_step(params, x[i * 2 : (i + 1) * 2])[0]) for i in range(8)]  # 2 images per device
    )
    assert abs(local_only - ref_loss) > 1e-3


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_sharded_outputs_keep_global_order(mode):
    mesh = make_mesh()
    x = np.arange(16 * 2, dtype=np.float32).reshape(16, 2)

    def per_device(scale, rows):
        return rows * scale + jax.lax.axis_index("data").astype(rows.dtype) * 1000.0

    run = data_parallel(per_device, mesh, mode=mode, in_specs=(P(), P("data")), out_specs=P("data"))
    out = np.asarray(run(replicate(jnp.float32(2.0), mesh), shard_batch(x, mesh)))
    expected = x * 2 + np.repeat(np.arange(8), 2)[:, None] * 1000.0
    np.testing.assert_array_equal(out, expected)


def test_shard_batch_places_on_data_axis_and_rejects_bad_sizes():
    mesh = make_mesh()
    batch = shard_batch({"noise": np.zeros((8, 3), np.float32)}, mesh)
    assert batch["noise"].sharding == NamedSharding(mesh, P("data"))
    assert len(batch["noise"].addressable_shards) == 8
    assert batch["noise"].addressable_shards[0].data.shape == (1, 3)
    with pytest.raises(FairdiffError, match="multiple of 8"):
        shard_batch(np.zeros((12, 3)), mesh)
    replicated = replicate(np.ones(3), mesh)
    assert replicated.sharding.is_fully_replicated


def test_bad_mode_and_spec_are_user_errors():
    mesh = make_mesh()
    with pytest.raises(FairdiffError, match="parallel.mode"):
        data_parallel(lambda x: x, mesh, mode="gspmd", in_specs=(P("data"),), out_specs=P("data"))
    with pytest.raises(FairdiffError, match="partition spec"):
        data_parallel(lambda x: x, mesh, in_specs=(P(None, "data"),), out_specs=P("data"))


def test_distributed_is_opt_in():
    from ml_collections import ConfigDict

    assert maybe_initialize_distributed(ConfigDict({"parallel": {"distributed": False}})) is False
