"""Dynamic targets: exact assignment vs scipy, expected transport vs POT, binary closed form vs binomial CDF and
Monte Carlo, order invariance, validity/confidence masking, validation errors, jit and grouped variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.stats import binom

from fairdiff_jax import FairdiffError
from fairdiff_jax.alignment import (
    binary_expected_targets,
    dynamic_targets,
    dynamic_targets_grouped,
    expected_targets,
    sample_target_labels,
    solve_assignment,
    transport_expectation,
    validate_target,
)

RNG = np.random.default_rng(1234)


def random_probs(n, k, rng=RNG):
    return rng.dirichlet(np.ones(k), size=n).astype(np.float32)


def binary_probs(n, rng=RNG):
    p1 = rng.random(n).astype(np.float32)
    return np.stack([1 - p1, p1], axis=-1)


@pytest.fixture(scope="module")
def batched_assignment():
    return jax.jit(jax.vmap(solve_assignment))


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_assignment_is_optimal_and_matches_scipy(batched_assignment, n):
    costs = RNG.random((20, n, n)).astype(np.float32)
    costs[:5] = np.round(costs[:5] * 3)  # many ties: optimum value must still match
    cols = np.asarray(batched_assignment(jnp.asarray(costs)))
    for cost, col in zip(costs, cols):
        assert sorted(col) == list(range(n))
        rows, ref = linear_sum_assignment(cost)
        np.testing.assert_allclose(cost[np.arange(n), col].sum(), cost[rows, ref].sum(), rtol=1e-5, atol=1e-5)
    for cost, col in zip(costs[5:], cols[5:]):  # continuous costs: the optimum is unique
        np.testing.assert_array_equal(col, linear_sum_assignment(cost)[1])


def pot_expectation(probs, labels, valid):
    """Reference q: ot.emd per sampled label set (uniform weights), plans averaged, marginals per attribute."""
    ot = pytest.importorskip("ot")
    image_vec = np.concatenate(probs, axis=-1).astype(np.float64)[valid]
    n_valid = int(valid.sum())
    sizes = [p.shape[-1] for p in probs]
    q = np.zeros((len(valid), sum(sizes)))
    num_samples = labels[0].shape[0]
    for s in range(num_samples):
        label_vec = np.concatenate([np.eye(k)[lab[s, :n_valid]] for k, lab in zip(sizes, labels)], axis=-1)
        cost = np.linalg.norm(image_vec[:, None] - label_vec[None], axis=-1)
        plan = ot.emd(np.full(n_valid, 1 / n_valid), np.full(n_valid, 1 / n_valid), cost)
        q[valid] += n_valid * plan @ label_vec / num_samples
    return np.split(q, np.cumsum(sizes)[:-1], axis=-1)


@pytest.mark.parametrize("sizes", [(2, 3), (4,)])
def test_expected_transport_matches_pot(sizes):
    n, num_samples = 12, 16
    probs = [random_probs(n, k) for k in sizes]
    targets = [RNG.dirichlet(np.ones(k)) for k in sizes]
    valid = np.ones(n, bool)
    valid[[3, 8]] = False
    labels = sample_target_labels(jax.random.key(0), [jnp.asarray(t) for t in targets], num_samples, n)
    q = transport_expectation([jnp.asarray(p) for p in probs], labels, jnp.asarray(valid))
    reference = pot_expectation(probs, [np.asarray(lab) for lab in labels], valid)
    for got, want in zip(q, reference):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert np.all(np.asarray(q[0])[~valid] == 0)


@pytest.mark.parametrize("d0", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
def test_binary_closed_form_is_binomial_cdf_over_valid_ranks(d0):
    n = 10
    probs = binary_probs(n)
    valid = np.ones(n, bool)
    valid[[1, 6]] = False
    q = np.asarray(binary_expected_targets(jnp.asarray(probs), jnp.array([d0, 1 - d0]), jnp.asarray(valid)))
    ranks = np.argsort(np.argsort(np.where(valid, probs[:, 1], np.inf)))
    want = binom.cdf(ranks, valid.sum(), d0)
    np.testing.assert_allclose(q[valid, 1], want[valid], atol=1e-5)
    np.testing.assert_allclose(q[valid].sum(-1), 1.0, atol=1e-6)
    assert np.all(q[~valid] == 0)


def test_binary_closed_form_matches_sampled_transport_70_30():
    n, num_samples = 8, 3000
    probs = binary_probs(n)
    target = [jnp.array([0.7, 0.3])]
    exact = np.asarray(expected_targets([probs], target)[0])
    labels = sample_target_labels(jax.random.key(7), target, num_samples, n)
    sampled = np.asarray(transport_expectation([jnp.asarray(probs)], labels, jnp.ones(n, bool))[0])
    # Monte-Carlo standard error <= 0.5 / sqrt(3000) ~ 0.009
    np.testing.assert_allclose(sampled, exact, atol=0.04)
    # the expected share of class 0 over the group equals the target
    np.testing.assert_allclose(exact[:, 0].mean(), 0.7, atol=1e-5)


def test_ties_get_equal_targets_and_labels_ignore_image_order():
    probs = binary_probs(9)
    probs[4] = probs[2]
    q = np.asarray(expected_targets([probs], [(0.5, 0.5)])[0])
    np.testing.assert_allclose(q[4], q[2], atol=1e-7)
    perm = RNG.permutation(9)
    q_perm = np.asarray(expected_targets([probs[perm]], [(0.5, 0.5)])[0])
    np.testing.assert_allclose(q_perm, q[perm], atol=1e-6)


def test_sampled_targets_ignore_image_order():
    n = 10
    probs = [random_probs(n, 2), random_probs(n, 3)]
    targets = [(0.5, 0.5), (0.2, 0.3, 0.5)]
    labels, conf = dynamic_targets(probs, targets, num_samples=30, key=jax.random.key(3), confidence=0.5)
    perm = RNG.permutation(n)
    labels_p, conf_p = dynamic_targets(
        [p[perm] for p in probs], targets, num_samples=30, key=jax.random.key(3), confidence=0.5
    )
    for a, b in zip(labels, labels_p):
        np.testing.assert_array_equal(np.asarray(a)[perm], np.asarray(b))
    for a, b in zip(conf, conf_p):
        np.testing.assert_allclose(np.asarray(a)[perm], np.asarray(b), atol=1e-6)


def test_labels_confidence_and_validity():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.55, 0.45], [0.45, 0.55], [0.2, 0.8], [0.1, 0.9]], np.float32)
    valid = np.array([True, True, True, True, True, False])
    (labels,), (conf,) = dynamic_targets([probs], [(0.5, 0.5)], valid=valid, confidence=0.8)
    q = np.asarray(binary_expected_targets(jnp.asarray(probs), jnp.array([0.5, 0.5]), jnp.asarray(valid)))
    np.testing.assert_allclose(np.asarray(conf)[valid], q[valid].max(-1), atol=1e-6)
    want = np.where(valid & (q.max(-1) >= 0.8), q.argmax(-1), -1)
    np.testing.assert_array_equal(np.asarray(labels), want)
    assert labels[5] == -1 and conf[5] == 0
    assert labels[0] == 0 and labels[4] == 1 and labels[2] == -1


def test_jit_and_grouped_match_per_group_calls():
    groups, n = 3, 8
    probs = [RNG.dirichlet(np.ones(3), size=(groups, n)).astype(np.float32)]
    valid = RNG.random((groups, n)) > 0.2
    target = [(0.2, 0.3, 0.5)]
    key = jax.random.key(11)
    labels, conf = jax.jit(lambda p, v, k: dynamic_targets_grouped(p, target, valid=v, key=k, num_samples=20))(
        probs, valid, key
    )
    keys = jax.random.split(key, groups)
    for g in range(groups):
        (lab,), (c,) = dynamic_targets([probs[0][g]], target, valid=valid[g], key=keys[g], num_samples=20)
        np.testing.assert_array_equal(np.asarray(labels[0][g]), np.asarray(lab))
        np.testing.assert_allclose(np.asarray(conf[0][g]), np.asarray(c), atol=1e-6)


@pytest.mark.parametrize(
    "target, fragment",
    [
        ((0.5, 0.6), "sums to 1.1"),
        ((1.2, -0.2), "negative"),
        ((0.2, 0.3, 0.5), "has 3 entries"),
        (((0.5, 0.5),), "1-D"),
    ],
)
def test_bad_targets_raise_one_clear_error(target, fragment):
    with pytest.raises(FairdiffError, match=fragment) as err:
        dynamic_targets([binary_probs(4)], [target])
    assert "attribute 0" in str(err.value) and "\n" not in str(err.value)


def test_validate_target_and_other_input_errors():
    np.testing.assert_allclose(validate_target((0.25, 0.75), 2), [0.25, 0.75])
    validate_target((0.5, 0.5 + 5e-7), 2)  # within tolerance
    with pytest.raises(FairdiffError, match="key"):
        dynamic_targets([random_probs(4, 3)], [(0.2, 0.3, 0.5)])
    with pytest.raises(FairdiffError, match="one target per attribute"):
        dynamic_targets([binary_probs(4)], [(0.5, 0.5), (0.5, 0.5)])
