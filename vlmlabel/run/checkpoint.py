"""Progress sidecar: rewards computed so far, saved so a killed or pre-empted run can resume.

The sidecar is a folder beside the destination holding ``rewards.f32`` (rows appended in
order, float32) and ``state.json`` (how many rows are valid, and what made them), replaced
atomically after the rows are on disk. A kill at any moment leaves either the previous or
the new state, never a torn one; rows past the recorded count are ignored.

Saves are written by a background thread (appending and fsyncing takes tens of milliseconds
that the device should spend computing); ``flush`` waits for them.

A checkpoint is only reused when everything that determines the rewards is the same
(``identity``) and the arithmetic will be the same (``numerics``: device kind, torch);
the batch size it was made with is kept on resume, since batch composition changes the
last bits of fp32 results.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmlabel.errors import VlmlabelError
from vlmlabel.events import QUIET, Events
from vlmlabel.files import atomic
from vlmlabel.metadata import JsonObject

STATE_FILE = "state.json"
ROWS_FILE = "rewards.f32"


def device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


def run_numerics(device: torch.device) -> dict[str, str]:
    """What changes the last bits of the results without changing what they mean."""
    return {"device": device_kind(device), "torch": torch.__version__}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the fields that differ, for messages."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


# The identity's record of the source files' sizes and times: vlmlabel's own writes into the file (rewards, a
# cache) move it, while the ``frames`` fingerprint, which also is in the identity, says what the frames are.
FILE_STATE = frozenset({"stamp"})


def frame_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``differences`` of two identities but for ``FILE_STATE``: results tied to the frames, not to file times."""
    return [k for k in differences(saved, current) if k not in FILE_STATE]


@dataclass
class Progress:
    """Where a run stands: rows [start, done) of its frame range [start, stop) are computed."""

    batch_size: int
    start: int
    stop: int
    done: int
    rows: np.ndarray  # (done - start, goals) float32


class Checkpoint:
    """A progress sidecar folder for one run (a whole file or one shard)."""

    def __init__(
        self,
        folder: Path,
        identity: dict[str, Any],
        numerics: dict[str, str],
        goals: int,
        events: Events = QUIET,
    ):
        self.folder = folder
        self.identity = identity
        self.numerics = numerics
        self.goals = goals
        self.events = events
        self._state: dict[str, Any] | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def _note(self, message: str) -> None:
        self.events.note(message)

    def load(self, restart: bool) -> Progress | None:
        """Saved progress usable by this run, or None (with a note saying why it was discarded)."""
        if not self.folder.exists():
            return None
        if restart:
            self._note(f"--restart: discarding saved progress in {self.folder}")
            self.discard()
            return None
        try:  # every value used below, with its type checked: a damaged state is only a reason to start over
            state = JsonObject.read(self.folder / STATE_FILE)
            done, start, stop, batch_size = (state.get(key, int) for key in ("done", "start", "stop", "batch_size"))
            saved, numerics = state.object("identity", required=True), state.object("numerics", required=True)
            count = (done - start) * self.goals
            rows = np.fromfile(self.folder / ROWS_FILE, dtype="<f4", count=count)
        except (OSError, ValueError, VlmlabelError):
            self._note(f"saved progress in {self.folder} is unreadable; starting over")
            self.discard()
            return None
        changed = differences(saved.values, self.identity)
        if changed:
            self._note(
                f"saved progress in {self.folder} was made with other options ({', '.join(changed)} "
                "differ); starting over"
            )
            self.discard()
            return None
        changed = differences(numerics.values, self.numerics)
        if changed:
            self._note(
                f"saved progress in {self.folder} was computed with another {', '.join(changed)} "
                f"({numerics.values} vs {self.numerics}); starting over so every reward comes from "
                "the same arithmetic"
            )
            self.discard()
            return None
        if rows.size != count or self.goals < 1:
            self._note(f"saved progress in {self.folder} is incomplete; starting over")
            self.discard()
            return None
        self._state = state.values
        return Progress(batch_size, start, stop, done, rows.reshape(done - start, self.goals))

    def begin(self, batch_size: int, start: int, stop: int) -> None:
        """Start a fresh sidecar for rows [start, stop) computed with ``batch_size``."""
        self.discard()
        self.folder.mkdir(parents=True)
        (self.folder / ROWS_FILE).touch()
        self._state = {
            "identity": self.identity,
            "numerics": self.numerics,
            "batch_size": batch_size,
            "start": start,
            "stop": stop,
            "done": start,
            "goals": self.goals,
        }
        self._write_state()

    def resume_from(self, progress: Progress) -> None:
        """Continue a loaded sidecar: drop rows written after its last saved state."""
        with open(self.folder / ROWS_FILE, "r+b") as handle:
            handle.truncate((progress.done - progress.start) * self.goals * 4)

    def save(self, done: int, new_rows: np.ndarray) -> None:
        """Queue ``new_rows`` (ending at row ``done``) to be appended, made durable, then recorded."""
        assert self._state is not None, "begin() or load() first"
        self._raise_error()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="vlmlabel-checkpoint", daemon=True)
            self._writer.start()
        self._queue.put((done, np.array(new_rows, dtype="<f4", copy=True)))

    def flush(self) -> None:
        """Wait until every queued save is on disk; raise the error of one that failed."""
        if self._writer is not None:
            self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Finish queued saves and stop the writer thread (errors are left to ``flush``)."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._append(*item)
            except BaseException as exc:  # handed to the scoring loop by flush()/save()
                self._error = exc
            finally:
                self._queue.task_done()

    def _append(self, done: int, rows: np.ndarray) -> None:
        with open(self.folder / ROWS_FILE, "ab") as handle:
            handle.write(rows.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        assert self._state is not None  # save() checked it before queueing the rows
        self._state["done"] = done
        self._write_state()

    def _write_state(self) -> None:
        atomic.write_bytes(self.folder / STATE_FILE, json.dumps(self._state).encode())

    @property
    def holds_rows(self) -> bool:
        """Whether any computed row was saved (else there is nothing worth keeping after a failure). Progress this
        run has not taken up yet (another camera's, scored later) is the last run's: it counts as kept."""
        if self._state is None:
            return (self.folder / STATE_FILE).exists()
        return int(self._state["done"]) > int(self._state["start"])

    def made_for(self, ignoring: frozenset[str] = frozenset()) -> bool:
        """Whether the progress saved in the folder is towards this run's very result (``ignoring`` those fields
        of the identity); False when there is none or it cannot be read."""
        try:
            saved = JsonObject.read(self.folder / STATE_FILE).object("identity", required=True)
        except VlmlabelError:
            return False
        return set(differences(saved.values, self.identity)) <= ignoring

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
