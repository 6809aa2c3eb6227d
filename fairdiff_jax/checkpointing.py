"""Orbax checkpoints of a training run: ``DIR/checkpoints/<step>/{adaptor,opt_state,meta}``.

Items: ``adaptor`` = ``{"params": ..., "ema": ...}`` (read by the exporter under exactly this name),
``opt_state`` (the optax state of the adaptor) and ``meta`` (JSON: step, RNG key data, prompt-iterator
state, anything else the loop wants back). Saves every ``save_every`` steps (or when forced, e.g. on
SIGTERM), keeps the last ``keep`` checkpoints, restores the newest readable one onto the devices that exist
now, and falls back to older checkpoints, with a warning, when the newest cannot be read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fairdiff_jax.errors import FairdiffError

ITEMS = ("adaptor", "opt_state", "meta")
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ RNG keys in meta


def key_to_meta(key: jax.Array) -> dict:
    """JSON-serialisable form of a PRNG key (typed ``jax.random.key`` or raw ``uint32`` ``PRNGKey``)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(key))
        return {"data": np.asarray(jax.random.key_data(key)).tolist(), "impl": impl, "typed": True}
    return {"data": np.asarray(key).tolist(), "impl": None, "typed": False}


def key_from_meta(entry: dict) -> jax.Array:
    """Inverse of ``key_to_meta``."""
    data = np.asarray(entry["data"], dtype=np.uint32)
    if entry.get("typed"):
        return jax.random.wrap_key_data(data, impl=entry["impl"])
    return jax.numpy.asarray(data)


# ---------------------------------------------------------------------------------------- pre-emption


class PreemptionFlag:
    """Sets ``requested`` when the process gets SIGTERM (pre-emption), so the loop can save and stop.

    Use as a context manager around the loop; the previous handler comes back on exit. With several
    processes, ``any_requested()`` agrees across hosts so that all of them save the same step.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        _log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        self.requested = True

    def __enter__(self) -> PreemptionFlag:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def any_requested(self) -> bool:
        """True when any process got the signal (a collective when there are several processes)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, dtype=np.int32))
        return bool(np.asarray(flags).any())


# ------------------------------------------------------------------------------------------- checkpoints


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """``ShapeDtypeStruct`` target for restoring ``tree``: each leaf keeps its own sharding, or ``sharding``.

    Leaves that are not ``jax.Array`` (numpy, Python numbers) go to the first device unless ``sharding`` is
    given; this is what makes restore land on the devices that exist now rather than those at save time.
    """
    default = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        placement = sharding or getattr(x, "sharding", None) or default
        shape = x.shape if hasattr(x, "shape") else np.shape(x)
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        return jax.ShapeDtypeStruct(shape, dtype, sharding=placement)

    return jax.tree.map(leaf, tree)


@dataclasses.dataclass
class Restored:
    """What ``Checkpointer.restore`` gives back."""

    step: int
    adaptor: Any  # {"params": ..., "ema": ...}
    opt_state: Any
    meta: dict


class Checkpointer:
    """An orbax ``CheckpointManager`` at ``workdir/checkpoints`` with the items ``adaptor``, ``opt_state``, ``meta``."""

    def __init__(self, workdir: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        if keep < 1 or save_every < 1:
            raise FairdiffError(f"keep_checkpoints={keep} and checkpoint_every={save_every} must both be >= 1")
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the interval is decided in save(), so step 1 is not saved implicitly
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # -- saving
    def save(self, step: int, adaptor: Any, opt_state: Any, meta: dict, *, force: bool = False) -> bool:
        """Save when ``step`` is a multiple of ``save_every`` (or ``force``); returns whether it saved.

        ``meta`` must be JSON-serialisable; ``step`` is added to it. Saving is asynchronous by default: call
        ``wait()`` (or ``close()``) before the process exits.
        """
        if (not force and step % self.save_every) or step in self.manager.all_steps():
            return False
        meta = dict(meta, step=int(step))
        saved = self.manager.save(
            int(step),
            args=ocp.args.Composite(
                adaptor=ocp.args.StandardSave(adaptor),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        if saved:
            _log.info("checkpoint of step %d is being written to %s", step, self.directory)
        return bool(saved)

    def wait(self) -> None:
        """Block until asynchronous saves have finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring
    def steps(self) -> list[int]:
        """Steps with a finished checkpoint, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _restore_step(self, step: int, adaptor_target: Any, opt_state_target: Any) -> Restored:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                adaptor=ocp.args.StandardRestore(adaptor_target),
                opt_state=ocp.args.StandardRestore(opt_state_target),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = dict(restored["meta"])
        if int(meta.get("step", step)) != step:
            raise ValueError(f"meta says step {meta.get('step')}, directory says {step}")
        return Restored(step=step, adaptor=restored["adaptor"], opt_state=restored["opt_state"], meta=meta)

    def restore(
        self,
        adaptor_like: Any,
        opt_state_like: Any,
        *,
        step: int | None = None,
        sharding: jax.sharding.Sharding | None = None,
    ) -> Restored | None:
        """Restore the newest readable checkpoint (or exactly ``step``); None when there is none yet.

        ``adaptor_like`` / ``opt_state_like`` are pytrees (arrays or ``ShapeDtypeStruct``) with the structure,
        shapes and placement wanted now, e.g. freshly initialised state replicated on the current mesh;
        ``sharding`` overrides the placement of every leaf. An unreadable checkpoint is skipped with a
        warning in favour of the next older one; if none can be read, ``FairdiffError`` says so.
        """
        adaptor_target = abstract_like(adaptor_like, sharding)
        opt_state_target = abstract_like(opt_state_like, sharding)
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise FairdiffError(
                    f"no checkpoint of step {step} in {self.directory}; available steps: {steps or 'none'}"
                )
            candidates = [step]
        else:
            candidates = list(reversed(steps))
        if not candidates:
            return None
        errors = []
        for candidate in candidates:
            try:
                restored = self._restore_step(candidate, adaptor_target, opt_state_target)
            except Exception as err:  # noqa: BLE001 - any read failure means "try the previous checkpoint"
                first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                errors.append(f"step {candidate}: {type(err).__name__}: {first_line}")
                warnings.warn(
                    f"checkpoint of step {candidate} in {self.directory} could not be read ({errors[-1]}); "
                    "trying the previous one",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            if errors:
                _log.warning("restored step %d after skipping unreadable checkpoints: %s", candidate, errors)
            return restored
        raise FairdiffError(
            f"no readable checkpoint in {self.directory} ({'; '.join(errors)}); delete the broken step folders "
            "or start a new --workdir"
        )
