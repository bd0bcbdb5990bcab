"""A new HDF5 file written through a Python file object, so that a failed write never reaches HDF5's C library.

HDF5 (2.0, through h5py 3.16) crashes the process (SIGSEGV) when a write of its own fails (a full disk, a file
grown past the size limit): it flushes its metadata cache again while unwinding. ``WriteThrough`` is the file
h5py writes (its ``fileobj`` driver): every write goes to the file on disk; the first one that fails is kept,
and from then on the file is a ``journal.Overlay`` (later writes held in memory), so HDF5 reads back what it
wrote and finishes without an error. ``check`` raises the kept failure (a full disk as an ``OSError`` saying
what to do): callers call it between their writes (so at most one block is held in memory once the disk is
full) and ``open_h5`` once the file is closed. The file is a temporary copy the caller removes on any error,
never the user's data.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py

from vlmlabel.files import interrupt, journal

_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class WriteThrough(journal.RandomAccessFile):
    """The file at ``path`` (created empty with ``create``) as the read-write file object h5py writes through.
    No exception from the file system crosses into HDF5 from a write: it is kept in ``failure``."""

    def __init__(self, path: Path, create: bool):
        super().__init__()
        self.path = path
        self._fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0), 0o644)
        self._pos = 0
        self._spill: journal.Overlay | None = None  # the file plus the writes made after the first failure
        self.failure: BaseException | None = None

    def __repr__(self) -> str:  # h5py names the file after it
        return str(self.path)

    def _end(self) -> int:
        return self._spill.size if self._spill is not None else os.fstat(self._fd).st_size

    def readinto(self, buffer: Any) -> int:  # any writable buffer
        view = memoryview(buffer).cast("B")
        try:
            data = (
                self._spill.read_at(self._pos, len(view))
                if self._spill is not None
                else os.pread(self._fd, len(view), self._pos)
            )
        except BaseException as exc:  # a read HDF5 cannot do is an error it must see, as a plain OSError
            self.failure = self.failure or exc.with_traceback(None)
            raise OSError(errno.EIO, f"read failed: {exc!r}") from None
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def write(self, data: Any) -> int:  # any bytes-like object
        view = memoryview(data).cast("B")
        if self._spill is None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], self._pos + done)
            except BaseException as exc:
                self._fail(exc)
        if self._spill is not None:
            self._spill.write_at(self._pos, view)
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self._spill is None:
            try:
                os.ftruncate(self._fd, size)
            except BaseException as exc:
                self._fail(exc)
        if self._spill is not None:
            self._spill.truncate(size)
        return size

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()

    def _fail(self, exc: BaseException) -> None:
        """Keep ``exc`` (without its traceback: frames of h5py's C driver kept alive crash the interpreter at exit)
        and hold every later write in memory."""
        self.failure = self.failure or exc.with_traceback(None)
        self._spill = journal.Overlay(self.path)

    def check(self) -> None:
        """Raise what went wrong under HDF5, if anything did (a full disk as one line saying what to do), then a
        signal held while HDF5 called this file (``interrupt.callback``)."""
        failure = self.failure
        if failure is None:
            interrupt.check()
            return
        if isinstance(failure, OSError) and failure.errno in _NO_ROOM:  # a fault, not bad input: an OSError still
            raise OSError(
                failure.errno,
                f"{failure.strerror}; nothing was changed: make room (or write elsewhere "
                "with --output) and run the same command again",
                str(self.path.parent),
            ) from None
        raise copy.copy(failure) from None


@contextlib.contextmanager
def open_h5(path: Path, mode: str) -> Iterator[tuple[h5py.File, Callable[[], None]]]:
    """``path`` opened by h5py for writing (``mode`` 'w': created empty; 'r+': as it is) through a
    ``WriteThrough``; yields the handle and the check to call between writes. A failed write is raised once the
    file is closed (the failure explains any error HDF5 met after it)."""
    target = WriteThrough(path, create=mode == "w")
    try:
        with h5py.File(target, mode) as handle:
            yield handle, target.check
    except BaseException:
        target.check()
        raise
    finally:
        target.close()
    target.check()
