"""One writer per destination: a lock file created with O_CREAT|O_EXCL, naming its owner.

The file holds the owner's PID, host, process start time and command, so a refusal can say
which run holds it. A lock left by a killed run on this host (PID gone, or reused by another
process) is stale and taken over; a lock from another host cannot be checked and is reported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from vlmlabel.errors import LockedError
from vlmlabel.events import QUIET, Events
from vlmlabel.files import atomic, liveness
from vlmlabel.files.interrupt import deferred

_TAKEOVER_GUARD_SECONDS = 60.0


def describe_holder(info: dict) -> str:
    return f"PID {info.get('pid')} on {info.get('host')} since {info.get('started')} ({info.get('command', '?')})"


def read_holder(path: Path) -> dict | None:
    """The owner recorded in a lock file, or None when there is none (or it cannot be read)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def holder_alive(info: dict) -> bool:
    """Whether the lock's owner may still run (a lock from another host counts as alive)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False  # no process of this host is named: nothing can hold it
    start = info.get("proc_start")
    return liveness.alive(pid, start if isinstance(start, str) else None)


class RunLock:
    """Context manager holding ``path`` as a lock for this process; released in ``__exit__``. Taking and
    releasing it are ``deferred`` steps: a signal cannot leave a lock that no ``__exit__`` will remove."""

    def __init__(self, path: Path, what: str, events: Events = QUIET):
        self.path = path
        self.what = what
        self.events = events
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "proc_start": liveness.process_start(os.getpid()),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
        }
        self._text = json.dumps(self.info)

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with deferred():
            atomic.clean_dead_leftovers(self.path)
            filled = atomic.beside(self.path, "tmp")
            try:
                filled.write_text(self._text)
                for _ in range(20):
                    if self._create(filled):
                        return self
                    self._handle_existing()
            finally:
                filled.unlink(missing_ok=True)
        raise LockedError(f"could not take the lock {self.path}; another run keeps taking it — try again")

    def held_by(self, stack: contextlib.ExitStack) -> RunLock:
        """Take the lock and register its release with ``stack`` as one step: no signal falls between the two."""
        with deferred():
            return stack.enter_context(self)

    def _create(self, filled: Path) -> bool:
        """Create the lock with its owner already written (a hard link to ``filled``), so a kill can never leave
        an empty one; False when it exists. Where hard links are not allowed, created and then written."""
        try:
            os.link(filled, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(self._text)
        return True

    def _handle_existing(self) -> None:
        text = self._read_text()
        if text is None:
            return  # released between our attempts: try again
        try:
            info = json.loads(text)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            info = None  # garbled (a truncated write, or edited by hand): judged by its age below
        if info is None:
            # Being written by its owner right now, or left empty by a crash at the wrong moment.
            if time.time() - self._mtime() < _TAKEOVER_GUARD_SECONDS:
                time.sleep(0.05)
                return
            info = {}
        elif holder_alive(info):
            raise LockedError(
                f"{self.what} is being written by another vlmlabel run: {describe_holder(info)}; "
                f"wait for it to finish, or if it is gone remove {self.path}"
            )
        if self._take_over(text):
            self.events.note(f"took over a stale lock left by a run that is gone ({describe_holder(info)})")

    def _take_over(self, stale_text: str) -> bool:
        """Remove the stale lock, unless another process is taking it over at the same moment."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > _TAKEOVER_GUARD_SECONDS:
                    guard.unlink(missing_ok=True)  # left by a process killed mid-takeover
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        try:
            if self._read_text() == stale_text:
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    def _read_text(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return time.time()

    def __exit__(self, *exc) -> None:
        with deferred():
            if self._read_text() == self._text:
                self.path.unlink(missing_ok=True)
