"""Face realism (DESIGN §1.3) as the authors compute it: ``L_face = 1 − cos(E(face of x), e*)``.

E(face) is the embedding of the face plus that of its mirror image, normalised (``get_face_feats``). e* is the
original image's embedding when the image keeps its class: for every attribute the target equals the original
image's predicted class and the original classifier's top probability is at least the keep confidence (0.9 for one
attribute, 0.8 for gender × race, 0.75 with age); otherwise e* is the reference embedding of a real face with the
largest dot product with E(face of x), searched over the *whole* reference set (``FaceFeatsModel.semantic_search``,
top-1, ``util.dot_score``). Which images count: with one attribute, those with a face and a target
(``exp-1-debias-gender/1-main-debias.py``, ``exp-2-...``, ``exp-6-debias-race/...``); with several attributes, every
image with a face (``exp-3-debias-gender-race/1-main-debias.py``, ``exp-4-...``), all in
sail-sg/finetune-fair-diffusion. The loss of the images that do not count is 0, and the mean is over all images (the
authors back-propagate ``loss_ij.mean()`` with constant placeholders for them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from fairdiff_jax.errors import FairdiffError

# the authors' keep-original confidence by number of debiased attributes (face_*_confidence_level in their scripts)
KEEP_CONFIDENCE = {1: 0.9, 2: 0.8, 3: 0.75}


def default_keep_confidence(num_attributes: int) -> float:
    """0.9 for one attribute, 0.8 for two (gender × race), 0.75 for three (with age); 0.75 beyond."""
    if num_attributes < 1:
        raise FairdiffError("the face-realism loss needs at least one attribute; configure attributes.<name>")
    return KEEP_CONFIDENCE.get(num_attributes, KEEP_CONFIDENCE[3])


def normalize(embeddings: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of ``[B, D]`` scaled to unit norm (float32 or wider), as ``torch.nn.functional.normalize``."""
    embeddings = embeddings.astype(jnp.promote_types(embeddings.dtype, jnp.float32))
    return embeddings / jnp.maximum(jnp.linalg.norm(embeddings, axis=-1, keepdims=True), eps)


def keep_original_face(
    labels: Mapping[str, jax.Array],
    original_probs: Mapping[str, jax.Array],
    original_valid: jax.Array,
    *,
    threshold: float,
) -> jax.Array:
    """``[B]`` bool: the original image has a face and, for every attribute, the target ``labels[a] [B]`` (−1: none)
    is the original prediction ``argmax original_probs[a] [B, K]`` with top probability ≥ ``threshold``."""
    keep = jnp.asarray(original_valid, bool)
    for name, label in labels.items():
        probs = original_probs[name]
        same = (label >= 0) & (label == jnp.argmax(probs, -1)) & (probs.max(-1) >= threshold)
        keep = keep & same
    return keep


def face_loss_mask(valid: jax.Array, labels: Mapping[str, jax.Array]) -> jax.Array:
    """``[B]`` bool, which images the loss covers: a face, and with a single attribute also a target."""
    used = jnp.asarray(valid, bool)
    if len(labels) == 1:
        used = used & (next(iter(labels.values())) >= 0)
    return used


def nearest_reference(queries: jax.Array, reference: jax.Array) -> jax.Array:
    """For each unit query ``[B, D]``, the row of the unit reference set ``[M, D]`` with the largest dot product."""
    reference = reference.astype(jnp.promote_types(queries.dtype, jnp.float32))
    return reference[jnp.argmax(jnp.einsum("bd,md->bm", queries, reference), axis=-1)]


def face_realism_loss(
    embeddings: jax.Array,
    original_embeddings: jax.Array,
    reference: jax.Array,
    keep_original: jax.Array,
    used: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(mean over the batch of 1 − cos(E(x), e*), per-image loss [B])`` before λ_face.

    Args:
      embeddings: ``[B, D]`` E(face) + E(mirrored face) of the images being trained (gradients flow).
      original_embeddings: ``[B, D]`` the same for the frozen model's images (no gradient).
      reference: ``[M, D]`` unit embeddings of real faces (:class:`~fairdiff_jax.face_reference.FaceReferenceSet`).
      keep_original: ``[B]`` from :func:`keep_original_face`; used: ``[B]`` from :func:`face_loss_mask`.
    """
    current = normalize(embeddings)
    original = jax.lax.stop_gradient(normalize(original_embeddings))
    nearest = jax.lax.stop_gradient(nearest_reference(jax.lax.stop_gradient(current), reference))
    goal = jnp.where(keep_original[:, None], original, nearest)
    per_image = jnp.where(used, 1.0 - (current * goal).sum(-1), 0.0)
    return per_image.sum() / embeddings.shape[0], per_image


def face_realism(
    embed: Callable[[jax.Array, jax.Array], jax.Array],
    images: jax.Array,
    original_images: jax.Array,
    landmarks: jax.Array,
    original_landmarks: jax.Array,
    valid: jax.Array,
    original_valid: jax.Array,
    labels: Mapping[str, jax.Array],
    original_probs: Mapping[str, jax.Array],
    reference: jax.Array,
    *,
    threshold: float,
) -> tuple[jax.Array, jax.Array]:
    """L_face of a batch from the images themselves: ``embed(images [B, H, W, 3], landmarks [B, 5, 2]) -> [B, D]``
    (E(face) + E(mirror), e.g. a bound :class:`~fairdiff_jax.attributes.face_embedder.FaceEmbedder`), the faces
    detected in the current and the original images, the targets ``labels[a] [B]`` and the original classifier's
    ``original_probs[a] [B, K]``. Returns (loss before λ_face, per-image loss ``[B]``)."""
    original = jax.lax.stop_gradient(embed(jax.lax.stop_gradient(original_images), original_landmarks))
    keep = keep_original_face(labels, original_probs, original_valid, threshold=threshold)
    used = face_loss_mask(valid, labels)
    return face_realism_loss(embed(images, landmarks), original, reference, keep, used)
