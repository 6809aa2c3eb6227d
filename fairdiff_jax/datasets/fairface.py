"""Face-attribute training data: FairFace (race, age, gender) from its released CSVs and images, and CelebA gender.

FairFace labels map to the paper's classes (``config.CLASSES``):

* race: White, Middle Eastern, Latino_Hispanic -> 0 (WMELH); Black -> 1; Indian -> 2; East Asian, Southeast
  Asian -> 3 (Asian);
* age: the nine FairFace buckets split at 50: ``0-2`` ... ``40-49`` -> 0 (young), ``50-59``, ``60-69``,
  ``more than 70`` -> 1 (old). The paper reports only a 75/25 young/old target and an original old frequency
  of ~0.20 for occupations; 50+ is our documented choice (``OLD_AGE_BUCKETS``), change it there if needed;
* gender: Female -> 0, Male -> 1 (CelebA: attribute ``Male``).

Two ways to read FairFace: :class:`FairFaceFiles`, a plain random-access reader over the CSV and image folder
(numpy + Pillow, no extra dependency), and a TFDS builder (:func:`fairface_tfds_source`, the ``tfds`` extra)
that writes ``array_record`` files and reads them back with ``tfds.data_source`` — tensorflow-datasets builds and
reads this format without TensorFlow. :func:`batches` turns either source into shuffled numpy batches.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from fairdiff_jax.errors import FairdiffError

FAIRFACE_RACES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")
RACE_TO_CLASS = {
    "White": 0,
    "Middle Eastern": 0,
    "Latino_Hispanic": 0,
    "Black": 1,
    "Indian": 2,
    "East Asian": 3,
    "Southeast Asian": 3,
}
AGE_BUCKETS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
OLD_AGE_BUCKETS = ("50-59", "60-69", "more than 70")  # 'old' = 50+
GENDER_TO_CLASS = {"Female": 0, "Male": 1}
CSV_COLUMNS = ("file", "age", "gender", "race")
SPLIT_FILES = {"train": "fairface_label_train.csv", "validation": "fairface_label_val.csv"}
LABELS = ("gender", "race", "age")


def _lookup(table: Mapping[str, int], value: str, what: str) -> int:
    if value not in table:
        raise FairdiffError(f"unknown FairFace {what} '{value}'; expected one of {sorted(table)}")
    return table[value]


def race_class(race: str) -> int:
    """FairFace race name -> the paper's 4 race classes (0 WMELH, 1 Black, 2 Indian, 3 Asian)."""
    return _lookup(RACE_TO_CLASS, race, "race")


def age_class(bucket: str) -> int:
    """FairFace age bucket -> 0 young (< 50), 1 old (50+)."""
    return int(_lookup({b: i for i, b in enumerate(AGE_BUCKETS)}, bucket, "age bucket") >= 6)


def gender_class(gender: str) -> int:
    """FairFace gender -> 0 female, 1 male."""
    return _lookup(GENDER_TO_CLASS, gender, "gender")


@dataclasses.dataclass(frozen=True)
class FaceRecord:
    """One labelled FairFace image; ``file`` is relative to the dataset folder (e.g. ``train/1.jpg``)."""

    file: str
    gender: int
    race: int
    age: int
    race7: str
    age_bucket: str
    service_test: bool


