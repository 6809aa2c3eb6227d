"""Stored evaluation images: one ``prompt_NNNN.npz`` per prompt (images, predicted labels, validity, and which
classifier scored them), written atomically so an interrupted evaluation resumes where it stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np


def store_prompt_record(path: str, record: dict) -> None:
    tmp = path + ".tmp.npz"
    arrays = {f"label_{k}": v for k, v in record["labels"].items()}
    scored_by = json.dumps(dict(record.get("scored_by", {})), sort_keys=True)
    np.savez_compressed(
        tmp, prompt=record["prompt"], images=record["images"], valid=record["valid"], scored_by=scored_by, **arrays
    )
    os.replace(tmp, path)


def prompt_file(folder: str, index: int) -> str:
    """The file of the ``index``-th prompt's images and labels in an evaluation folder."""
    return os.path.join(folder, f"prompt_{index:04d}.npz")


def read_stored_prompt(path: str, prompt: str, num_images: int) -> dict | None:
    """The record stored at ``path`` by :func:`generate_prompt_set` if it holds ``num_images`` of ``prompt``."""
    if not os.path.isfile(path):
        return None
    with np.load(path) as stored:
        if str(stored["prompt"]) != prompt or stored["images"].shape[0] != num_images:
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
