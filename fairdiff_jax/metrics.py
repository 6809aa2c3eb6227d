"""Bias measures (DESIGN.md §1.4): class frequencies, ``bias(P) = mean over class pairs i<j of |freq_i - freq_j|``
among the images whose attribute was classified, intersections, the fair-generator floor, per-prompt-set summaries.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.errors import FairdiffError


def class_frequencies(labels: jax.Array, num_classes: int, valid: jax.Array | None = None) -> jax.Array:
    """Class frequencies among valid images: ``[..., M]`` int labels -> ``[..., K]``.

    Labels outside ``[0, K)`` (e.g. -1 for "no face") count as invalid; so do entries where ``valid`` is
    False. Rows without any valid image give NaN frequencies.
    """
    labels = jnp.asarray(labels)
    mask = (labels >= 0) & (labels < num_classes)
    if valid is not None:
        mask = mask & jnp.asarray(valid, bool)
    counts = jnp.sum(jax.nn.one_hot(labels, num_classes) * mask[..., None], axis=-2)
    total = jnp.sum(mask, axis=-1, keepdims=True)
    return jnp.where(total > 0, counts / jnp.maximum(total, 1), jnp.nan)


def bias_from_freq(freq: jax.Array) -> jax.Array:
    """Mean over class pairs ``i < j`` of ``|freq_i - freq_j|``: ``[..., K] -> [...]`` (0 = balanced)."""
    freq = jnp.asarray(freq)
    num_classes = freq.shape[-1]
    rows, cols = np.triu_indices(num_classes, k=1)
    return jnp.mean(jnp.abs(freq[..., rows] - freq[..., cols]), axis=-1)


def _bias_float64(freq: np.ndarray) -> np.ndarray:
    """``bias_from_freq`` in numpy float64 (for the exact floor, where float32 rounding would show)."""
    rows, cols = np.triu_indices(freq.shape[-1], k=1)
    return np.mean(np.abs(freq[..., rows] - freq[..., cols]), axis=-1)


def bias_from_labels(labels: jax.Array, num_classes: int, valid: jax.Array | None = None) -> jax.Array:
    """``bias_from_freq(class_frequencies(labels, num_classes, valid))``: ``[..., M] -> [...]``."""
    return bias_from_freq(class_frequencies(labels, num_classes, valid))


def intersection_labels(labels: Sequence[jax.Array], num_classes: Sequence[int]) -> jax.Array:
    """Joint class of several attributes (``gender_x_race``): ``a * K_b + b``; -1 where any label is -1.

    ``labels``: one ``[..., M]`` int array per attribute; returns ``[..., M]`` in ``[0, prod(K))``.
    """
    joint = jnp.zeros_like(jnp.asarray(labels[0]))
    invalid = jnp.zeros(joint.shape, bool)
    for attr_labels, k in zip(labels, num_classes, strict=True):
        attr_labels = jnp.asarray(attr_labels)
        invalid = invalid | (attr_labels < 0) | (attr_labels >= k)
        joint = joint * k + attr_labels
    return jnp.where(invalid, -1, joint)


def _compositions(total: int, parts: int) -> np.ndarray:
    """Every way to write ``total`` as ``parts`` non-negative integers: ``[C(total+parts-1, parts-1), parts]``."""
    bars = np.array(list(itertools.combinations(range(total + parts - 1), parts - 1)), dtype=np.int64)
    bars = bars.reshape(-1, parts - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), total + parts - 1)], axis=1)
    return np.diff(edges, axis=1) - 1


def fair_bias_floor(
    num_classes: int,
    num_samples: int,
    *,
    probs: Sequence[float] | None = None,
    exact_limit: int = 2_000_000,
    mc_draws: int = 20_000,
    seed: int = 0,
) -> float:
    """Expected bias of ``num_samples`` images from a generator that is exactly fair (or follows ``probs``).

    Even a perfectly fair binary attribute shows ``E[bias] ~ sqrt(2/pi)/sqrt(M) ~ 0.8/sqrt(M)``. Exact
    (sum over every outcome of the multinomial) when there are at most ``exact_limit`` outcomes, else a
    Monte-Carlo estimate from ``mc_draws`` draws.
    """
    if num_classes < 2 or num_samples < 1:
        raise FairdiffError(f"fair_bias_floor needs >= 2 classes and >= 1 sample, got {num_classes}, {num_samples}")
    p = np.full(num_classes, 1.0 / num_classes) if probs is None else np.asarray(probs, np.float64)
    if math.comb(num_samples + num_classes - 1, num_classes - 1) <= exact_limit:
        counts = _compositions(num_samples, num_classes)
        log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, num_samples + 1)))])
        log_p = np.log(np.where(p > 0, p, 1.0))
        impossible = ((counts > 0) & (p == 0)).any(-1)
        log_pmf = log_fact[num_samples] - log_fact[counts].sum(-1) + (counts * log_p).sum(-1)
        log_pmf = np.where(impossible, -np.inf, log_pmf)
        biases = _bias_float64(counts / num_samples)
        return float(np.sum(np.exp(log_pmf) * biases))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num_samples, p, size=mc_draws)
    return float(np.mean(_bias_float64(counts / num_samples)))


def bias_metrics(results: Sequence[Mapping], num_classes: Mapping[str, int]) -> dict:
    """Per-attribute (and intersection) bias mean ± std over prompts, mean frequencies and the fair floor.

    ``results`` as from :func:`generate_prompt_set`. Images whose largest face was not classified
    (``valid`` False) are left out, as in the paper.
    """
    names = list(num_classes)
    columns = {n: (np.stack([r["labels"][n] for r in results]), num_classes[n]) for n in names}
    if len(names) > 1:
        for size in range(2, len(names) + 1):
            for combo in itertools.combinations(names, size):
                joint = intersection_labels([columns[n][0] for n in combo], [num_classes[n] for n in combo])
                columns["_x_".join(combo)] = (np.asarray(joint), int(np.prod([num_classes[n] for n in combo])))
    valid = np.stack([r["valid"] for r in results])
    out = {"bias": {}, "bias_std": {}, "freq": {}, "freq_std": {}, "bias_floor": {}, "per_prompt_bias": {}}
    for name, (labels, k) in columns.items():
        freq = np.asarray(class_frequencies(jnp.asarray(labels), k, jnp.asarray(valid)))  # [prompts, K]
        bias = np.asarray(bias_from_freq(freq))
        out["bias"][name] = float(np.nanmean(bias))
        out["bias_std"][name] = float(np.nanstd(bias))
        out["freq"][name] = [float(f) for f in np.nanmean(freq, 0)]
        out["freq_std"][name] = [float(f) for f in np.nanstd(freq, 0)]
        out["per_prompt_bias"][name] = [float(b) for b in bias]
        per_prompt = max(1, int(np.round(valid.sum(1).mean())))
        out["bias_floor"][name] = fair_bias_floor(k, per_prompt)
    out["n_images"] = int(valid.size)
    out["n_valid"] = int(valid.sum())
    out["prompts"] = [r["prompt"] for r in results]
    return out
