"""A training run's folder: one training process at a time, and resumes that keep the adaptor its checkpoints hold.

``RunLock`` is a lock file naming its holder (host, pid); a second run refuses in one line, and a stale lock (its
pid dead on this host) is taken over with a warning. ``check_resume`` compares a resumed run's config and adaptor
with the ones stored beside its checkpoints *before anything is written*: changes of what the checkpoints are (the
adaptor's kind or shape, the base model, the attributes and targets) are refused naming the keys; the others
(steps, learning rate, logging) are returned so the loop can log them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from fairdiff_jax.adaptors.spec import METADATA_FILE, AdaptorSpec, check_base_model, read_adaptor_metadata
from fairdiff_jax.errors import FairdiffError

LOCK_FILE = "train.lock"
# Config keys whose change makes the stored checkpoints a different adaptor, an adaptor of another model, or one
# trained towards other attributes or targets (every ``attributes.*`` key counts too).
CHECKPOINT_DEFINING_KEYS = (
    "model.world",
    "model.path",
    "model.variant",
    "adaptor.kind",
    "adaptor.rank",
    "adaptor.alpha",
    "adaptor.num_tokens",
)
_SPEC_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "num_soft_tokens", "soft_token")
_log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Hold ``workdir/train.lock`` while a training process writes the folder (use as a context manager)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.held = False

    def _write(self) -> None:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(holder, f)
        self.held = True

    def __enter__(self) -> RunLock:
        try:
            self._write()
            return self
        except FileExistsError:
            pass
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
        except (OSError, json.JSONDecodeError):
            holder = {}
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            _log.warning("taking over the stale lock of process %d (no longer running) in %s", pid, self.path)
            os.remove(self.path)
            self._write()
            return self
        workdir = os.path.dirname(self.path)
        raise FairdiffError(
            f"{workdir} is in use by another training run (host {host}, pid {pid}, since {holder.get('since')}); "
            f"wait for it or stop it, or use another --workdir (if no such run is alive, delete {self.path})"
        )

    def __exit__(self, *exc) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as stored


def check_resume(cfg, workdir: str, spec: AdaptorSpec, frozen: dict, plain_config: dict) -> list[str]:
    """For a workdir that holds checkpoints: refuse a changed adaptor or base model (one line naming the keys and
    the fix) and return the other changed keys as ``"key: old -> new"`` lines."""
    config_path = os.path.join(workdir, "config.json")
    stored = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            stored = _flat(json.load(f))
    new = _flat(_json(plain_config))
    missing = object()
    changed = sorted(k for k in set(stored) | set(new) if stored.get(k, missing) != new.get(k, missing))
    describe = {k: f"{k}: {stored.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in changed}
    refused = [describe[k] for k in changed if k in CHECKPOINT_DEFINING_KEYS or k.startswith("attributes.")]
    if not refused and os.path.isfile(os.path.join(workdir, METADATA_FILE)):  # e.g. a config.json edited by hand
        stored_spec = read_adaptor_metadata(workdir)
        for field in _SPEC_FIELDS:
            before, after = _json(getattr(stored_spec, field)), _json(getattr(spec, field))
            if before != after:
                refused.append(f"adaptor.json {field}: {before!r} -> {after!r}")
        if not refused:
            check_base_model(stored_spec, frozen["unet"], frozen["text_encoder"])
    if refused:
        raise FairdiffError(
            f"{workdir} holds checkpoints of another run than this config asks for ({'; '.join(refused)}); "
            "resume with the stored values (see its config.json) or start a new --workdir for the new adaptor"
        )
    return [describe[k] for k in changed]
