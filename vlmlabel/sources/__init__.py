"""Readers of frames and episode boundaries (IO only)."""

from __future__ import annotations

from pathlib import Path

from vlmlabel.errors import SeveralCameras, SourceError
from vlmlabel.files import journal
from vlmlabel.sources import lerobot, tables
from vlmlabel.sources.base import (
    FILE_SUFFIXES,
    PARQUET_SUFFIX,
    Align,
    DatasetSource,
    Episode,
    FrameFormat,
    FrameSource,
    Segment,
)
from vlmlabel.sources.hdf5 import HDF5Source
from vlmlabel.sources.streaming import open_streaming

__all__ = ["Align", "Episode", "FrameFormat", "FrameSource", "Segment", "HDF5Source", "open_any_camera", "open_source"]

_PARQUET_MAGIC = b"PAR1"


def _is_parquet_file(path: Path) -> bool:
    if path.suffix == PARQUET_SUFFIX:
        return True
    with open(path, "rb") as handle:
        return handle.read(4) == _PARQUET_MAGIC


def open_source(
    path: str,
    image_key: str | None = None,
    split: str = "train",
    revision: str | None = None,
    streaming: bool = False,
    nvdec_gpu: int | None = None,
) -> DatasetSource:
    """Open a dataset read-only, choosing the reader from what the path is.

    An HDF5 file; a LeRobot folder (meta/info.json); a `save_to_disk` folder; a parquet file, folder or
    glob; else, when nothing local has that name, a Hub dataset id ``org/name``. ``nvdec_gpu``: the CUDA device
    whose NVDEC decodes video (LeRobot video; nothing else is video).
    """
    given = Path(path)
    if any(ch in path for ch in "*?[") and not given.exists():
        return tables.open_parquet(path, image_key)
    if given.is_dir():
        if lerobot.is_lerobot(given):
            return lerobot.LeRobotSource(given, image_key, nvdec_gpu)
        if tables.is_disk_dataset(given):
            return tables.open_disk(given, image_key, split)
        if any(given.rglob("*.parquet")):
            return tables.open_parquet(path, image_key)
        raise SourceError(
            f"{given} is a folder but not a dataset vlmlabel reads (no meta/info.json, state.json, "
            "dataset_dict.json or parquet files)"
        )
    if given.is_file() and _is_parquet_file(given):
        return tables.open_parquet(path, image_key)
    if not given.exists() and tables.HUB_ID.fullmatch(path) and given.suffix not in FILE_SUFFIXES:
        if streaming:
            return open_streaming(path, image_key, split, revision)
        return tables.open_hub(path, image_key, split, revision)
    journal.recover(given)  # a write a killed run left half done is finished or undone before reading
    return HDF5Source(path, image_key)


def open_any_camera(
    path: str, image_key: str | None = None, split: str = "train", revision: str | None = None
) -> DatasetSource:
    """Open a dataset to read what is not frames (written rewards, episodes): with several cameras and none
    named, the first one does."""
    try:
        return open_source(path, image_key, split, revision)
    except SeveralCameras as several:
        return open_source(path, several.cameras[0], split, revision)
