"""The one way vlmlabel puts a file or folder in place: write beside it, flush, rename.

Every writer (rewards, embeddings, shard parts, progress state) goes through ``staged``:
the temporary path sits beside the real target (symlinks resolved, so it is on the same file
system and the rename is atomic), is named after this process, and is removed on any failure.
Leftovers of runs that died (their PID no longer exists on this host) are removed by the next
run that stages the same target. Until the final rename the target is untouched. A signal while the
copy is written removes it; from the flush on, the step is finished first (``files.interrupt.deferred``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vlmlabel.errors import OutputError
from vlmlabel.files import liveness
from vlmlabel.files.interrupt import deferred

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]
_TAG = re.compile(r"\.vlmlabel-(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.(?P<what>[a-z]+)$")


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (after a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def real_target(path: Path) -> Path:
    """The path a write must replace: a symlink is followed, so the link stays a link."""
    if not path.is_symlink():
        return path.absolute()
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):  # a loop of links, before Python 3.13
        resolved = path
    if resolved.is_symlink():  # a loop of links: Python 3.13 returns where the loop was found
        raise OutputError(f"{path} is a loop of symbolic links; point the link at a file, or name another path")
    return resolved


def beside(target: Path, what: str) -> Path:
    """This process's temporary path of kind ``what`` beside ``target``: named so a later run can tell whose it is."""
    return target.parent / f".{target.name}.vlmlabel-{HOST}-{os.getpid()}.{what}"


def staging_names(target: Path) -> list[str]:
    """The names ``staged`` (and an in-place write's journal) give their paths beside ``target``, to check their
    length up front."""
    real = real_target(target)
    return [beside(real, what).name for what in ("tmp", "old", "journal")]


def remove(path: Path) -> None:
    """Remove a file, link or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Leftover:
    """A path ``beside`` gave a target, and the process that named it."""

    path: Path
    host: str
    pid: int

    @property
    def dead(self) -> bool:
        """Its process is gone (only a process of this host can be judged)."""
        return self.host == HOST and not liveness.alive(self.pid)


def leftovers(target: Path, kinds: tuple[str, ...]) -> list[Leftover]:
    """The paths of kinds ``kinds`` that any process's ``beside`` gave ``target``, in name order."""
    prefix = f".{target.name}.vlmlabel-"
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:
        return []
    return [
        Leftover(entry, match["host"], int(match["pid"]))
        for entry in entries
        if entry.name.startswith(prefix) and (match := _TAG.search(entry.name)) and match["what"] in kinds
    ]


def clean_dead_leftovers(target: Path) -> list[Path]:
    """Remove temporary copies of ``target`` left by runs on this host whose process is gone. A run killed
    between the two renames of a folder replacement left the old folder aside and none in its place: that
    one is put back, never removed."""
    removed: list[Path] = []
    for leftover in leftovers(target, ("tmp", "old")):
        if not leftover.dead:
            continue
        entry = leftover.path
        if entry.name.endswith(".old") and not target.exists() and not target.is_symlink():
            os.rename(entry, target)
            continue
        remove(entry)
        removed.append(entry)
    return removed


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A path beside ``target`` to write into; it replaces ``target`` only if the block succeeds.

    A file replaces a file with one atomic rename; a folder replaces an existing folder with two
    renames (old aside, new in), and the old one is restored if the second fails.
    """
    target = real_target(target)
    clean_dead_leftovers(target)
    tmp, old = beside(target, "tmp"), beside(target, "old")
    remove(tmp)
    try:
        yield tmp
        with deferred():  # put in place, or (an error) undone below; never cut by a signal
            if tmp.is_file():
                fsync(tmp)
                os.replace(tmp, target)
            else:
                if target.exists():
                    os.rename(target, old)
                os.rename(tmp, target)
            fsync(target.parent)
            remove(old)
    except BaseException:
        with deferred():
            remove(tmp)
            if old.exists() and not target.exists():
                os.rename(old, target)
        raise


def write_bytes(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data`` atomically."""
    with staged(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
