"""Everything a run keeps on disk through orbax: ``DIR/checkpoints/<step>/{adaptor,opt_state,meta}`` and exported
Flax adaptors (``OUT/flax_adaptor``).

One manager definition (:func:`checkpoint_manager`) and one set of item names (:data:`ITEMS`): ``adaptor`` =
``{"params": ..., "ema": ...}``, ``opt_state`` (the optax state of the adaptor) and ``meta`` (JSON: step,
prompt-iterator state, skipped updates). The train loop saves every ``save_every`` steps (or when forced, e.g. on
SIGTERM), keeps the last ``keep``, restores the newest readable checkpoint onto the devices that exist now and
falls back to older ones, with a warning, when the newest cannot be read; evaluation and export read the adaptor
item alone (:func:`restore_adaptor_item`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fairdiff_jax.adaptors.spec import AdaptorSpec, check_base_model, read_adaptor_metadata, write_adaptor_metadata
from fairdiff_jax.errors import FairdiffError

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("adaptor", "opt_state", "meta")
ADAPTOR_ITEM = "adaptor"
FLAX_ADAPTOR_DIR = "flax_adaptor"
_log = logging.getLogger(__name__)


class _OrbaxReadTaskFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records whose exception was raised inside orbax (a
    failed read of a damaged checkpoint, already reported as one warning line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or not record.exc_info[2]:
            return True
        import traceback

        frames = traceback.extract_tb(record.exc_info[2])
        return not any("orbax" in frame.filename or "tensorstore" in frame.filename for frame in frames)


def _quiet_closed_event_loop() -> None:
    """Drop the "RuntimeError: Event loop is closed" tracebacks that tensorstore's callbacks print (through
    ``sys.excepthook`` or, from tensorstore's own threads, ``sys.unraisablehook``) after orbax fails to read a damaged
    checkpoint, and asyncio's reports of the failed read tasks; every other exception is printed as usual."""
    import sys

    previous = sys.excepthook
    if getattr(previous, "_fairdiff_quiet", False):
        return
    logging.getLogger("asyncio").addFilter(_OrbaxReadTaskFilter())

    def hook(kind, value, traceback):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        previous(kind, value, traceback)

    previous_unraisable = sys.unraisablehook

    def unraisable(report):  # the same error raised in tensorstore's own threads reaches Python as unraisable
        if report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed":
            return
        previous_unraisable(report)

    hook._fairdiff_quiet = True
    sys.excepthook = hook
    sys.unraisablehook = unraisable


def _tree_bytes(*trees: Any) -> int:
    return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in jax.tree.leaves(trees)))


def _write_error(err: BaseException, directory: str, step: int | None, size: int) -> FairdiffError:
    """One line for a failed checkpoint write: what failed, where, and how much space one checkpoint needs."""
    cause, seen = err, []
    while cause is not None and cause not in seen:  # orbax wraps the OSError of the write
        seen.append(cause)
        if isinstance(cause, OSError):
            break
        cause = cause.__cause__ or cause.__context__
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else f"{type(err).__name__}: {err}"
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    return FairdiffError(
        f"could not write {what} to {directory} ({str(reason).splitlines()[0][:200]}); one checkpoint needs about "
        f"{max(size, 1) / 2**20:.1f} MiB plus metadata; free space there or move --workdir, then run the same command "
        "to resume from the last checkpoint"
    )


