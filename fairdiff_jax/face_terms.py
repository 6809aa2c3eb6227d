"""The face terms of a run (DESIGN §1.3), assembled once from the config and the world: L_face (``loss.lambda_face``,
``loss.face_keep_confidence``, the face embedder of ``loss.face_embedder_path``, the reference set of
``loss.face_reference_path``) and factor2 (``attributes.<name>.factor2``, the damping of L_img's gradient inside the
face boxes). The train step applies them (``FaceTerms.per_image_loss`` and ``FaceTerms.damp``).

Both need faces: the world must detect them (``World.face_detector``; the stable-diffusion world's is
``faces.detector``), and L_face needs dlib's 5 landmarks (``faces.detector=dlib_cnn`` or ``dlib_hog``), since its
embedder, dlib's face-recognition ResNet, reads dlib's face chip. The toy world has no faces: there both stay off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from fairdiff_jax.alignment.face import face_realism
from fairdiff_jax.alignment.face_box import scale_face_box_gradient
from fairdiff_jax.alignment.semantic import mismatch_factor
from fairdiff_jax.attributes.face_embedder import FaceEmbedder
from fairdiff_jax.attributes.faces import FaceDetections
from fairdiff_jax.attributes.image_ops import expand_square_boxes
from fairdiff_jax.config.schema import attribute_names
from fairdiff_jax.errors import FairdiffError


@dataclasses.dataclass(frozen=True, eq=False)
class FaceTerms:
    """The static side of the face terms; their weights live in the run's frozen pytree under ``"face"``
    (``{"embedder": Flax params, "reference": [M, D] unit embeddings}``, empty without L_face).

    Attributes:
      detector: ``images [B, H, W, 3] -> FaceDetections`` (host, no gradient), the world's face detector.
      box_expand: the face box of factor2 is the detected box expanded to a square by this (the classifier's crop,
        as the authors hook the gradient on their expanded ``face_bbox``).
      embedder: the face-embedding network (None when ``lambda_face`` is 0).
      lambda_face: the weight of L_face.
      keep_confidence: the original classifier's probability above which the original face is the target.
      factor2: attribute -> its factor2 (1 = no damping).
    """

    detector: Callable[[jax.Array], FaceDetections]
    box_expand: float
    embedder: FaceEmbedder | None
    lambda_face: float
    keep_confidence: float
    factor2: Mapping[str, float]

    @property
    def use_face(self) -> bool:
        return self.embedder is not None and self.lambda_face > 0

    @property
    def use_factor2(self) -> bool:
        return any(f != 1.0 for f in self.factor2.values())

    def detect(self, images: jax.Array) -> FaceDetections:
        """The largest face of each image ``[B, H, W, 3]`` (constants: no gradient flows through detection)."""
        found = self.detector(jax.lax.stop_gradient(images))
        return jax.tree_util.tree_map(jax.lax.stop_gradient, found)

    def boxes(self, detections: FaceDetections) -> jax.Array:
        """The face boxes ``[B, 4]`` of factor2."""
        return expand_square_boxes(detections.boxes, self.box_expand)

    def damp(self, images, detections, original_detections, labels, original_pred) -> jax.Array:
        """factor2: ``images [B, H, W, 3]`` whose L_img gradient is multiplied, inside the intersection of their
        face box and the original's, by factor2 chosen as the authors choose it (:func:`mismatch_factor`: the
        attribute's factor2 where the target ``labels[a] [B]`` differs from the original prediction
        ``original_pred[a] [B]``, −1 = no face; the smallest such with several attributes; 1 when all agree or the
        image has no face). Identity when every factor2 is 1."""
        if not self.use_factor2:
            return images
        factors = mismatch_factor(labels, original_pred, detections.valid, self.factor2, no_face=1.0)
        boxes, original_boxes = self.boxes(detections), self.boxes(original_detections)
        return scale_face_box_gradient(
            images, boxes, original_boxes, detections.valid, original_detections.valid, factors
        )

    def per_image_loss(
        self, weights, images, detections, original_images, original_detections, labels, original_probs
    ) -> jax.Array:
        """L_face per image ``[B]`` (before λ_face) with the frozen ``weights`` (``{"embedder", "reference"}``), the
        faces of the images and of the originals, the targets and the original classifier's probabilities."""
        _, per_image = face_realism(
            lambda x, landmarks: self.embedder(weights["embedder"], x, landmarks),
            images,
            original_images,
            detections.landmarks,
            original_detections.landmarks,
            detections.valid,
            original_detections.valid,
            labels,
            original_probs,
            weights["reference"],
            threshold=self.keep_confidence,
        )
        return per_image


