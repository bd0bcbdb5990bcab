"""Which camera a source reads: the one ``--image-key`` names, else the only one it holds.

One chooser for every source; what differs between them is how their refusals name a camera and the place
they looked (``CameraChooser``), how a key is looked up and what is said when none is found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmlabel.errors import MULTI_CAMERA, SeveralCameras, SourceError


@dataclass(frozen=True)
class CameraChooser:
    """How a source's refusals say it: a camera is one of its ``noun`` ("image datasets", "image columns",
    "cameras") found in ``where``; ``--image-key KEY {absent}`` says that KEY names none; ``tail`` follows the
    list of those there."""

    noun: str
    where: str | Path
    absent: str
    tail: str = ""

    def choose(
        self,
        found: list[str],
        asked: str | None,
        find: Callable[[str], str | None],
        none: Callable[[], SourceError],
    ) -> str:
        """The key of the camera read: the one ``asked`` names (``find``: the key it names, or None), else the
        only one ``found``. Refused, listing those found, when ``asked`` names none or several are found (and
        none asked for); with ``none()`` when none is found and none asked for."""
        if asked is not None:
            key = find(asked)
            if key is None:
                listed = ", ".join(found) or "none"
                raise SourceError(f"--image-key {asked!r} {self.absent}; {self.noun} there: {listed}{self.tail}")
            return key
        if not found:
            raise none()
        if len(found) > 1:
            raise SeveralCameras(f"several {self.noun} in {self.where}: {', '.join(found)}; {MULTI_CAMERA}", found)
        return found[0]
