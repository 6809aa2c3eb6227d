"""Differentiable image geometry in JAX: bilinear sampling, box crops, 5-point face alignment, model inputs.

Coordinates are in pixels with pixel centres at integers (pixel (x, y) covers [x−½, x+½] × [y−½, y+½]);
a box ``(x0, y0, x1, y1)`` is in edge coordinates, so the whole image is ``(0, 0, W, H)``. Gradients flow to the
pixels; boxes and landmarks are treated as constants (they come from a no-gradient detector).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The 5-point template (eyes, nose tip, mouth corners) of the 112x112 face-recognition crop used by ArcFace.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def bilinear_sample(images: jax.Array, coords: jax.Array) -> jax.Array:
    """Sample ``images [B, H, W, C]`` at ``coords [B, h, w, 2]`` (x, y; pixel centres) -> ``[B, h, w, C]``.

    Points outside the image read the nearest border pixel (edge padding).
    """
    height, width = images.shape[1], images.shape[2]
    coords = jax.lax.stop_gradient(coords)
    x = jnp.clip(coords[..., 0], 0.0, width - 1.0)
    y = jnp.clip(coords[..., 1], 0.0, height - 1.0)
    x0 = jnp.clip(jnp.floor(x), 0, max(width - 2, 0)).astype(jnp.int32)
    y0 = jnp.clip(jnp.floor(y), 0, max(height - 2, 0)).astype(jnp.int32)
    x1 = jnp.minimum(x0 + 1, width - 1)
    y1 = jnp.minimum(y0 + 1, height - 1)
    wx = (x - x0)[..., None]
    wy = (y - y0)[..., None]

    def gather(image, yy, xx):
        return image[yy, xx]

    gather = jax.vmap(gather)
    top = gather(images, y0, x0) * (1 - wx) + gather(images, y0, x1) * wx
    bottom = gather(images, y1, x0) * (1 - wx) + gather(images, y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def expand_square_boxes(boxes: jax.Array, scale: float = 1.0) -> jax.Array:
    """Square boxes ``[B, 4]`` around the centres of ``boxes``, side = ``scale`` × the longer side."""
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    half = jnp.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * scale / 2
    return jnp.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], axis=-1)


def crop_and_resize(images: jax.Array, boxes: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Bilinear crop of ``boxes [B, 4]`` (x0, y0, x1, y1) from ``images [B, H, W, C]`` -> ``[B, s, s, C]``."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    u = (jnp.arange(out_w, dtype=jnp.float32) + 0.5) / out_w
    v = (jnp.arange(out_h, dtype=jnp.float32) + 0.5) / out_h
    xs = boxes[:, 0, None] + u[None] * (boxes[:, 2] - boxes[:, 0])[:, None] - 0.5  # [B, w]
    ys = boxes[:, 1, None] + v[None] * (boxes[:, 3] - boxes[:, 1])[:, None] - 0.5  # [B, h]
    grid = jnp.stack(jnp.broadcast_arrays(xs[:, None, :], ys[:, :, None]), axis=-1)
    return bilinear_sample(images, grid)


def similarity_transform(source: jax.Array, destination: jax.Array) -> jax.Array:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``source [B, P, 2]`` to
    ``destination [P, 2]`` (Umeyama, no reflection) -> ``[B, 2, 3]`` matrices ``[sR | t]``."""
    destination = jnp.broadcast_to(jnp.asarray(destination, jnp.float32), source.shape)
    src_mean = source.mean(axis=1, keepdims=True)
    dst_mean = destination.mean(axis=1, keepdims=True)
    src_c = source - src_mean
    dst_c = destination - dst_mean
    # With complex numbers z = x + iy, the best similarity is dst ≈ a·src + b, a = Σ conj(src)·dst / Σ |src|².
    src_z = src_c[..., 0] + 1j * src_c[..., 1]
    dst_z = dst_c[..., 0] + 1j * dst_c[..., 1]
    a = (jnp.conj(src_z) * dst_z).sum(axis=1) / jnp.maximum((jnp.abs(src_z) ** 2).sum(axis=1), 1e-12)
    rot_scale = jnp.stack(
        [jnp.stack([a.real, -a.imag], axis=-1), jnp.stack([a.imag, a.real], axis=-1)], axis=-2
    )  # [B, 2, 2]
    translation = dst_mean[:, 0] - jnp.einsum("bij,bj->bi", rot_scale, src_mean[:, 0])
    return jnp.concatenate([rot_scale, translation[..., None]], axis=-1)


def warp_affine(images: jax.Array, matrices: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Output pixel p takes the input at ``A⁻¹ p`` where ``matrices [B, 2, 3]`` maps input -> output pixels."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    matrices = jax.lax.stop_gradient(matrices)
    linear, shift = matrices[:, :, :2], matrices[:, :, 2]
    inverse = jnp.linalg.inv(linear)
    ys, xs = jnp.meshgrid(jnp.arange(out_h, dtype=jnp.float32), jnp.arange(out_w, dtype=jnp.float32), indexing="ij")
    out_points = jnp.stack([xs, ys], axis=-1)  # [h, w, 2]
    source = jnp.einsum("bij,bhwj->bhwi", inverse, out_points[None] - shift[:, None, None, :])
    return bilinear_sample(images, source)


def align_faces(
    images: jax.Array, landmarks: jax.Array, size: int = 112, template: np.ndarray = ARCFACE_TEMPLATE_112
) -> jax.Array:
    """5-point similarity alignment: ``landmarks [B, 5, 2]`` (pixel centres) -> crops ``[B, size, size, C]``."""
    template = jnp.asarray(template, jnp.float32) * (size / 112.0)
    matrices = similarity_transform(jax.lax.stop_gradient(jnp.asarray(landmarks, jnp.float32)), template)
    return warp_affine(images, matrices, size)


def model_input(
    images: jax.Array,
    size: int = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> jax.Array:
    """Images ``[B, H, W, 3]`` in [-1, 1] -> resized (antialiased bicubic, like PIL) and normalised ``[B, s, s, 3]``.

    Non-square images are resized on the shorter side and centre-cropped, as the CLIP / DINO processors do.
    """
    batch, height, width, channels = images.shape
    unit = (images.astype(jnp.float32) + 1.0) / 2.0
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        unit = jax.image.resize(unit, (batch, new_h, new_w, channels), method="bicubic", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    unit = unit[:, top : top + size, left : left + size]
    return (unit - jnp.asarray(mean)) / jnp.asarray(std)
