"""Changing a file where it lies, all or nothing, through a rollback journal (as SQLite does).

Adding rewards to a large HDF5 file changes few bytes: new ones at its end and a few pages of metadata
(superblock, group headers, heaps). Copying the whole file to change them costs seconds per GiB, so the
change is made in place instead:

1. ``Overlay`` is the file as a file object (h5py's ``fileobj`` driver) whose writes stay in memory: while
   HDF5 works, the file on disk is not touched.
2. ``apply`` writes the original bytes of every range it is about to overwrite, and the original size, to a
   journal beside the file (checksummed, fsynced), then writes the new bytes, fsyncs, and removes the journal.
3. An error inside ``apply`` puts the original bytes back at once (and the modification time); a signal
   waits for it to finish (``files.interrupt.deferred``: milliseconds). A process killed inside it leaves the
   journal: ``recover``, run before vlmlabel opens the file again, puts the original bytes back (or, if every
   new byte had landed, simply removes the journal).

Between a kill inside step 2 (a few milliseconds) and the next vlmlabel command on the file, other programs
may find the file unreadable; any vlmlabel command repairs it. ``apply`` refuses (``Busy``) when another
process has the file open, or holds a lock on it: the caller then writes a copy and renames it, which open
readers do not notice.
"""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmlabel.errors import OutputError, SourceError
from vlmlabel.files import atomic, holders
from vlmlabel.files.interrupt import callback, check, deferred, pause_at

PAGE = 512  # bytes per overwritten page kept in memory: HDF5 metadata blocks are small and scattered
_MAGIC = b"vlmlabel rollback journal 1\n"
_WAIT_SECONDS = 30.0  # how long a reader waits for a live run's apply (milliseconds long) to finish
_CALLED_BACK = ("seek", "tell", "flush", "readinto", "write", "truncate")  # what h5py's file driver calls


class Busy(Exception):
    """Another process has the file open or locked: it must not see the file change under it."""


class RandomAccessFile(io.RawIOBase):
    """A read-write file object that h5py (its ``fileobj`` driver) moves about: subclasses read and write at
    ``_pos`` and say where the file ends (``_end``). Every method the driver calls, a subclass's own included,
    is an ``interrupt.callback``: a signal inside it is held until the caller's next ``check``, so that no
    exception is left pending inside HDF5."""

    _pos = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _CALLED_BACK:
            if name in vars(cls):
                callback(vars(cls)[name])

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @callback
    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._end()}[whence]
        self._pos = base + offset
        return self._pos

    @callback
    def tell(self) -> int:
        return self._pos

    @callback
    def flush(self) -> None:
        pass

    def _end(self) -> int:
        raise NotImplementedError


