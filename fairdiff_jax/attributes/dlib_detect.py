"""dlib face detection on the host: the CNN (MMOD) or HOG detector, then dlib's 5-point shape predictor on the largest
face, as the authors' fallback path does (``face_recognition.face_locations(model="cnn",
number_of_times_to_upsample=0)``, then landmarks on the box trimmed to the image; sail-sg/finetune-fair-diffusion,
``exp-1-debias-gender/1-main-debias.py``, ``get_face_FR``).

The trained files come from the ``face-recognition-models`` package (``pip install -e '.[faces]'``); dlib itself from
``dlib-bin``. Both are needed on the host that detects; the JAX side (alignment, embedding) needs neither.
About 1.5 s per 512x512 image for ``dlib_cnn`` and 0.03 s for ``dlib_hog`` on one CPU core.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading
from typing import ClassVar

import numpy as np

from fairdiff_jax.attributes.face_chip import template_landmarks
from fairdiff_jax.attributes.host_detector import HostFaceDetector, clip_boxes, largest_box
from fairdiff_jax.errors import FairdiffError

DLIB_DETECTORS = ("dlib_cnn", "dlib_hog")
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
INSTALL_HINT = "pip install -e '.[faces]' (dlib-bin and face-recognition-models)"
_local = threading.local()  # one dlib detector / predictor pair per thread


def dlib_model_file(name: str) -> str:
    """The path of one of dlib's trained files shipped by ``face-recognition-models`` (e.g. ``RECOGNITION_FILE``).

    The package is located, not imported: its ``__init__`` needs ``pkg_resources``, which recent setuptools dropped.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FairdiffError(f"dlib's trained model files are not installed (face-recognition-models); {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", name)
    if not os.path.isfile(path):
        raise FairdiffError(f"'{path}' is missing from face-recognition-models; reinstall it: {INSTALL_HINT}")
    return path


def _dlib():
    try:
        import dlib
    except ImportError as err:
        raise FairdiffError(f"the dlib face detectors need dlib, which is not installed; {INSTALL_HINT}") from err
    return dlib


def _load(loader, path: str, what: str):
    try:
        return loader(path)
    except RuntimeError as err:  # dlib's serialization_error: several lines; keep the first
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FairdiffError(
            f"dlib could not read the {what} '{path}' ({first}); reinstall face-recognition-models or pass a "
            "dlib .dat file of that kind"
        ) from err


@dataclasses.dataclass(frozen=True)
class DlibFaceDetector(HostFaceDetector):
    """The largest face per image from dlib, with dlib's 5 landmarks, callable on JAX arrays (``pure_callback``).

    Attributes:
      kind: ``"dlib_cnn"`` (MMOD CNN, robust, slow on CPU) or ``"dlib_hog"`` (HOG + linear SVM, frontal faces, fast).
      model_path: the CNN detector's ``.dat`` (default: face-recognition-models' ``mmod_human_face_detector.dat``).
      landmark_path: the 5-point shape predictor (default: face-recognition-models' file).
      min_face_size: faces whose (image-clipped) box is smaller than this on its shorter side are ignored.
      upsample: how many times dlib doubles the image before detecting (0, as the authors; 1 finds smaller faces).
    """

    kind: str = "dlib_cnn"
    model_path: str = ""
    landmark_path: str = ""
    min_face_size: int = 32
    upsample: int = 0
    landmark_scheme: ClassVar[str] = "dlib"

    def __post_init__(self) -> None:
        if self.kind not in DLIB_DETECTORS:
            raise FairdiffError(f"dlib face detector '{self.kind}' is unknown; choose one of {DLIB_DETECTORS}")
        for path, key in ((self.model_path, "faces.model_path"), (self.landmark_path, "landmark_path")):
            if path and not os.path.isfile(os.path.expanduser(path)):
                raise FairdiffError(f"dlib model file '{path}' does not exist; set {key} to an existing .dat file")
        if self.min_face_size < 1 or self.upsample < 0:
            raise FairdiffError(f"min_face_size={self.min_face_size} must be >= 1 and upsample={self.upsample} >= 0")
        self._engine()  # fail at construction (missing dlib, unreadable model), not inside a compiled step

    def _engine(self):
        cache = getattr(_local, "engines", None)
        if cache is None:
            cache = _local.engines = {}
        key = (self.kind, self.model_path, self.landmark_path)
        if key not in cache:
            cache[key] = self._create()
        return cache[key]

    def _create(self):
        dlib = _dlib()
        landmarks = os.path.expanduser(self.landmark_path) or dlib_model_file(LANDMARKS_FILE)
        predictor = _load(dlib.shape_predictor, landmarks, "5-point shape predictor")
        if self.kind == "dlib_hog":
            return dlib.get_frontal_face_detector(), predictor
        weights = os.path.expanduser(self.model_path) or dlib_model_file(CNN_DETECTOR_FILE)
        return _load(dlib.cnn_face_detection_model_v1, weights, "CNN face detector"), predictor

    def _largest_face(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        dlib = _dlib()
        detector, predictor = self._engine()
        found = detector(rgb, int(self.upsample))
        rects = [d.rect for d in found] if self.kind == "dlib_cnn" else list(found)
        if not rects:
            return None
        edges = [[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects]  # dlib rects are inclusive
        boxes = clip_boxes(np.asarray(edges, np.float32), *rgb.shape[:2])
        boxes = boxes[np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= self.min_face_size]
        if not len(boxes):
            return None
        box = boxes[largest_box(boxes)]
        trimmed = dlib.rectangle(int(box[0]), int(box[1]), int(box[2]) - 1, int(box[3]) - 1)
        shape = predictor(rgb, trimmed)
        points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float32)
        return box, points

    def _placeholder_landmarks(self, box: np.ndarray) -> np.ndarray:
        return template_landmarks(np.asarray(box, np.float32)[None])[0]
