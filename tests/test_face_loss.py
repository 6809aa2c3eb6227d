"""L_face as the authors compute it (sail-sg/finetune-fair-diffusion, exp-1 / exp-3 / exp-4 ``1-main-debias.py``):
the keep-original rule, which images count, top-1 search over the whole reference set, the loss and its gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.alignment.face import (
    default_keep_confidence,
    face_loss_mask,
    face_realism_loss,
    keep_original_face,
    nearest_reference,
)
from fairdiff_jax.errors import FairdiffError

RNG = np.random.default_rng(3)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_keep_confidence_follows_the_authors_scripts():
    assert [default_keep_confidence(n) for n in (1, 2, 3)] == [0.9, 0.8, 0.75]
    with pytest.raises(FairdiffError):
        default_keep_confidence(0)


def test_keep_original_is_the_authors_condition():
    labels = {"gender": np.array([1, 1, 1, -1, 1, 0]), "race": np.array([2, 2, 3, 1, 0, 3])}
    probs = {
        "gender": np.array([[0.05, 0.95], [0.05, 0.95], [0.15, 0.85], [0.02, 0.98], [0.95, 0.05], [0.99, 0.01]]),
        "race": np.array([[0, 0, 0.9, 0.1], [0.5, 0, 0.5, 0], [0, 0, 0.1, 0.9], [0, 1, 0, 0], [1, 0, 0, 0], [0] * 4]),
    }
    probs["race"][5] = [0.0, 0.0, 0.05, 0.95]
    original_valid = np.array([True, True, True, True, True, False])
    got = keep_original_face(
        {k: jnp.asarray(v) for k, v in labels.items()},
        {k: jnp.asarray(v, jnp.float32) for k, v in probs.items()},
        jnp.asarray(original_valid),
        threshold=0.8,
    )
    # exp-3's idxs_w_face_feats_from_ori, per image: targets != -1, targets == preds_ori, max(probs_ori) >= level,
    # for gender and race (an original without a face has no prediction: preds_ori = -1)
    want = []
    for i in range(6):
        ok = original_valid[i]
        for name in labels:
            pred = int(np.argmax(probs[name][i])) if original_valid[i] else -1
            ok = ok and labels[name][i] != -1 and labels[name][i] == pred and probs[name][i].max() >= 0.8
        want.append(bool(ok))
    assert want == [True, False, True, False, False, False]
    np.testing.assert_array_equal(np.asarray(got), want)


def test_which_images_count():
    valid = jnp.array([True, True, False, True])
    gender = jnp.array([1, -1, 0, 0])
    # one attribute: a face and a target (exp-1); several: every face (exp-3 / exp-4)
    np.testing.assert_array_equal(np.asarray(face_loss_mask(valid, {"gender": gender})), [True, False, False, True])
    both = face_loss_mask(valid, {"gender": gender, "race": jnp.array([-1, -1, 2, 3])})
    np.testing.assert_array_equal(np.asarray(both), [True, True, False, True])


def test_nearest_reference_is_top1_dot_product_over_the_whole_set():
    reference = _unit(RNG.normal(size=(50, 16))).astype(np.float32)
    queries = _unit(RNG.normal(size=(7, 16))).astype(np.float32)
    got = np.asarray(nearest_reference(jnp.asarray(queries), jnp.asarray(reference)))
    np.testing.assert_array_equal(got, reference[np.argmax(queries @ reference.T, axis=1)])


def _loss_numpy(current, original, reference, keep, used):
    cur, ori = _unit(current), _unit(original)
    goal = np.where(keep[:, None], ori, reference[np.argmax(cur @ reference.T, axis=1)])
    return np.where(used, 1.0 - (cur * goal).sum(-1), 0.0)


def test_face_realism_loss_value_and_gradient():
    current = RNG.normal(size=(5, 8))
    original = RNG.normal(size=(5, 8))
    reference = _unit(RNG.normal(size=(20, 8)))
    keep = np.array([True, False, True, False, False])
    used = np.array([True, True, False, True, False])
    loss, per_image = face_realism_loss(
        jnp.asarray(current, jnp.float32),
        jnp.asarray(original, jnp.float32),
        jnp.asarray(reference, jnp.float32),
        jnp.asarray(keep),
        jnp.asarray(used),
    )
    want = _loss_numpy(current, original, reference, keep, used)
    np.testing.assert_allclose(np.asarray(per_image), want, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(want.sum() / 5, rel=1e-5)  # mean over all images, unused ones count 0

    with jax.enable_x64(True):
        args = (jnp.asarray(original), jnp.asarray(reference), jnp.asarray(keep), jnp.asarray(used))
        grad = np.asarray(jax.grad(lambda e: face_realism_loss(e, *args)[0])(jnp.asarray(current)))
        grad_original = np.asarray(
            jax.grad(lambda o: face_realism_loss(jnp.asarray(current), o, *args[1:])[0])(args[0])
        )
    # float64 central differences of the numpy loss (the target e* held fixed, as the authors detach it)
    numeric = np.zeros_like(current)
    for index in np.ndindex(current.shape):
        step = np.zeros_like(current)
        step[index] = 1e-6
        numeric[index] = (
            _loss_numpy(current + step, original, reference, keep, used).sum()
            - _loss_numpy(current - step, original, reference, keep, used).sum()
        ) / (2e-6 * 5)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    assert not grad[~used].any() and grad[used].any()
    assert not grad_original.any()  # e* is a constant
