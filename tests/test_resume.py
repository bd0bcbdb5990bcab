"""Resume after kill -9 / SIGTERM, locking, and checkpoint invalidation."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.cluster_files import ROOT, env, make_dataset, read_rewards, relabel_args
from vlmlabel.cli import app
from vlmlabel.errors import Interrupted, LockedError, SourceError, WorkerLost
from vlmlabel.events import Events
from vlmlabel.run.checkpoint import Checkpoint
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import FinishedSummary, RelabelRequest
from vlmlabel.run.shards import dest_lock, work_dir

pytestmark = pytest.mark.subprocess


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _request(source: Path, model_dir: Path, **overrides) -> RelabelRequest:
    fields = dict(
        source=source, goals=["a red block"], model=str(model_dir), device="cpu", batch_size=2, checkpoint_every=10
    )
    fields.update(overrides)
    return RelabelRequest(**fields)


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data.h5")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir) -> dict[str, np.ndarray]:
    """Rewards of one uninterrupted run (batch size 2) of the same data."""
    source = make_dataset(tmp_path_factory.mktemp("baseline") / "data.h5")
    relabel_file(_request(source, tiny_model_dir))
    return read_rewards(source)


def _state(source: Path) -> dict | None:
    try:
        return json.loads((work_dir(source, "vlm_reward") / "progress" / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def _start(dataset: Path, model_dir: Path, delay: str) -> subprocess.Popen:
    args = relabel_args(dataset, model_dir, "--batch-size", "2", "--checkpoint-every", "10")
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env(VLMLABEL_TEST_BATCH_DELAY=delay),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _assert_untouched(dataset: Path, digest: str) -> None:
    assert _digest(dataset) == digest
    with h5py.File(dataset, "r") as f:  # opens, and no reward was written
        assert "vlm_reward" not in f["data/demo_0"]


def test_kill9_at_several_points_then_rerun_gives_uninterrupted_rewards(dataset, baseline, tiny_model_dir):
    digest = _digest(dataset)
    total = sum(len(v) for v in baseline.values())
    points = sorted(random.Random(6).sample(range(12, total - 12), 2))
    lock = dest_lock(dataset)
    # First kill while the run starts (lock taken, nothing scored yet), then at random saved positions.
    proc = _start(dataset, tiny_model_dir, "0.03")
    _wait_for(lock.exists, proc)
    proc.kill()
    proc.wait()
    _assert_untouched(dataset, digest)
    saved = 0
    for point in points:
        proc = _start(dataset, tiny_model_dir, "0.03")
        _wait_for(lambda point=point: (_state(dataset) or {}).get("done", 0) >= point, proc)
        proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        _assert_untouched(dataset, digest)
        state = _state(dataset)
        assert state["done"] >= point and state["done"] >= saved  # progress is kept across kills
        saved = state["done"]
    final = subprocess.run(
        relabel_args(dataset, tiny_model_dir, "--batch-size", "2", "--checkpoint-every", "10"),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert final.returncode == 0, final.stderr
    assert "stale lock" in final.stderr  # the last kill left its lock behind
    got = read_rewards(dataset)
    assert got.keys() == baseline.keys()
    for name in baseline:
        np.testing.assert_array_equal(got[name], baseline[name])  # bit for bit
    assert not work_dir(dataset, "vlm_reward").exists()  # sidecar removed after the write
    assert not lock.exists()


def test_sigterm_saves_progress_exits_143_and_second_run_is_refused(dataset, baseline, tiny_model_dir):
    digest = _digest(dataset)
    proc = _start(dataset, tiny_model_dir, "0.05")
    _wait_for(lambda: (_state(dataset) or {}).get("done", 0) >= 30, proc)
    # A second run on the same file refuses, naming the first one.
    with pytest.raises(LockedError, match=rf"PID {proc.pid} on {socket.gethostname()}"):
        relabel_file(_request(dataset, tiny_model_dir))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "SIGTERM received" in stderr and "run the same command again to resume" in stderr
    _assert_untouched(dataset, digest)
    state = _state(dataset)
    assert state["done"] >= 30
    assert not dest_lock(dataset).exists()  # released on the graceful path
    notes: list[str] = []
    summary = relabel_file(_request(dataset, tiny_model_dir), events=Events(on_note=notes.append))
    assert summary.result.resumed == state["done"]
    assert any("resuming" in n for n in notes)
    got = read_rewards(dataset)
    for name in baseline:
        np.testing.assert_array_equal(got[name], baseline[name])


def _interrupt_after(frames: int, signum: int = signal.SIGTERM):
    """An on_progress callback that sends this process ``signum`` once ``frames`` are scored."""
    seen = [0]

    def callback(count: int) -> None:
        seen[0] += count
        if seen[0] >= frames:
            os.kill(os.getpid(), signum)

    return callback


def test_resume_keeps_the_saved_batch_size(tmp_path, dataset, baseline, tiny_model_dir):
    with pytest.raises(Interrupted) as info:
        relabel_file(_request(dataset, tiny_model_dir), events=Events(on_progress=_interrupt_after(51, signal.SIGINT)))
    assert info.value.exit_code == 130 and "SIGINT received" in str(info.value)
    assert _state(dataset)["done"] == 52  # the batch in flight finished and was saved
    assert not dest_lock(dataset).exists()
    notes: list[str] = []
    relabel_file(_request(dataset, tiny_model_dir, batch_size=7), events=Events(on_note=notes.append))
    assert any("resuming with --batch-size 2" in n for n in notes)
    got = read_rewards(dataset)
    for name in baseline:
        np.testing.assert_array_equal(got[name], baseline[name])


def _fail_after(frames: int, error: Exception):
    seen = [0]

    def callback(count: int) -> None:
        seen[0] += count
        if seen[0] >= frames:
            raise error

    return callback


def test_a_lost_decoding_worker_keeps_progress_and_bad_data_does_not(dataset, baseline, tiny_model_dir):
    """A worker killed by the out-of-memory killer is a fault, like a kill: the rerun takes the progress up. A
    refused frame means the data changed or is bad: what was saved is dropped."""
    lost = WorkerLost("a decoding worker stopped unexpectedly (killed by signal 9; out of memory?)")
    with pytest.raises(WorkerLost):
        relabel_file(_request(dataset, tiny_model_dir), events=Events(on_progress=_fail_after(30, lost)))
    assert _state(dataset)["done"] >= 20  # the last checkpoint (every 10 frames) before the failure
    notes: list[str] = []
    relabel_file(_request(dataset, tiny_model_dir), events=Events(on_note=notes.append))
    assert any("resuming" in n for n in notes)
    got = read_rewards(dataset)
    for name in baseline:
        np.testing.assert_array_equal(got[name], baseline[name])
    other = make_dataset(dataset.parent / "other.h5")
    with pytest.raises(SourceError):
        relabel_file(
            _request(other, tiny_model_dir), events=Events(on_progress=_fail_after(30, SourceError("frame 3 is bad")))
        )
    assert _state(other) is None


def test_a_rerun_after_a_kill_past_the_write_clears_what_that_run_left(dataset, tiny_model_dir, monkeypatch):
    """Killed after its rewards landed but before its cleanup, a run leaves its progress and its lock; the
    identical rerun finds the rewards written and removes them, unless a live run holds the lock."""
    from vlmlabel.files import liveness
    from vlmlabel.run import lifecycle

    with monkeypatch.context() as patched:
        patched.setattr(lifecycle, "_discard", lambda checkpoints, work: None)  # the kill: no cleanup
        relabel_file(_request(dataset, tiny_model_dir))
    work, lock = work_dir(dataset, "vlm_reward"), dest_lock(dataset)
    assert (work / "progress" / "state.json").exists()
    live = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": liveness.process_start(os.getpid())}
    lock.write_text(json.dumps(live))
    assert isinstance(relabel_file(_request(dataset, tiny_model_dir)), FinishedSummary)
    assert (work / "progress").exists() and lock.exists()  # a live run's: left alone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({**live, "pid": int(gone.stdout), "proc_start": "0"}))
    notes: list[str] = []
    assert isinstance(
        relabel_file(_request(dataset, tiny_model_dir), events=Events(on_note=notes.append)), FinishedSummary
    )
    assert not work.exists() and not lock.exists()
    assert any("already written" in n for n in notes) and any("stale lock" in n for n in notes)


def test_changed_goal_invalidates_and_restart_discards(tmp_path, tiny_model_dir):
    dataset = make_dataset(tmp_path / "small.h5", lengths=(9, 14, 6))
    with pytest.raises(Interrupted):
        relabel_file(_request(dataset, tiny_model_dir), events=Events(on_progress=_interrupt_after(12)))
    notes: list[str] = []
    with pytest.raises(Interrupted):
        relabel_file(
            _request(dataset, tiny_model_dir, goals=["a blue cup"]),
            events=Events(on_progress=_interrupt_after(8), on_note=notes.append),
        )
    assert any("other options (goals differ)" in n for n in notes)
    assert _state(dataset)["identity"]["goals"] == ["a blue cup"]
    notes.clear()
    summary = relabel_file(
        _request(dataset, tiny_model_dir, goals=["a blue cup"], restart=True), events=Events(on_note=notes.append)
    )
    assert any("--restart" in n for n in notes)
    assert summary.result.resumed == 0
    other = tmp_path / "other.h5"
    copy = make_dataset(tmp_path / "copy.h5", lengths=(9, 14, 6))
    relabel_file(_request(copy, tiny_model_dir, goals=["a blue cup"], output=other))
    got, expected = read_rewards(dataset), read_rewards(other)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_stale_lock_is_taken_over_and_foreign_host_lock_refuses(dataset, tiny_model_dir):
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = dest_lock(dataset)
    lock.write_text(
        json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "earlier", "command": "vlmlabel relabel"})
    )
    notes: list[str] = []
    relabel_file(_request(dataset, tiny_model_dir, batch_size=32), events=Events(on_note=notes.append))
    assert any(f"stale lock left by a run that is gone (PID {gone.pid}" in n for n in notes)
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 1234, "host": "node-elsewhere", "started": "now", "command": "vlmlabel"}))
    result = CliRunner().invoke(
        app,
        [
            "relabel",
            str(dataset),
            "-g",
            "a cup",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--reward-key",
            "other",
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    assert "PID 1234 on node-elsewhere" in result.output and f"remove {lock}" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert lock.exists()  # someone else's lock is never removed


def test_checkpoint_ignores_rows_written_after_its_last_state(tmp_path):
    folder = tmp_path / "progress"
    checkpoint = Checkpoint(folder, {"goals": ["a"]}, {"device": "cpu"}, goals=2)
    checkpoint.begin(batch_size=4, start=8, stop=40)
    first = np.arange(16, dtype=np.float32).reshape(8, 2)
    checkpoint.save(16, first)
    checkpoint.flush()
    checkpoint.close()
    with open(folder / "rewards.f32", "ab") as handle:  # a kill after appending, before the state was replaced
        handle.write(np.ones(6, np.float32).tobytes())
    again = Checkpoint(folder, {"goals": ["a"]}, {"device": "cpu"}, goals=2)
    progress = again.load(restart=False)
    assert (progress.batch_size, progress.start, progress.stop, progress.done) == (4, 8, 40, 16)
    np.testing.assert_array_equal(progress.rows, first)
    again.resume_from(progress)
    again.save(20, np.full((4, 2), 7, np.float32))
    again.flush()
    again.close()
    rows = Checkpoint(folder, {"goals": ["a"]}, {"device": "cpu"}, goals=2).load(restart=False).rows
    np.testing.assert_array_equal(rows, np.concatenate([first, np.full((4, 2), 7, np.float32)]))
    notes: list[str] = []
    other_device = Checkpoint(
        folder, {"goals": ["a"]}, {"device": "cuda NVIDIA H100"}, goals=2, events=Events(on_note=notes.append)
    )
    assert other_device.load(restart=False) is None
    assert "another device" in notes[0] and not folder.exists()


def test_a_lock_killed_while_being_taken_is_never_empty_and_is_taken_over(tmp_path):
    """kill -9 of a process taking and releasing a lock in a loop: the lock left, if any, names its dead owner
    (it appears whole, through a hard link), so the next run takes it over at once."""
    from vlmlabel.run.locking import RunLock

    lock = tmp_path / "data.h5.vlmlabel.lock"
    loop = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        from pathlib import Path
        from vlmlabel.run.locking import RunLock
        print("go", flush=True)
        while True:
            with RunLock(Path({str(lock)!r}), "data.h5"):
                pass
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert loop.stdout is not None and loop.stdout.readline().strip() == "go"
    for _ in range(5):
        time.sleep(0.2)
        os.kill(loop.pid, signal.SIGSTOP)  # freeze it mid-loop: the lock is there whole, or not at all
        assert not lock.exists() or json.loads(lock.read_text())["pid"] == loop.pid
        os.kill(loop.pid, signal.SIGCONT)
    loop.kill()
    loop.wait()
    started = time.monotonic()
    with RunLock(lock, "data.h5"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - started < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither lock nor the dead run's temp file is left
