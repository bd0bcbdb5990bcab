"""The in-place HDF5 write through a rollback journal: the file is untouched until the last step, that step is
undone on any error, and a process killed anywhere inside it leaves a file the next run restores exactly."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import layouts
from vlmlabel.destinations import hdf5 as hdf5_destination
from vlmlabel.destinations.hdf5 import H5Dataset, write_file
from vlmlabel.errors import SourceError
from vlmlabel.events import Events
from vlmlabel.files import journal

BUILDERS = {"flat": layouts.build_flat_d4rl, "robomimic": layouts.build_robomimic, "minari": layouts.build_minari}


def _contents(path: Path) -> dict[str, object]:
    """Every object of the file with its values and attributes: what any reader sees."""
    found: dict[str, object] = {}
    with h5py.File(path, "r") as handle:

        def visit(name: str, item: h5py.HLObject) -> None:
            values = item[()].tobytes() if isinstance(item, h5py.Dataset) else None
            found[name] = (values, sorted((k, repr(v)) for k, v in item.attrs.items()))

        handle.visititems(visit)
    return found


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewards(lf: layouts.LayoutFile) -> list[H5Dataset]:
    attrs = {"formula": "cos", "vlmlabel_version": "test"}
    return [
        H5Dataset(path, np.linspace(0, 1, 7 + i, dtype=np.float32), attrs) for i, path in enumerate(lf.reward_paths)
    ]


def _copy_write(path: Path, datasets: list[H5Dataset], monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(hdf5_destination, "write_in_place", lambda *args, **kwargs: False)
        write_file(path, path, datasets, overwrite=False)


@pytest.mark.parametrize("layout", sorted(BUILDERS))
def test_the_in_place_write_is_what_the_copy_writes_and_keeps_the_file(layout, tmp_path, monkeypatch):
    journaled, copied = tmp_path / "journaled.h5", tmp_path / "copied.h5"
    lf = BUILDERS[layout](journaled)
    copied.write_bytes(journaled.read_bytes())
    datasets = _rewards(lf)
    inode = journaled.stat().st_ino
    write_file(journaled, journaled, datasets, overwrite=False)
    _copy_write(copied, datasets, monkeypatch)
    assert journaled.stat().st_ino == inode  # written where it lies
    assert copied.stat().st_ino != inode
    assert _contents(journaled) == _contents(copied)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied.h5", "journaled.h5"]
    with h5py.File(journaled, "r+") as handle:  # HDF5 itself keeps writing it as a sound file
        handle["more"] = np.arange(5)
    assert _contents(journaled)["more"][0] == np.arange(5).tobytes()


def test_a_reader_holding_the_file_open_gets_the_copy_instead(tmp_path):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time, h5py
        handle = h5py.File({str(lf.path)!r}, "r")
        print("open", flush=True)
        sys.stdin.read()
        print(len(handle["data"]), flush=True)
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "open"
        inode = lf.path.stat().st_ino
        write_file(lf.path, lf.path, _rewards(lf), overwrite=False)
        assert lf.path.stat().st_ino != inode  # renamed into place: the reader keeps its own, whole file
        out, _ = reader.communicate("", timeout=60)
        assert out.strip() == str(len(lf.steps))
    finally:
        reader.kill()
    with h5py.File(lf.path, "r") as handle:
        assert "vlm_reward" in handle["data/demo_0"]


def test_an_error_while_applying_puts_every_byte_and_the_time_back(tmp_path, monkeypatch):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    before, stat = _digest(lf.path), lf.path.stat()
    real_write = journal._write_all
    calls = [0]

    def fail_on_the_third(fd, data, offset):  # the journal, the new end, then a page: a full disk there
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data, offset)

    monkeypatch.setattr(journal, "_write_all", fail_on_the_third)
    with pytest.raises(OSError, match="No space"):
        write_file(lf.path, lf.path, _rewards(lf), overwrite=False)
    assert calls[0] > 3  # the rollback wrote the old bytes back
    assert _digest(lf.path) == before and lf.path.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


def _killed_apply(path: Path, datasets: list[H5Dataset], step: int, torn: bool) -> None:
    """In a forked child, write in place and die by SIGKILL at the ``step``-th byte write (half of it written
    first when ``torn``), or, past the last write, just before the journal is removed."""
    pid = os.fork()
    if pid == 0:
        calls = [0]
        real_write, real_remove = journal._write_all, journal._remove

        def write(fd, data, offset):
            calls[0] += 1
            if calls[0] == step:
                if torn:
                    os.pwrite(fd, bytes(data)[: max(1, len(data) // 2)], offset)
                os.kill(os.getpid(), signal.SIGKILL)
            real_write(fd, data, offset)

        def remove(path_):
            if path_.name.endswith(".journal"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_remove(path_)

        journal._write_all, journal._remove = write, remove
        try:
            write_file(path, path, datasets, overwrite=False)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _writes(path: Path, datasets: list[H5Dataset], monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, object]]:
    """How many byte writes one uninterrupted in-place write makes (journal included), and what it gives."""
    spare = path.with_name("count.h5")
    spare.write_bytes(path.read_bytes())
    calls = [0]
    real_write = journal._write_all

    def count(fd, data, offset):
        calls[0] += 1
        real_write(fd, data, offset)

    with monkeypatch.context() as patch:
        patch.setattr(journal, "_write_all", count)
        write_file(spare, spare, datasets, overwrite=False)
    expected = _contents(spare)
    spare.unlink()
    return calls[0], expected


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["robomimic", "minari"])
def test_a_kill_at_every_write_leaves_the_file_whole_after_recovery(layout, tmp_path, monkeypatch):
    lf = BUILDERS[layout](tmp_path / "data.h5")
    datasets = _rewards(lf)
    writes, complete = _writes(lf.path, datasets, monkeypatch)
    original, original_digest = _contents(lf.path), _digest(lf.path)
    pristine = lf.path.read_bytes()
    seen = set()
    for step in range(1, writes + 2):  # writes + 1: killed after every byte is written, before the journal goes
        for torn in (False, True) if step <= writes else (False,):
            lf.path.write_bytes(pristine)
            mtime = lf.path.stat().st_mtime_ns
            _killed_apply(lf.path, datasets, step, torn)
            notes = journal.recover(lf.path)
            assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]
            if step == 1:  # killed while writing the journal: the file was never touched
                assert _digest(lf.path) == original_digest
                continue
            assert len(notes) == 1
            if step > writes:
                assert "completed" in notes[0] and _contents(lf.path) == complete
            else:
                assert "undid" in notes[0] and _digest(lf.path) == original_digest
                assert lf.path.stat().st_mtime_ns == mtime  # as it was, for every tool that looks at times
            seen.add(notes[0].split()[0])
    assert seen == {"completed", "undid"}
    assert _contents(lf.path) in (original, complete)


def test_a_file_changed_after_the_kill_is_not_rolled_over(tmp_path):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    _killed_apply(lf.path, _rewards(lf), step=3, torn=False)  # the new end written, then killed
    with open(lf.path, "r+b") as handle:  # someone edits the first page, which the journal would restore
        handle.seek(0)
        handle.write(b"\xff" * 16)
    edited = _digest(lf.path)
    with pytest.raises(SourceError, match="changed after a vlmlabel write"):
        journal.recover(lf.path)
    assert _digest(lf.path) == edited and len(list(tmp_path.glob(".data.h5.*.journal"))) == 1


def test_a_journal_cut_short_is_only_removed(tmp_path):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    before = _digest(lf.path)
    _killed_apply(lf.path, _rewards(lf), step=2, torn=False)  # journal whole, nothing else written yet
    (left,) = tmp_path.glob(".data.h5.*.journal")
    left.write_bytes(left.read_bytes()[:-10])  # as if the kill had come while it was written
    assert "incomplete journal" in journal.recover(lf.path)[0]
    assert _digest(lf.path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


def test_a_journal_whose_pid_names_another_process_now_is_recovered(tmp_path, monkeypatch):
    """After a reboot, or in a container, the dead run's PID may name a live process: what tells is the file's
    lock, which the run held while its journal existed. Held, the journal is waited for, then refused."""
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    before = _digest(lf.path)
    _killed_apply(lf.path, _rewards(lf), step=3, torn=True)
    (left,) = tmp_path.glob(".data.h5.*.journal")
    reused = left.with_name(left.name.rsplit("-", 1)[0] + f"-{os.getpid()}.journal")  # a live process's PID
    left.rename(reused)
    monkeypatch.setattr(journal, "_WAIT_SECONDS", 0.3)
    with open(lf.path, "rb") as holder:  # a run applying its journal holds the lock
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(SourceError, match="being written by another vlmlabel run"):
            journal.recover(lf.path)
    assert reused.exists()
    assert "undid an interrupted write" in journal.recover(lf.path)[0]
    assert _digest(lf.path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


def test_a_journal_of_another_host_is_refused_with_what_to_do(tmp_path):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    (tmp_path / ".data.h5.vlmlabel-othernode-123.journal").write_bytes(b"x")
    with pytest.raises(SourceError, match="from othernode"):
        journal.recover(lf.path)
    with pytest.raises(SourceError, match="unfinished write"):
        from vlmlabel.sources import open_source

        open_source(str(lf.path))


def test_the_next_relabel_recovers_before_it_reads(tmp_path, tiny_model_dir):
    from vlmlabel.run.lifecycle import relabel_file
    from vlmlabel.run.request import RelabelRequest

    lf = layouts.build_robomimic(tmp_path / "data.h5")
    before = _digest(lf.path)
    _killed_apply(lf.path, _rewards(lf), step=4, torn=True)
    assert _digest(lf.path) != before  # half written
    notes: list[str] = []
    relabel_file(
        RelabelRequest(source=lf.path, goals=["a red block"], model=str(tiny_model_dir), device="cpu"),
        events=Events(on_note=notes.append),
    )
    assert any("undid an interrupted write" in n for n in notes)
    with h5py.File(lf.path, "r") as handle:
        assert [handle[p].shape for p in lf.reward_paths] == [(steps,) for steps in lf.steps]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


# -- the overlay against a plain bytearray -------------------------------------------------------------

_operation = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3000), st.binary(min_size=1, max_size=1200)),
    st.tuples(st.just("read"), st.integers(0, 3500), st.integers(0, 1500)),
    st.tuples(st.just("truncate"), st.integers(0, 3000)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(original=st.binary(min_size=0, max_size=2500), operations=st.lists(_operation, max_size=25))
def test_the_overlay_reads_and_applies_exactly_what_was_written(original, operations, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(original)
    model = bytearray(original)
    overlay = journal.Overlay(path)
    for operation in operations:
        if operation[0] == "write":
            _, offset, data = operation
            model.extend(bytes(max(0, offset - len(model))))
            model[offset : offset + len(data)] = data
            overlay.seek(offset)
            assert overlay.write(data) == len(data)
        elif operation[0] == "read":
            _, offset, count = operation
            assert overlay.read_at(offset, count) == bytes(model[offset : offset + count])
        else:
            _, size = operation
            model = model[:size] + bytearray(max(0, size - len(model)))
            overlay.truncate(size)
        assert overlay.size == len(model)
    overlay.close()
    assert path.read_bytes() == original  # nothing reaches the file before apply
    journal.apply(path, overlay)
    written = path.read_bytes()
    assert written[: len(model)] == bytes(model)
    assert len(written) == max(len(model), len(original))  # never cut: the bytes past the end are HDF5's slack
    assert not list(tmp_path.glob(".*journal"))


@pytest.mark.parametrize("where", ["read_at", "write_at"])
def test_a_signal_inside_the_driver_is_raised_as_itself_and_the_process_exits_cleanly(where, tmp_path):
    """A KeyboardInterrupt while h5py reads or writes through the overlay reaches the caller as itself, and the
    interpreter then exits normally (re-raising the very object h5py holds made it crash at exit, code 139)."""
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    before = _digest(lf.path)
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from vlmlabel.files import journal
        from vlmlabel.destinations.hdf5 import H5Dataset, write_file

        real = journal.Overlay.{where}
        calls = [0]
        def interrupted(self, *args):
            calls[0] += 1
            if calls[0] == 2:
                raise KeyboardInterrupt
            return real(self, *args)
        journal.Overlay.{where} = interrupted
        path = Path({str(lf.path)!r})
        try:
            write_file(path, path, [H5Dataset("data/demo_0/vlm_reward", np.zeros(3, np.float32))], overwrite=False)
        except KeyboardInterrupt:
            print("interrupted")
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "interrupted"), done.stderr[-2000:]
    assert _digest(lf.path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]
