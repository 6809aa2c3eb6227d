"""factor2 (DESIGN §1.3): inside the intersection of the current and the original image's face boxes, the gradient of
L_img is multiplied by the image's factor2 (the authors' ``apply_grad_hook_face`` in sail-sg/finetune-fair-diffusion,
``exp-1-debias-gender/1-main-debias.py`` and ``exp-3-debias-gender-race/1-main-debias.py``).

The boxes are the ones the attribute classifier crops (the detected box expanded to a square, ``expand_bbox``), an
image without a face in the current image is left alone, and one whose original has no face has an empty
intersection. It touches only the images fed to L_img's feature extractors, never the cross-entropy or L_face.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fairdiff_jax.alignment.semantic import box_mask
from fairdiff_jax.gradients import scale_gradient


def intersect_boxes(boxes: jax.Array, other: jax.Array) -> jax.Array:
    """Intersection of boxes ``[B, 4]`` (x0, y0, x1, y1 edges); an empty one has x1 <= x0 or y1 <= y0."""
    return jnp.concatenate([jnp.maximum(boxes[:, :2], other[:, :2]), jnp.minimum(boxes[:, 2:], other[:, 2:])], -1)


def scale_face_box_gradient(
    images: jax.Array,
    boxes: jax.Array,
    original_boxes: jax.Array,
    valid: jax.Array,
    original_valid: jax.Array,
    factors: jax.Array,
) -> jax.Array:
    """Identity on ``images [B, H, W, C]`` whose gradient is multiplied by ``factors [B]`` inside the intersection of
    ``boxes`` and ``original_boxes`` ``[B, 4]`` where both images have a face (``valid``, ``original_valid [B]``)."""
    height, width = images.shape[1:3]
    # a pixel is inside when its centre is: the slice [y0:y1, x0:x1] for integer edges, as the authors index
    inside = box_mask(intersect_boxes(boxes, original_boxes), height, width) > 0
    inside = inside & (jnp.asarray(valid, bool) & jnp.asarray(original_valid, bool))[:, None, None]
    factors = jax.lax.stop_gradient(jnp.asarray(factors, jnp.float32))
    scale = jnp.where(inside, factors[:, None, None], 1.0)
    return scale_gradient(images, scale[..., None].astype(images.dtype))
