"""SIGINT and SIGTERM alike, in every command and every phase of it.

Schedulers (SLURM pre-emption, torchrun, Kubernetes) send SIGTERM and wait a grace period before SIGKILL;
a user sends SIGINT (Ctrl-C). Both take one path:

- ``stoppable`` (each command, and the library's ``relabel_file``, ``embed_file``, ``merge_shards``): while it
  lasts, either signal raises ``Interrupted`` (a ``KeyboardInterrupt``; exit 128 + the signal's number) where
  the main thread is, and ``with``/``finally`` blocks undo what was half done: a staged copy is removed, a
  journal rolled back, the lock released. Once it is raised, further signals are ignored, so that undoing
  runs to its end.
- ``deferred``: a step that must finish once begun (taking or releasing the lock, the rename or journal that
  puts a write in place, removing saved progress). A signal inside it is held, and raised at the next
  ``check``: the phase boundaries, the scoring loop's batch boundaries and the end of the command.
- ``GracefulStop`` (scoring): the first signal only asks to stop; the loop finishes the batch in flight, saves
  progress and raises. A second signal stops at once.
- ``callback``: a function C code calls back (h5py's file driver): a signal landing in it (or in what it calls)
  is held like ``deferred``'s, since no exception can leave such a call intact (see ``callback``).
- ``killable``: a wait inside C code that no Python handler can cut short (torch.distributed waiting for the
  other ranks), holding nothing to undo: there the signals end the process, as they would without vlmlabel.

Signals are handled by the main thread only: elsewhere (a reader thread, a library caller's thread) these
contexts change nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import CodeType, FrameType, TracebackType
from typing import Any, TypeVar

from vlmlabel.errors import Interrupted

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_FINISH = "nothing was left half written; run the same command again to finish"
# Test-only: the phase (open, score, write, commit) at which a run announces itself on stderr and waits for a
# signal, so tests can stop it there (see ``pause_at``).
_PAUSE_ENV = "VLMLABEL_TEST_PAUSE_AT"
_PAUSE_SECONDS = 60.0
_CALLBACKS: set[CodeType] = set()  # the code of every function marked with ``callback``
_Function = TypeVar("_Function", bound=Callable[..., Any])


@dataclass
class _State:
    """The main thread's signal state for the command in hand (one per process: handlers are too)."""

    depth: int = 0  # nested ``stoppable`` contexts
    previous: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = field(
        default_factory=dict
    )
    signum: int | None = None  # the first signal received
    count: int = 0  # signals received
    raised: bool = False  # ``Interrupted`` was raised for them
    held: int = 0  # nested ``deferred`` steps
    graceful: int = 0  # nested ``GracefulStop`` regions


_state = _State()


def _fresh() -> None:
    """A new state for a new command."""
    global _state
    _state = _State()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _raise(signum: int, message: str) -> None:
    _state.raised = True
    raise Interrupted(signum, message)


def _handle(signum: int, frame: FrameType | None) -> None:
    if _state.raised:
        return  # stopping already: what is being undone must not be cut short
    _state.count += 1
    if _state.signum is None:
        _state.signum = signum
    if _state.held or _in_callback(frame):
        return  # raised at the next check, once the step (or the C code calling back) is done
    if _state.graceful and _state.count == 1:
        return  # the scoring loop stops at the end of its batch
    if _state.graceful:
        _raise(
            signum,
            f"{_name(signum)} received twice: stopped at once; progress up to the last checkpoint is "
            "kept, run the same command again to resume",
        )
    _raise(signum, f"{_name(signum)} received: stopped; {_FINISH}")


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """For a whole command: SIGINT and SIGTERM raise ``Interrupted``; a signal held until the end is raised there.
    Nested uses share the outermost one's handlers."""
    if not _in_main_thread():
        yield
        return
    if _state.depth == 0:
        _fresh()
        for sig in _SIGNALS:
            _state.previous[sig] = signal.signal(sig, _handle)
    _state.depth += 1
    try:
        yield
        check()
    finally:
        _state.depth -= 1
        if _state.depth == 0:
            for signum, handler in _state.previous.items():
                signal.signal(signum, handler)
            _state.previous.clear()


def check(saved: str = _FINISH) -> None:
    """A safe point: raise ``Interrupted`` for a signal received and not raised yet; ``saved`` says what was kept
    and what to do."""
    if _state.signum is not None and not _state.raised and _in_main_thread():
        _raise(_state.signum, f"{_name(_state.signum)} received: stopped; {saved}")


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A step that must finish once begun: a signal received inside it is raised at the next ``check``."""
    if not _in_main_thread() or _state.depth == 0:
        yield
        return
    _state.held += 1
    try:
        yield
    finally:
        _state.held -= 1


def callback(function: _Function) -> _Function:
    """Mark ``function`` as one C code calls back (a file object's methods, which h5py's file driver calls from
    inside HDF5): a signal landing in it, or in anything it calls, is held until the next ``check``.

    An exception raised there cannot reach the caller intact: HDF5 meets an error and goes on calling the file
    object (truncate, flush) with the exception still pending, and CPython's method lookup then mistakes it for
    its own failure, drops it and raises ``AttributeError`` instead. Held, the call finishes its work and the
    signal is raised by the caller's next ``check``, once HDF5 has returned."""
    _CALLBACKS.add(function.__code__)
    return function


def _in_callback(frame: FrameType | None) -> bool:
    """Whether ``frame`` (where a signal landed) runs inside a function marked with ``callback``."""
    while frame is not None:
        if frame.f_code in _CALLBACKS:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def killable() -> Iterator[None]:
    """A wait in C code that Python's signal handlers cannot interrupt, with nothing held that needs undoing: SIGINT
    and SIGTERM end the process there (their default action) instead of waiting, maybe for hours, for it to
    return. A signal held before it is raised first."""
    if not _in_main_thread() or _state.depth == 0:
        yield
        return
    check()
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig in _SIGNALS:
            signal.signal(sig, _handle)


class GracefulStop:
    """Scoring: while active, a first SIGINT/SIGTERM only requests a stop (``requested``), raised by ``check``
    between batches once progress is saved; a second stops at once."""

    def __init__(self) -> None:
        self._command: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> GracefulStop:
        if _in_main_thread():
            self._command = stoppable()
            self._command.__enter__()
            _state.graceful += 1
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._command is not None:
            _state.graceful -= 1
            command, self._command = self._command, None
            command.__exit__(kind, exc, traceback)

    @property
    def requested(self) -> bool:
        return _state.signum is not None and _in_main_thread()

    def check(self, saved: str) -> None:
        """Raise ``Interrupted`` if a stop was requested; ``saved`` says what was kept."""
        check(saved)


def pause_at(phase: str) -> None:
    """Test-only: with VLMLABEL_TEST_PAUSE_AT=PHASE, say "vlmlabel-test: paused at PHASE" on stderr and wait (a
    minute at most) until a signal arrives, so a test can stop the run in that phase. Nothing otherwise."""
    if os.environ.get(_PAUSE_ENV) != phase:
        return
    print(f"vlmlabel-test: paused at {phase}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + _PAUSE_SECONDS
    while _state.signum is None and time.monotonic() < deadline:
        time.sleep(0.01)
