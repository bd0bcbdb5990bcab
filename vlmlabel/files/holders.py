"""Who else holds a file: other processes with it open (Linux ``/proc``), or a ``flock`` on it.

HDF5's own file lock is often disabled (HDF5_USE_FILE_LOCKING=FALSE on NFS and Lustre), so a file being
written by another program is looked for directly before vlmlabel replaces it, and a file changed in place
must be held by nobody else.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # file systems without flock


def open_for_writing(path: Path) -> list[str]:
    """Other processes of this host holding ``path`` open for writing, described (Linux /proc; [] elsewhere)."""
    return [h.described for h in _holders(path) if h.writing and h.pid != os.getpid()]


def open_by_others(path: Path) -> list[str]:
    """Other processes of this host holding ``path`` open at all, described."""
    return [h.described for h in _holders(path) if h.pid != os.getpid()]


def open_elsewhere(path: Path, skip_fd: int) -> list[str]:
    """Every process of this host holding ``path`` open (this one too, but for its descriptor ``skip_fd``),
    described: a file changed in place must not be changed under a reader."""
    return [h.described for h in _holders(path) if not (h.pid == os.getpid() and h.fd == skip_fd)]


@dataclass(frozen=True)
class _Holder:
    pid: int
    fd: int
    writing: bool
    command: str

    @property
    def described(self) -> str:
        return f"PID {self.pid} ({self.command.strip()[:80]})"


def _holders(path: Path) -> list[_Holder]:
    """Open descriptors of ``path`` in every process of this host that can be looked at (Linux /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    real = str(path.resolve())
    found = []
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(fd) != real:
                    continue
                flags = next(
                    line
                    for line in (pid_dir / "fdinfo" / fd.name).read_text().splitlines()
                    if line.startswith("flags:")
                )
            except (OSError, StopIteration):
                continue
            try:
                command = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                command = "?"
            writing = int(flags.split()[1], 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
            found.append(_Holder(int(pid_dir.name), int(fd.name), writing, command))
    return found


def lock_exclusively(fd: int) -> bool | None:
    """Take an exclusive ``flock`` on ``fd`` without waiting: True when taken, False when another open file holds
    one (a process, or HDF5's own lock), None where the file system has no locks. Other errors are raised."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            raise
        return None
    return True


def unlocked(path: Path) -> bool:
    """No process holds a ``flock`` on the file at ``path`` (probed by taking one, then letting it go). False
    where that cannot be told: the file cannot be opened, or its file system has no locks."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return lock_exclusively(fd) is True
    except OSError:
        return False
    finally:
        os.close(fd)
