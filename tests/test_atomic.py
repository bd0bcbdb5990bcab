"""The one atomic-write module: temp beside the real target, rename on success, nothing left on failure,
leftovers of dead runs removed, symlinks kept links."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests import layouts
from vlmlabel.files import atomic
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftover(target, pid: int, what: str = "tmp"):
    return target.parent / f".{target.name}.vlmlabel-{atomic.HOST}-{pid}.{what}"


def test_a_file_replaces_the_target_only_on_success(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.staged(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_folder_replaces_the_target_and_is_restored_on_failure(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic.staged(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("half")
        raise RuntimeError("killed")
    assert (target / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ds"]
    with atomic.staged(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "data.h5"
    target.write_bytes(b"x")
    dead_file, dead_dir = _leftover(target, _dead_pid()), _leftover(target, _dead_pid(), "old")
    dead_file.write_bytes(b"a full-size copy")
    dead_dir.mkdir()
    live = _leftover(target, os.getppid())
    live.write_bytes(b"another run's copy in progress")
    atomic.write_bytes(target, b"y")
    assert not dead_file.exists() and not dead_dir.exists()
    assert live.exists() and target.read_bytes() == b"y"


def test_a_symlinked_target_is_written_through_and_stays_a_link(tmp_path):
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    real = real_dir / "data.bin"
    real.write_bytes(b"old")
    link = link_dir / "data.bin"
    link.symlink_to(real)
    seen = []
    with atomic.staged(link) as tmp:
        seen.append(tmp.parent)
        tmp.write_bytes(b"new")
    assert seen == [real_dir]  # the temp file sits beside the real target, on its file system
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_relabel_in_place_through_a_symlink_and_after_a_killed_write(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "real.h5")
    link = tmp_path / "link.h5"
    link.symlink_to(lf.path)
    stale = _leftover(lf.path, _dead_pid())
    stale.write_bytes(lf.path.read_bytes())  # a copy left by a run killed during its final write
    relabel_file(RelabelRequest(source=link, goals=["a red block"], model=str(tiny_model_dir), device="cpu"))
    assert link.is_symlink() and not stale.exists()
    with h5py.File(lf.path, "r") as f:
        assert np.isfinite(f["data/demo_0/vlm_reward"][()]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.h5", "real.h5"]


def test_a_folder_set_aside_by_a_killed_run_is_put_back_not_removed(tmp_path):
    """kill -9 between the two renames of a folder replacement: the old folder is aside, none in its place."""
    target = tmp_path / "out"
    aside = _leftover(target, _dead_pid(), "old")
    aside.mkdir()
    (aside / "data.parquet").write_bytes(b"the user's labelled data")
    half = _leftover(target, _dead_pid(), "tmp")
    half.mkdir()
    with atomic.staged(target) as tmp:
        tmp.mkdir()
        assert (target / "data.parquet").read_bytes() == b"the user's labelled data"  # back before the new write
        (tmp / "data.parquet").write_bytes(b"new")
    assert (target / "data.parquet").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
