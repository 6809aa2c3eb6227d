"""On-disk attribute classifiers: a folder with ``config.json`` (architecture, heads and class names, input size,
normalisation, face crop or whole image) and ``params.msgpack`` (Flax ``{"params", "batch_stats"}``).

``load_classifier(folder)`` returns an :class:`AttributeClassifier` (``classifier(params, images [B, H, W, 3] in
[-1, 1]) -> ClassifierOutput``) and its parameters. Face classifiers run on the differentiable 224 crop of the
largest face (``FacePipeline``; the whole image when no detector is given); whole-image classifiers resize the
image. ``load_attribute_classifiers({attr: folder})`` joins the folders a config names into one classifier.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.core import FrozenDict
from flax.traverse_util import flatten_dict

from fairdiff_jax.attributes.classifier import ClassifierOutput, FaceAttributeClassifier
from fairdiff_jax.attributes.faces import FaceDetections, FacePipeline, WholeImageDetector
from fairdiff_jax.attributes.image_ops import crop_and_resize
from fairdiff_jax.attributes.mobilenet import MobileNetV3Large
from fairdiff_jax.errors import FairdiffError

FORMAT = "fairdiff-classifier"
FORMAT_VERSION = 1
ARCHITECTURES = ("mobilenet_v3_large",)
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"
UNIT_RANGE = (0.5, 0.5, 0.5)  # mean = std = 0.5 on [0, 1] pixels: the network sees [-1, 1] (the paper's input)
AUTHORS_CROP_EXPAND = 1.5  # the authors expand the detected box by 50% to a square before resizing to 224


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What ``config.json`` holds. ``classes``: attribute -> class names in class order."""

    classes: dict[str, tuple[str, ...]]
    architecture: str = "mobilenet_v3_large"
    width_multiplier: float = 1.0
    input_size: int = 224
    mean: tuple[float, float, float] = UNIT_RANGE
    std: tuple[float, float, float] = UNIT_RANGE
    face_crop: bool = True
    crop_expand: float = AUTHORS_CROP_EXPAND
    source: str = ""

    @property
    def heads(self) -> dict[str, int]:
        return {name: len(names) for name, names in self.classes.items()}

    def build(self) -> MobileNetV3Large:
        return MobileNetV3Large(self.heads, width_multiplier=self.width_multiplier)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["classes"] = {k: list(v) for k, v in self.classes.items()}
        return {"format": FORMAT, "version": FORMAT_VERSION, **out}


def _spec_from_json(data: Any, path: str) -> ClassifierSpec:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FairdiffError(f'{path} is not a fairdiff classifier config (no "format": "{FORMAT}"); re-save it')
    if data.get("version") != FORMAT_VERSION:
        raise FairdiffError(f"{path} has format version {data.get('version')}; this code reads {FORMAT_VERSION}")
    fields = {f.name for f in dataclasses.fields(ClassifierSpec)}
    unknown = sorted(set(data) - fields - {"format", "version"})
    if unknown:
        raise FairdiffError(f"{path} has unknown key(s) {unknown}; allowed: {sorted(fields)}")
    try:
        values = {k: v for k, v in data.items() if k in fields}
        values["classes"] = {str(k): tuple(str(c) for c in v) for k, v in values["classes"].items()}
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(x) for x in values[key])
        spec = ClassifierSpec(**values)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise FairdiffError(f'{path} is malformed ({err!r}); it needs at least "classes": {{attr: [names]}}') from err
    return _check_spec(spec, path)


def _check_spec(spec: ClassifierSpec, where: str) -> ClassifierSpec:
    if spec.architecture not in ARCHITECTURES:
        raise FairdiffError(f"{where}: architecture '{spec.architecture}' is unknown; use one of {ARCHITECTURES}")
    if not spec.classes or any(len(names) < 2 for names in spec.classes.values()):
        raise FairdiffError(f"{where}: every head needs at least two class names, got {spec.classes}")
    if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
        raise FairdiffError(f"{where}: mean and std must be three numbers each, std > 0; got {spec.mean}, {spec.std}")
    if spec.input_size < 32 or spec.crop_expand <= 0 or spec.width_multiplier <= 0:
        raise FairdiffError(
            f"{where}: input_size must be >= 32 and crop_expand, width_multiplier > 0; got {spec.input_size}, "
            f"{spec.crop_expand}, {spec.width_multiplier}"
        )
    return spec


