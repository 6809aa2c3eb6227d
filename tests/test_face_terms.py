"""The face terms of a run from its config: off when not asked for, and one-line refusals when they cannot work (no
face detector, a detector without dlib's landmarks, no embedder installed, a reference set from another embedder)."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

from fairdiff_jax.config import load_config
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.face_reference import FaceReferenceSet, save_face_reference
from fairdiff_jax.face_terms import build_face_terms

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class _Detector:
    def __init__(self, scheme: str):
        self.landmark_scheme = scheme


def _config(tmp_path, *overrides):
    return load_config(os.path.join(CONFIGS, "gender.py"), [f"--config.model.path={tmp_path}", *overrides])


def _reference(path, embedder: str) -> str:
    unit = np.eye(3, 128, dtype=np.float32)
    labels = {"gender": np.zeros(3, np.int32)}
    probs = {"gender": np.full((3, 2), 0.5, np.float32)}
    reference = FaceReferenceSet(unit, labels, probs, {"gender": ("female", "male")}, embedder)
    save_face_reference(str(path), reference)
    return str(path)


def test_off_unless_asked_and_refusals_are_one_line(tmp_path, monkeypatch):
    run = types.SimpleNamespace(face_detector=_Detector("dlib"), face_box_expand=1.5)
    off = _config(tmp_path, "--config.loss.lambda_face=0", "--config.attributes.gender.factor2=1")
    assert build_face_terms(off, run) == (None, {})
    damped = _config(tmp_path, "--config.loss.lambda_face=0")  # factor2 0.2 only: no embedder is loaded
    face, weights = build_face_terms(damped, run)
    assert face.use_factor2 and not face.use_face and weights == {} and face.box_expand == 1.5

    faceless = types.SimpleNamespace(face_detector=None, face_box_expand=1.0)
    arcface = types.SimpleNamespace(face_detector=_Detector("arcface"), face_box_expand=1.0)
    cases = [
        (faceless, damped, "detects none"),
        (arcface, _config(tmp_path), "dlib's 5 landmarks"),
        (run, _config(tmp_path), "needs a reference set of real faces"),
    ]
    for where, cfg, message in cases:
        with pytest.raises(FairdiffError, match=message) as info:
            build_face_terms(cfg, where)
        assert "\n" not in str(info.value) and "--config." in str(info.value)


def test_the_embedder_and_the_reference_must_match(tmp_path, monkeypatch):
    pytest.importorskip("dlib", reason="dlib is not installed: pip install -e '.[faces]'")
    from fairdiff_jax.attributes import dlib_detect
    from fairdiff_jax.attributes.face_embedder import file_identity

    run = types.SimpleNamespace(face_detector=_Detector("dlib"), face_box_expand=1.0)
    identity = file_identity(dlib_detect.dlib_model_file(dlib_detect.RECOGNITION_FILE))
    good = _reference(tmp_path / "good.safetensors", identity)
    face, weights = build_face_terms(_config(tmp_path, f"--config.loss.face_reference_path={good}"), run)
    assert face.use_face and face.embedder.identity == identity and weights["reference"].shape == (3, 128)
    assert face.keep_confidence == 0.9 and face.lambda_face == 1.0  # the gender config's values

    other = _reference(tmp_path / "other.safetensors", "some_other_embedder:0000000000000000")
    with pytest.raises(FairdiffError, match="was built with embedder some_other_embedder"):
        build_face_terms(_config(tmp_path, f"--config.loss.face_reference_path={other}"), run)
    monkeypatch.setattr(dlib_detect.importlib.util, "find_spec", lambda name: None)  # no face-recognition-models
    with pytest.raises(FairdiffError, match="needs a face embedder and none is installed") as info:
        build_face_terms(_config(tmp_path, f"--config.loss.face_reference_path={good}"), run)
    assert "face_embedder_path" in str(info.value) and "\n" not in str(info.value)
