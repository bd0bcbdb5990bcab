"""Where rewards go: one ``Destination`` per output family, chosen here and only here.

The registry maps each kind of source to the family that keeps its format: the HDF5 file itself (or an
``--output`` copy), a new save_to_disk / parquet / LeRobot dataset, or a parquet sidecar for a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vlmlabel.destinations.base import Destination, RewardColumn, Stamp
from vlmlabel.sources.base import Episode, FrameSource, SourceKind

__all__ = ["Destination", "RewardColumn", "Stamp", "destination_for", "destination_path", "family_of"]


class DestinationClass(Protocol):
    """A destination class. Its source is ``Any``: each class takes its own source class, which the registry
    pairs with it by ``SourceKind`` (something the types cannot say)."""

    def __call__(self, source: Any, output: Path | None, episodes: list[Episode], link: bool) -> Destination: ...

    def default_output(self, source: Any) -> Path: ...


@dataclass(frozen=True)
class Family:
    """An output family: how to build its destination, and how ``--push-to-hub`` uploads what it wrote."""

    build: DestinationClass
    push_as_dataset: bool  # through `datasets` (save_to_disk folders); else the files as they are
    what: str  # what the user gets, for `inspect`


def _families() -> dict[SourceKind, Family]:
    from vlmlabel.destinations.hdf5 import HDF5Destination
    from vlmlabel.destinations.lerobot import LeRobotDestination
    from vlmlabel.destinations.sidecar import SidecarDestination
    from vlmlabel.destinations.tables import DiskDestination, HubDownloadDestination, ParquetDestination

    return {
        SourceKind.hdf5: Family(HDF5Destination, False, "float32 datasets beside each episode's data in"),
        SourceKind.disk: Family(DiskDestination, True, "new float32 column(s) of a new save_to_disk dataset"),
        SourceKind.hub: Family(HubDownloadDestination, True, "new float32 column(s) of a new save_to_disk dataset"),
        SourceKind.parquet: Family(ParquetDestination, False, "new float32 column(s) of new parquet files"),
        SourceKind.lerobot: Family(LeRobotDestination, False, "new float32 column(s) of a new LeRobot dataset"),
        SourceKind.stream: Family(SidecarDestination, False, "a parquet sidecar keyed by episode and frame"),
    }


def family_of(source: FrameSource) -> Family:
    return _families()[source.kind]


def destination_for(source: FrameSource, output: Path | None, episodes: list[Episode],
                    link: bool = False) -> Destination:
    """The destination of ``source``'s rewards: ``output`` when given, else the family's default place.

    ``link``: files a new dataset carries over unchanged are hard-linked to the source's, not copied."""
    return family_of(source).build(source, output, episodes, link)


def destination_path(source: FrameSource, output: Path | None) -> Path:
    """Where ``source``'s rewards go, without building the destination (merge looks for parts beside it)."""
    return output.absolute() if output is not None else family_of(source).build.default_output(source)
