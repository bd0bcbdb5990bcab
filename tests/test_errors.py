"""Errors met while running: a failed write, an unreachable Hub, the console script, read-only sources.

The table of bad inputs (exit 2, one line, nothing changed) is tests/test_hostile_inputs.py."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from tests import layouts
from vlmlabel.cli import app
from vlmlabel.destinations import hdf5 as hdf5_writer
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest

runner = CliRunner()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def test_failure_during_write_leaves_source_intact(tmp_path, tiny_model_dir, monkeypatch):
    lf = layouts.build_robomimic(tmp_path / "r.h5")
    before = digest(lf.path)
    calls = []

    def failing_put(handle, dataset, overwrite):
        calls.append(dataset.path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return original(handle, dataset, overwrite)

    original = hdf5_writer._put
    monkeypatch.setattr(hdf5_writer, "_put", failing_put)
    result = runner.invoke(app, ["relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "x", "-q"])
    assert result.exit_code == 2
    assert "No space left" in result.output
    assert digest(lf.path) == before
    # Only the saved progress stays beside it (so a rerun after freeing space resumes): no temp copy, no lock.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "r.h5.vlmlabel-vlm_reward"]
    assert sorted(p.name for p in (tmp_path / "r.h5.vlmlabel-vlm_reward").iterdir()) == ["progress"]
    with h5py.File(lf.path, "r") as f:
        assert "vlm_reward" not in f["data/demo_0"]
    monkeypatch.undo()  # space freed: the rerun takes every score from the saved progress
    again = relabel_file(RelabelRequest(source=lf.path, goals=["x"], model=str(tiny_model_dir)))
    assert again.result.resumed == sum(lf.steps)


def test_unreachable_hub_fails_within_seconds(tmp_path):
    """Not offline-flagged, not cached, Hub unreachable: a clear error in seconds, not minutes of retries."""
    source = layouts.build_robomimic(tmp_path / "r.h5").path
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "NO_PROXY": "*",
    }
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "vlmlabel", "relabel", str(source), "--goal", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "unreachable" in proc.stderr and "--pretrained FILE" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 30


def test_console_entry_point_runs_and_reports_errors(tmp_path, tiny_model_dir):
    """The installed `vlmlabel` script, as users call it."""
    source = layouts.build_robomimic(tmp_path / "r.h5").path
    ok = subprocess.run(
        ["vlmlabel", "relabel", str(source), "--model", str(tiny_model_dir), "--goal", "a cup"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "rewards written to" in ok.stdout
    bad = subprocess.run(
        ["vlmlabel", "relabel", str(tmp_path / "nope.h5"), "--goal", "a cup"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_read_only_source_gets_a_labelled_copy_and_is_never_replaced(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "r.h5")
    lf.path.chmod(0o444)
    before = digest(lf.path)
    out = tmp_path / "copy.h5"
    result = runner.invoke(
        app, ["relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "x", "-q", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert f["data/demo_0/vlm_reward"].shape == (lf.steps[0],)
    assert out.stat().st_mode & stat.S_IWUSR  # the copy is the user's to write (it was opened r+ as such)
    assert digest(lf.path) == before


def test_evaluate_and_plot_of_an_unlabelled_table_say_relabel_first(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    datasets.Dataset.from_dict({"image": list(layouts.make_frames(3, 16, 16, 0))}).save_to_disk(str(folder))
    for args in (["evaluate", str(folder)], ["plot", str(folder), "--out", str(tmp_path / "p.png")]):
        result = runner.invoke(app, args, terminal_width=400)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and "run `vlmlabel relabel` first" in result.output
        assert len(result.output.strip().splitlines()) == 1