def read_fairface_csv(path: str) -> list[FaceRecord]:
    """Rows of a FairFace label CSV (columns file, age, gender, race[, service_test]) as mapped records."""
    if not os.path.isfile(path):
        raise FairdiffError(f"FairFace label file {path} not found; download fairface_label_{{train,val}}.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise FairdiffError(f"{path} lacks column(s) {missing}; a FairFace label CSV has {list(CSV_COLUMNS)}")
        return [
            FaceRecord(
                file=row["file"],
                gender=gender_class(row["gender"]),
                race=race_class(row["race"]),
                age=age_class(row["age"]),
                race7=row["race"],
                age_bucket=row["age"],
                service_test=str(row.get("service_test", "False")).strip().lower() == "true",
            )
            for row in reader
        ]


def _split_csv(root: str, split: str) -> str:
    if split not in SPLIT_FILES:
        raise FairdiffError(f"unknown FairFace split '{split}'; use one of {sorted(SPLIT_FILES)}")
    return os.path.join(root, SPLIT_FILES[split])


def load_image(path: str) -> np.ndarray:
    """An RGB image file -> uint8 ``[H, W, 3]``."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise FairdiffError(f"cannot read image {path} ({err}); check the FairFace image folder") from err


class FairFaceFiles(Sequence):
    """Random-access FairFace split read straight from ``root`` (the CSVs and the ``train/``, ``val/`` folders).

    ``source[i]`` -> ``{"image": uint8 [H, W, 3], "gender": int, "race": int, "age": int}``.
    """

    def __init__(self, root: str, split: str = "train"):
        self.root = root
        self.records = read_fairface_csv(_split_csv(root, split))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = load_image(os.path.join(self.root, record.file))
        return {"image": image, "gender": record.gender, "race": record.race, "age": record.age}


# ------------------------------------------------------------------------------------------------ TFDS (extra)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise FairdiffError(
            "tensorflow-datasets is not installed; pip install -e .[tfds] (TensorFlow itself is not needed), or "
            "read FairFace with FairFaceFiles(root) instead"
        ) from err
    return tfds


@functools.cache
def fairface_builder_class():
    """The TFDS builder class for FairFace (made on first use, so the module imports without tfds)."""
    from fairdiff_jax.config import CLASSES

    tfds = _import_tfds()

    class FairFace(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """FairFace faces with the paper's race (4), age (young/old) and gender classes plus the raw labels."""

        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Put fairface_label_train.csv, fairface_label_val.csv and the train/ and val/ image folders of the "
            "FairFace release in the manual directory."
        )

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "gender": tfds.features.ClassLabel(names=CLASSES["gender"]),
                    "race": tfds.features.ClassLabel(names=CLASSES["race"]),
                    "age": tfds.features.ClassLabel(names=CLASSES["age"]),
                    "race7": tfds.features.ClassLabel(names=FAIRFACE_RACES),
                    "age_bucket": tfds.features.ClassLabel(names=AGE_BUCKETS),
                    "service_test": np.bool_,
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features, homepage="https://github.com/joojs/fairface")

        def _split_generators(self, dl_manager):
            root = os.fspath(dl_manager.manual_dir)
            return {split: self._generate_examples(root, split) for split in SPLIT_FILES}

        def _generate_examples(self, root, split):
            for record in read_fairface_csv(_split_csv(root, split)):
                yield (
                    record.file,
                    {
                        "image": os.path.join(root, record.file),
                        "gender": record.gender,
                        "race": record.race,
                        "age": record.age,
                        "race7": record.race7,
                        "age_bucket": record.age_bucket,
                        "service_test": record.service_test,
                    },
                )

    return FairFace


def fairface_tfds_source(root: str, data_dir: str, split: str = "train"):
    """Build (once) the FairFace TFDS dataset from ``root`` into ``data_dir`` as array_record and return the
    random-access ``tfds`` data source of ``split`` (items like :class:`FairFaceFiles`' plus raw labels)."""
    tfds = _import_tfds()
    builder = fairface_builder_class()(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    return builder.as_data_source(split=split)


class CelebAGender(Sequence):
    """CelebA through ``tfds.data_source('celeb_a')``: items ``{"image": uint8, "gender": 0 female / 1 male}``."""

    def __init__(self, data_dir: str | None = None, split: str = "train"):
        tfds = _import_tfds()
        self.source = tfds.data_source("celeb_a", split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.source[index]
        return {"image": np.asarray(item["image"]), "gender": int(bool(item["attributes"]["Male"]))}


# ------------------------------------------------------------------------------------------------ batching


def prepare_image(image: np.ndarray, size: int, *, flip: bool = False) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``[size, size, 3]`` in [-1, 1]: centre square crop, bilinear resize."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(np.ascontiguousarray(image[top : top + side, left : left + side]))
    if side != size:
        square = square.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(square, np.float32) / 127.5 - 1.0
    return pixels[:, ::-1] if flip else pixels


def batches(
    source: Sequence[Mapping[str, Any]],
    batch_size: int,
    *,
    image_size: int,
    labels: Sequence[str],
    seed: int = 0,
    shuffle: bool = True,
    augment: bool = False,
    repeat: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches ``{"image": [B, S, S, 3] in [-1, 1], label: int32 [B]}`` from a random-access source.

    Each epoch is a fresh permutation (``shuffle``); ``augment`` flips half the images horizontally; with
    ``repeat=False`` one pass is made and the last batch may be smaller.
    """
    if len(source) == 0:
        raise FairdiffError("the dataset is empty; check the data folder and split")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(source)) if shuffle else np.arange(len(source))
        stop = len(order) - len(order) % batch_size if repeat else len(order)
        for start in range(0, stop, batch_size):
            items = [source[int(i)] for i in order[start : start + batch_size]]
            flips = rng.random(len(items)) < 0.5 if augment else np.zeros(len(items), bool)
            batch = {"image": np.stack([prepare_image(it["image"], image_size, flip=f) for it, f in zip(items, flips)])}
            for name in labels:
                batch[name] = np.asarray([int(it[name]) for it in items], np.int32)
            yield batch
        if not repeat:
            return
        if stop == 0:
            raise FairdiffError(f"batch size {batch_size} exceeds the {len(source)} examples; use a smaller batch")