def checkpoint_dir(workdir: str) -> str:
    """The folder of a run's checkpoints."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def checkpoint_manager(workdir: str, *, keep: int | None = None, async_save: bool = False) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints`` with the run's items (the only place one is opened)."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,  # the interval is decided by Checkpointer.save, so step 1 is not saved implicitly
        max_to_keep=keep,
        create=keep is not None,
        enable_async_checkpointing=async_save,
    )
    handlers = {
        "adaptor": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


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
        self.directory = checkpoint_dir(workdir)
        self.save_every = int(save_every)
        self._bytes, self._pending = 0, None
        self.manager = checkpoint_manager(workdir, keep=keep, async_save=async_save)

    # -- saving
    def save(self, step: int, adaptor: Any, opt_state: Any, meta: dict, *, force: bool = False) -> bool:
        """Save when ``step`` is a multiple of ``save_every`` (or ``force``); returns whether it saved.

        ``meta`` must be JSON-serialisable; ``step`` is added to it. Saving is asynchronous by default: call
        ``wait()`` (or ``close()``) before the process exits.
        """
        if (not force and step % self.save_every) or step in self.manager.all_steps():
            return False
        meta = dict(meta, step=int(step))
        self._bytes = _tree_bytes(adaptor, opt_state)
        self._pending = int(step)
        try:
            saved = self.manager.save(
                int(step),
                args=ocp.args.Composite(
                    adaptor=ocp.args.StandardSave(adaptor),
                    opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise _write_error(err, self.directory, step, self._bytes) from err
        if saved:
            _log.info("checkpoint of step %d is being written to %s", step, self.directory)
        return bool(saved)

    def wait(self) -> None:
        """Block until asynchronous saves have finished (a failed write is one ``FairdiffError`` line)."""
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as err:
            raise _write_error(err, self.directory, self._pending, self._bytes) from err

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def delete_after(self, step: int) -> list[int]:
        """Delete the checkpoints after ``step`` (a resume from an earlier step abandons them); returns their steps."""
        later = [s for s in self.steps() if s > step]
        for s in later:
            self.manager.delete(s)
        return later

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
        _quiet_closed_event_loop()
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


def _single_device_target(metadata_tree: Any) -> Any:
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), metadata_tree
    )


def _restore_item(manager, steps: list[int], step: int | None, directory: str) -> tuple[int, Any]:
    if not steps:
        raise FairdiffError(f"{directory} holds no finished checkpoint; train longer or check the workdir.")
    step = max(steps) if step is None else int(step)
    if step not in steps:
        raise FairdiffError(f"no checkpoint for step {step} in {directory}; available steps: {sorted(steps)}.")
    try:
        metadata = manager.item_metadata(step)[ADAPTOR_ITEM]
        tree = getattr(metadata, "tree", metadata)
        restored = manager.restore(
            step, args=ocp.args.Composite(**{ADAPTOR_ITEM: ocp.args.StandardRestore(_single_device_target(tree))})
        )[ADAPTOR_ITEM]
    except Exception as err:
        raise FairdiffError(
            f"cannot restore the '{ADAPTOR_ITEM}' item of checkpoint step {step} in {directory} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); the checkpoint is corrupt or was not written by "
            "fairdiff train — pick another --step."
        ) from err
    return step, restored


class _SkipUnrestoredItemWarnings(logging.Filter):
    """Drop orbax's warning that the run's other items (optimizer state, meta) were left unread: by design here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "could not be restored" not in record.getMessage()


def restore_adaptor_item(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """``(step, {"params", "ema"})`` from ``workdir/checkpoints`` (latest step unless given), on one device."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FairdiffError(f"{directory} does not exist; train first ('fairdiff train --workdir {workdir}').")
    try:
        manager = checkpoint_manager(workdir)
        steps = list(manager.all_steps())
    except Exception as err:  # orbax raises many types for unreadable folders
        raise FairdiffError(f"cannot read checkpoints in {directory}: {err}") from err
    _quiet_closed_event_loop()
    quiet = _SkipUnrestoredItemWarnings()
    logging.getLogger("absl").addFilter(quiet)
    try:
        step, restored = _restore_item(manager, steps, step, directory)
    finally:
        manager.close()
        logging.getLogger("absl").removeFilter(quiet)
    if not isinstance(restored, Mapping) or not {"params", "ema"} <= set(restored):
        raise FairdiffError(f"checkpoint step {step} in {directory} has no adaptor params/ema; not a fairdiff run.")
    return step, dict(restored)


def save_flax_adaptor(directory: str, spec: AdaptorSpec, params: Mapping) -> str:
    """Write ``directory/adaptor.json`` and the parameters as an orbax checkpoint ``directory/flax_adaptor``."""
    write_adaptor_metadata(directory, spec)
    path = os.path.join(os.path.abspath(directory), FLAX_ADAPTOR_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, jax.device_get(dict(params)), force=True)
    return path


def load_flax_adaptor(
    directory: str, unet_params: Mapping | None = None, text_encoder_params: Mapping | None = None
) -> tuple[AdaptorSpec, dict]:
    """``(spec, params)`` saved by :func:`save_flax_adaptor`; checked against the base weights when given."""
    spec = read_adaptor_metadata(directory)
    if unet_params is not None or text_encoder_params is not None:
        check_base_model(spec, unet_params, text_encoder_params)
    path = os.path.join(os.path.abspath(directory), FLAX_ADAPTOR_DIR)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            target = _single_device_target(checkpointer.metadata(path).item_metadata.tree)
            params = checkpointer.restore(path, target)
    except Exception as err:
        raise FairdiffError(f"cannot read the Flax adaptor {path}: {err}; re-export it.") from err
    return spec, dict(params)
