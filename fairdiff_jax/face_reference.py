"""The reference set of real faces for the face-realism loss: its file format and ``fairdiff faces build-reference``.

A reference file is a safetensors file: ``embeddings [M, D]`` float32 (unit rows: E(face) + E(mirrored face),
normalised, as the authors store ``face_feats.pkl``), ``labels.<attr> [M]`` int32 and ``probs.<attr> [M, K]`` float32
(the classifier's prediction for each face), and string metadata: ``format``, ``version``, ``embedder`` (the face
embedder's identity, file name and SHA-256 prefix), ``dim``, ``classes`` (JSON: attribute -> class names) and
``files`` (JSON: the image names, relative to the folder). A file built with another embedder or embedding size is
refused, since its embeddings would not be comparable.

    fairdiff faces build-reference --images DIR --classifier CLS [--classifier CLS2] --out FILE
        [--embedder dlib_face_recognition_resnet_model_v1.dat] [--detector dlib_cnn|dlib_hog] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.errors import FairdiffError

FORMAT = "fairdiff-face-reference"
FORMAT_VERSION = "1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class FaceReferenceSet:
    """Embeddings of real faces ``[M, D]`` (unit rows) with each face's predicted classes ``labels[a] [M]`` and
    probabilities ``probs[a] [M, K]``, the class names, the embedder identity and the source image names."""

    embeddings: np.ndarray
    labels: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    classes: dict[str, tuple[str, ...]]
    embedder: str
    files: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def save_face_reference(path: str, reference: FaceReferenceSet) -> None:
    """Write ``reference`` to ``path`` (safetensors, see the module docstring), atomically."""
    from safetensors.numpy import save_file

    tensors = {"embeddings": np.ascontiguousarray(reference.embeddings, np.float32)}
    for name in reference.classes:
        tensors[f"labels.{name}"] = np.ascontiguousarray(reference.labels[name], np.int32)
        tensors[f"probs.{name}"] = np.ascontiguousarray(reference.probs[name], np.float32)
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "embedder": reference.embedder,
        "dim": str(reference.dim),
        "classes": json.dumps({k: list(v) for k, v in reference.classes.items()}),
        "files": json.dumps(list(reference.files)),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def load_face_reference(path: str, *, embedder: str | None = None, dim: int | None = None) -> FaceReferenceSet:
    """Read a reference file; with ``embedder`` / ``dim`` given, refuse one built with another embedder or size."""
    from safetensors import SafetensorError, safe_open

    rebuild = "rebuild it with: fairdiff faces build-reference --images DIR --classifier CLS --out FILE"
    if not os.path.isfile(path):
        raise FairdiffError(f"face reference file '{path}' does not exist; {rebuild}")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise FairdiffError(f"'{path}' is not a readable face reference file ({err}); {rebuild}") from err
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION or "embeddings" not in tensors:
        raise FairdiffError(f"'{path}' is not a {FORMAT} file of version {FORMAT_VERSION}; {rebuild}")
    classes = {k: tuple(v) for k, v in json.loads(meta["classes"]).items()}
    reference = FaceReferenceSet(
        embeddings=tensors["embeddings"].astype(np.float32),
        labels={k: tensors[f"labels.{k}"] for k in classes},
        probs={k: tensors[f"probs.{k}"] for k in classes},
        classes=classes,
        embedder=meta["embedder"],
        files=tuple(json.loads(meta.get("files", "[]"))),
    )
    if embedder is not None and reference.embedder != embedder:
        raise FairdiffError(
            f"face reference '{path}' was built with embedder {reference.embedder}, but the configured face embedder "
            f"is {embedder}; {rebuild} --embedder <the configured file>"
        )
    if dim is not None and reference.dim != dim:
        raise FairdiffError(f"face reference '{path}' holds {reference.dim}-D embeddings, the embedder gives {dim}-D")
    if len(reference.embeddings) == 0:
        raise FairdiffError(f"face reference '{path}' holds no faces; {rebuild} from a folder of face photographs")
    return reference


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively), sorted, relative to it."""
    if not os.path.isdir(folder):
        raise FairdiffError(f"--images {folder} is not a folder; pass a folder of face photographs")
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, n), folder) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not found:
        raise FairdiffError(f"--images {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return sorted(found)


def _read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise FairdiffError(f"cannot read image '{path}' ({err}); remove it or convert it to PNG / JPEG") from err


def build_face_reference(
    folder: str,
    names: Sequence[str],
    detector,
    classify: Callable[[jax.Array, object], dict[str, jax.Array]],
    classes: dict[str, tuple[str, ...]],
    embedder,
    embedder_params,
    *,
    batch_size: int = 16,
) -> tuple[FaceReferenceSet, int]:
    """Embed the largest face of each image (``detector`` on the host, then ``embedder``) and classify it with
    ``classify(images, detections) -> {attr: probs [B, K]}``; returns (reference set, images without a face)."""

    @jax.jit
    def process(images, detections):
        embeddings = embedder(embedder_params, images, detections.landmarks)
        unit = embeddings / jnp.maximum(jnp.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
        return unit, classify(images, detections)

    by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for name in names:
        image = _read_image(os.path.join(folder, name))
        by_shape.setdefault(image.shape, []).append((name, image))
    kept_names, embeddings, probs, missing = [], [], {k: [] for k in classes}, 0
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            pixels = np.stack([image for _, image in chunk]).astype(np.float32) / 127.5 - 1.0
            pad = batch_size - len(chunk)  # a fixed batch size: one compiled program per image size
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, 0)]) if pad else pixels
            detections = detector.detect_numpy(pixels)
            unit, out = process(jnp.asarray(pixels), jax.tree_util.tree_map(jnp.asarray, detections))
            valid = np.asarray(detections.valid)[: len(chunk)]
            missing += int((~valid).sum())
            kept_names += [name for (name, _), ok in zip(chunk, valid) if ok]
            embeddings.append(np.asarray(unit)[: len(chunk)][valid])
            for k in classes:
                probs[k].append(np.asarray(out[k], np.float32)[: len(chunk)][valid])
    stacked = {k: np.concatenate(v) for k, v in probs.items()}
    reference = FaceReferenceSet(
        embeddings=np.concatenate(embeddings).astype(np.float32),
        labels={k: np.argmax(v, -1).astype(np.int32) for k, v in stacked.items()},
        probs=stacked,
        classes=classes,
        embedder=embedder.identity,
        files=tuple(kept_names),
    )
    return reference, missing


