"""Observing a run (metrics files, progress, image grids, non-finite guard, compile stats) and bias measures.

Writers act on process 0 only. The bias utilities follow DESIGN.md §1.4:
``bias(P) = mean over class pairs i<j of |freq_i - freq_j|`` among the images whose attribute was classified.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.errors import FairdiffError

_log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ bias


def class_frequencies(labels: jax.Array, num_classes: int, valid: jax.Array | None = None) -> jax.Array:
    """Class frequencies among valid images: ``[..., M]`` int labels -> ``[..., K]``.

    Labels outside ``[0, K)`` (e.g. -1 for "no face") count as invalid; so do entries where ``valid`` is
    False. Rows without any valid image give NaN frequencies.
    """
    labels = jnp.asarray(labels)
    mask = (labels >= 0) & (labels < num_classes)
    if valid is not None:
        mask = mask & jnp.asarray(valid, bool)
    counts = jnp.sum(jax.nn.one_hot(labels, num_classes) * mask[..., None], axis=-2)
    total = jnp.sum(mask, axis=-1, keepdims=True)
    return jnp.where(total > 0, counts / jnp.maximum(total, 1), jnp.nan)


def bias_from_freq(freq: jax.Array) -> jax.Array:
    """Mean over class pairs ``i < j`` of ``|freq_i - freq_j|``: ``[..., K] -> [...]`` (0 = balanced)."""
    freq = jnp.asarray(freq)
    num_classes = freq.shape[-1]
    rows, cols = np.triu_indices(num_classes, k=1)
    return jnp.mean(jnp.abs(freq[..., rows] - freq[..., cols]), axis=-1)


def _bias_float64(freq: np.ndarray) -> np.ndarray:
    """``bias_from_freq`` in numpy float64 (for the exact floor, where float32 rounding would show)."""
    rows, cols = np.triu_indices(freq.shape[-1], k=1)
    return np.mean(np.abs(freq[..., rows] - freq[..., cols]), axis=-1)


def bias_from_labels(labels: jax.Array, num_classes: int, valid: jax.Array | None = None) -> jax.Array:
    """``bias_from_freq(class_frequencies(labels, num_classes, valid))``: ``[..., M] -> [...]``."""
    return bias_from_freq(class_frequencies(labels, num_classes, valid))


def intersection_labels(labels: Sequence[jax.Array], num_classes: Sequence[int]) -> jax.Array:
    """Joint class of several attributes (``gender_x_race``): ``a * K_b + b``; -1 where any label is -1.

    ``labels``: one ``[..., M]`` int array per attribute; returns ``[..., M]`` in ``[0, prod(K))``.
    """
    joint = jnp.zeros_like(jnp.asarray(labels[0]))
    invalid = jnp.zeros(joint.shape, bool)
    for attr_labels, k in zip(labels, num_classes, strict=True):
        attr_labels = jnp.asarray(attr_labels)
        invalid = invalid | (attr_labels < 0) | (attr_labels >= k)
        joint = joint * k + attr_labels
    return jnp.where(invalid, -1, joint)


def _compositions(total: int, parts: int) -> np.ndarray:
    """Every way to write ``total`` as ``parts`` non-negative integers: ``[C(total+parts-1, parts-1), parts]``."""
    bars = np.array(list(itertools.combinations(range(total + parts - 1), parts - 1)), dtype=np.int64)
    bars = bars.reshape(-1, parts - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), total + parts - 1)], axis=1)
    return np.diff(edges, axis=1) - 1


def fair_bias_floor(
    num_classes: int,
    num_samples: int,
    *,
    probs: Sequence[float] | None = None,
    exact_limit: int = 2_000_000,
    mc_draws: int = 20_000,
    seed: int = 0,
) -> float:
    """Expected bias of ``num_samples`` images from a generator that is exactly fair (or follows ``probs``).

    Even a perfectly fair binary attribute shows ``E[bias] ~ sqrt(2/pi)/sqrt(M) ~ 0.8/sqrt(M)``. Exact
    (sum over every outcome of the multinomial) when there are at most ``exact_limit`` outcomes, else a
    Monte-Carlo estimate from ``mc_draws`` draws.
    """
    if num_classes < 2 or num_samples < 1:
        raise FairdiffError(f"fair_bias_floor needs >= 2 classes and >= 1 sample, got {num_classes}, {num_samples}")
    p = np.full(num_classes, 1.0 / num_classes) if probs is None else np.asarray(probs, np.float64)
    if math.comb(num_samples + num_classes - 1, num_classes - 1) <= exact_limit:
        counts = _compositions(num_samples, num_classes)
        log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, num_samples + 1)))])
        log_p = np.log(np.where(p > 0, p, 1.0))
        impossible = ((counts > 0) & (p == 0)).any(-1)
        log_pmf = log_fact[num_samples] - log_fact[counts].sum(-1) + (counts * log_p).sum(-1)
        log_pmf = np.where(impossible, -np.inf, log_pmf)
        biases = _bias_float64(counts / num_samples)
        return float(np.sum(np.exp(log_pmf) * biases))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num_samples, p, size=mc_draws)
    return float(np.mean(_bias_float64(counts / num_samples)))


# ------------------------------------------------------------------------------------- non-finite guard


def all_finite(tree: Any) -> jax.Array:
    """True when every entry of every leaf is finite (usable inside jit)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``finite`` else ``old``, leaf by leaf: refuse a non-finite update inside jit."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


