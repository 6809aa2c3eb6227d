"""Semantics preservation (DESIGN §1.3): ``L_img = Σ_e (1 − cos(e(x), e(x_ori)))`` over frozen feature
extractors e (CLIP and DINO), with dynamic per-image weights and a damped gradient inside the face box."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.gradients import scale_gradient

FeatureExtractor = Callable[[jax.Array], jax.Array]  # images [B, H, W, 3] in [-1, 1] -> [B, D]


def box_mask(boxes: jax.Array, height: int, width: int) -> jax.Array:
    """``[B, H, W]`` float mask, 1 where a pixel centre lies inside the box (x0, y0, x1, y1; edge coordinates)."""
    ys = jnp.arange(height, dtype=jnp.float32)[None, :, None] + 0.5
    xs = jnp.arange(width, dtype=jnp.float32)[None, None, :] + 0.5
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    inside = (
        (xs >= boxes[:, 0, None, None])
        & (xs <= boxes[:, 2, None, None])
        & (ys >= boxes[:, 1, None, None])
        & (ys <= boxes[:, 3, None, None])
    )
    return inside.astype(jnp.float32)


def scale_face_gradient(images: jax.Array, boxes: jax.Array, valid: jax.Array, factor: float = 0.2) -> jax.Array:
    """Identity on ``images [B, H, W, C]`` whose gradient is multiplied by ``factor`` inside each valid face box."""
    mask = box_mask(boxes, images.shape[1], images.shape[2]) * jnp.asarray(valid, jnp.float32)[:, None, None]
    scale = 1.0 - (1.0 - factor) * mask
    return scale_gradient(images, scale[..., None].astype(images.dtype))


def semantic_weights(
    labels: Mapping[str, jax.Array], original_labels: Mapping[str, jax.Array], factor: float = 0.2
) -> jax.Array:
    """Per-image weight ``[B]``: 1 if every attribute's target equals the original image's predicted class,
    else ``factor`` (factor1 = 0.2; an uncertain target, label −1, never equals a class)."""
    keep = None
    for name, label in labels.items():
        same = (label >= 0) & (label == original_labels[name])
        keep = same if keep is None else keep & same
    return jnp.where(keep, 1.0, factor)


def mismatch_factor(
    labels: Mapping[str, jax.Array],
    original_labels: Mapping[str, jax.Array],
    has_face: jax.Array,
    factors: Mapping[str, float],
    *,
    no_face: float | None = None,
) -> jax.Array:
    """Per-image factor ``[B]`` chosen as the paper's authors choose factor1 (and factor2), attribute by attribute.

    ``labels`` are the dynamic targets (−1 = none), ``original_labels`` the original image's predicted classes
    (−1 where the original has no face), ``has_face`` ``[B]`` whether the generated image has a face,
    ``factors`` the factor of each attribute (same names as ``labels``). Rules of
    sail-sg/finetune-fair-diffusion, ``gen_dynamic_weights`` in exp-{1,2,6}-*/1-main-debias.py (one attribute)
    and exp-3-debias-gender-race, exp-4-debias-gender-race-age, exp-5-*/1-main-debias.py (several):

    - one attribute: no face → 1; a target of −1 or one that differs from the original class → its factor;
      else 1;
    - several: no face → the minimum of all factors; else the minimum factor over the attributes whose target
      differs from the original class (a raw comparison, so −1 against an original −1 counts as agreeing, as
      there), 1 when none differs.

    ``no_face`` overrides the no-face value (e.g. 1 for factor2, where the authors hook no gradient).
    """
    names = list(labels)
    if not names or set(names) != set(factors) or not set(names) <= set(original_labels):
        raise FairdiffError(
            f"mismatch_factor needs one factor and one original label per attribute; got labels for {names}, "
            f"factors for {sorted(factors)} and original labels for {sorted(original_labels)}."
        )
    has_face = jnp.asarray(has_face, bool)
    if len(names) == 1:
        name = names[0]
        label, original = jnp.asarray(labels[name]), jnp.asarray(original_labels[name])
        with_face = jnp.where((label < 0) | (label != original), float(factors[name]), 1.0)
        default_no_face = 1.0
    else:
        smallest = jnp.full(has_face.shape, jnp.inf, jnp.float32)  # over the attributes that differ
        for name in names:
            differs = jnp.asarray(labels[name]) != jnp.asarray(original_labels[name])
            smallest = jnp.where(differs, jnp.minimum(smallest, float(factors[name])), smallest)
        with_face = jnp.where(jnp.isinf(smallest), 1.0, smallest)
        default_no_face = min(float(factors[n]) for n in names)
    value = default_no_face if no_face is None else float(no_face)
    return jnp.where(has_face, with_face, value).astype(jnp.float32)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Row-wise cosine similarity of ``[B, D]`` arrays -> ``[B]``."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    return (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


def semantic_loss(
    images: jax.Array,
    original_images: jax.Array,
    extractors: Sequence[FeatureExtractor],
    *,
    weights: jax.Array | None = None,
    face_boxes: jax.Array | None = None,
    face_valid: jax.Array | None = None,
    face_factor: float = 0.2,
) -> tuple[jax.Array, jax.Array]:
    """Weighted semantics-preservation loss (before λ_img).

    Args:
      images: ``[B, H, W, 3]`` in [-1, 1], generated by the model being finetuned (gradients flow).
      original_images: ``[B, H, W, 3]`` from the frozen model, same noise (no gradient).
      extractors: feature extractors (e.g. CLIP and DINO), each ``images -> [B, D]``.
      weights: ``[B]`` per-image weights (see :func:`semantic_weights`); default 1.
      face_boxes / face_valid: ``[B, 4]`` / ``[B]``; if given, the gradient inside the box is × ``face_factor``.

    Returns: (mean over images of weight × Σ_e (1 − cos), per-image unweighted ``[B]``).
    """
    if face_boxes is not None:
        valid = jnp.ones(images.shape[:1], bool) if face_valid is None else face_valid
        images = scale_face_gradient(images, face_boxes, valid, face_factor)
    original_images = jax.lax.stop_gradient(original_images)
    per_image = jnp.zeros(images.shape[:1], jnp.float32)
    for extract in extractors:
        reference = jax.lax.stop_gradient(extract(original_images))
        per_image = per_image + (1.0 - cosine_similarity(extract(images), reference))
    weights = jnp.ones_like(per_image) if weights is None else weights
    return (weights * per_image).mean(), per_image
