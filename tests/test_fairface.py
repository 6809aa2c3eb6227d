"""FairFace label mapping, the plain reader, the TFDS builder (tfds extra) and a tiny classifier training run."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from fairdiff_jax.config import CLASSES
from fairdiff_jax.datasets import (
    AGE_BUCKETS,
    FAIRFACE_RACES,
    FairFaceFiles,
    age_class,
    batches,
    gender_class,
    prepare_image,
    race_class,
    read_fairface_csv,
)
from fairdiff_jax.errors import FairdiffError

ROWS = [  # file, age, gender, race, service_test
    ("train/1.jpg", "50-59", "Male", "East Asian", "True"),
    ("train/2.jpg", "30-39", "Female", "Indian", "False"),
    ("train/3.png", "3-9", "Female", "Black", "False"),
    ("train/4.jpg", "20-29", "Male", "Indian", "True"),
    ("train/5.png", "20-29", "Female", "Indian", "False"),
    ("train/6.jpg", "20-29", "Male", "White", "True"),
    ("train/7.jpg", "40-49", "Male", "Middle Eastern", "False"),
    ("train/8.png", "more than 70", "Female", "Latino_Hispanic", "True"),
    ("train/9.jpg", "60-69", "Male", "Southeast Asian", "False"),
    ("train/10.jpg", "0-2", "Female", "Black", "True"),
]
VAL_ROWS = [("val/1.jpg", "10-19", "Male", "White", "False"), ("val/2.png", "60-69", "Female", "East Asian", "True")]


def _write_split(root, csv_name, rows, seed):
    rng = np.random.default_rng(seed)
    lines = ["file,age,gender,race,service_test"]
    for file, age, gender, race, service in rows:
        os.makedirs(root / os.path.dirname(file), exist_ok=True)
        pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)  # non-square: exercises the centre crop
        Image.fromarray(pixels).save(root / file, quality=95)
        lines.append(f"{file},{age},{gender},{race},{service}")
    (root / csv_name).write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def fairface_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairface")
    _write_split(root, "fairface_label_train.csv", ROWS, 0)
    _write_split(root, "fairface_label_val.csv", VAL_ROWS, 1)
    return root


def test_label_mapping_to_paper_classes():
    assert [race_class(r) for r in FAIRFACE_RACES] == [0, 1, 0, 3, 3, 2, 0]
    assert [CLASSES["race"][race_class(r)] for r in ("Middle Eastern", "Southeast Asian", "Indian")] == [
        "WMELH",
        "Asian",
        "Indian",
    ]
    assert [age_class(b) for b in AGE_BUCKETS] == [0, 0, 0, 0, 0, 0, 1, 1, 1]  # old = 50+
    assert (gender_class("Female"), gender_class("Male")) == (0, 1)
    for bad in (lambda: race_class("Asian"), lambda: age_class("50+"), lambda: gender_class("F")):
        with pytest.raises(FairdiffError, match="unknown FairFace"):
            bad()


def test_plain_reader_and_batches(fairface_root):
    records = read_fairface_csv(str(fairface_root / "fairface_label_train.csv"))
    assert [r.race for r in records] == [3, 2, 1, 2, 2, 0, 0, 0, 3, 1]
    assert [r.age for r in records] == [1, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    assert [r.service_test for r in records[:3]] == [True, False, False]
    source = FairFaceFiles(str(fairface_root), "train")
    first = source[0]
    assert first["image"].shape == (12, 10, 3) and first["image"].dtype == np.uint8
    assert (first["gender"], first["race"], first["age"]) == (1, 3, 1)
    seen = []
    stream = batches(source, 4, image_size=8, labels=("race", "age"), seed=3)
    for _ in range(5):  # 2 full batches per epoch of 10, then a new permutation
        batch = next(stream)
        assert batch["image"].shape == (4, 8, 8, 3) and batch["race"].dtype == np.int32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        seen.append(batch["race"])
    once = list(batches(source, 4, image_size=8, labels=("race",), shuffle=False, repeat=False))
    assert [len(b["race"]) for b in once] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["race"] for b in once]), [r.race for r in records])
    pixels = (np.arange(12 * 10 * 3) % 256).astype(np.uint8).reshape(12, 10, 3)
    np.testing.assert_allclose(prepare_image(pixels, 10), pixels[1:11] / 127.5 - 1.0, atol=1e-6)  # centre rows
    np.testing.assert_allclose(prepare_image(pixels, 10, flip=True), pixels[1:11, ::-1] / 127.5 - 1.0, atol=1e-6)


def test_reader_errors(fairface_root, tmp_path):
    with pytest.raises(FairdiffError, match="not found"):
        FairFaceFiles(str(tmp_path), "train")
    with pytest.raises(FairdiffError, match="unknown FairFace split"):
        FairFaceFiles(str(fairface_root), "test")
    (tmp_path / "fairface_label_train.csv").write_text("file,gender\ntrain/1.jpg,Male\n")
    with pytest.raises(FairdiffError, match="lacks column"):
        FairFaceFiles(str(tmp_path), "train")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is None,
    reason="the TFDS builder needs the tfds extra (pip install -e .[tfds]); TensorFlow itself is not needed",
)
def test_tfds_builder_without_tensorflow(fairface_root, tmp_path):
    from fairdiff_jax.datasets import fairface_tfds_source

    train = fairface_tfds_source(str(fairface_root), str(tmp_path / "tfds"), "train")
    val = fairface_tfds_source(str(fairface_root), str(tmp_path / "tfds"), "validation")  # reuses the build
    assert len(train) == len(ROWS) and len(val) == len(VAL_ROWS)
    plain = FairFaceFiles(str(fairface_root), "train")
    by_file = {r.file: (r.gender, r.race, r.age) for r in plain.records}
    items = [train[i] for i in range(len(train))]
    labels = sorted((int(it["gender"]), int(it["race"]), int(it["age"])) for it in items)
    assert labels == sorted(by_file.values())
    assert all(it["image"].shape == (12, 10, 3) for it in items)
    png = next(it for it in items if FAIRFACE_RACES[int(it["race7"])] == "Latino_Hispanic")  # train/8.png, lossless
    np.testing.assert_array_equal(png["image"], np.asarray(Image.open(fairface_root / "train/8.png")))
    assert next(batches(train, 5, image_size=8, labels=("gender", "race", "age")))["image"].shape == (5, 8, 8, 3)


def _train_module():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "train_classifier.py")
    spec = importlib.util.spec_from_file_location("train_classifier_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_script_writes_loadable_classifier(fairface_root, tmp_path, capsys):
    from fairdiff_jax.attributes.classifier_io import load_classifier, read_classifier_config

    script = _train_module()
    out = tmp_path / "race_age"
    argv = ["--data", "fairface", "--data_root", str(fairface_root), "--out", str(out), "--steps", "3"]
    argv += ["--batch_size", "4", "--width_multiplier", "0.25", "--image_size", "32", "--eval_every", "10"]
    assert script.main(argv) == 0
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(v) for entry in losses for v in entry.values())
    assert set(logs[-1]["accuracy"]) == {"race", "age"}
    spec = read_classifier_config(str(out))
    assert spec.classes == {"race": CLASSES["race"], "age": CLASSES["age"]} and spec.input_size == 32
    classifier, params = load_classifier(str(out))
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
    logits = jax.jit(classifier)(params, images).logits
    assert logits["race"].shape == (2, 4) and np.all(np.isfinite(logits["age"]))
    assert script.main(["--data", "fairface", "--out", str(tmp_path / "x")]) == 2  # no --data_root: clear error


def test_training_starts_from_torchvision_imagenet_backbone(tmp_path):
    from fairdiff_jax.attributes.mobilenet import MobileNetV3Large, init_variables
    from fairdiff_jax.attributes.torchvision_convert import to_torchvision_state_dict
    from fairdiff_jax.models.safetensors_io import write_safetensors

    imagenet = init_variables(MobileNetV3Large({"imagenet": 10}, width_multiplier=0.25), 32, seed=5)
    write_safetensors(str(tmp_path / "imagenet.safetensors"), to_torchvision_state_dict(imagenet, ["imagenet"]))
    module = MobileNetV3Large({"race": 4, "age": 2}, width_multiplier=0.25)
    start = _train_module().initial_variables(module, 32, 0, str(tmp_path / "imagenet.safetensors"))
    np.testing.assert_array_equal(
        start["params"]["features_7"]["block_1"]["conv"]["kernel"],
        imagenet["params"]["features_7"]["block_1"]["conv"]["kernel"],
    )
    np.testing.assert_array_equal(start["params"]["classifier_0"]["bias"], imagenet["params"]["classifier_0"]["bias"])
    assert start["params"]["head_race"]["kernel"].shape == (1280 // 4, 4) and "head_imagenet" not in start["params"]
