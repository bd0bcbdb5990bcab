"""Signals are symmetric: SIGINT and SIGTERM stop every command in every phase the same clean way.

Each case starts a command in its own process group (SLURM and a terminal signal the whole group), lets it reach
a phase (``VLMLABEL_TEST_PAUSE_AT``, the test-only hook of ``files.interrupt.pause_at``), and signals it there:

- open: the lock taken, the model about to load (merge: the parts about to be read);
- score: the second batch (embed: while the cache's copy is being filled);
- write: the new file complete, not yet in place (an in-place write: its image in memory; embed: a full-size copy);
- commit: the journal written, the file not yet changed (in place only).

Every case exits with 128 + the signal's number and one line. Up to commit the source is byte-identical and
nothing but saved progress (or shard parts) stays beside it; at commit the write is finished whole and nothing
stays. The rerun then gives the reference rewards (embed: the embeddings of an uninterrupted run).

Steps that must finish once begun are checked in this process at the exact moment a signal could land: the
rename that puts a staged write in place, the lock being taken, and the cleanup that follows a first signal.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
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

from tests import layouts
from tests.cluster_files import ROOT, env, make_dataset
from tests.forked_cli import ForkedRun
from vlmlabel.cli import app
from vlmlabel.errors import Interrupted
from vlmlabel.events import Events
from vlmlabel.files import atomic
from vlmlabel.files.interrupt import check, stoppable
from vlmlabel.run import locking
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.locking import RunLock
from vlmlabel.run.request import RelabelRequest
from vlmlabel.run.shards import ShardSpec
from vlmlabel.sources import Align

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
GOAL = "a red block"
LENGTHS = (5, 7, 4)  # 16 frames, 4 batches of 4; two shards of whole episodes
PHASES = {
    "relabel": ("open", "score", "write", "commit"),
    "embed": ("open", "score", "write"),
    "merge": ("open", "write", "commit"),
}
CASES = [
    (command, phase, name) for command, phases in PHASES.items() for phase in phases for name in ("SIGINT", "SIGTERM")
]
WORK = "data.h5.vlmlabel-vlm_reward"  # saved progress and shard parts
# Run as the console command, a fresh interpreter (the others are forked with the CLI imported: tests.forked_cli):
# the issue's own case, and scoring with a decoding worker, which the signal to the process group reaches too.
CONSOLE = {("embed", "write", "SIGTERM"), ("relabel", "score", "SIGTERM")}


def _frames() -> np.ndarray:
    """The frames of ``make_dataset(LENGTHS)`` in file order."""
    return np.concatenate([layouts.make_frames(n, 20, 24, seed=100 + k) for k, n in enumerate(LENGTHS)])


def _args(command: str, source: Path, model: Path, workers: int = 0) -> list[str]:
    common = ["--model", str(model), "--device", "cpu", "--batch-size", "4", "--workers", str(workers), "-q"]
    if command == "relabel":
        return ["relabel", str(source), "--goal", GOAL, "--align", "frame", *common]
    if command == "embed":
        return ["embed", str(source), *common]
    return ["merge", str(source), "-q"]


def _rewards(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return np.concatenate([f[f"data/demo_{k}/vlm_reward"][()] for k in range(len(LENGTHS))])


def _embeddings(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, item: (
                found.update({name: item[()]}) if "vlm_embedding" in name and isinstance(item, h5py.Dataset) else None
            )
        )
    return found


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_model_dir) -> dict[str, np.ndarray]:
    """The embedding cache of an uninterrupted run."""
    source = make_dataset(tmp_path_factory.mktemp("embedded") / "data.h5", LENGTHS)
    result = runner.invoke(app, _args("embed", source, tiny_model_dir))
    assert result.exit_code == 0, result.output
    return _embeddings(source)


def _signal_at(phase: str, name: str, args: list[str], stderr: Path, console: bool) -> tuple[int, list[str]]:
    """Run ``vlmlabel ARGS`` (``console``: as the console command, else forked) until it pauses at ``phase``, then
    signal its process group: its exit code and the lines of stderr besides the pause's own."""
    marker = f"vlmlabel-test: paused at {phase}"
    environ = env(VLMLABEL_TEST_PAUSE_AT=phase)
    if console:
        with open(stderr, "w") as sink:
            run = subprocess.Popen(
                [sys.executable, "-m", "vlmlabel", *args],
                cwd=ROOT,
                env=environ,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 120
            while marker not in stderr.read_text().splitlines() and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            os.killpg(run.pid, getattr(signal, name))
            code = run.wait(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    else:
        forked = ForkedRun(args, environ, stderr)
        reached = forked.wait_for(marker)
        if reached:
            os.killpg(forked.pid, getattr(signal, name))
        code = forked.finish()
    lines = [line for line in stderr.read_text().splitlines() if line.strip()]
    assert marker in lines, f"the run ended without reaching {phase}: {lines}"
    return code, [line for line in lines if line != marker]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("command, phase, name", CASES)
def test_a_signal_in_any_phase_stops_cleanly_and_the_rerun_equals_the_reference(
    command, phase, name, tmp_path, tiny_model_dir, reference, embedded
):
    folder = tmp_path / "data"
    folder.mkdir()
    source = make_dataset(folder / "data.h5", LENGTHS)
    if command == "merge":
        for index in range(2):
            relabel_file(
                RelabelRequest(
                    source,
                    [GOAL],
                    model=str(tiny_model_dir),
                    device="cpu",
                    batch_size=4,
                    workers=0,
                    align=Align.frame,
                    shard=ShardSpec(index, 2),
                )
            )
    before = _digest(source)
    console = (command, phase, name) in CONSOLE
    args = _args(command, source, tiny_model_dir, workers=1 if console and phase == "score" else 0)

    code, lines = _signal_at(phase, name, args, tmp_path / "stderr.txt", console)

    assert code == 128 + getattr(signal, name), lines
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: {name} received"), lines
    left = {p.name for p in folder.iterdir()}
    if phase == "commit":  # the write was under way: finished whole, then stopped
        assert left == {"data.h5"}
        np.testing.assert_allclose(_rewards(source), reference(_frames(), [GOAL])[:, 0], atol=2e-3)
    else:
        assert _digest(source) == before
        assert left <= {"data.h5", WORK}  # no copy, no journal, no lock: only progress or parts
        if command == "relabel" and phase in ("score", "write"):
            assert (folder / WORK / "progress" / "state.json").exists()  # the batches scored are kept
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert {p.name for p in folder.iterdir()} == {"data.h5"}
    if command == "embed":
        got = _embeddings(source)
        assert got.keys() == embedded.keys()
        for key, values in embedded.items():
            np.testing.assert_array_equal(got[key], values)
    else:
        np.testing.assert_allclose(_rewards(source), reference(_frames(), [GOAL])[:, 0], atol=2e-3)


# -- the steps that must finish once begun, at the exact line a signal lands on ---------------------------------


def _deliver(signum: int) -> None:
    """What the interpreter does when the signal arrives here: run the handler installed for it."""
    handler = signal.getsignal(signum)
    assert callable(handler), "no handler installed: the process would die"
    handler(signum, None)


def test_a_signal_as_a_staged_write_is_renamed_lets_it_finish_then_stops(tmp_path, monkeypatch):
    target = tmp_path / "rewards.bin"
    target.write_bytes(b"old")
    rename = os.replace

    def replace_on_signal(src, dst):
        _deliver(signal.SIGTERM)
        rename(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_on_signal)
    went_on = []
    with pytest.raises(Interrupted) as info, stoppable():
        atomic.write_bytes(target, b"new")
        went_on.append(True)  # the step in hand finished; the signal stops the run at its next safe point
    assert info.value.exit_code == 143 and went_on
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["rewards.bin"]


def test_a_signal_as_the_lock_is_created_never_leaves_it_behind(tmp_path, monkeypatch):
    lock = tmp_path / "data.h5.vlmlabel.lock"
    link = os.link

    def link_then_signal(src, dst):
        link(src, dst)
        _deliver(signal.SIGINT)  # the lock exists; __enter__ has not returned yet

    monkeypatch.setattr(locking.os, "link", link_then_signal)
    with pytest.raises(Interrupted) as info, stoppable(), RunLock(lock, "data.h5"):
        assert lock.exists()
        check()  # the next safe point
    assert info.value.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_once_stopping_a_second_signal_does_not_cut_the_cleanup(tmp_path, monkeypatch):
    target = tmp_path / "data.h5"
    target.write_bytes(b"source")
    remove = atomic.remove

    def remove_on_signal(path):
        if path.exists():
            _deliver(signal.SIGINT)  # pressed again as the copy is being removed
        remove(path)

    monkeypatch.setattr(atomic, "remove", remove_on_signal)
    with pytest.raises(Interrupted) as info, stoppable(), atomic.staged(target) as tmp:
        tmp.write_bytes(b"half a copy")
        _deliver(signal.SIGTERM)
    assert info.value.exit_code == 143  # the first signal's
    assert [p.name for p in tmp_path.iterdir()] == ["data.h5"] and target.read_bytes() == b"source"


def test_once_stopping_further_signals_wait_for_every_finally_block():
    cleaned = []
    with pytest.raises(Interrupted) as info, stoppable():
        try:
            _deliver(signal.SIGTERM)
        finally:  # closing files, stopping workers, releasing buffers: no step of it may be cut
            _deliver(signal.SIGINT)
            _deliver(signal.SIGTERM)
            cleaned.append(True)
    assert info.value.exit_code == 143 and cleaned


@pytest.mark.subprocess
@pytest.mark.parametrize("where", ["read_at", "write_at"])
def test_sigterm_while_hdf5_builds_the_in_place_image_is_raised_whole(where, tmp_path):
    """The signal lands inside h5py's file driver (``journal.Overlay``), which keeps the exception and re-raises a
    copy: the copy is still the signal's ``Interrupted``, the file is untouched and the process exits normally."""
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    before = _digest(source)
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from pathlib import Path
        from vlmlabel.files import journal
        from vlmlabel.destinations.hdf5 import H5Dataset, write_file
        from vlmlabel.errors import Interrupted
        from vlmlabel.files.interrupt import stoppable

        real = journal.Overlay.{where}
        calls = [0]
        def signalled(self, *args):
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, *args)
        journal.Overlay.{where} = signalled
        path = Path({str(source)!r})
        try:
            with stoppable():
                write_file(path, path, [H5Dataset("data/demo_0/vlm_reward", np.zeros(5, np.float32))], False)
        except Interrupted as exc:
            print("interrupted", exc.exit_code)
        """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env()
    )
    assert (done.returncode, done.stdout.strip()) == (0, "interrupted 143"), done.stderr[-2000:]
    assert _digest(source) == before and [p.name for p in tmp_path.iterdir()] == ["data.h5"]


def _listening(port: int) -> bool:
    """Whether a process of this host listens on TCP ``port`` (Linux /proc/net/tcp, state 0A), without connecting."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            if any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A" for line in list(lines)[1:]):
                return True
    return False


