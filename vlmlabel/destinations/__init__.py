"""Where rewards go: one ``Destination`` per output family, chosen here and only here.

The registry maps each kind of source to the family that keeps its format: the HDF5 file itself (or an
``--output`` copy), a new save_to_disk / parquet / LeRobot dataset, or a parquet sidecar for a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vlmlabel.destinations.base import Destination, RewardColumn, check_output_suffix
from vlmlabel.destinations.hdf5 import HDF5Destination
from vlmlabel.destinations.lerobot import LeRobotDestination
from vlmlabel.destinations.sidecar import SidecarDestination
from vlmlabel.destinations.tables import DiskDestination, HubDownloadDestination, ParquetDestination
from vlmlabel.sources.base import Episode, FrameSource, SourceKind

__all__ = ["Destination", "RewardColumn", "destination_for", "destination_path", "family_of"]


class DestinationClass(Protocol):
    """A destination class. Its source is ``Any``: each class takes its own source class, which the registry
    pairs with it by ``SourceKind`` (something the types cannot say)."""

    def __call__(self, source: Any, output: Path | None, episodes: list[Episode], link: bool) -> Destination: ...

    def default_output(self, source: Any) -> Path: ...

    def output_suffixes(self, source: Any) -> tuple[str, ...]:
        """How the name of a file written for ``source`` may end (the first one advised); () when a folder is."""
        ...


@dataclass(frozen=True)
class Family:
    """An output family: how to build its destination, and how ``--push-to-hub`` uploads what it wrote."""

    build: DestinationClass
    push_as_dataset: bool  # through `datasets` (save_to_disk folders); else the files as they are
    what: str  # what the user gets, for `inspect`
    format: str  # the format written, for messages

    def check_output(self, source: FrameSource, output: Path) -> None:
        """Refuse an ``--output`` named for another format than the one written for ``source``, which vlmlabel's own
        readers (and any other tool) would then take for what it is not: a file's name ends in one of its
        format's suffixes; a folder's in none of a file format's (.h5, .parquet, ...)."""
        check_output_suffix(output, self.build.output_suffixes(source), self.format)


def _families() -> dict[SourceKind, Family]:
    return {
        SourceKind.hdf5: Family(HDF5Destination, False, "float32 datasets beside each episode's data in", "HDF5"),
        SourceKind.disk: Family(
            DiskDestination, True, "new float32 column(s) of a new save_to_disk dataset", "a save_to_disk dataset"
        ),
        SourceKind.hub: Family(
            HubDownloadDestination,
            True,
            "new float32 column(s) of a new save_to_disk dataset",
            "a save_to_disk dataset",
        ),
        SourceKind.parquet: Family(ParquetDestination, False, "new float32 column(s) of new parquet files", "parquet"),
        SourceKind.lerobot: Family(
            LeRobotDestination, False, "new float32 column(s) of a new LeRobot dataset", "a LeRobot dataset"
        ),
        SourceKind.stream: Family(
            SidecarDestination, False, "a parquet sidecar keyed by episode and frame", "a parquet sidecar"
        ),
    }


def family_of(source: FrameSource) -> Family:
    return _families()[source.kind]


def destination_for(
    source: FrameSource, output: Path | None, episodes: list[Episode], link: bool = False
) -> Destination:
    """The destination of ``source``'s rewards: ``output`` when given, else the family's default place.

    ``link``: files a new dataset carries over unchanged are hard-linked to the source's, not copied. An ``output``
    named for another format is refused (``Family.check_output``)."""
    family = family_of(source)
    if output is not None:
        family.check_output(source, output)
    return family.build(source, output, episodes, link)


def destination_path(source: FrameSource, output: Path | None) -> Path:
    """Where ``source``'s rewards go, without building the destination (merge looks for parts beside it)."""
    family = family_of(source)
    if output is None:
        return family.build.default_output(source)
    family.check_output(source, output)
    return output.absolute()
