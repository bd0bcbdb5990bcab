"""Whether a process of this host still runs: the one check behind stale locks, dead runs' leftovers and
interrupted journals.

A PID alone is not an owner: once its process is gone the number can name another one. Where the owner's start
time was recorded (``process_start``), a process with that PID but another start time is not the owner.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``); None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host exists (one of another user counts) and, when its start time
    ``start`` was recorded and its present one can be read, is still the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    if start is None:
        return True
    current = process_start(pid)
    return current is None or current == start
