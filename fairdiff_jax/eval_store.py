"""Stored evaluation images: one ``prompt_NNNN.npz`` per prompt (images, predicted labels, validity, and which
classifier scored them), written atomically so an interrupted evaluation resumes where it stopped.

Each record carries the key of what produced it (:func:`generation_key`: the model's identity, the sampler
settings, the noise seed, the prompt and the image count), and a stored record is reused only under the same key,
so a folder reused for another checkpoint, adaptor, target or step count is regenerated, never reported stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def params_digest(tree: Any) -> str:
    """A digest of a pytree's values (e.g. adaptor parameters), independent of where they live."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:24]


def generation_key(model: str, settings: Any, prompt: str, index: int, attributes: Sequence[str]) -> str:
    """The key of one prompt's stored images: ``model`` (an identity string of the weights) and the evaluation
    ``settings`` (a dataclass: sampler, seed, image count), the prompt, its index and the labelled attributes."""
    fields = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    fields.pop("batch_size", None)  # how the images are batched does not change them
    payload = {"model": model, "settings": fields, "prompt": prompt, "index": index, "attributes": sorted(attributes)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def store_prompt_record(path: str, record: Mapping, key: str = "") -> None:
    """Write one prompt's record (atomically) with the key of what produced it."""
    tmp = path + ".tmp.npz"
    arrays = {f"label_{k}": v for k, v in record["labels"].items()}
    scored_by = json.dumps(dict(record.get("scored_by", {})), sort_keys=True)
    np.savez_compressed(
        tmp,
        prompt=record["prompt"],
        images=record["images"],
        valid=record["valid"],
        key=key,
        scored_by=scored_by,
        **arrays,
    )
    os.replace(tmp, path)


def prompt_file(folder: str, index: int) -> str:
    """The file of the ``index``-th prompt's images and labels in an evaluation folder."""
    return os.path.join(folder, f"prompt_{index:04d}.npz")


def read_stored_prompt(path: str, prompt: str, num_images: int, key: str | None = None) -> dict | None:
    """The record stored at ``path`` if it holds ``num_images`` of ``prompt`` (and, when ``key`` is given, was
    produced under that key); else None."""
    if not os.path.isfile(path):
        return None
    with np.load(path) as stored:
        if str(stored["prompt"]) != prompt or stored["images"].shape[0] != num_images:
            return None
        if key is not None and ("key" not in stored.files or str(stored["key"]) != key):
            return None
        labels = {k[len("label_") :]: stored[k] for k in stored.files if k.startswith("label_")}
        scored_by = json.loads(str(stored["scored_by"])) if "scored_by" in stored.files else {}
        return {
            "prompt": str(stored["prompt"]),
            "images": stored["images"],
            "labels": labels,
            "valid": stored["valid"],
            "scored_by": scored_by,
        }


def load_prompt_set(folder: str, prompts: Sequence[str], num_images: int) -> list[dict] | None:
    """The stored records of every prompt in ``folder`` (as written by :func:`generate_prompt_set`), or None
    if any prompt is missing or was stored with another prompt text or image count."""
    results = []
    for index, prompt in enumerate(prompts):
        record = read_stored_prompt(prompt_file(folder, index), prompt, num_images)
        if record is None:
            return None
        results.append(record)
    return results
