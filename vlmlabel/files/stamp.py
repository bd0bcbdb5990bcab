"""``Stamp``: size and modification time of every file a source reads, the one way a change is noticed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlabel.errors import OutputError


@dataclass(frozen=True)
class Stamp:
    """Size and modification time of every file a source reads: the one way a change is noticed.

    Paths are resolved, so the same dataset named another way (relative, through a link) has the same stamp."""

    files: tuple[tuple[str, int, int], ...]

    @classmethod
    def of(cls, paths: Iterable[Path]) -> Stamp:
        found = []
        for path in paths:
            stat = path.stat()
            found.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
        return cls(tuple(found))

    def as_json(self) -> list[list[Any]]:
        return [list(entry) for entry in self.files]

    def verify(self, where: object) -> None:
        """Refuse to write when a file read has changed since the stamp was taken."""
        try:
            changed = Stamp.of(Path(name) for name, _, _ in self.files) != self
        except OSError:
            changed = True
        if changed:
            raise OutputError(f"{where} changed while rewards were computed; nothing was written — run again")