def _face_classifier(folders: Sequence[str], detector):
    """``(classify(images, detections) -> {attr: probs}, classes)`` for classifier folders, each face classifier
    cropping the detections it is given (so detection runs once per image)."""
    from fairdiff_jax.attributes.classifier_io import load_classifier, read_classifier_config

    parts, classes = [], {}
    for folder in folders:
        classifier, variables = load_classifier(folder, detector=detector)
        parts.append((classifier, variables))
        classes.update(read_classifier_config(folder).classes)

    def classify(images, detections):
        out = {}
        for classifier, variables in parts:
            logits = classifier(variables, images, detections).logits
            out.update({k: jax.nn.softmax(v, -1) for k, v in logits.items()})
        return out

    return classify, classes


def build_reference_command(args: argparse.Namespace) -> str:
    """``fairdiff faces build-reference``: build and write the file; returns the one-line summary."""
    from fairdiff_jax.attributes.dlib_detect import DLIB_DETECTORS, RECOGNITION_FILE, DlibFaceDetector, dlib_model_file
    from fairdiff_jax.attributes.face_embedder import load_face_embedder

    if args.detector not in DLIB_DETECTORS:
        raise FairdiffError(f"--detector {args.detector} is unknown; choose one of {', '.join(DLIB_DETECTORS)}")
    if args.batch_size < 1:
        raise FairdiffError(f"--batch-size {args.batch_size} must be >= 1")
    names = list_images(args.images)[: args.limit or None]
    detector = DlibFaceDetector(args.detector, min_face_size=args.min_face_size)
    embedder, params = load_face_embedder(args.embedder or dlib_model_file(RECOGNITION_FILE))
    classify, classes = _face_classifier(args.classifier, detector)
    reference, missing = build_face_reference(
        args.images, names, detector, classify, classes, embedder, params, batch_size=args.batch_size
    )
    if len(reference.embeddings) == 0:
        raise FairdiffError(f"no face was found in the {len(names)} images of {args.images}; nothing to write")
    save_face_reference(args.out, reference)
    counts = {k: np.bincount(v, minlength=len(classes[k])).tolist() for k, v in reference.labels.items()}
    return (
        f"wrote {len(reference.embeddings)} faces ({missing} of {len(names)} images had none) to {args.out}; "
        f"embedder {reference.embedder}; faces per predicted class {counts}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairdiff faces", description="Face tools for the face-realism loss.")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build-reference", help="embed a folder of real face images into a reference file")
    build.add_argument("--images", required=True, help="folder of face photographs (searched recursively)")
    build.add_argument("--classifier", required=True, action="append", help="classifier folder (repeatable)")
    build.add_argument("--out", required=True, help="the reference file to write (.safetensors)")
    build.add_argument("--embedder", default="", help="face-recognition .dat (default: face-recognition-models')")
    build.add_argument("--detector", default="dlib_cnn", help="dlib_cnn (default, the authors') or dlib_hog")
    build.add_argument("--min-face-size", type=int, default=32, help="ignore faces smaller than this (pixels)")
    build.add_argument("--batch-size", type=int, default=16)
    build.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fairdiff faces ...``; user errors raise FairdiffError (the CLI prints them as one line)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    print(build_reference_command(args))
    return 0
