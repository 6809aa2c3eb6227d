"""Training data for the attribute classifiers: FairFace (race, age, gender) and CelebA (gender)."""

from fairdiff_jax.datasets.fairface import (
    AGE_BUCKETS,
    FAIRFACE_RACES,
    OLD_AGE_BUCKETS,
    RACE_TO_CLASS,
    CelebAGender,
    FaceRecord,
    FairFaceFiles,
    age_class,
    batches,
    fairface_builder_class,
    fairface_tfds_source,
    gender_class,
    prepare_image,
    race_class,
    read_fairface_csv,
)

__all__ = [
    "AGE_BUCKETS",
    "FAIRFACE_RACES",
    "OLD_AGE_BUCKETS",
    "RACE_TO_CLASS",
    "CelebAGender",
    "FaceRecord",
    "FairFaceFiles",
    "age_class",
    "batches",
    "fairface_builder_class",
    "fairface_tfds_source",
    "gender_class",
    "prepare_image",
    "race_class",
    "read_fairface_csv",
]
