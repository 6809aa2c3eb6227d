"""Checkpoints: keep-last-N and save interval, exact resume of every item, fallback past a corrupt newest."""

import glob
import os
import signal
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fairdiff_jax import FairdiffError
from fairdiff_jax.checkpoints import Checkpointer
from fairdiff_jax.parallel import make_mesh, replicate
from fairdiff_jax.preemption import PreemptionFlag
from fairdiff_jax.prompts import PromptIterator


def fresh_state():
    params = {"text": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 3))}, "tokens": jnp.zeros((5,))}
    optimizer = optax.adamw(1e-2, weight_decay=1e-2)
    return {"params": params, "ema": params}, optimizer, optimizer.init(params)


def trained_state(step: int):
    """A state that differs per step: params moved by ``step`` AdamW updates, EMA trailing behind."""
    adaptor, optimizer, opt_state = fresh_state()
    params, ema = adaptor["params"], adaptor["ema"]
    for i in range(step):
        grads = jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1)), params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, params)
    return {"params": params, "ema": ema}, opt_state


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def saved_run(tmp_path):
    """Steps 1..7 with save_every=2, keep=2, state replicated on all 8 devices, then a forced save at 7."""
    mesh = make_mesh()
    iterator = PromptIterator([f"p{i}" for i in range(7)], prompts_per_step=2, seed=3)
    saved = {}
    with Checkpointer(str(tmp_path), save_every=2, keep=2) as ckpt:
        decisions = []
        for step in range(1, 8):
            next(iterator)
            adaptor, opt_state = trained_state(step)
            meta = {"skipped": 100 + step, "prompts": iterator.state()}
            decisions.append(ckpt.save(step, replicate(adaptor, mesh), replicate(opt_state, mesh), meta))
            saved[step] = (adaptor, opt_state, meta)
        assert decisions == [False, True, False, True, False, True, False]
        assert ckpt.save(7, *saved[7][:2], meta=saved[7][2], force=True)  # e.g. after SIGTERM
        assert not ckpt.save(6, *saved[6][:2], meta=saved[6][2], force=True)  # already saved: no error
        ckpt.wait()
    return str(tmp_path), saved, iterator


def test_keep_last_n_and_save_interval(saved_run):
    workdir, _, _ = saved_run
    ckpt = Checkpointer(workdir, save_every=2, keep=2)
    assert ckpt.steps() == [6, 7] and ckpt.latest_step() == 7
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6", "7"]
    assert set(os.listdir(os.path.join(workdir, "checkpoints", "7"))) >= {"adaptor", "opt_state", "meta"}


def test_resume_restores_every_item_exactly(saved_run):
    workdir, saved, iterator = saved_run
    adaptor_like, _, opt_state_like = fresh_state()
    restored = Checkpointer(workdir, save_every=2, keep=2).restore(adaptor_like, opt_state_like)
    adaptor, opt_state, _ = saved[7]
    assert restored.step == 7 and restored.meta["step"] == 7
    assert_trees_equal(restored.adaptor, adaptor)
    assert_trees_equal(restored.opt_state, opt_state)  # optax namedtuples come back as namedtuples
    assert int(restored.opt_state[0].count) == 7
    assert restored.meta["skipped"] == 107
    resumed = PromptIterator([f"p{i}" for i in range(7)], prompts_per_step=2, seed=0)
    resumed.restore(restored.meta["prompts"])
    assert [next(resumed) for _ in range(5)] == [next(iterator) for _ in range(5)]
    older = Checkpointer(workdir, save_every=2, keep=2).restore(adaptor_like, opt_state_like, step=6)
    assert_trees_equal(older.adaptor, saved[6][0])
    with pytest.raises(FairdiffError, match="no checkpoint of step 4"):
        Checkpointer(workdir, save_every=2, keep=2).restore(adaptor_like, opt_state_like, step=4)


def test_restore_onto_other_devices(saved_run):
    """Saved replicated over 8 devices; restored onto a 2-device mesh and onto a single device."""
    workdir, saved, _ = saved_run
    adaptor_like, _, opt_state_like = fresh_state()
    small_mesh = make_mesh(jax.devices()[:2])
    replicated = NamedSharding(small_mesh, P())
    restored = Checkpointer(workdir, save_every=2, keep=2).restore(adaptor_like, opt_state_like, sharding=replicated)
    leaf = restored.adaptor["params"]["text"]["lora_a"]
    assert leaf.sharding == replicated and len(leaf.addressable_shards) == 2
    assert_trees_equal(restored.adaptor, saved[7][0])
    single = Checkpointer(workdir, save_every=2, keep=2).restore(adaptor_like, opt_state_like)
    assert len(single.adaptor["ema"]["tokens"].devices()) == 1


def test_unreadable_newest_falls_back_with_warning(saved_run):
    workdir, saved, _ = saved_run
    adaptor_like, _, opt_state_like = fresh_state()
    newest = os.path.join(workdir, "checkpoints", "7")
    data_files = [f for f in glob.glob(os.path.join(newest, "adaptor", "**", "*"), recursive=True) if os.path.isfile(f)]
    for path in data_files:
        if "_CHECKPOINT_METADATA" not in path:
            with open(path, "wb") as f:
                f.write(b"\x00garbage\xff" * 7)
    with pytest.warns(RuntimeWarning, match="step 7 .* could not be read"):
        restored = Checkpointer(workdir, save_every=2, keep=2).restore(adaptor_like, opt_state_like)
    assert restored.step == 6
    assert_trees_equal(restored.adaptor, saved[6][0])
    # With every checkpoint unreadable the user gets one clear error instead of a traceback.
    with open(os.path.join(workdir, "checkpoints", "6", "meta", "metadata"), "w") as f:
        f.write("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FairdiffError, match="no readable checkpoint"):
            Checkpointer(workdir, save_every=2, keep=2).restore(adaptor_like, opt_state_like)


def test_empty_workdir_restores_nothing(tmp_path):
    adaptor_like, _, opt_state_like = fresh_state()
    assert Checkpointer(str(tmp_path), save_every=5).restore(adaptor_like, opt_state_like) is None


def test_sigterm_sets_the_flag_and_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionFlag() as flag:
        assert not flag.any_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.any_requested()
    assert signal.getsignal(signal.SIGTERM) == before
