"""Pre-emption: a SIGTERM (a scheduler taking the machine back) asks the train loop to save and stop."""

from __future__ import annotations

import logging
import signal
from typing import Any

import jax
import numpy as np

_log = logging.getLogger(__name__)


class PreemptionFlag:
    """Sets ``requested`` when the process gets SIGTERM (pre-emption) or Ctrl-C, so the loop can save and stop.

    Use as a context manager around the loop; the previous handler comes back on exit. With several
    processes, ``any_requested()`` agrees across hosts so that all of them save the same step.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        _log.warning(
            "received signal %d: will save a checkpoint and stop after this step (Ctrl-C again to abort)", signum
        )
        self.requested = True
        self.signal = signum

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