def face_terms_requested(cfg: ConfigDict) -> bool:
    """Whether the config asks for L_face or factor2 at all."""
    return float(cfg.loss.lambda_face) > 0 or any(cfg.attributes[n].factor2 != 1.0 for n in cfg.attributes)


def build_face_terms(cfg: ConfigDict, run) -> tuple[FaceTerms | None, dict]:
    """(FaceTerms, their frozen weights) for ``cfg`` on ``run`` (a :class:`fairdiff_jax.run.Run`, whose world gave
    its face detector); (None, {}) when the config asks for neither term. Loads the embedder and the reference set
    when ``lambda_face > 0``."""
    if not face_terms_requested(cfg):
        return None, {}
    detector = run.face_detector
    if detector is None:
        asked = "loss.lambda_face > 0" if cfg.loss.lambda_face > 0 else "attributes.*.factor2 != 1"
        raise FairdiffError(
            f"{asked} needs faces, but model.world='{cfg.model.world}' detects none (faces.detector="
            f"'{cfg.faces.detector}'); set --config.faces.detector=dlib_cnn for a Stable Diffusion model, or turn the "
            "face terms off with --config.loss.lambda_face=0 and --config.attributes.<name>.factor2=1"
        )
    embedder, frozen = None, {}
    if cfg.loss.lambda_face > 0:
        if getattr(detector, "landmark_scheme", "arcface") != "dlib":
            raise FairdiffError(
                f"loss.lambda_face > 0 aligns faces by dlib's 5 landmarks, which faces.detector='{cfg.faces.detector}' "
                "does not give; set --config.faces.detector=dlib_cnn (the authors' detector) or dlib_hog"
            )
        embedder, frozen = load_face_weights(cfg)
    names = attribute_names(cfg)
    terms = FaceTerms(
        detector=detector,
        box_expand=float(run.face_box_expand),
        embedder=embedder,
        lambda_face=float(cfg.loss.lambda_face),
        keep_confidence=float(cfg.loss.face_keep_confidence),
        factor2={n: float(cfg.attributes[n].factor2) for n in names},
    )
    return terms, frozen


def load_face_weights(cfg: ConfigDict) -> tuple[FaceEmbedder, dict]:
    """The face embedder of ``loss.face_embedder_path`` (default: dlib's, from face-recognition-models) and the
    reference set of ``loss.face_reference_path``, checked to come from the same embedder."""
    from fairdiff_jax.attributes.dlib_detect import RECOGNITION_FILE, dlib_model_file
    from fairdiff_jax.attributes.face_embedder import load_face_embedder
    from fairdiff_jax.face_reference import load_face_reference

    if not cfg.loss.face_reference_path:
        raise FairdiffError(
            "loss.lambda_face > 0 needs a reference set of real faces; build one with `fairdiff faces build-reference "
            "--images DIR --classifier CLS --out FILE` and set --config.loss.face_reference_path=FILE"
        )
    path = cfg.loss.face_embedder_path
    if not path:
        try:
            path = dlib_model_file(RECOGNITION_FILE)
        except FairdiffError as err:
            raise FairdiffError(
                f"loss.lambda_face > 0 needs a face embedder and none is installed ({err}); or set "
                "--config.loss.face_embedder_path=/path/to/dlib_face_recognition_resnet_model_v1.dat"
            ) from err
    embedder, params = load_face_embedder(path)
    reference = load_face_reference(cfg.loss.face_reference_path, embedder=embedder.identity, dim=embedder.dim)
    return embedder, {"embedder": params, "reference": jnp.asarray(reference.embeddings)}
