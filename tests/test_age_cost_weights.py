"""Age cost weighting of the transport against POT's ``ot.emd`` with the paper authors' weighted cost.

The reference restates ``generate_dynamic_targets_gender_race_age`` of sail-sg/finetune-fair-diffusion,
exp-4-debias-gender-race-age/1-main-debias.py: 16 joint classes (gender, race, age), a plan from uniform image
mass to the sampled class counts, and the age term ``((p_young - 0) * 2)^2 + (p_old - 1)^2`` for "old".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.alignment.targets import (
    dynamic_targets,
    expected_targets,
    old_label_young_weight,
    sample_target_labels,
    transport_expectation,
)
from fairdiff_jax.errors import FairdiffError

ot = pytest.importorskip("ot")
TARGETS = [np.array([0.5, 0.5]), np.full(4, 0.25), np.array([0.75, 0.25])]


def authors_expectation(probs, labels, valid, young_weight):
    """Joint-class plans by ``ot.emd`` with the authors' cost, averaged; marginals per attribute."""
    gender, race, age = (np.asarray(p, np.float64)[valid] for p in probs)
    classes = [(g, r, a) for g in range(2) for r in range(4) for a in range(2)]  # g*8 + r*2 + a
    cost = np.zeros((len(gender), len(classes)))
    for j, (g, r, a) in enumerate(classes):
        age_diff = age - np.eye(2)[a]
        if a == 1:
            age_diff[:, 0] *= young_weight
        cost[:, j] = np.sqrt(
            ((gender - np.eye(2)[g]) ** 2).sum(-1) + ((race - np.eye(4)[r]) ** 2).sum(-1) + (age_diff**2).sum(-1)
        )
    n_valid = len(gender)
    joint = np.zeros((n_valid, len(classes)))
    for s in range(labels[0].shape[0]):
        counts = np.zeros(len(classes))
        for g, r, a in zip(*(np.asarray(lab)[s, :n_valid] for lab in labels)):
            counts[g * 8 + r * 2 + a] += 1
        joint += ot.emd(np.ones(n_valid), counts, cost)
    joint /= labels[0].shape[0]
    marginals = [
        np.stack([joint[:, [j for j, c in enumerate(classes) if c[i] == k]].sum(-1) for k in range(size)], -1)
        for i, size in enumerate((2, 4, 2))
    ]
    out = [np.zeros((len(valid), m.shape[1])) for m in marginals]
    for o, m in zip(out, marginals):
        o[valid] = m
    return out


def random_case(seed, n=40):
    rng = np.random.default_rng(seed)
    probs = [rng.dirichlet(np.ones(k) * 0.6, size=n).astype(np.float32) for k in (2, 4, 2)]
    valid = rng.random(n) > 0.1
    labels = sample_target_labels(jax.random.key(seed), [jnp.asarray(t) for t in TARGETS], 24, n)
    return probs, valid, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_transport_matches_pot_with_the_authors_cost(seed):
    probs, valid, labels = random_case(seed)
    weights = [None, None, old_label_young_weight()]
    q = transport_expectation([jnp.asarray(p) for p in probs], labels, jnp.asarray(valid), weights)
    weighted = authors_expectation(probs, labels, valid, young_weight=2.0)
    plain = authors_expectation(probs, labels, valid, young_weight=1.0)
    for got, want in zip(q, weighted):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # the weighting matters: the unweighted cost gives other age targets on these inputs
    assert np.abs(np.asarray(q[2]) - plain[2]).max() > 0.02


def test_age_labels_change_and_contract_accepts_the_weights():
    probs, valid, _ = random_case(2)
    args = ([jnp.asarray(p) for p in probs], TARGETS)
    kwargs = dict(valid=jnp.asarray(valid), num_samples=100, key=jax.random.key(2))
    plain, _ = dynamic_targets(*args, **kwargs)
    weighted, _ = dynamic_targets(*args, **kwargs, cost_weights=[None, None, old_label_young_weight()])
    changed = float(np.mean(np.asarray(plain[2]) != np.asarray(weighted[2])))
    print(f"age labels changed by the weighting: {changed:.1%}")
    assert changed > 0


def test_lone_binary_attribute_keeps_its_closed_form_under_weights():
    rng = np.random.default_rng(4)
    p1 = rng.random(12).astype(np.float32)
    probs = [np.stack([1 - p1, p1], -1)]
    valid = np.ones(12, bool)
    closed = expected_targets([jnp.asarray(probs[0])], [TARGETS[2]], cost_weights=[old_label_young_weight()])
    labels = sample_target_labels(jax.random.key(0), [jnp.asarray(TARGETS[2])], 4000, 12)
    sampled = transport_expectation([jnp.asarray(probs[0])], labels, jnp.asarray(valid), [old_label_young_weight()])
    np.testing.assert_allclose(np.asarray(closed[0]), np.asarray(sampled[0]), atol=0.03)


def test_bad_cost_weights_are_refused():
    probs = [jnp.full((4, 2), 0.5), jnp.full((4, 4), 0.25)]
    with pytest.raises(FairdiffError, match="one"):
        expected_targets(probs, TARGETS[:2], key=jax.random.key(0), cost_weights=[None])
    with pytest.raises(FairdiffError, match=r"\[4, 4\]"):
        expected_targets(probs, TARGETS[:2], key=jax.random.key(0), cost_weights=[None, np.ones((2, 2))])
