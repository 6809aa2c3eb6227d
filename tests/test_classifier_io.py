"""Classifier folders: save/load round trip, face-crop and whole-image wrappers, joining folders, clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fairdiff_jax.attributes.classifier import FaceAttributeClassifier
from fairdiff_jax.attributes.classifier_io import (
    WholeImageClassifier,
    load_attribute_classifiers,
    load_classifier,
    read_classifier_config,
    save_classifier,
)
from fairdiff_jax.attributes.image_ops import IMAGENET_MEAN, IMAGENET_STD
from fairdiff_jax.attributes.mobilenet import MobileNetV3Large, init_variables
from fairdiff_jax.attributes.torchvision_convert import import_torchvision_classifier, to_torchvision_state_dict
from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.models.safetensors_io import write_safetensors

WIDTH, SIZE = 0.25, 32
GENDER = {"gender": ("female", "male")}
RACE_AGE = {"race": ("WMELH", "Black", "Indian", "Asian"), "age": ("young", "old")}


def _variables(classes, seed):
    heads = {k: len(v) for k, v in classes.items()}
    variables = init_variables(MobileNetV3Large(heads, width_multiplier=WIDTH), SIZE, seed=seed)
    rng = np.random.default_rng(seed)  # non-trivial running statistics and head biases
    flat = flatten_dict(variables)
    for path, value in flat.items():
        if path[-1] in ("mean", "bias"):
            flat[path] = rng.normal(0, 0.2, value.shape).astype(np.float32)
        elif path[-1] == "var":
            flat[path] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
    from flax.traverse_util import unflatten_dict

    return unflatten_dict(flat)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    gender_vars, race_age_vars = _variables(GENDER, 1), _variables(RACE_AGE, 2)
    common = dict(width_multiplier=WIDTH, input_size=SIZE)
    save_classifier(str(root / "gender"), gender_vars, classes=GENDER, crop_expand=1.0, **common)
    save_classifier(
        str(root / "race_age"), race_age_vars, classes=RACE_AGE, mean=IMAGENET_MEAN, std=IMAGENET_STD, **common
    )
    save_classifier(str(root / "whole"), gender_vars, classes=GENDER, face_crop=False, **common)
    return root, gender_vars, race_age_vars


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape), jnp.float32)


def test_round_trip_face_crop_equals_network_on_normalised_pixels(folders):
    root, gender_vars, _ = folders
    classifier, params = load_classifier(str(root / "gender"))
    assert isinstance(classifier, FaceAttributeClassifier) and dict(classifier.num_classes) == {"gender": 2}
    spec = read_classifier_config(str(root / "gender"))
    assert spec.classes == GENDER and spec.input_size == SIZE and spec.face_crop
    images = _images((2, SIZE, SIZE, 3))  # whole-image "face", expand 1.0, same size: the crop is the identity
    out = jax.jit(classifier)(params, images)
    module = MobileNetV3Large({"gender": 2}, width_multiplier=WIDTH)
    reference = jax.jit(module.apply)(gender_vars, images)  # mean = std = 0.5: [-1, 1] pixels go in unchanged
    np.testing.assert_allclose(out.logits["gender"], reference["gender"], rtol=1e-5, atol=1e-5)
    assert bool(out.valid.all())
    grad = jax.jit(jax.grad(lambda x: classifier(params, x).logits["gender"][:, 1].sum()))(images)
    assert float(jnp.abs(grad).max()) > 0


def test_whole_image_classifier_resizes_and_normalises(folders):
    root, gender_vars, race_age_vars = folders
    classifier, params = load_classifier(str(root / "whole"))
    assert isinstance(classifier, WholeImageClassifier)
    images = _images((2, 2 * SIZE, 2 * SIZE, 3), seed=1)
    pooled = np.asarray(images).reshape(2, SIZE, 2, SIZE, 2, 3).mean(axis=(2, 4))  # 2x bilinear = 2x2 mean
    module = MobileNetV3Large({"gender": 2}, width_multiplier=WIDTH)
    out = jax.jit(classifier)(params, images)
    np.testing.assert_allclose(out.logits["gender"], jax.jit(module.apply)(gender_vars, pooled)["gender"], atol=1e-5)
    # ImageNet normalisation is read from config.json and applied to [0, 1] pixels
    race_age, ra_params = load_classifier(str(root / "race_age"))
    small = _images((1, SIZE, SIZE, 3), seed=2)
    normalised = ((np.asarray(small) + 1) / 2 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    ref = jax.jit(MobileNetV3Large({"race": 4, "age": 2}, width_multiplier=WIDTH).apply)(race_age_vars, normalised)
    got = jax.jit(race_age.network)(ra_params, small)
    np.testing.assert_allclose(got["race"], ref["race"], rtol=1e-5, atol=1e-5)


def test_join_folders_for_config_attributes(folders):
    root, _, _ = folders
    paths = {"gender": str(root / "gender"), "race": str(root / "race_age"), "age": str(root / "race_age")}
    joined, params = load_attribute_classifiers(paths)
    assert len(params) == 2 and joined.num_classes == {"gender": 2, "race": 4, "age": 2}
    images = _images((2, SIZE, SIZE, 3), seed=3)
    out = jax.jit(joined)(params, images)
    single, single_params = load_classifier(str(root / "race_age"))
    np.testing.assert_allclose(
        out.logits["age"], jax.jit(single)(single_params, images).logits["age"], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(FairdiffError, match="none for attribute"):
        load_attribute_classifiers({"age": str(root / "gender")})


def test_torchvision_import_round_trip_without_torch(folders, tmp_path):
    _, _, race_age_vars = folders
    state = to_torchvision_state_dict(race_age_vars, ["race", "age"])
    state["features.0.1.num_batches_tracked"] = np.array(7, np.int64)
    write_safetensors(str(tmp_path / "authors.safetensors"), state)
    folder = import_torchvision_classifier(
        str(tmp_path / "authors.safetensors"),
        str(tmp_path / "imported"),
        RACE_AGE,
        width_multiplier=WIDTH,
        input_size=SIZE,
    )
    classifier, params = load_classifier(folder)
    assert read_classifier_config(folder).source.endswith("authors.safetensors")
    images = _images((1, SIZE, SIZE, 3), seed=4)
    expected = jax.jit(MobileNetV3Large({"race": 4, "age": 2}, width_multiplier=WIDTH).apply)(race_age_vars, images)
    got = jax.jit(classifier.network)(params, images)
    np.testing.assert_allclose(got["age"], expected["age"], rtol=1e-5, atol=1e-5)


def test_bad_folders_give_clear_errors(folders, tmp_path):
    root, gender_vars, _ = folders
    with pytest.raises(FairdiffError, match="does not exist"):
        load_classifier(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FairdiffError, match="has no config.json"):
        load_classifier(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(FairdiffError, match="cannot parse"):
        load_classifier(str(broken))
    config = json.loads((root / "gender" / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architecture": "resnet50"}))
    with pytest.raises(FairdiffError, match="architecture 'resnet50'"):
        load_classifier(str(broken))
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(FairdiffError, match="no params.msgpack"):
        load_classifier(str(broken))
    (broken / "params.msgpack").write_bytes((root / "gender" / "params.msgpack").read_bytes()[:5000])
    with pytest.raises(FairdiffError, match="corrupt"):
        load_classifier(str(broken))
    (broken / "config.json").write_text(json.dumps({**config, "width_multiplier": 0.5}))
    (broken / "params.msgpack").write_bytes((root / "gender" / "params.msgpack").read_bytes())
    with pytest.raises(FairdiffError, match="do not match config.json"):
        load_classifier(str(broken))
    with pytest.raises(FairdiffError, match="do not match config.json"):
        save_classifier(str(tmp_path / "wrong"), gender_vars, classes=RACE_AGE, width_multiplier=WIDTH)
