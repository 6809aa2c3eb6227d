"""Face realism (DESIGN §1.3): ``L_face = 1 − cos(E(face of x), e*)`` with a pluggable face-embedding network E.

e* is the original image's face embedding when the image keeps its class (its target equals the original
prediction with confidence ≥ 0.9), else the reference embedding of a real face of the target class that is
nearest (by cosine) to the current face. Images without a face or a target contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.alignment.semantic import cosine_similarity
from fairdiff_jax.errors import FairdiffError

FaceEmbedder = Callable[[jax.Array], jax.Array]  # aligned faces [B, 112, 112, 3] in [-1, 1] -> [B, D]


class FaceReference(NamedTuple):
    """Reference embeddings of real faces: ``embeddings [K, M, D]`` (unit norm) and ``mask [K, M]`` per class."""

    embeddings: jax.Array
    mask: jax.Array

    @classmethod
    def from_class_lists(cls, per_class: Sequence[np.ndarray]) -> FaceReference:
        """Build from one ``[M_k, D]`` array per class (classes in the target's class order)."""
        if not per_class or any(np.asarray(e).ndim != 2 or len(e) == 0 for e in per_class):
            raise FairdiffError(
                "face reference set needs at least one [M, D] embedding array per class; compute embeddings of "
                "real faces for every class of the target."
            )
        size = max(len(e) for e in per_class)
        dim = np.asarray(per_class[0]).shape[1]
        emb = np.zeros((len(per_class), size, dim), np.float32)
        mask = np.zeros((len(per_class), size), bool)
        for k, e in enumerate(per_class):
            e = np.asarray(e, np.float32)
            emb[k, : len(e)] = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-8)
            mask[k, : len(e)] = True
        return cls(jnp.asarray(emb), jnp.asarray(mask))


def joint_class(labels: Mapping[str, jax.Array], num_classes: Mapping[str, int]) -> jax.Array:
    """Mixed-radix joint class ``[B]`` of per-attribute labels (attribute order of ``num_classes``); −1 if any
    label is −1. E.g. gender (2) × race (4): joint = gender · 4 + race."""
    joint = None
    missing = None
    for name, k in num_classes.items():
        label = labels[name]
        joint = label if joint is None else joint * k + label
        missing = (label < 0) if missing is None else missing | (label < 0)
    return jnp.where(missing, -1, joint)


def face_targets(
    labels: Mapping[str, jax.Array],
    conf: Mapping[str, jax.Array],
    original_labels: Mapping[str, jax.Array],
    num_classes: Mapping[str, int],
    *,
    keep_threshold: float = 0.9,
) -> tuple[jax.Array, jax.Array]:
    """(keep_original ``[B]`` bool, target joint class ``[B]``, −1 = none) for :func:`face_realism_loss`."""
    keep = None
    for name in num_classes:
        same = (labels[name] >= 0) & (labels[name] == original_labels[name]) & (conf[name] >= keep_threshold)
        keep = same if keep is None else keep & same
    return keep, joint_class(labels, num_classes)


def nearest_reference(embeddings: jax.Array, target_class: jax.Array, reference: FaceReference) -> jax.Array:
    """For each face ``[B, D]``, the reference embedding of its target class with the largest cosine ``[B, D]``."""
    unit = embeddings / jnp.maximum(jnp.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-8)
    classes = jnp.clip(target_class, 0, reference.embeddings.shape[0] - 1)
    candidates = reference.embeddings[classes]  # [B, M, D]
    scores = jnp.where(reference.mask[classes], jnp.einsum("bmd,bd->bm", candidates, unit), -jnp.inf)
    return jnp.take_along_axis(candidates, jnp.argmax(scores, axis=-1)[:, None, None], axis=1)[:, 0]


def face_realism_loss(
    embed: FaceEmbedder | None,
    faces: jax.Array,
    original_faces: jax.Array,
    reference: FaceReference | None,
    keep_original: jax.Array,
    target_class: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, bool]:
    """Mean over images of ``1 − cos(E(face), e*)`` (before λ_face); faces ``[B, s, s, 3]`` aligned crops.

    Images count when they have a face (``valid``) and either keep their original face or have a target class.
    Returns (loss, active); ``(0.0, False)`` when no face-embedding network or reference set is configured.
    """
    if embed is None or reference is None:
        return jnp.zeros((), jnp.float32), False
    current = embed(faces)
    original = jax.lax.stop_gradient(embed(jax.lax.stop_gradient(original_faces)))
    nearest = jax.lax.stop_gradient(nearest_reference(jax.lax.stop_gradient(current), target_class, reference))
    goal = jnp.where(keep_original[:, None], original, nearest)
    used = valid & (keep_original | (target_class >= 0))
    per_image = jnp.where(used, 1.0 - cosine_similarity(current, goal), 0.0)
    return per_image.sum() / faces.shape[0], True
