"""Readers of frames and episode boundaries (IO only)."""

from vlmlabel.sources.base import Align, Episode, FrameFormat, FrameSource, Segment
from vlmlabel.sources.hdf5 import HDF5Source

__all__ = ["Align", "Episode", "FrameFormat", "FrameSource", "Segment", "HDF5Source", "open_source"]


def open_source(path: str, image_key: str | None = None) -> FrameSource:
    """Open a dataset read-only, choosing the reader from what the path is."""
    return HDF5Source(path, image_key)
