"""Observing a run: metrics as JSON lines and TensorBoard, progress bars, compile time and compiled memory.

Writers act on process 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_log = logging.getLogger(__name__)


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


def make_folder(path: str, what: str) -> None:
    """Create ``path`` (and parents) or say in one line why it cannot be written."""
    from fairdiff_jax.errors import FairdiffError

    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as err:
        raise FairdiffError(
            f"{what} {path} cannot be written ({err.strerror or err}); choose a folder you can write to"
        ) from None


def truncate_metrics(workdir: str, step: int) -> int:
    """Drop the ``metrics.jsonl`` records after ``step`` (a resume from ``step`` writes them again); returns their
    number."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` in order."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, *, initial: int = 0, desc: str = "train", enabled: bool | None = None):
    """A tqdm bar with rate and ETA, shown on process 0 only."""
    from tqdm.auto import tqdm

    enabled = is_main_process() if enabled is None else enabled
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


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
