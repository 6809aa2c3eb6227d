"""Dynamic target labels by expected optimal transport (DESIGN §1.2).

For one prompt group of N images with class probabilities p_i (one simplex per attribute), target label sets
u_1..u_N are drawn i.i.d. from the user's target distribution D; the optimal assignment σ* matches images to
labels with cost ||p_i − u_j||₂ (concatenated over attributes), and ``q_i = E_u[u_{σ*(i)}]``. The label of an
image is ``argmax q_i`` when ``max q_i ≥ confidence``, else −1 (no target).

One binary attribute has a closed form: sort the valid images by p(class 1); with K0 ~ Binomial(N_valid, D0)
the K0 lowest get class 0, so the image of ascending rank r has ``q(class 1) = P(K0 ≤ r) = BinomCDF(r; N, D0)``.
Tied probabilities share the average over their ranks, so the result never depends on the order of images.
Everything else is estimated with S sampled label sets, each solved exactly (``solve_assignment``).

Optional per-attribute cost weights ``W [K, K]`` scale the difference of class k's probability when the label
is u: the attribute's cost term becomes ``Σ_k (W[u, k] (p_k − 1[k = u]))²``. The paper's authors weight the
"young" probability twice when the age label is "old" (:func:`old_label_young_weight`). For a lone binary
attribute any positive weights leave the sorted assignment optimal (cost(p, 0) ∝ p_1 and cost(p, 1) ∝ 1 − p_1),
so the closed form stays exact and ignores them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln, xlog1py, xlogy

from fairdiff_jax.alignment.assignment import solve_assignment
from fairdiff_jax.errors import FairdiffError

TARGET_TOLERANCE = 1e-6
AUTHORS_YOUNG_WEIGHT = 2.0  # exp-4-debias-gender-race-age/1-main-debias.py: ((prob_age[0] - 0) * 2) ** 2


def old_label_young_weight(weight: float = AUTHORS_YOUNG_WEIGHT) -> np.ndarray:
    """Age cost weights ``[2, 2]`` (classes young, old): with the label "old", the young probability's
    difference counts ``weight`` times (sail-sg/finetune-fair-diffusion,
    exp-4-debias-gender-race-age/1-main-debias.py, ``generate_dynamic_targets_gender_race_age``)."""
    return np.array([[1.0, 1.0], [float(weight), 1.0]])


def check_cost_weights(cost_weights, probs) -> list:
    """Per attribute ``None`` or a positive finite ``[K, K]`` float32 array; one entry per attribute."""
    if cost_weights is None:
        return [None] * len(probs)
    if len(cost_weights) != len(probs):
        raise FairdiffError(
            f"cost_weights has {len(cost_weights)} entries for {len(probs)} attributes; give one [K, K] array or "
            "None per attribute."
        )
    checked = []
    for index, (weights, p) in enumerate(zip(cost_weights, probs)):
        if weights is None or isinstance(weights, jax.core.Tracer):
            checked.append(weights)
            continue
        values = np.asarray(weights, np.float64)
        k = p.shape[-1]
        if values.shape != (k, k) or not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise FairdiffError(
                f"cost weights of attribute {index} must be a positive [K, K] = [{k}, {k}] array (row: label, "
                f"column: class), got shape {values.shape}; e.g. old_label_young_weight() for age."
            )
        checked.append(jnp.asarray(values, jnp.float32))
    return checked


def validate_target(target, num_classes: int | None = None, name: str = "attribute") -> np.ndarray:
    """Check a target distribution (non-negative, sums to 1 within 1e-6, length K) and return it as float64.

    Raises FairdiffError naming the attribute, the bad value and the fix. Traced values are not checked.
    """
    if isinstance(target, jax.core.Tracer):
        return target
    values = np.asarray(target, dtype=np.float64)
    shown = np.array2string(values, precision=6, separator=", ") if values.size <= 16 else f"{values.size} values"
    if values.ndim != 1 or values.size == 0:
        raise FairdiffError(
            f"target of {name} must be a 1-D list of class probabilities, got shape {values.shape}; "
            "give one probability per class, e.g. (0.5, 0.5)."
        )
    if num_classes is not None and values.size != num_classes:
        raise FairdiffError(
            f"target of {name} has {values.size} entries {shown}, but the classifier has {num_classes} classes; "
            f"give exactly {num_classes} probabilities in class order."
        )
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise FairdiffError(
            f"target of {name} = {shown} has negative or non-finite entries; all probabilities must be >= 0."
        )
    if abs(values.sum() - 1.0) > TARGET_TOLERANCE:
        raise FairdiffError(
            f"target of {name} = {shown} sums to {values.sum():.8g}, not 1 (tolerance {TARGET_TOLERANCE:g}); "
            "rescale it so the probabilities sum to 1."
        )
    return values


def _check_inputs(probs, target, valid):
    probs = [jnp.asarray(p) for p in probs]
    if not probs:
        raise FairdiffError("dynamic_targets got no attributes; pass one [N, K] probability array per attribute.")
    if len(target) != len(probs):
        raise FairdiffError(
            f"dynamic_targets got {len(probs)} probability arrays but {len(target)} target distributions; "
            "pass one target per attribute, in the same order."
        )
    n = probs[0].shape[-2]
    for index, p in enumerate(probs):
        if p.ndim < 2 or p.shape[-2] != n:
            raise FairdiffError(
                f"probabilities of attribute {index} have shape {p.shape}; every attribute needs [N, K] with the "
                f"same N (= {n}) images."
            )
    targets = [
        jnp.asarray(validate_target(t, p.shape[-1], f"attribute {i}"), jnp.float32)
        for i, (t, p) in enumerate(zip(target, probs))
    ]
    valid = jnp.ones(probs[0].shape[:-1], bool) if valid is None else jnp.asarray(valid, bool)
    return [jax.lax.stop_gradient(p.astype(jnp.float32)) for p in probs], targets, valid


def binomial_cdf(k: jax.Array, n: jax.Array, prob: jax.Array, max_n: int) -> jax.Array:
    """P(X ≤ k) for X ~ Binomial(n, prob), elementwise over int ``k``; ``n ≤ max_n`` may be traced."""
    n = jnp.asarray(n, jnp.float32)
    prob = jnp.asarray(prob, jnp.float32)
    outcomes = jnp.arange(max_n + 1, dtype=jnp.float32)
    log_pmf = (
        gammaln(n + 1.0)
        - gammaln(outcomes + 1.0)
        - gammaln(jnp.maximum(n - outcomes, 0.0) + 1.0)
        + xlogy(outcomes, prob)
        + xlog1py(jnp.maximum(n - outcomes, 0.0), -prob)
    )
    pmf = jnp.where(outcomes <= n, jnp.exp(log_pmf), 0.0)
    cdf = jnp.cumsum(pmf)
    k = jnp.asarray(k)
    return jnp.where(k >= n, 1.0, cdf[jnp.clip(k, 0, max_n)])


@jax.jit
def binary_expected_targets(probs: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    """Closed-form ``q`` for one two-class attribute. probs ``[N, 2]``, target ``[2]``, valid ``[N]`` -> ``[N, 2]``.

    Ranks count only valid images; images with equal p(class 1) get the mean of the CDF over their shared ranks.
    """
    n = probs.shape[0]
    score = probs[:, 1]
    n_valid = valid.sum()
    lower = ((score[None, :] < score[:, None]) & valid[None, :]).sum(axis=1)
    ties = ((score[None, :] == score[:, None]) & valid[None, :]).sum(axis=1)
    ranks = jnp.arange(n)
    cdf = binomial_cdf(ranks, n_valid, target[0], n)  # cdf[r] = q(class 1) of rank r
    cdf_prefix = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(cdf)])
    mean_cdf = (cdf_prefix[jnp.clip(lower + ties, 0, n)] - cdf_prefix[lower]) / jnp.maximum(ties, 1)
    q_one = jnp.where(valid, mean_cdf, 0.0)
    return jnp.stack([jnp.where(valid, 1.0 - q_one, 0.0), q_one], axis=-1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def sample_target_labels(key: jax.Array, target: Sequence[jax.Array], num_samples: int, n: int) -> list[jax.Array]:
    """S i.i.d. label sets from the joint (product) target: one ``[S, N]`` int array per attribute."""
    keys = jax.random.split(key, len(target))
    return [
        jax.random.choice(k, t.shape[0], shape=(num_samples, n), p=jnp.asarray(t, jnp.float32))
        for k, t in zip(keys, target)
    ]


@jax.jit
def transport_expectation(
    probs: Sequence[jax.Array],
    labels: Sequence[jax.Array],
    valid: jax.Array,
    cost_weights: Sequence[jax.Array | None] | None = None,
) -> list[jax.Array]:
    """Average over label sets of the optimal assignment's one-hot labels, per attribute.

    Args:
      probs: per attribute ``[N, K_a]`` class probabilities.
      labels: per attribute ``[S, N]`` sampled labels; of each set, the first N_valid labels are used.
      valid: ``[N]`` bool; invalid images take no label.
      cost_weights: per attribute ``None`` or ``[K_a, K_a]`` weights (module docs); default unweighted.

    Returns: per attribute ``[N, K_a]`` expected target ``q`` (rows of invalid images are 0).
    """
    n = probs[0].shape[0]
    cost_weights = [None] * len(probs) if cost_weights is None else list(cost_weights)
    squared = jnp.zeros((labels[0].shape[0], n, n), jnp.float32)  # [S, image, label]
    worst = 0.0  # the largest possible squared distance, for the penalty below
    for p, lab, weights in zip(probs, labels, cost_weights):
        one_hot = jax.nn.one_hot(lab, p.shape[-1])  # [S, N, K]
        diff = p[None, :, None, :] - one_hot[:, None, :, :]
        if weights is not None:
            diff = diff * weights[lab][:, None, :, :]
            worst = worst + 2.0 * jnp.max(weights) ** 2
        else:
            worst = worst + 2.0
        squared = squared + jnp.sum(diff**2, axis=-1)
    distance = jnp.sqrt(squared)
    # Only the first N_valid labels are real; invalid images are matched to the rest at no cost. Any plan that
    # pairs a valid image with a spare label costs 2*penalty more than the swap, so it is never optimal.
    real_label = jnp.arange(n) < valid.sum()
    penalty = jnp.sqrt(worst) + 1.0
    cost = jnp.where(
        valid[:, None] & real_label[None, :],
        distance,
        jnp.where(valid[:, None] | real_label[None, :], penalty, 0.0),
    )
    matched = jax.vmap(solve_assignment)(cost)  # [S, N]
    label_vec = jnp.concatenate([jax.nn.one_hot(lab, p.shape[-1]) for lab, p in zip(labels, probs)], axis=-1)
    chosen = jnp.take_along_axis(label_vec, matched[:, :, None], axis=1)  # [S, N, D]
    q = jnp.where(valid[:, None], chosen.mean(axis=0), 0.0)
    splits = np.cumsum([p.shape[-1] for p in probs])[:-1]
    return jnp.split(q, splits, axis=-1)


def expected_targets(
    probs: Sequence[jax.Array],
    target: Sequence,
    *,
    valid: jax.Array | None = None,
    num_samples: int = 100,
    key: jax.Array | None = None,
    cost_weights: Sequence | None = None,
) -> list[jax.Array]:
    """Expected transported targets ``q`` (per attribute ``[N, K_a]``) for one prompt group; see module docs."""
    probs, targets, valid = _check_inputs(probs, target, valid)
    weights = check_cost_weights(cost_weights, probs)
    if len(probs) == 1 and probs[0].shape[-1] == 2:  # exact for any positive cost weights (module docs)
        return [binary_expected_targets(probs[0], targets[0], valid)]
    if key is None:
        raise FairdiffError(
            "dynamic targets for several attributes or more than two classes are sampled; pass key=jax.random.key(...)."
        )
    if num_samples < 1:
        raise FairdiffError(f"num_samples must be a positive number of target label sets, got {num_samples}.")
    labels = sample_target_labels(key, targets, num_samples, probs[0].shape[0])
    return transport_expectation(probs, labels, valid, weights)


@jax.jit
def labels_from_expectation(
    q: Sequence[jax.Array], valid: jax.Array, confidence: float
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per attribute: label ``argmax q`` where ``max q ≥ confidence`` and valid, else −1; confidence ``max q``."""
    labels, confs = [], []
    for q_attr in q:
        conf = jnp.where(valid, q_attr.max(axis=-1), 0.0)
        label = jnp.where(valid & (conf >= confidence), jnp.argmax(q_attr, axis=-1), -1).astype(jnp.int32)
        labels.append(label)
        confs.append(conf)
    return labels, confs


