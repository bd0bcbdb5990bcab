"""Graceful stop on SIGINT/SIGTERM: finish the current batch, save progress, then stop.

Schedulers (SLURM pre-emption, torchrun, Kubernetes) send SIGTERM and wait a grace period
before SIGKILL; a first signal only sets a flag that the scoring loop checks between
batches, so the checkpoint on disk is always whole. A second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from vlmlabel.errors import Interrupted

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager: while active, SIGINT/SIGTERM request a stop instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        # the handlers replaced, as signal.signal returns them
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Interrupted(signum, f"{signal.Signals(signum).name} received twice: stopped at once; "
                                      "progress up to the last checkpoint is kept")
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, saved: str) -> None:
        """Raise ``Interrupted`` if a stop was requested; ``saved`` says what was kept."""
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise Interrupted(self.signum, f"{name} received: stopped; {saved}")
