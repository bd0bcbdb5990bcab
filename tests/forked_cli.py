"""The vlmlabel command in a process of its own, forked from a server that has already imported it.

``python -m vlmlabel`` spends about 3 s importing torch and open_clip before it does anything; tests that start
many short runs (signals at each phase of each command) fork them instead from multiprocessing's fork server,
which ``decode_workers`` preloads with the CLI. Each run is still a separate process, in a session of its own:
its own signal handlers, its own exit code (``SystemExit`` from the CLI, or minus the signal that killed it), its
stderr in a file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

from vlmlabel.reader.decode_workers import start_server


def _main(args: list[str], environ: dict[str, str], stderr: str) -> None:
    """The child: a new session, stdout discarded, stderr to a file, then the CLI as the console script runs it."""
    os.setsid()
    os.environ.clear()
    os.environ.update(environ)
    for fd, path in ((1, os.devnull), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["vlmlabel", *args]
    from vlmlabel.cli import app

    app(args, prog_name="vlmlabel")


class ForkedRun:
    """``vlmlabel ARGS`` running in a forked process with ``environ``; ``stderr`` is the file its stderr goes to."""

    def __init__(self, args: list[str], environ: dict[str, str], stderr: Path):
        self.stderr = stderr
        start_server()  # multiprocessing's fork server, with the CLI imported
        self.process = mp.get_context("forkserver").Process(
            target=_main, args=(args, environ, str(stderr)), daemon=True
        )
        self.process.start()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def wait_for(self, line: str, timeout: float = 120) -> bool:
        """Whether ``line`` appeared on its stderr before it ended (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stderr.exists() and line in self.stderr.read_text().splitlines():
                return True
            if not self.process.is_alive():
                return False
            time.sleep(0.02)
        return False

    def finish(self, timeout: float = 120) -> int:
        """Its exit code once it has ended (killed, -9, after ``timeout``)."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        assert self.process.exitcode is not None
        return self.process.exitcode
