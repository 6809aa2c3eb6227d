"""Worlds: the model families a run can be built on, chosen by name (``config.model.world``).

A world supplies what differs between model families: the model folder, the attribute classifier, the semantic
feature extractors and, optionally, its own prompt splits and a face detector (for the face terms).
``stable_diffusion`` (a diffusers-format folder with classifier folders and CLIP / DINO encoders from the config) is
built in; plug-ins add names with
:func:`register_world` or through the ``fairdiff_jax.worlds`` entry-point group (as the embedded toy world does),
the way big_vision picks ``models.{name}``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

import jax

from fairdiff_jax.errors import FairdiffError

# (params, images [B,H,W,3] in [-1,1]) -> (logits {attr: [B,K]}, valid [B])
Classifier = Callable[[Any, jax.Array], tuple[Mapping[str, jax.Array], jax.Array]]
# (params, images) -> [B, D]
FeatureFn = Callable[[Any, jax.Array], jax.Array]
ENTRY_POINT_GROUP = "fairdiff_jax.worlds"


@dataclasses.dataclass(frozen=True, eq=False)
class World:
    """What a model family brings to a run. ``prompts``: split name -> prompts, with ``"train"`` for training and
    the other splits for evaluation; empty when the prompts come from ``config.data.prompts``."""

    model_folder: str
    components: tuple[str, ...]  # which parts of the folder to load (see models.load_stable_diffusion)
    classifier: Classifier
    classifier_params: Any
    feature_fns: tuple[FeatureFn, ...] = ()
    feature_params: tuple[Any, ...] = ()
    prompts: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    # the face terms (fairdiff_jax.face_terms): the detector the facial classifiers use (None: this world has no
    # faces, so L_face and factor2 stay off) and the expansion of its box into the classifier's face crop; the
    # classifier then also takes ``detections=`` (faces found earlier for the same images)
    face_detector: Any = None
    face_box_expand: float = 1.0


@dataclasses.dataclass(frozen=True)
class WorldPlugin:
    """A registered world: ``build(cfg) -> World``, ``validate(cfg)`` (cheap checks at config load) and
    ``check_training(cfg)`` (cheap checks of training-only settings, e.g. whether the face terms can work here)."""

    build: Callable[[Any], World]
    validate: Callable[[Any], None] = lambda cfg: None
    check_training: Callable[[Any], None] = lambda cfg: None


_REGISTRY: dict[str, WorldPlugin] = {}


def register_world(name: str, plugin: WorldPlugin) -> None:
    """Make ``config.model.world = name`` build runs with ``plugin``."""
    _REGISTRY[name] = plugin


def _entry_point_names() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_world(name: str) -> WorldPlugin:
    """The plug-in registered as ``name`` (in this process or as an installed entry point)."""
    if name not in _REGISTRY:
        if name == "stable_diffusion":
            importlib.import_module("fairdiff_jax.worlds.stable_diffusion")
        else:
            found = _entry_point_names().get(name)
            if found is not None:
                register_world(name, found.load())
    if name not in _REGISTRY:
        known = sorted({"stable_diffusion", *_REGISTRY, *_entry_point_names()})
        raise FairdiffError(
            f"config model.world='{name}' is not a known world; choose one of {', '.join(known)} (plug-ins register "
            f"names in the '{ENTRY_POINT_GROUP}' entry-point group; reinstall with pip install -e . if one is missing)"
        )
    return _REGISTRY[name]


def validate_world(cfg) -> None:
    """The world's own checks of a loaded config (e.g. that its model folder exists)."""
    get_world(cfg.model.world).validate(cfg)


def check_world_training(cfg) -> None:
    """The world's checks of training-only settings (before anything is loaded)."""
    get_world(cfg.model.world).check_training(cfg)


def build_world(cfg) -> World:
    """The :class:`World` of ``cfg.model.world``."""
    return get_world(cfg.model.world).build(cfg)


__all__ = [
    "Classifier",
    "FeatureFn",
    "World",
    "WorldPlugin",
    "build_world",
    "check_world_training",
    "get_world",
    "register_world",
]