class NonFiniteGuard:
    """Counts skipped (non-finite) updates; stops the run after ``max_consecutive`` in a row."""

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def update(self, finite: bool, step: int) -> bool:
        """Record one step's outcome; returns ``finite``. Raises ``FairdiffError`` when training diverged."""
        if bool(finite):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        _log.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", step, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise FairdiffError(
                f"training diverged: {self.consecutive} non-finite updates in a row up to step {step}; "
                "lower train.lr or use model.dtype=float32, then resume"
            )
        return False


# ------------------------------------------------------------------------------------ compile statistics


def memory_stats(compiled) -> dict[str, float]:
    """Compiled memory in MiB from ``compiled.memory_analysis()`` (empty when the backend gives none)."""
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return {}
    if analysis is None:
        return {}
    stats = {}
    for field in ("temp", "argument", "output", "alias", "generated_code"):
        value = getattr(analysis, f"{field}_size_in_bytes", None)
        if value is not None:
            stats[f"{field}_mib"] = float(value) / 2**20
    return stats


def compile_with_stats(jitted, *args, name: str = "train_step", **kwargs) -> tuple[Any, dict[str, float]]:
    """Lower and compile ``jitted`` ahead of time; log and return the compile time and compiled memory."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    stats = {"compile_seconds": time.perf_counter() - start, **memory_stats(compiled)}
    details = ", ".join(f"{k} {v:.1f}" for k, v in stats.items())
    _log.info("compiled %s: %s", name, details)
    return compiled, stats


# ------------------------------------------------------------------------------------------------ writers


def is_main_process() -> bool:
    return jax.process_index() == 0


def _json_number(value):
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Scalars to ``workdir/metrics.jsonl`` (one JSON object per call) and TensorBoard at ``workdir/tb``.

    Only process 0 writes; on other processes every method does nothing. Non-finite values are written as
    ``null`` in JSON.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = is_main_process() if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Append ``{"step": step, "time": ..., **scalars}``; array values must be scalars."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _json_number(v) for k, v in scalars.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(np.asarray(value)), int(step))
            self._tb.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Log an ``[H, W, 3]`` uint8 image (e.g. a grid) to TensorBoard."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, np.asarray(image), int(step), dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` in order."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, *, initial: int = 0, desc: str = "train", enabled: bool | None = None):
    """A tqdm bar with rate and ETA, shown on process 0 only."""
    from tqdm.auto import tqdm

    enabled = is_main_process() if enabled is None else enabled
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


# ------------------------------------------------------------------------------------------------ images

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
