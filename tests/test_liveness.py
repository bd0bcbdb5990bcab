"""The one process-liveness check (``files.liveness``): a PID that is gone, a live one, and a PID that now names
another process than the one whose start time was recorded; and the callers that go by it (leftovers beside a
target, lock holders)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from vlmlabel.files import atomic, liveness
from vlmlabel.run.locking import holder_alive

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="process start times are read from Linux /proc")


@pytest.fixture
def child() -> Iterator[subprocess.Popen]:
    """A live process other than this one, stopped at the end."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the PID names no process now
    return process.pid


def test_a_process_that_has_exited_is_not_alive():
    pid = _dead_pid()
    assert not liveness.alive(pid)
    assert not liveness.alive(pid, "12345")
    assert liveness.process_start(pid) is None


def test_a_live_process_is_alive_with_or_without_its_start_time(child):
    start = liveness.process_start(child.pid)
    assert start is not None
    assert liveness.alive(child.pid) and liveness.alive(child.pid, start)
    assert liveness.alive(os.getpid(), liveness.process_start(os.getpid()))


def test_a_reused_pid_with_another_start_time_is_not_the_owner(child):
    """The PID exists, but the process that recorded it started at another time: it is gone."""
    start = liveness.process_start(child.pid)
    assert start is not None
    assert not liveness.alive(child.pid, str(int(start) - 1))
    assert not liveness.alive(child.pid, "0")


def test_the_start_time_is_the_kernels_clock_ticks_since_boot():
    """proc(5): field 22 of /proc/PID/stat is the start in clock ticks since boot, i.e. CLOCK_BOOTTIME."""
    ticks = os.sysconf("SC_CLK_TCK")
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    try:
        start = liveness.process_start(process.pid)
    finally:
        process.kill()
        process.wait()
    assert start is not None
    assert int(before * ticks) - 1 <= int(start) <= int(after * ticks) + 1


def test_a_start_time_that_cannot_be_read_now_does_not_make_a_live_pid_dead(child, monkeypatch):
    monkeypatch.setattr(liveness, "process_start", lambda pid: None)
    assert liveness.alive(child.pid, "0")


def test_a_process_of_another_user_counts_as_alive(monkeypatch):
    def refused(pid: int, signal: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(liveness.os, "kill", refused)
    assert liveness.alive(1)


def test_leftovers_and_lock_holders_go_by_the_same_check(tmp_path, child):
    """A dead run's leftover beside a target, and a lock whose recorded owner is gone or was replaced under its
    PID, are judged by ``liveness.alive`` alike."""
    target = tmp_path / "data.h5"
    live = atomic.Leftover(atomic.beside(target, "tmp"), atomic.HOST, child.pid)
    dead = atomic.Leftover(atomic.beside(target, "tmp"), atomic.HOST, _dead_pid())
    assert not live.dead and dead.dead
    owner = {"pid": child.pid, "host": socket.gethostname(), "proc_start": liveness.process_start(child.pid)}
    assert holder_alive(owner)
    assert not holder_alive({**owner, "proc_start": "0"})  # the PID now names another process
    assert not holder_alive({**owner, "pid": dead.pid})