class Overlay(RandomAccessFile):
    """The file at ``path`` as a read-write file object whose writes stay in memory.

    Bytes below the original size that are written live in ``PAGE``-sized pages; bytes past it in one
    growing tail. Reads see the file with every write made so far. Exceptions raised inside a call (a
    signal, a bug) cannot cross h5py's C driver intact, so the first one is kept in ``failure`` and
    re-raised by ``reraise``.
    """

    def __init__(self, path: Path):
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self.original_size = os.fstat(self._fd).st_size
        self.size = self.original_size
        self._zero_from = self.original_size  # original bytes from here on were cut off by a truncate
        self._pages: dict[int, bytearray] = {}
        self._tail = bytearray()  # bytes from original_size on
        self._pos = 0
        self.failure: BaseException | None = None

    # -- the file object h5py uses ------------------------------------------------------------------

    def _end(self) -> int:
        return self.size

    def readinto(self, buffer: Any) -> int:  # any writable buffer
        try:
            data = self.read_at(self._pos, len(memoryview(buffer)))
        except BaseException as exc:
            raise self._keep(exc) from None
        memoryview(buffer).cast("B")[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def write(self, data: Any) -> int:  # any bytes-like object
        try:
            view = memoryview(data).cast("B")
            self.write_at(self._pos, view)
        except BaseException as exc:
            raise self._keep(exc) from None
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if size < self.size:
            self._tail = self._tail[: max(0, size - self.original_size)]
            self._zero_from = min(self._zero_from, size)
            for index in [i for i in self._pages if i * PAGE >= size]:
                del self._pages[index]
            if size % PAGE and size // PAGE in self._pages:
                page = self._pages[size // PAGE]
                page[size % PAGE :] = bytes(PAGE - size % PAGE)
        elif size > self.original_size:
            self._tail.extend(bytes(size - self.original_size - len(self._tail)))
        self.size = size
        return size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()

    # -- reading and writing ------------------------------------------------------------------------

    def _keep(self, exc: BaseException) -> OSError:
        # Kept without its traceback, and raised later as a copy: re-raising the object raised inside h5py's C
        # driver, or keeping the driver's frames alive, made the interpreter crash at exit (code 139).
        self.failure = self.failure or exc.with_traceback(None)
        return OSError(errno.EIO, f"write to memory failed: {exc!r}")

    def reraise(self) -> None:
        """Raise the exception kept from inside a call, if there was one, then a signal held inside one."""
        if self.failure is not None:
            raise copy.copy(self.failure) from None
        check()

    def _original(self, start: int, stop: int) -> bytes:
        """The file's own bytes in [start, stop), zeros where it was cut off or never reached."""
        end = max(start, min(stop, self._zero_from))
        data = os.pread(self._fd, end - start, start) if end > start else b""
        return data + bytes(stop - start - len(data))

    def _page(self, index: int) -> bytearray:
        page = self._pages.get(index)
        if page is None:
            start = index * PAGE
            page = self._pages[index] = bytearray(self._original(start, start + PAGE))
        return page

    def read_at(self, offset: int, count: int) -> bytes:
        stop = min(offset + count, self.size)
        if stop <= offset:
            return b""
        low = min(stop, self.original_size)  # [offset, low): the file's bytes, patched by the pages written
        out = bytearray()
        if offset < low:
            out += self._original(offset, low)
            for index in range(offset // PAGE, (low - 1) // PAGE + 1):
                page = self._pages.get(index)
                if page is not None:
                    start = index * PAGE
                    lo, hi = max(start, offset), min(start + PAGE, low)
                    out[lo - offset : hi - offset] = page[lo - start : hi - start]
        if stop > self.original_size:
            out += self._tail[max(offset, self.original_size) - self.original_size : stop - self.original_size]
        return bytes(out)

    def write_at(self, offset: int, data: memoryview) -> None:
        stop = offset + len(data)
        low = min(stop, self.original_size)
        position = offset
        while position < low:
            index = position // PAGE
            start = index * PAGE
            hi = min(start + PAGE, low)
            self._page(index)[position - start : hi - start] = data[position - offset : hi - offset]
            position = hi
        if stop > self.original_size:
            begin = max(offset, self.original_size) - self.original_size
            if len(self._tail) < begin:
                self._tail.extend(bytes(begin - len(self._tail)))
            self._tail[begin : stop - self.original_size] = data[max(offset, self.original_size) - offset :]
        self.size = max(self.size, stop)

    def changes(self) -> list[tuple[int, bytes]]:
        """Every range written, as (offset, new bytes): runs of adjacent pages, the part cut off by a truncate and
        grown again (zeros where nothing was written since), then the tail."""
        low = min(self.size, self.original_size)  # pages hold bytes below it only; the tail holds the rest
        cut = min(self._zero_from, low)
        runs: list[tuple[int, bytearray]] = []
        for index in sorted(self._pages):
            start = index * PAGE
            if start >= cut:
                continue
            page = self._pages[index][: min(PAGE, cut - start)]
            if runs and runs[-1][0] + len(runs[-1][1]) == start:
                runs[-1][1].extend(page)
            else:
                runs.append((start, bytearray(page)))
        out = [(start, bytes(data)) for start, data in runs]
        if cut < low:
            out.append((cut, self.read_at(cut, low - cut)))
        if self._tail:
            out.append((self.original_size, bytes(self._tail)))
        return out


@dataclass(frozen=True)
class Entry:
    """One range ``apply`` overwrites: where, what was there and what goes there (below the original size, byte
    for byte, to tell a write cut short from someone else's change), and a checksum of all it writes."""

    offset: int
    old: bytes
    new_below: bytes  # the new bytes over ``old``
    new_length: int
    new_crc: int

    @classmethod
    def of(cls, offset: int, old: bytes, new: bytes) -> Entry:
        return cls(offset, old, new[: len(old)], len(new), zlib.crc32(new))


def journal_path(path: Path) -> Path:
    """This process's journal for the file at ``path`` (symlinks followed)."""
    return atomic.beside(atomic.real_target(path), "journal")


def apply(path: Path, overlay: Overlay) -> None:
    """Put ``overlay``'s writes into the file at ``path`` all or nothing (see the module's docstring).

    Raises ``Busy``, having changed nothing, when another process holds the file open or locked."""
    real = atomic.real_target(path)
    fd = os.open(real, os.O_RDWR)
    try:
        _hold_exclusively(fd, real)
        before = os.fstat(fd)
        if before.st_size != overlay.original_size:
            raise OutputError(f"{path} changed while rewards were written; nothing was written — run again")
        changes = overlay.changes()
        final = max(overlay.size, overlay.original_size)  # never shorter: rolling back a cut would need its bytes
        entries = [
            Entry.of(offset, os.pread(fd, max(0, min(len(new), before.st_size - offset)), offset), new)
            for offset, new in changes
        ]
        journal = journal_path(real)
        with deferred():  # written, or undone on an error; a signal waits for either
            try:
                _write_journal(journal, before, final, entries)
                pause_at("commit")
                for offset, new in sorted(changes, key=lambda change: change[0] < before.st_size):
                    _write_all(fd, new, offset)  # the new end first, then the pages that point to it
                os.fsync(fd)
            except BaseException:
                if journal.exists():  # else it was never written whole, nor was the file touched
                    _roll_back(fd, before.st_size, before.st_atime_ns, before.st_mtime_ns, entries)
                    _remove(journal)
                raise
            _remove(journal)
    finally:
        os.close(fd)


def _hold_exclusively(fd: int, path: Path) -> None:
    """Take an exclusive lock on the file and make sure no process (this one included) has it open."""
    if holders.lock_exclusively(fd) is False:  # None: a file system without locks, where /proc must tell
        raise Busy(f"{path} is locked by another process")
    others = holders.open_elsewhere(path, skip_fd=fd)
    if others:
        raise Busy(f"{path} is open in {others[0]}")


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _write_journal(path: Path, before: os.stat_result, final: int, entries: list[Entry]) -> None:
    header = {
        "device": before.st_dev,
        "inode": before.st_ino,
        "original_size": before.st_size,
        "final_size": final,
        "times_ns": [before.st_atime_ns, before.st_mtime_ns],
        "entries": [[e.offset, len(e.old), e.new_length, e.new_crc] for e in entries],
    }
    body = _MAGIC + json.dumps(header).encode() + b"\n" + b"".join(e.old + e.new_below for e in entries)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        _write_all(fd, body + zlib.crc32(body).to_bytes(4, "little"), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _remove(path)
        raise
    os.close(fd)
    atomic.fsync(path.parent)


def _remove(journal: Path) -> None:
    journal.unlink(missing_ok=True)
    atomic.fsync(journal.parent)


@dataclass(frozen=True)
class Journal:
    """A journal read back: the file it belongs to, its sizes and the ranges written."""

    device: int
    inode: int
    original_size: int
    final_size: int
    times_ns: tuple[int, int]  # the file's access and modification times before the write
    entries: list[Entry]

    @classmethod
    def read(cls, path: Path) -> Journal | None:
        """The journal, or None when it is incomplete (its writer died before the file was touched)."""
        data = path.read_bytes()
        body, crc = data[:-4], data[-4:]
        if len(data) < len(_MAGIC) + 4 or not body.startswith(_MAGIC) or zlib.crc32(body).to_bytes(4, "little") != crc:
            return None
        header_end = body.index(b"\n", len(_MAGIC))
        header = json.loads(body[len(_MAGIC) : header_end])
        entries, position = [], header_end + 1
        for offset, old_length, new_length, new_crc in header["entries"]:
            old, new_below = (
                body[position : position + old_length],
                body[position + old_length : position + 2 * old_length],
            )
            entries.append(Entry(offset, old, new_below, new_length, new_crc))
            position += 2 * old_length
        return cls(
            header["device"],
            header["inode"],
            header["original_size"],
            header["final_size"],
            tuple(header["times_ns"]),
            entries,
        )


def recover(path: Path) -> list[str]:
    """Finish or undo any write to ``path`` left half done by a vlmlabel run that died; what was done, said.

    A journal of a run still alive on this host is waited for; one from another host cannot be judged from
    here and is refused with what to do. A run is gone when its PID is (``Leftover.dead``), or when no process
    holds the file's ``flock`` (``holders.unlocked``): a run holds it from before its journal is written until
    after it is removed, so its journal has outlived it even if its PID now names another process (after a
    reboot, in a container). The lock cannot tell where the file system has none (the PID is then all there is
    to go by), nor while a reader holds the file open: HDF5 takes a shared lock on every file it opens."""
    real = atomic.real_target(path)
    notes: list[str] = []
    for left in atomic.leftovers(real, ("journal",)):
        if left.host != atomic.HOST:
            raise SourceError(
                f"{path} has an unfinished write by vlmlabel on host {left.host} ({left.path.name}); "
                f"run any vlmlabel command on it from {left.host}, which repairs it"
            )
        if not (left.dead or holders.unlocked(real)):
            _wait_gone(left.path, real)
        elif left.path.exists():
            notes.append(_recover_one(real, left.path))
    return notes


def _wait_gone(journal: Path, real: Path) -> None:
    """Wait for a live run to finish applying its journal to ``real``."""
    deadline = time.monotonic() + _WAIT_SECONDS
    while journal.exists():
        if time.monotonic() > deadline:
            raise SourceError(
                f"{real} is being written by another vlmlabel run ({journal.name}), or a program that "
                "has it open holds its lock; wait for them to finish, then run again"
            )
        time.sleep(0.05)


def _recover_one(real: Path, path: Path) -> str:
    journal = Journal.read(path)
    if journal is None:  # written only partly: the file itself was never touched
        _remove(path)
        return f"removed an incomplete journal of a run that died before writing {real}"
    fd = os.open(real, os.O_RDWR)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (journal.device, journal.inode):
            _remove(path)
            return f"removed a journal for a file that {real} no longer is"
        states = [_state(fd, entry) for entry in journal.entries]
        if "foreign" in states:
            raise SourceError(
                f"{real} was changed after a vlmlabel write to it was interrupted, and the journal "
                f"{path.name} beside it no longer fits: move the file aside and restore it from "
                "a backup, or if you trust it as it is, remove the journal"
            )
        if all(s == "new" for s in states) and now.st_size == journal.final_size:
            _remove(path)
            return f"completed an interrupted write to {real} (every byte had been written)"
        _roll_back(fd, journal.original_size, *journal.times_ns, journal.entries)
    finally:
        os.close(fd)
    _remove(path)
    return f"undid an interrupted write to {real}: it is as it was before that run"


def _state(fd: int, entry: Entry) -> str:
    """'new', 'old' or 'foreign': what the file holds now where ``entry`` was to be written. Any mix of old and
    new bytes (a write cut short) is 'old': rolling back undoes it."""
    current = os.pread(fd, entry.new_length, entry.offset)
    if len(current) == entry.new_length and zlib.crc32(current) == entry.new_crc:
        return "new"
    now = np.frombuffer(current[: len(entry.old)].ljust(len(entry.old), b"\0"), np.uint8)
    old, new = np.frombuffer(entry.old, np.uint8), np.frombuffer(entry.new_below, np.uint8)
    return "old" if bool(np.all((now == old) | (now == new))) else "foreign"


def _roll_back(fd: int, original_size: int, atime_ns: int, mtime_ns: int, entries: list[Entry]) -> None:
    """Put the original bytes, size and times back, and flush them."""
    for entry in entries:
        if entry.old:
            _write_all(fd, entry.old, entry.offset)
    os.ftruncate(fd, original_size)
    os.utime(fd, ns=(atime_ns, mtime_ns))
    os.fsync(fd)
