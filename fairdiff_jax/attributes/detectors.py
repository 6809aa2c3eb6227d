"""Host-side face detectors behind the :class:`~fairdiff_jax.attributes.faces.FaceDetector` interface, and the one
list of detector names a config may choose (``faces.detector``).

Backends (each keeps the largest face per image; see :mod:`~fairdiff_jax.attributes.host_detector`):
  * ``haar``: OpenCV's bundled frontal-face Haar cascade (``haarcascade_frontalface_default.xml`` ships inside the
    ``opencv-python-headless`` 4.x wheel; nothing is downloaded). It gives boxes only, so the five landmarks are
    placed from the box with the geometry of the 112x112 ArcFace template (``ARCFACE_TEMPLATE_112`` stretched
    over the box); these are approximate (about 10% of the box side on a frontal face).
  * ``yunet``: OpenCV's YuNet (``cv2.FaceDetectorYN``) from a local ONNX file (e.g.
    ``face_detection_yunet_2023mar.onnx``). It returns five landmarks in the order right eye, left eye, nose tip,
    right mouth corner, left mouth corner of the *subject*, i.e. image-left eye first: the same order as
    ``ARCFACE_TEMPLATE_112`` (OpenCV's own ``FaceRecognizerSF.alignCrop`` feeds them to that template as is).
  * ``dlib_cnn`` / ``dlib_hog``: dlib's CNN (MMOD) or HOG detector with dlib's 5-point landmarks
    (:mod:`~fairdiff_jax.attributes.dlib_detect`), the points dlib's face chip and face-recognition network use.

Known limit: with several *simulated* CPU devices on few cores (``--xla_force_host_platform_device_count``),
concurrent callbacks under ``shard_map`` / ``pmap`` can starve JAX's CPU copy threads and hang; on GPU hosts, or
with one CPU device, they do not. About 0.11 s per 512x512 image for ``haar`` on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import ClassVar

import numpy as np

from fairdiff_jax.attributes.dlib_detect import DLIB_DETECTORS, DlibFaceDetector
from fairdiff_jax.attributes.host_detector import HostFaceDetector, clip_boxes, largest_box
from fairdiff_jax.attributes.image_ops import ARCFACE_TEMPLATE_112
from fairdiff_jax.errors import FairdiffError

BACKENDS = ("haar", "yunet")  # OpenCV's
FACE_DETECTORS = ("none", *BACKENDS, *DLIB_DETECTORS)  # every value faces.detector accepts
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
_INSTALL = "pip install -e '.[faces]' (opencv-python-headless 4.x)"
_local = threading.local()  # one OpenCV detector object per thread: they keep state and are not thread-safe


def _cv2():
    try:
        import cv2
    except ImportError as err:
        raise FairdiffError(f"face detection needs OpenCV, which is not installed; {_INSTALL}") from err
    return cv2


def landmarks_from_boxes(boxes: np.ndarray) -> np.ndarray:
    """Template landmarks ``[N, 5, 2]`` for boxes ``[N, 4]`` (x0, y0, x1, y1 edges): the 112x112 template scaled
    onto each box, pixel centre c of the template grid going to ``x0 + (c + 0.5) * w / 112 - 0.5``."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=-1)[:, None, :]  # [N, 1, 2]
    return boxes[:, None, :2] + (ARCFACE_TEMPLATE_112[None] + 0.5) * size / 112.0 - 0.5


