"""factor2: the gradient of L_img is scaled inside the intersection of the current and original face boxes only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.alignment.face_box import intersect_boxes, scale_face_box_gradient


def test_gradient_inside_the_box_intersection_is_scaled_and_outside_unchanged():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 12, 10, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=images.shape), jnp.float32)
    boxes = jnp.asarray([[2, 3, 8, 9], [0, 0, 10, 12], [1, 1, 5, 5], [2, 2, 6, 6]], jnp.float32)
    original = jnp.asarray([[4, 1, 10, 7], [3, 4, 6, 11], [6, 6, 9, 9], [2, 2, 6, 6]], jnp.float32)
    valid = jnp.asarray([True, True, True, False])  # image 3: no face now -> left alone
    original_valid = jnp.asarray([True, True, True, True])
    factors = jnp.asarray([0.2, 0.3, 0.5, 0.2])
    loss = lambda x: (jnp.sin(x) * weights).sum()  # any L_img stand-in
    scaled = jax.grad(lambda x: loss(scale_face_box_gradient(x, boxes, original, valid, original_valid, factors)))
    plain = np.asarray(jax.grad(loss)(images))
    got = np.asarray(scaled(images))
    want = plain.copy()
    # the authors' slices: rows max(y0, y0') : min(y1, y1'), columns max(x0, x0') : min(x1, x1')
    want[0, 3:7, 4:8] *= 0.2
    want[1, 4:11, 3:6] *= 0.3  # image 2's boxes do not overlap: nothing scaled
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(intersect_boxes(boxes, original))[2], [6, 6, 5, 5])  # empty
    value = scale_face_box_gradient(images, boxes, original, valid, original_valid, factors)
    np.testing.assert_array_equal(np.asarray(value), np.asarray(images))  # identity in the forward pass
    no_original = jnp.asarray([False, True, True, True])
    got = np.asarray(
        jax.grad(lambda x: loss(scale_face_box_gradient(x, boxes, original, valid, no_original, factors)))(images)
    )
    np.testing.assert_allclose(got[0], plain[0], rtol=1e-6)  # the original has no face: nothing to intersect
