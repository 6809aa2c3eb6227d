"""L_align, the training-loop alignment call (grouped and across a named device axis), the semantics-preservation
loss with its weights and face-box gradient scale (the face-realism loss: test_face_loss.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax import FairdiffError
from fairdiff_jax.alignment import (
    alignment_cross_entropy,
    distributional_alignment,
    distributional_alignment_grouped,
    dynamic_targets,
    mismatch_factor,
    scale_face_gradient,
    semantic_loss,
)
from fairdiff_jax.attributes import FaceAttributeClassifier, FacePipeline

RNG = np.random.default_rng(7)


def test_alignment_cross_entropy_matches_numpy():
    logits = RNG.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 2, -1, 1, -1, 2])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -sum(log_probs[i, labels[i]] for i in range(6) if labels[i] >= 0) / 6
    np.testing.assert_allclose(float(alignment_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))), want, 1e-6)


def test_alignment_targets_carry_no_gradient():
    logits = {"gender": jnp.asarray(RNG.normal(size=(8, 2)), jnp.float32), "race": jnp.asarray(RNG.normal(size=(8, 4)))}
    valid = jnp.asarray(RNG.random(8) > 0.2)
    targets = {"gender": (0.5, 0.5), "race": (0.25, 0.25, 0.25, 0.25)}
    key = jax.random.key(0)

    def loss_fn(lg):
        out = distributional_alignment(lg, valid, targets, key=key, num_samples=20, confidence=0.3)
        return out.loss, out

    grads, out = jax.jit(jax.grad(loss_fn, has_aux=True))(logits)
    fixed = jax.jit(jax.grad(lambda lg: sum(alignment_cross_entropy(lg[n], out.labels[n]) for n in lg)))(logits)
    for name in logits:
        assert np.all(np.isfinite(np.asarray(grads[name])))
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(fixed[name]), atol=1e-6)
        assert np.any(np.asarray(out.labels[name]) >= 0)
        assert np.all(np.asarray(out.labels[name])[~np.asarray(valid)] == -1)


def test_missing_target_is_a_clear_error():
    with pytest.raises(FairdiffError, match="config.attributes.<name>.target"):
        distributional_alignment({"age": jnp.zeros((4, 2))}, jnp.ones(4, bool), {"gender": (0.5, 0.5)})


def test_grouped_and_device_axis_variants_agree_with_one_group():
    groups, n, devices = 2, 8, 4
    logits = {"race": jnp.asarray(RNG.normal(size=(groups, n, 3)), jnp.float32)}
    valid = jnp.asarray(RNG.random((groups, n)) > 0.1)
    targets = {"race": (0.2, 0.3, 0.5)}
    key = jax.random.key(5)
    grouped = jax.jit(lambda lg, v: distributional_alignment_grouped(lg, v, targets, key=key, num_samples=10))(
        logits, valid
    )
    keys = jax.random.split(key, groups)
    single = jax.jit(lambda lg, v, k: distributional_alignment(lg, v, targets, key=k, num_samples=10))
    singles = [single({"race": logits["race"][g]}, valid[g], keys[g]) for g in range(groups)]
    np.testing.assert_allclose(float(grouped.loss), np.mean([float(s.loss) for s in singles]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(grouped.labels["race"][1]), np.asarray(singles[1].labels["race"]))

    # the group's images spread over a named axis of 4 "devices": same targets, pmean of losses = group loss
    def per_device(device_logits, device_valid):
        out = distributional_alignment(
            {"race": device_logits}, device_valid, targets, key=keys[0], num_samples=10, axis_name="data"
        )
        return jax.lax.pmean(out.loss, "data"), out.labels["race"]

    loss, labels = jax.jit(jax.vmap(per_device, axis_name="data"))(
        logits["race"][0].reshape(devices, n // devices, 3), valid[0].reshape(devices, n // devices)
    )
    np.testing.assert_array_equal(np.asarray(labels).reshape(n), np.asarray(singles[0].labels["race"]))
    np.testing.assert_allclose(np.asarray(loss), float(singles[0].loss), rtol=1e-5)


def test_gradient_steps_move_toy_classifier_toward_target():
    """10 images all predicted class 1, target 50/50: descending L_align on the inputs raises class 0's share."""
    n, size = 10, 4
    weights = jnp.asarray(RNG.normal(size=(size * size * 3, 2)) * 0.3, jnp.float32)
    bias = jnp.array([0.0, 1.5])

    def network(params, crops):
        return {"gender": crops.reshape(crops.shape[0], -1) @ params[0] + params[1]}

    classifier = FaceAttributeClassifier(network, {"gender": 2}, FacePipeline(crop_size=size))
    images = jnp.asarray(RNG.uniform(-0.1, 0.1, size=(n, size, size, 3)), jnp.float32)

    def loss_fn(x):
        out = classifier((weights, bias), x)
        return distributional_alignment(out.logits, out.valid, {"gender": (0.5, 0.5)}).loss

    def freq_class0(x):
        return float(jnp.mean(jnp.argmax(classifier((weights, bias), x).logits["gender"], -1) == 0))

    assert freq_class0(images) == 0.0
    grad_fn = jax.jit(jax.grad(loss_fn))
    for _ in range(10):
        grad = grad_fn(images)
        assert np.all(np.isfinite(np.asarray(grad)))
        images = images - 0.5 * grad
    assert 0.3 <= freq_class0(images) <= 0.7


