"""Distributional alignment loss L_align (DESIGN §1.2) and the one call the training loop makes for it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fairdiff_jax.alignment.targets import dynamic_targets, validate_target
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.parallel import all_gather_group, own_slice


class AlignmentOutput(NamedTuple):
    """Result of :func:`distributional_alignment`; labels/conf are per attribute ``[N]`` (or ``[G, N]``)."""

    loss: jax.Array
    labels: dict[str, jax.Array]
    conf: dict[str, jax.Array]


def alignment_cross_entropy(logits: jax.Array, labels: jax.Array, num_images: int | jax.Array | None = None):
    """``(1/N) Σ_i 1[label_i ≥ 0] CE(logits_i, label_i)``. logits ``[N, K]``, labels ``[N]`` (−1 = no target)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    per_image = jnp.where(labels >= 0, -picked, 0.0)
    return per_image.sum() / (logits.shape[0] if num_images is None else num_images)


def _check_names(logits: Mapping, targets: Mapping):
    missing = sorted(set(logits) - set(targets))
    if missing:
        raise FairdiffError(
            f"no target distribution for attribute(s) {missing}; set config.attributes.<name>.target for each "
            f"classifier head (have targets for {sorted(targets)})."
        )
    names = list(logits)
    checked = {
        name: jnp.asarray(validate_target(targets[name], logits[name].shape[-1], f"attribute '{name}'"), jnp.float32)
        for name in names
    }
    return names, checked


def distributional_alignment(
    logits: Mapping[str, jax.Array],
    valid: jax.Array,
    targets: Mapping[str, jax.Array],
    *,
    key: jax.Array | None = None,
    num_samples: int = 100,
    confidence: float = 0.8,
    axis_name: str | None = None,
    cost_weights: Mapping[str, jax.Array] | None = None,
) -> AlignmentOutput:
    """Dynamic targets (no gradient) and L_align for one prompt group; the loss sums over attributes.

    Args:
      logits: attribute name -> ``[N, K_a]`` classifier logits of this group's images.
      valid: ``[N]`` bool, images with a detected face / usable prediction.
      targets: attribute name -> ``[K_a]`` target distribution.
      key: PRNG key for the sampled transport (unused for one binary attribute).
      axis_name: if set, the group's images are spread over this named axis (shard_map / pmap / vmap): the
        probabilities are all-gathered so that every device computes the same targets for the whole group, and
        the loss is this device's mean, so a ``pmean`` over the axis gives the group mean.
      cost_weights: attribute name -> ``[K_a, K_a]`` transport-cost weights (``alignment.targets``), optional.

    Returns: AlignmentOutput(loss scalar, labels {name: [N]}, conf {name: [N]}).
    """
    names, checked = _check_names(logits, targets)
    probs = [jax.nn.softmax(jax.lax.stop_gradient(logits[n]).astype(jnp.float32), axis=-1) for n in names]
    valid = jnp.asarray(valid, bool)
    local_n = valid.shape[0]
    if axis_name is not None:
        probs = [all_gather_group(p, axis_name=axis_name) for p in probs]
        valid_all = all_gather_group(valid, axis_name=axis_name)
    else:
        valid_all = valid
    weights = [(cost_weights or {}).get(n) for n in names]
    labels, conf = dynamic_targets(
        probs,
        [checked[n] for n in names],
        valid=valid_all,
        num_samples=num_samples,
        confidence=confidence,
        key=key,
        cost_weights=weights if any(w is not None for w in weights) else None,
    )
    if axis_name is not None:
        labels = [own_slice(x, local_n, axis_name=axis_name) for x in labels]
        conf = [own_slice(x, local_n, axis_name=axis_name) for x in conf]
    loss = sum(alignment_cross_entropy(logits[n], lab) for n, lab in zip(names, labels))
    return AlignmentOutput(loss, dict(zip(names, labels)), dict(zip(names, conf)))


def distributional_alignment_grouped(
    logits: Mapping[str, jax.Array],
    valid: jax.Array,
    targets: Mapping[str, jax.Array],
    *,
    key: jax.Array | None = None,
    num_samples: int = 100,
    confidence: float = 0.8,
    axis_name: str | None = None,
    cost_weights: Mapping[str, jax.Array] | None = None,
) -> AlignmentOutput:
    """:func:`distributional_alignment` for G prompt groups: logits ``[G, N, K_a]``, valid ``[G, N]``.

    Targets are computed per group (independent keys); the loss is the mean over groups.
    """
    names, checked = _check_names(logits, targets)
    groups = valid.shape[0]
    keys = jax.random.split(key, groups) if key is not None else None

    def one_group(group_logits, group_valid, group_key):
        return distributional_alignment(
            group_logits,
            group_valid,
            checked,
            key=group_key,
            num_samples=num_samples,
            confidence=confidence,
            axis_name=axis_name,
            cost_weights=cost_weights,
        )

    group_logits = {n: logits[n] for n in names}
    if keys is None:
        out = jax.vmap(lambda lg, v: one_group(lg, v, None))(group_logits, valid)
    else:
        out = jax.vmap(one_group)(group_logits, valid, keys)
    return AlignmentOutput(out.loss.mean(), out.labels, out.conf)