@dataclasses.dataclass(frozen=True)
class OpenCVFaceDetector(HostFaceDetector):
    """The largest face per image from OpenCV, callable on JAX arrays (``jit``-safe through ``pure_callback``).

    Attributes:
      backend: ``"haar"`` (bundled cascade, boxes only) or ``"yunet"`` (ONNX model at ``model_path``, landmarks).
      model_path: the YuNet ONNX file (required for ``yunet``); for ``haar`` an optional cascade XML instead of
        the bundled one.
      min_face_size: faces whose box is smaller than this many pixels on its shorter side are ignored.
      score_threshold: YuNet's minimum face score in [0, 1] (unused by ``haar``).
      min_neighbors: Haar's ``minNeighbors`` (how many overlapping raw detections make a face; higher is stricter).
      scale_factor: Haar's image-pyramid step (> 1).
    """

    backend: str = "haar"
    model_path: str = ""
    min_face_size: int = 32
    score_threshold: float = 0.6
    min_neighbors: int = 5
    scale_factor: float = 1.1
    landmark_scheme: ClassVar[str] = "arcface"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise FairdiffError(f"face detector backend '{self.backend}' is unknown; choose one of {BACKENDS}")
        if self.backend == "yunet" and not self.model_path:
            raise FairdiffError(
                "the yunet face detector needs a local ONNX model; set model_path (faces.model_path) to e.g. "
                "face_detection_yunet_2023mar.onnx from the OpenCV model zoo"
            )
        if self.model_path and not os.path.isfile(os.path.expanduser(self.model_path)):
            raise FairdiffError(
                f"face detector model '{self.model_path}' does not exist; set model_path (faces.model_path) to an "
                f"existing {'ONNX' if self.backend == 'yunet' else 'cascade XML'} file"
            )
        if self.min_face_size < 1 or not 0.0 <= self.score_threshold <= 1.0:
            raise FairdiffError(
                f"min_face_size={self.min_face_size} must be >= 1 and score_threshold={self.score_threshold} in [0, 1]"
            )
        if self.min_neighbors < 0 or self.scale_factor <= 1.0:
            raise FairdiffError(
                f"min_neighbors={self.min_neighbors} must be >= 0 and scale_factor={self.scale_factor} > 1"
            )
        self._engine()  # fail at construction (missing OpenCV, unreadable model), not inside a compiled step

    # ------------------------------------------------------------------ host side

    def _engine(self):
        cache = getattr(_local, "engines", None)
        if cache is None:
            cache = _local.engines = {}
        key = (self.backend, self.model_path, self.score_threshold)
        if key not in cache:
            cache[key] = self._create()
        return cache[key]

    def _create(self):
        cv2 = _cv2()
        if self.backend == "haar":
            if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
                raise FairdiffError(
                    f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 removed them); {_INSTALL}, or use "
                    "faces.detector=yunet"
                )
            path = os.path.expanduser(self.model_path) or os.path.join(cv2.data.haarcascades, HAAR_CASCADE)
            cascade = cv2.CascadeClassifier(path)
            if cascade.empty():
                raise FairdiffError(f"OpenCV could not load the Haar cascade '{path}'; reinstall it with {_INSTALL}")
            return cascade
        try:
            return cv2.FaceDetectorYN.create(
                os.path.expanduser(self.model_path), "", (320, 320), score_threshold=float(self.score_threshold)
            )
        except cv2.error as err:
            raise FairdiffError(
                f"OpenCV could not load the YuNet model '{self.model_path}' ({str(err).strip().splitlines()[-1]}); "
                "pass a face_detection_yunet ONNX file"
            ) from err

    def _faces(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """All faces of one uint8 RGB image ``[H, W, 3]``: boxes ``[N, 4]`` edges, landmarks ``[N, 5, 2]`` or None."""
        cv2 = _cv2()
        engine = self._engine()
        if self.backend == "haar":
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            found = engine.detectMultiScale(
                gray,
                scaleFactor=float(self.scale_factor),
                minNeighbors=int(self.min_neighbors),
                minSize=(int(self.min_face_size), int(self.min_face_size)),
            )
            xywh = np.asarray(found, np.float32).reshape(-1, 4)
            return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), None
        height, width = rgb.shape[:2]
        engine.setInputSize((width, height))
        _, found = engine.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # YuNet is trained on BGR input
        rows = np.zeros((0, 15), np.float32) if found is None else np.asarray(found, np.float32).reshape(-1, 15)
        rows = rows[(rows[:, 14] >= self.score_threshold) & (np.minimum(rows[:, 2], rows[:, 3]) >= self.min_face_size)]
        boxes = np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], axis=1)
        return boxes, rows[:, 4:14].reshape(-1, 5, 2)

    def _largest_face(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        found, points = self._faces(rgb)
        if not len(found):
            return None
        found = clip_boxes(found, *rgb.shape[:2])
        pick = largest_box(found)
        return found[pick], points[pick] if points is not None else landmarks_from_boxes(found[pick])[0]

    def _placeholder_landmarks(self, box: np.ndarray) -> np.ndarray:
        return landmarks_from_boxes(box)[0]


FaceDetectorBackend = OpenCVFaceDetector | DlibFaceDetector


def make_face_detector(
    kind: str,
    model_path: str = "",
    *,
    min_face_size: int = 32,
    score_threshold: float = 0.6,
    min_neighbors: int = 5,
) -> FaceDetectorBackend | None:
    """The detector a config names (``faces.detector``, one of :data:`FACE_DETECTORS`): ``"none"`` -> None (the
    image is the face), ``"haar"`` / ``"yunet"`` -> :class:`OpenCVFaceDetector`, ``"dlib_cnn"`` / ``"dlib_hog"`` ->
    :class:`~fairdiff_jax.attributes.dlib_detect.DlibFaceDetector` (``model_path`` overrides the CNN's weights)."""
    if kind not in FACE_DETECTORS:
        raise FairdiffError(f"faces.detector='{kind}' is unknown; choose one of {', '.join(FACE_DETECTORS)}")
    if kind == "none":
        return None
    if kind in DLIB_DETECTORS:
        return DlibFaceDetector(kind, model_path, min_face_size=int(min_face_size))
    return OpenCVFaceDetector(
        kind,
        model_path,
        min_face_size=int(min_face_size),
        score_threshold=float(score_threshold),
        min_neighbors=int(min_neighbors),
    )


def detector_from_config(faces_cfg) -> FaceDetectorBackend | None:
    """``make_face_detector`` from a config's ``faces`` group (``cfg.faces``)."""
    return make_face_detector(
        str(faces_cfg.detector),
        str(faces_cfg.model_path),
        min_face_size=int(faces_cfg.min_face_size),
        score_threshold=float(faces_cfg.score_threshold),
        min_neighbors=int(faces_cfg.min_neighbors),
    )