@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="Linux /proc needed to see the rank waiting")
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_rank_waiting_for_the_others_ends_on_a_signal(name, tmp_path, tiny_model_dir):
    """torchrun's rank 0 waits, inside torch.distributed's C++ code, for a rank that never comes: no Python handler
    runs there, so the signal must end the process at once (as it would without vlmlabel), not hours later."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    ranks = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    run = ForkedRun(_args("relabel", source, tiny_model_dir), {**env(), **ranks}, tmp_path / "stderr.txt")
    deadline = time.monotonic() + 120
    while not _listening(port) and run.process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _listening(port), (tmp_path / "stderr.txt").read_text()
    os.killpg(run.pid, getattr(signal, name))
    assert run.finish(timeout=20) == -getattr(signal, name)
    assert [p.name for p in tmp_path.iterdir() if p.name != "stderr.txt"] == ["data.h5"]


def test_a_signal_as_scoring_starts_keeps_every_camera_s_saved_progress(tmp_path, tiny_model_dir):
    """Two cameras are scored one after the other, each with its own saved progress. A run stopped while the first
    camera's progress is taken up must keep the second's, which it has not opened yet."""
    source = tmp_path / "data.h5"
    with h5py.File(source, "w") as f:
        for k, length in enumerate(LENGTHS):
            for cam, name in enumerate(("agentview_image", "robot0_eye_in_hand_image")):
                f[f"data/demo_{k}/obs/{name}"] = layouts.make_frames(length, 20, 24, seed=200 + 10 * cam + k)
            f[f"data/demo_{k}/actions"] = np.zeros((length, 2), np.float32)
    request = RelabelRequest(
        source,
        [GOAL],
        model=str(tiny_model_dir),
        device="cpu",
        batch_size=4,
        workers=0,
        checkpoint_every=4,
        image_key=["obs/agentview_image", "obs/robot0_eye_in_hand_image"],
    )
    frames = sum(LENGTHS)
    seen = [0]

    def stop_in_second_camera(count: int) -> None:
        seen[0] += count
        if seen[0] >= frames + 8:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        relabel_file(request, events=Events(on_progress=stop_in_second_camera))
    second = tmp_path / WORK / "progress-cam1" / "state.json"
    assert second.exists()
    with pytest.raises(Interrupted):  # stopped as the first camera's (complete) progress is taken up
        relabel_file(request, events=Events(on_start=lambda total: os.kill(os.getpid(), signal.SIGTERM)))
    assert second.exists()
    summary = relabel_file(request)
    assert summary.result.resumed >= frames + 8