def dynamic_targets(
    probs: Sequence[jax.Array],
    target: Sequence,
    *,
    valid: jax.Array | None = None,
    num_samples: int = 100,
    confidence: float = 0.8,
    key: jax.Array | None = None,
    cost_weights: Sequence | None = None,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Target labels and confidences for one prompt group (DESIGN §3 contract).

    Args:
      probs: per attribute ``[N, K_a]`` class probabilities (no gradient flows through them).
      target: per attribute ``[K_a]`` target distribution; attributes are independent.
      valid: ``[N]`` bool, images with a usable prediction (default: all).
      num_samples: S, sampled label sets (not used for one binary attribute, which is exact).
      confidence: C, labels whose ``max q`` is below it become −1.
      key: PRNG key, needed only when sampling is used.
      cost_weights: per attribute ``None`` or ``[K_a, K_a]`` transport-cost weights (module docs).

    Returns: (labels, conf): per attribute ``[N]`` int32 labels (−1 = no target) and ``[N]`` float confidences.
    """
    _, _, valid_mask = _check_inputs(probs, target, valid)
    q = expected_targets(probs, target, valid=valid, num_samples=num_samples, key=key, cost_weights=cost_weights)
    return labels_from_expectation(q, valid_mask, confidence)


def dynamic_targets_grouped(
    probs: Sequence[jax.Array],
    target: Sequence,
    *,
    valid: jax.Array | None = None,
    num_samples: int = 100,
    confidence: float = 0.8,
    key: jax.Array | None = None,
    cost_weights: Sequence | None = None,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """:func:`dynamic_targets` for G prompt groups at once: probs ``[G, N, K_a]``, valid ``[G, N]`` -> ``[G, N]``."""
    probs, targets, valid = _check_inputs(probs, target, valid)
    groups = probs[0].shape[0]
    if any(p.ndim != 3 or p.shape[0] != groups for p in probs):
        raise FairdiffError(
            f"dynamic_targets_grouped needs [G, N, K] probabilities with one G, got {[p.shape for p in probs]}."
        )
    keys = None if key is None else jax.random.split(key, groups)
    weights = check_cost_weights(cost_weights, [p[0] for p in probs])

    def one_group(group_probs, group_valid, group_key):
        return dynamic_targets(
            group_probs,
            targets,
            valid=group_valid,
            num_samples=num_samples,
            confidence=confidence,
            key=group_key,
            cost_weights=weights,
        )

    if keys is None:
        return jax.vmap(lambda p, v: one_group(p, v, None))(probs, valid)
    return jax.vmap(one_group)(probs, valid, keys)