def linear_extractor(dim, seed):
    projection = jnp.asarray(np.random.default_rng(seed).normal(size=(8 * 8 * 3, dim)), jnp.float32)
    return lambda images: jnp.tanh(images.reshape(images.shape[0], -1) @ projection / 8.0)


def test_semantic_loss_values_weights_and_finite_gradients():
    extractors = [linear_extractor(5, 0), linear_extractor(7, 1)]
    images = jnp.asarray(RNG.uniform(-1, 1, size=(3, 8, 8, 3)), jnp.float32)
    original = jnp.asarray(RNG.uniform(-1, 1, size=(3, 8, 8, 3)), jnp.float32)
    weights = mismatch_factor({"g": jnp.array([1, 0, -1])}, {"g": jnp.array([1, 1, 1])}, jnp.ones(3, bool), {"g": 0.2})
    np.testing.assert_allclose(np.asarray(weights), [1.0, 0.2, 0.2])
    loss, per_image = semantic_loss(images, original, extractors, weights=weights)
    want = np.zeros(3)
    for extract in extractors:
        a, b = np.asarray(extract(images)), np.asarray(extract(original))
        want += 1 - (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(np.asarray(per_image), want, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (want * [1, 0.2, 0.2]).mean(), rtol=1e-5)
    assert float(semantic_loss(original, original, extractors)[0]) == pytest.approx(0.0, abs=1e-6)
    grad = jax.grad(lambda x: semantic_loss(x, original, extractors, weights=weights)[0])(images)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).sum() > 0


def test_face_box_gradient_is_scaled_inside_the_box_only():
    extractors = [linear_extractor(6, 2)]
    images = jnp.asarray(RNG.uniform(-1, 1, size=(2, 8, 8, 3)), jnp.float32)
    original = jnp.asarray(RNG.uniform(-1, 1, size=(2, 8, 8, 3)), jnp.float32)
    boxes = jnp.array([[2.0, 1.0, 6.0, 5.0], [0.0, 0.0, 8.0, 8.0]])
    valid = jnp.array([True, False])
    plain = jax.grad(lambda x: semantic_loss(x, original, extractors)[0])(images)
    scaled = jax.grad(lambda x: semantic_loss(x, original, extractors, face_boxes=boxes, face_valid=valid)[0])(images)
    ratio = np.ones((2, 8, 8, 3))
    ratio[0, 1:5, 2:6] = 0.2  # pixel centres 1.5..4.5 (rows) and 2.5..5.5 (cols) are inside the box
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(plain) * ratio, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(scale_face_gradient(images, boxes, valid)), np.asarray(images))


def test_dynamic_targets_contract_returns_sequences():
    labels, conf = dynamic_targets([jnp.asarray(RNG.dirichlet(np.ones(2), size=6), jnp.float32)], [(0.3, 0.7)])
    assert len(labels) == len(conf) == 1 and labels[0].shape == (6,) and labels[0].dtype == jnp.int32