def _expected_variables(spec: ClassifierSpec) -> Any:
    module = spec.build()
    return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))


def save_classifier(
    folder: str,
    variables: Mapping[str, Any],
    *,
    classes: Mapping[str, Sequence[str]],
    width_multiplier: float = 1.0,
    input_size: int = 224,
    mean: Sequence[float] = UNIT_RANGE,
    std: Sequence[float] = UNIT_RANGE,
    face_crop: bool = True,
    crop_expand: float = AUTHORS_CROP_EXPAND,
    source: str = "",
) -> ClassifierSpec:
    """Write ``folder/config.json`` and ``folder/params.msgpack`` for MobileNetV3 ``variables``
    (``{"params", "batch_stats"}``); the shapes are checked against the architecture before writing."""
    spec = ClassifierSpec(
        classes={str(k): tuple(str(c) for c in v) for k, v in classes.items()},
        width_multiplier=float(width_multiplier),
        input_size=int(input_size),
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
        face_crop=bool(face_crop),
        crop_expand=float(crop_expand),
        source=source,
    )
    _check_spec(spec, folder)
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    _check_variables(variables, _expected_variables(spec), folder)
    os.makedirs(folder, exist_ok=True)
    state = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), variables)
    with open(os.path.join(folder, PARAMS_FILE + ".tmp"), "wb") as f:
        f.write(serialization.msgpack_serialize(state))
    os.replace(os.path.join(folder, PARAMS_FILE + ".tmp"), os.path.join(folder, PARAMS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(spec.to_json(), f, indent=2)
    return spec


def _check_variables(variables: Any, expected: Any, where: str) -> None:
    got = {k: np.shape(v) for k, v in flatten_dict(variables, sep="/").items()}
    want = {k: tuple(v.shape) for k, v in flatten_dict(dict(expected), sep="/").items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if tuple(got[k]) != want[k])
    if missing or extra or wrong:
        detail = missing[:2] + extra[:2] + [f"{k} {got[k]} != {want[k]}" for k in wrong[:2]]
        raise FairdiffError(
            f"classifier weights for {where} do not match config.json ({len(missing)} missing, {len(extra)} "
            f"unexpected, {len(wrong)} with wrong shape: {'; '.join(detail)}); save them again with save_classifier"
        )


def read_classifier_config(folder: str) -> ClassifierSpec:
    """The :class:`ClassifierSpec` of a classifier folder (checked)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isdir(folder):
        raise FairdiffError(f"classifier folder {folder} does not exist; pass a folder written by save_classifier")
    if not os.path.isfile(path):
        raise FairdiffError(
            f"classifier folder {folder} has no {CONFIG_FILE}; write it with save_classifier or convert a torchvision "
            "checkpoint with import_torchvision_classifier"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FairdiffError(f"cannot parse {path} ({err}); the file is corrupt, save the classifier again") from err
    return _spec_from_json(data, path)


def _read_variables(folder: str, spec: ClassifierSpec) -> dict[str, Any]:
    path = os.path.join(folder, PARAMS_FILE)
    if not os.path.isfile(path):
        raise FairdiffError(f"classifier folder {folder} has no {PARAMS_FILE}; save the classifier again")
    try:
        with open(path, "rb") as f:
            state = serialization.msgpack_restore(f.read())
    except Exception as err:  # msgpack raises several unrelated types for truncated or foreign data
        raise FairdiffError(f"cannot read {path} ({type(err).__name__}); the file is corrupt, save it again") from err
    if not isinstance(state, dict):
        raise FairdiffError(f"{path} does not hold a parameter tree; save the classifier again")
    _check_variables(state, _expected_variables(spec), folder)
    return jax.tree_util.tree_map(jnp.asarray, state)


def network_fn(spec: ClassifierSpec) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
    """``(variables, crops [B, S, S, 3] in [-1, 1]) -> {attr: [B, K]}``: normalise as configured, then the network."""
    module = spec.build()
    mean, std = jnp.asarray(spec.mean, jnp.float32), jnp.asarray(spec.std, jnp.float32)

    def apply(variables: Any, crops: jax.Array) -> dict[str, jax.Array]:
        pixels = ((crops.astype(jnp.float32) + 1.0) / 2.0 - mean) / std
        return module.apply(variables, pixels)

    return apply


@dataclasses.dataclass(frozen=True)
class WholeImageClassifier:
    """Classifier for non-facial attributes: resize the whole image to ``input_size`` (bilinear), no detection."""

    network: Callable[[Any, jax.Array], Mapping[str, jax.Array]]
    num_classes: Mapping[str, int]
    input_size: int = 224

    def __call__(self, params: Any, images: jax.Array, detections: FaceDetections | None = None) -> ClassifierOutput:
        del detections  # the whole image is classified
        batch, height, width = images.shape[:3]
        boxes = jnp.broadcast_to(jnp.array([0.0, 0.0, width, height], jnp.float32), (batch, 4))
        logits = dict(self.network(params, crop_and_resize(images, boxes, self.input_size)))
        return ClassifierOutput(logits, jnp.ones((batch,), bool))


def load_classifier(
    folder: str, *, detector: Callable[[jax.Array], FaceDetections] | None = None
) -> tuple[FaceAttributeClassifier | WholeImageClassifier, dict[str, Any]]:
    """A classifier folder -> ``(classifier, params)``; ``classifier(params, images [B,H,W,3] in [-1,1])`` returns
    :class:`ClassifierOutput` and is hashable (``jax.jit(classifier)`` works). Face classifiers crop the largest
    face found by ``detector``, square box expanded by ``crop_expand``; without a detector the whole image is the
    face crop (:class:`WholeImageDetector`, no expansion)."""
    spec = read_classifier_config(folder)
    variables = _read_variables(folder, spec)
    network = network_fn(spec)
    if spec.face_crop:
        # Without a detector the image is taken to be the face crop already, so it is not expanded further.
        expand = spec.crop_expand if detector is not None else 1.0
        faces = FacePipeline(detector or WholeImageDetector(), crop_size=spec.input_size, expand=expand)
        return FaceAttributeClassifier(network, FrozenDict(spec.heads), faces), variables
    return WholeImageClassifier(network, FrozenDict(spec.heads), spec.input_size), variables


@dataclasses.dataclass(frozen=True)
class CombinedClassifier:
    """Several classifiers as one: params is a tuple (one entry per part); logits are the union of the parts'
    heads that ``keep`` selects; an image is valid when every part found its face."""

    parts: tuple[Any, ...]
    keep: tuple[tuple[str, ...], ...]

    @property
    def num_classes(self) -> dict[str, int]:
        return {n: part.num_classes[n] for part, names in zip(self.parts, self.keep) for n in names}

    def __call__(
        self, params: Sequence[Any], images: jax.Array, detections: FaceDetections | None = None
    ) -> ClassifierOutput:
        """``detections``: faces found earlier for these images, used by the face-crop parts instead of detecting."""
        given, logits, valid, detections = detections, {}, jnp.ones((images.shape[0],), bool), None
        for part, names, part_params in zip(self.parts, self.keep, params):
            out = part(part_params, images, given)
            logits.update({n: out.logits[n] for n in names})
            valid = valid & out.valid
            detections = detections if detections is not None else out.detections
        return ClassifierOutput(logits, valid, detections)


def load_attribute_classifiers(
    folders: Mapping[str, str], *, detector: Callable[[jax.Array], FaceDetections] | None = None
) -> tuple[CombinedClassifier, tuple[Any, ...]]:
    """``{attr: folder}`` (e.g. ``config.attributes.<name>.classifier``) -> one classifier and its params.

    A folder shared by several attributes is loaded once; each folder must have a head named after its attribute.
    """
    by_folder: dict[str, list[str]] = {}
    for name, folder in folders.items():
        by_folder.setdefault(os.path.abspath(folder), []).append(name)
    parts, keep, params = [], [], []
    for folder, names in by_folder.items():
        classifier, variables = load_classifier(folder, detector=detector)
        missing = [n for n in names if n not in classifier.num_classes]
        if missing:
            raise FairdiffError(
                f"classifier folder {folder} has heads {list(classifier.num_classes)}, none for attribute(s) "
                f"{missing}; point attributes.<name>.classifier to a folder with a head of that name"
            )
        parts.append(classifier)
        keep.append(tuple(names))
        params.append(variables)
    return CombinedClassifier(tuple(parts), tuple(keep)), tuple(params)
