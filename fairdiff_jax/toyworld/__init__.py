"""The embedded toy world: a synthetic text-to-image world with a known bias, its base model and classifiers."""

from fairdiff_jax.toyworld.build import (
    SHIPPED_DIR,
    ToyWorld,
    build_toy_world,
    ensure_toy_world,
    is_complete,
    load_toy_world,
    measure_base_model,
    read_world,
)
from fairdiff_jax.toyworld.classifiers import classify, load_classifiers, predict, train_classifiers
from fairdiff_jax.toyworld.world import (
    ATTRIBUTES,
    OCCUPATION_NAMES,
    OCCUPATIONS,
    render,
    sample_balanced_batch,
    sample_training_batch,
    split,
)

__all__ = [
    "ATTRIBUTES",
    "OCCUPATIONS",
    "OCCUPATION_NAMES",
    "SHIPPED_DIR",
    "ToyWorld",
    "build_toy_world",
    "classify",
    "ensure_toy_world",
    "is_complete",
    "load_classifiers",
    "load_toy_world",
    "measure_base_model",
    "predict",
    "read_world",
    "render",
    "sample_balanced_batch",
    "sample_training_batch",
    "split",
    "train_classifiers",
]
