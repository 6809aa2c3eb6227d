"""Face pipeline: detection without gradient (pluggable backend), then differentiable crops of the pixels.

A detector is any callable ``images [B, H, W, 3] in [-1, 1] -> FaceDetections`` describing the largest face of
each image. Its output is wrapped in ``stop_gradient``; backends that run outside JAX (a host detector called
through ``jax.pure_callback``) fit the same interface: ``detectors.OpenCVFaceDetector`` (Haar cascade or YuNet) and
``dlib_detect.DlibFaceDetector`` (dlib's CNN or HOG detector) are the real ones. ``WholeImageDetector`` is the backend
for attributes that are not facial and for the toy world: the face is the whole image. A detector's
``landmark_scheme`` (``"arcface"`` unless it says ``"dlib"``) decides which 5-point alignment the pipeline applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from fairdiff_jax.attributes.face_chip import DLIB_CHIP_SIZE, extract_face_chips
from fairdiff_jax.attributes.image_ops import ARCFACE_TEMPLATE_112, align_faces, crop_and_resize, expand_square_boxes


class FaceDetections(NamedTuple):
    """The largest face per image: boxes ``[B, 4]`` (x0, y0, x1, y1 pixels), landmarks ``[B, 5, 2]``
    (eyes, nose, mouth corners), valid ``[B]`` bool (False: no face)."""

    boxes: jax.Array
    landmarks: jax.Array
    valid: jax.Array


class FaceDetector(Protocol):
    def __call__(self, images: jax.Array) -> FaceDetections: ...


class FaceCrops(NamedTuple):
    """Differentiable crops: ``crops [B, S, S, 3]`` (expanded square box), ``aligned [B, s, s, 3]`` (5-point)."""

    crops: jax.Array
    aligned: jax.Array
    detections: FaceDetections


@dataclasses.dataclass(frozen=True)
class WholeImageDetector:
    """Backend that reports the full image as the face (valid everywhere); landmarks fill the image the way the
    112x112 template fills its crop, so 5-point alignment reduces to a resize of the whole image."""

    def __call__(self, images: jax.Array) -> FaceDetections:
        batch, height, width = images.shape[:3]
        box = jnp.array([0.0, 0.0, width, height], jnp.float32)
        # template points are pixel centres of a 112 grid; map centre c to c' = (c + 0.5) * scale - 0.5
        landmarks = (jnp.asarray(ARCFACE_TEMPLATE_112) + 0.5) * jnp.array([width / 112.0, height / 112.0]) - 0.5
        return FaceDetections(
            boxes=jnp.broadcast_to(box, (batch, 4)),
            landmarks=jnp.broadcast_to(landmarks, (batch, 5, 2)),
            valid=jnp.ones((batch,), bool),
        )


@dataclasses.dataclass(frozen=True)
class FacePipeline:
    """Detect (no gradient), crop the expanded square box to ``crop_size`` and align to ``align_size``.

    Attributes:
      detector: the detection backend.
      crop_size: side of the attribute-classifier crop (224 in the paper).
      expand: the square box side is ``expand`` × the longer side of the detected box.
      align_size: side of the 5-point aligned crop for the face embedding (112, ArcFace template); a detector with
        dlib landmarks gives dlib's face chip instead (150, padding 0.25, as dlib's face-recognition network wants).
    """

    detector: Callable[[jax.Array], FaceDetections] = WholeImageDetector()
    crop_size: int = 224
    expand: float = 1.0
    align_size: int = 112

    def detect(self, images: jax.Array) -> FaceDetections:
        return jax.tree_util.tree_map(jax.lax.stop_gradient, self.detector(jax.lax.stop_gradient(images)))

    def face_boxes(self, detections: FaceDetections) -> jax.Array:
        """The square boxes ``[B, 4]`` the crops are taken from (the detected box expanded by ``expand``)."""
        return expand_square_boxes(detections.boxes, self.expand)

    def __call__(
        self, images: jax.Array, *, aligned: bool = True, detections: FaceDetections | None = None
    ) -> FaceCrops:
        """images ``[B, H, W, 3]`` in [-1, 1] -> FaceCrops; gradients reach the pixels through both crops.
        ``detections`` found earlier for these images (e.g. by the train step, which needs them too) skip detection."""
        if detections is None:
            detections = self.detect(images)
        else:
            detections = jax.tree_util.tree_map(jax.lax.stop_gradient, detections)
        crops = crop_and_resize(images, self.face_boxes(detections), self.crop_size)
        aligned_faces = None
        if aligned and getattr(self.detector, "landmark_scheme", "arcface") == "dlib":
            aligned_faces = extract_face_chips(images, detections.landmarks, DLIB_CHIP_SIZE)
        elif aligned:
            aligned_faces = align_faces(images, detections.landmarks, self.align_size)
        return FaceCrops(crops, aligned_faces, detections)
