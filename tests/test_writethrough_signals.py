"""A signal landing inside any method h5py's file driver calls back (seek, tell, flush, readinto, write, truncate)
of the file objects HDF5 writes through (``writethrough.WriteThrough``, ``journal.Overlay``) stops the write
the normal clean way: ``Interrupted`` with the signal's exit code, the source byte-identical, nothing beside it.

Raised inside the callback, the exception stayed pending in HDF5, which went on calling ``truncate`` and ``flush``
on its way out; CPython's method lookup then dropped it and raised ``AttributeError: 'WriteThrough' object has
no attribute 'flush'`` (``_PyType_Lookup`` in CPython's Objects/typeobject.c: on a miss in its method cache, it
takes the pending exception for an error of its own lookup through the class's bases and clears it). The signal
lands at an exact line, the first or the last of every call of the method, with that cache emptied, as it is
whenever other code has evicted the file's methods from it.
"""

from __future__ import annotations

import hashlib
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cluster_files import make_dataset
from vlmlabel.destinations import writethrough
from vlmlabel.destinations.hdf5 import H5Dataset, write_file
from vlmlabel.errors import Interrupted
from vlmlabel.files import journal
from vlmlabel.files.interrupt import stoppable

CALLED_BACK = ("seek", "tell", "flush", "readinto", "write", "truncate")
FILES = (writethrough.WriteThrough, journal.Overlay, journal.RandomAccessFile)
WRITES = {  # how each write reaches HDF5: journal.Overlay in place, writethrough.WriteThrough into a copy or new
    "in place": lambda path, out: write_file(path, path, [H5Dataset("data/demo_0/vlm_reward", _REWARD)], False),
    "copy": lambda path, out: write_file(path, out, [H5Dataset("data/demo_0/vlm_reward", _REWARD)], False),
    "new": lambda path, out: write_file(None, out, [H5Dataset("vlm_reward", _REWARD)], False),
}
_REWARD = np.arange(5, dtype=np.float32)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _method(frame) -> str | None:
    """The called-back method ``frame`` runs, if it is one of the file objects' own."""
    code = frame.f_code
    if code.co_name in CALLED_BACK and any(getattr(vars(c).get(code.co_name), "__code__", None) is code for c in FILES):
        return code.co_name
    return None


def _lines(write, path: Path, out: Path) -> dict[str, list[int]]:
    """The lines each call of each method runs in one uninterrupted write, in call order."""
    lines: dict[str, list[int]] = {}

    def tracer(frame, event, arg):
        name = _method(frame)
        if name is None:
            return None
        lines.setdefault(name, []).append(0)

        def local(frame, event, arg):
            if event == "line":
                lines[name][-1] += 1
            return local

        return local

    sys.settrace(tracer)
    try:
        write(path, out)
    finally:
        sys.settrace(None)
    return lines


def _signal_at(method: str, call: int, line: int):
    """A tracer delivering SIGTERM at the ``line``-th line of the ``call``-th call of ``method``, as the interpreter
    does when the signal arrives there: it runs the handler in that frame."""
    calls = [0]

    def tracer(frame, event, arg):
        if _method(frame) != method:
            return None
        calls[0] += 1
        if calls[0] != call:
            return None
        seen = [0]

        def local(frame, event, arg):
            if event == "line":
                seen[0] += 1
                if seen[0] == line:
                    sys._clear_type_cache()  # as after other code evicted the file's methods from it (see above)
                    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, frame)
            return local

        return local

    return tracer, calls


# A new file is only written: h5py never reads it back through the file object (``readinto``).
CALLED = {how: tuple(m for m in CALLED_BACK if (how, m) != ("new", "readinto")) for how in WRITES}


def test_each_write_calls_back_the_methods_the_signal_cases_cover(tmp_path):
    """The cases below are made from CALLED: a write that calls another method (an h5py upgrade) fails here."""
    for how, write in WRITES.items():
        folder = tmp_path / how
        folder.mkdir()
        called = _lines(write, make_dataset(folder / "data.h5", (5, 4)), folder / "out.h5")
        assert tuple(m for m in CALLED_BACK if called.get(m)) == CALLED[how], how


@pytest.mark.parametrize("line", ["first line", "last line"])
@pytest.mark.parametrize(("how", "method"), [(how, m) for how in sorted(WRITES) for m in CALLED[how]])
def test_a_signal_inside_a_file_callback_stops_the_write_cleanly(how, method, line, tmp_path):
    write = WRITES[how]
    rehearsal = tmp_path / "rehearsal"
    rehearsal.mkdir()
    calls = _lines(write, make_dataset(rehearsal / "data.h5", (5, 4)), rehearsal / "out.h5")[method]
    for call, lines in enumerate(calls, 1):
        folder = tmp_path / f"call {call}"
        folder.mkdir()
        source = make_dataset(folder / "data.h5", (5, 4))
        before = _digest(folder)
        tracer, seen = _signal_at(method, call, 1 if line == "first line" else lines)
        with pytest.raises(Interrupted) as info:
            with stoppable():
                sys.settrace(tracer)
                try:
                    write(source, folder / "out.h5")
                finally:
                    sys.settrace(None)
        assert info.value.exit_code == 143 and seen[0] >= call, call
        assert _digest(folder) == before, call  # the source as it was, no output and nothing beside it
