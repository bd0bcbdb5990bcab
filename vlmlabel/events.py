"""What a run tells its caller while it works: one ``Events`` object travels instead of three callbacks.

A leaf module (nothing of vlmlabel imported), so the scoring loop, the cache, locks and checkpoints all
take it without reaching up into ``run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Events:
    """The frame total once known, frames done, and notes (resume, stale lock...); any may be left out."""

    on_start: Callable[[int], None] | None = None
    on_progress: Callable[[int], None] | None = None
    on_note: Callable[[str], None] | None = None

    def start(self, total: int) -> None:
        if self.on_start is not None:
            self.on_start(total)

    def progress(self, done: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done)

    def note(self, message: str) -> None:
        if self.on_note is not None:
            self.on_note(message)

    def started_by(self, on_start: Callable[[int], None] | None) -> Events:
        """The same events with another start (None: none), for a step whose total is not the run's."""
        return replace(self, on_start=on_start)

    def notes_only(self) -> Events:
        """Notes kept; start and progress dropped (a step that shows no bar)."""
        return Events(on_note=self.on_note)


QUIET = Events()
