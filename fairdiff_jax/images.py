"""Image grids: tiles of generated images with a colour bar per predicted attribute under each image."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from fairdiff_jax.errors import FairdiffError
from fairdiff_jax.reporting import is_main_process

# One colour per class (colour-blind friendly "tab10"-like), grey for "no label".
PALETTE = np.array(
    [
        [230, 97, 1],
        [94, 60, 153],
        [27, 158, 119],
        [253, 184, 99],
        [178, 171, 210],
        [102, 166, 30],
        [231, 41, 138],
        [31, 120, 180],
        [166, 118, 29],
        [102, 102, 102],
    ],
    np.uint8,
)
NO_LABEL = np.array([200, 200, 200], np.uint8)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[..., 3]`` floats in ``[-1, 1]`` -> uint8 in ``[0, 255]``."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(
    images: np.ndarray,
    ncols: int,
    labels: Mapping[str, Sequence[int]] | None = None,
    *,
    bar_height: int | None = None,
    pad: int = 2,
) -> np.ndarray:
    """Tile ``[B, H, W, 3]`` images in ``[-1, 1]`` into one uint8 ``[rows*(H+bars+pad)+pad, ..., 3]`` grid.

    ``labels`` maps attribute names to ``[B]`` class indices; each image gets one coloured bar per
    attribute underneath (``PALETTE[class]``; grey for -1).
    """
    images = to_uint8(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise FairdiffError(f"image_grid expects [B, H, W, 3] images, got shape {images.shape}")
    num, height, width, _ = images.shape
    labels = {k: np.asarray(v) for k, v in (labels or {}).items()}
    bar = bar_height or max(2, height // 16)
    cell_h = height + bar * len(labels)
    nrows = max(1, math.ceil(num / ncols))
    grid = np.full((nrows * (cell_h + pad) + pad, ncols * (width + pad) + pad, 3), 255, np.uint8)
    for index in range(num):
        top = pad + (index // ncols) * (cell_h + pad)
        left = pad + (index % ncols) * (width + pad)
        grid[top : top + height, left : left + width] = images[index]
        for row, attr_labels in enumerate(labels.values()):
            cls = int(attr_labels[index])
            colour = PALETTE[cls % len(PALETTE)] if cls >= 0 else NO_LABEL
            grid[top + height + row * bar : top + height + (row + 1) * bar, left : left + width] = colour
    return grid


def save_image_grid(
    images: np.ndarray, path: str, ncols: int, labels: Mapping[str, Sequence[int]] | None = None
) -> np.ndarray:
    """Write ``image_grid(images, ncols, labels)`` as a PNG at ``path`` (process 0 only); returns the grid."""
    from PIL import Image

    grid = image_grid(images, ncols, labels)
    if is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(grid).save(path)
    return grid


def save_grids(results: Sequence[Mapping], out_dir: str, *, max_images: int = 32, ncols: int = 8) -> None:
    """One PNG per prompt: the first ``max_images`` images with a colour bar per attribute underneath."""
    for index, record in enumerate(results):
        shown = record["images"][:max_images].astype(np.float32) / 127.5 - 1.0
        labels = {k: np.where(record["valid"][:max_images], v[:max_images], -1) for k, v in record["labels"].items()}
        save_image_grid(shown, os.path.join(out_dir, f"grid_{index:04d}.png"), ncols, labels)
