"""dlib's 5-point face chip (``get_face_chip_details`` + ``extract_image_chips``) in JAX, differentiable in the pixels.

Geometry, as dlib's ``image_transforms/interpolation.h`` places it: the five chip points are dlib's reference points
``(padding + p) / (1 + 2 padding) · size``; the least-squares similarity chip -> image (Umeyama) gives an angle, a scale
s and the image point of chip point (size/2, size/2), the centre of a ``size·s − 1`` wide square; chip pixels 0 and
size−1 land on that square's edges. When the square is large dlib first halves the image with its 5x5 binomial
pyramid (``pyramid_down<2>``, on the sub-image around the face, with its own point mapping ``p/2 − (1.25, 0.75)``)
until the square is no larger than the chip, then samples bilinearly; samples whose 2x2 neighbourhood leaves the image
are black. All of that is reproduced; dlib's rounding of each output (and pyramid) pixel to uint8 is not.
Landmarks are constants (stop_gradient); the gradient reaches the pixels through the pyramid and the bilinear weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# dlib's 5-point reference positions in a unit chip (dlib 5-point order: outer and inner corner of the image-right
# eye, outer and inner corner of the image-left eye, bottom of the nose)
DLIB_TEMPLATE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    np.float64,
)
DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25  # dlib's compute_face_descriptor default
_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32)


def chip_points(size: int = DLIB_CHIP_SIZE, padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """Where dlib puts the five landmarks in a ``size`` chip with ``padding`` ``[5, 2]``."""
    return ((padding + DLIB_TEMPLATE_5) / (2 * padding + 1) * size).astype(np.float32)


def template_landmarks(boxes: np.ndarray, size: int = DLIB_CHIP_SIZE, padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """Placeholder landmarks ``[B, 5, 2]`` (numpy) whose chip is roughly the box ``[B, 4]`` (edges): for no face."""
    unit = (chip_points(size, padding) + 0.5) / size  # chip pixel centres -> fractions of the chip
    boxes = np.asarray(boxes, np.float32)
    return (boxes[:, None, :2] + unit[None] * (boxes[:, None, 2:] - boxes[:, None, :2]) - 0.5).astype(np.float32)


def pyramid_down(images: jax.Array) -> jax.Array:
    """dlib's ``pyramid_down<2>``: ``[B, H, W, C]`` -> ``[B, (H−3)//2, (W−3)//2, C]``, output pixel (r, c) = the 5x5
    binomial average of input rows 2r..2r+4 and columns 2c..2c+4 (no rounding)."""
    channels = images.shape[-1]
    kernel = jnp.asarray(np.outer(_BINOMIAL, _BINOMIAL) / 256.0, images.dtype)
    kernel = jnp.broadcast_to(kernel[:, :, None, None], (5, 5, 1, channels))
    return jax.lax.conv_general_dilated(
        images, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels
    )


def _similarity(source: np.ndarray, target: jax.Array) -> jax.Array:
    """Least-squares similarity ``a·z + b`` (complex form) mapping ``source [P, 2]`` onto ``target [B, P, 2]``."""
    src = jnp.asarray(source[:, 0] + 1j * source[:, 1], jnp.complex64)
    dst = target[..., 0] + 1j * target[..., 1]
    src_c = src - src.mean()
    dst_c = dst - dst.mean(axis=-1, keepdims=True)
    scale_rot = (jnp.conj(src_c)[None] * dst_c).sum(-1) / jnp.maximum((jnp.abs(src_c) ** 2).sum(), 1e-12)
    return scale_rot, dst.mean(axis=-1) - scale_rot * src.mean()


def _lround(x: jax.Array) -> jax.Array:
    return (jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)).astype(jnp.int32)


def _sample(images: jax.Array, points: jax.Array, extent: jax.Array) -> jax.Array:
    """dlib's ``interpolate_bilinear`` of ``images [B, H, W, C]`` at ``points [B, h, w, 2]`` (x, y), black wherever
    the 2x2 neighbourhood leaves the ``extent [B, 2]`` (width, height) of the valid image."""
    x, y = points[..., 0], points[..., 1]
    left, top = jnp.floor(x), jnp.floor(y)
    inside = (left >= 0) & (top >= 0) & (left + 1 < extent[:, 0, None, None]) & (top + 1 < extent[:, 1, None, None])
    height, width = images.shape[1:3]
    x0 = jnp.clip(left, 0, width - 2).astype(jnp.int32)
    y0 = jnp.clip(top, 0, height - 2).astype(jnp.int32)
    fx, fy = (x - left)[..., None], (y - top)[..., None]
    gather = jax.vmap(lambda image, yy, xx: image[yy, xx])
    upper = gather(images, y0, x0) * (1 - fx) + gather(images, y0, x0 + 1) * fx
    lower = gather(images, y0 + 1, x0) * (1 - fx) + gather(images, y0 + 1, x0 + 1) * fx
    return jnp.where(inside[..., None], upper * (1 - fy) + lower * fy, 0.0)


def max_pyramid_levels(height: int, width: int) -> int:
    """How many ``pyramid_down`` levels an ``H x W`` image has before a side falls to 8 pixels or fewer."""
    levels = 0
    while min(height, width) > 8:
        height, width, levels = (height - 3) // 2, (width - 3) // 2, levels + 1
    return levels


class ChipGeometry(NamedTuple):
    """Where dlib takes each chip from: ``centre [B, 2]`` and ``half [B]`` (half side) of its square in the image,
    ``rotation [B, 2, 2]``, the pyramid ``depth [B]`` (0: the image itself) and the integer crop the pyramid is built
    from, ``origin [B, 2]`` (x, y) and ``extent [B, 2]`` (width, height)."""

    centre: jax.Array
    half: jax.Array
    rotation: jax.Array
    depth: jax.Array
    origin: jax.Array
    extent: jax.Array


def chip_geometry(
    landmarks: jax.Array, height: int, width: int, size: int = DLIB_CHIP_SIZE, padding: float = DLIB_CHIP_PADDING
) -> ChipGeometry:
    """dlib's ``get_face_chip_details`` and the crop / level choice of ``extract_image_chips`` for ``landmarks
    [B, 5, 2]`` in an ``height x width`` image."""
    landmarks = jax.lax.stop_gradient(jnp.asarray(landmarks, jnp.float32))
    scale_rot, shift = _similarity(chip_points(size, padding).astype(np.float64), landmarks)
    angle, scale = jnp.angle(scale_rot), jnp.abs(scale_rot)
    centre_z = scale_rot * (size / 2 + 1j * size / 2) + shift  # the image point of chip point (size/2, size/2)
    centre = jnp.stack([centre_z.real, centre_z.imag], -1)
    half = (size * scale - 1.0) / 2.0  # dlib's centered_drect(centre, size·s, size·s) spans size·s − 1
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rotation = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)

    # pyramid depth: halve the square (side w -> (w + 1) / 2, dlib's rect_down) while its area exceeds the chip's
    side, depth = 2.0 * half + 1.0, jnp.zeros(landmarks.shape[:1], jnp.int32)
    for _ in range(max_pyramid_levels(height, width)):
        side = (side + 1.0) / 2.0
        depth = depth + (side * side > size * size)
    grow = 2.0 ** (depth + 2) - 2.0  # dlib grows the crop by 2 pixels, then by 2·grow + 2 per level

    corners = jnp.asarray([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], jnp.float32)
    rotated = centre[:, None] + jnp.einsum("bij,bkj->bki", rotation, corners[None] * half[:, None, None])
    low = jnp.maximum(rotated.min(1) - grow[:, None], 0.0)
    high = jnp.minimum(rotated.max(1) + grow[:, None], jnp.asarray([width - 1.0, height - 1.0]))
    origin, end = _lround(low), _lround(high)
    return ChipGeometry(centre, half, rotation, depth, origin, (end - origin + 1).astype(jnp.float32))


def extract_face_chips(
    images: jax.Array,
    landmarks: jax.Array,
    size: int = DLIB_CHIP_SIZE,
    padding: float = DLIB_CHIP_PADDING,
    *,
    truncate: bool = False,
) -> jax.Array:
    """dlib's ``get_face_chip(image, shape, size, padding)`` for a batch: ``images [B, H, W, C]`` (any value range),
    ``landmarks [B, 5, 2]`` (dlib's 5-point order, pixel centres at integers) -> chips ``[B, size, size, C]``.

    ``truncate`` floors every pyramid level and the chip as dlib's uint8 images do (for 0..255 pixels; parity checks
    only: the floor has no gradient)."""
    floor = jnp.floor if truncate else (lambda x: x)
    batch, height, width, channels = images.shape
    geometry = chip_geometry(landmarks, height, width, size, padding)
    padded = jnp.pad(images, ((0, 0), (0, height), (0, width), (0, 0)))
    crop = jax.vmap(lambda image, x0, y0: jax.lax.dynamic_slice(image, (y0, x0, 0), (height, width, channels)))(
        padded, geometry.origin[:, 0], geometry.origin[:, 1]
    )  # the crop dlib builds its pyramid from, at a fixed size (beyond its extent nothing is sampled)

    grid = jnp.stack(jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32)), -1)
    unit = grid / (size - 1) * 2.0 - 1.0  # chip pixel -> [-1, 1] across the square, [size, size, 2] (x, y)
    directions = jnp.einsum("bij,hwj->bhwi", geometry.rotation, unit)
    centre, half, extent = geometry.centre - geometry.origin.astype(jnp.float32), geometry.half, geometry.extent
    chips = jnp.zeros((batch, size, size, channels), images.dtype)
    levels = max_pyramid_levels(height, width)
    for level in range(levels + 1):  # level 0 is the crop itself, level k the crop halved k times
        sampled = _sample(crop, centre[:, None, None] + directions * half[:, None, None, None], extent)
        chips = jnp.where((geometry.depth == level)[:, None, None, None], floor(sampled), chips)
        if level < levels:
            crop = floor(pyramid_down(crop))
            centre = centre / 2.0 - jnp.asarray([1.25, 0.75], jnp.float32)  # dlib's pyramid_down<2>::point_down
            half = half / 2.0
            too_small = extent.min(-1, keepdims=True) <= 8  # dlib's pyramid gives an empty image then
            extent = jnp.where(too_small, 0.0, jnp.floor((extent - 3) / 2))
    return chips
