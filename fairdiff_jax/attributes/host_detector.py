"""The shared shell of host-side face detectors: the largest face per image, called from JAX through
``jax.pure_callback`` with fixed output shapes, so it works inside ``jit``, ``grad`` (it sees ``stop_gradient`` inputs
only), ``shard_map`` and ``pmap``. An image with no face gets ``valid=False``, the whole-image box and placeholder
landmarks, so the crops downstream stay well defined and are simply ignored.

A backend implements ``_largest_face(rgb)`` and ``_placeholder_landmarks(box)``; its ``landmark_scheme`` says what
the five points are: ``"arcface"`` (eye centres, nose tip, mouth corners, image-left first: the 112x112 ArcFace
template's order) or ``"dlib"`` (dlib's 5-point shape: outer and inner corner of the image-right eye, of the
image-left eye, bottom of the nose).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.attributes.faces import FaceDetections

LANDMARK_SCHEMES = ("arcface", "dlib")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images ``[B, H, W, 3]`` in [-1, 1] (any float dtype) -> uint8 RGB ``[B, H, W, 3]`` (rounded, clipped)."""
    unit = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(unit), 0, 255).astype(np.uint8)


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boxes ``[N, 4]`` (x0, y0, x1, y1 edges) clipped to the image."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    return boxes


def largest_box(boxes: np.ndarray) -> int:
    """Index of the box ``[N, 4]`` with the largest area (boxes already clipped to the image, as the authors rank)."""
    return int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))


class HostFaceDetector:
    """Mixin for frozen-dataclass detectors: ``detect_numpy`` on the host and ``__call__`` from JAX."""

    landmark_scheme: str = "arcface"

    def _largest_face(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The largest face of a uint8 RGB image ``[H, W, 3]``: (box ``[4]`` edges, landmarks ``[5, 2]``) or None."""
        raise NotImplementedError

    def _placeholder_landmarks(self, box: np.ndarray) -> np.ndarray:
        """Landmarks ``[5, 2]`` for an image without a face whose box is ``box`` (the whole image)."""
        raise NotImplementedError

    def detect_numpy(self, images: np.ndarray) -> FaceDetections:
        """Host detection: images ``[B, H, W, 3]`` in [-1, 1] -> numpy FaceDetections of the largest face each."""
        images = np.asarray(images)
        batch, height, width = images.shape[:3]
        whole = np.array([0.0, 0.0, width, height], np.float32)
        boxes = np.broadcast_to(whole, (batch, 4)).copy()
        landmarks = np.broadcast_to(self._placeholder_landmarks(whole), (batch, 5, 2)).astype(np.float32)
        valid = np.zeros((batch,), bool)
        for index, rgb in enumerate(to_uint8(images)):
            found = self._largest_face(np.ascontiguousarray(rgb))
            if found is not None:
                boxes[index], landmarks[index] = found
                valid[index] = True
        return FaceDetections(boxes, landmarks, valid)

    def __call__(self, images: jax.Array) -> FaceDetections:
        """images ``[B, H, W, 3]`` in [-1, 1] -> FaceDetections (boxes ``[B, 4]``, landmarks ``[B, 5, 2]``, valid
        ``[B]``), computed on the host; no gradient flows through it."""
        batch = images.shape[0]
        shapes = FaceDetections(
            jax.ShapeDtypeStruct((batch, 4), jnp.float32),
            jax.ShapeDtypeStruct((batch, 5, 2), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.bool_),
        )
        pixels = jax.lax.stop_gradient(images).astype(jnp.float32)
        return jax.pure_callback(self.detect_numpy, shapes, pixels, vmap_method="sequential")
