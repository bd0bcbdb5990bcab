"""What every source gives the engine: episodes as lists of frame rows, and the rows themselves."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence, Union

import numpy as np


class Align(str, enum.Enum):
    """Which observation scores step t."""

    frame = "frame"  # o_t
    next = "next"  # o_{t+1}, as D4RL/robomimic rewards are defined


@dataclass(frozen=True)
class Segment:
    """Contiguous rows [start, stop) of one frame array."""

    array: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Episode:
    """One episode: how many rewards it gets, which frames score them, and where they are written."""

    name: str
    steps: int
    frames: tuple[Segment, ...]
    target: str


@dataclass(frozen=True)
class FrameFormat:
    """How frames are stored: raw arrays (HWC, CHW or HW grayscale) or encoded JPEG/PNG bytes."""

    layout: str  # "HWC" | "CHW" | "HW" | "encoded"
    frame_shape: tuple[int, ...]
    dtype: str

    @property
    def encoded(self) -> bool:
        return self.layout == "encoded"

    def describe(self) -> str:
        if self.encoded:
            return "encoded JPEG/PNG bytes"
        return f"{self.layout} {'x'.join(map(str, self.frame_shape))} {self.dtype}"


def reward_path(target: str, name: str) -> str:
    """Where a reward named ``name`` lands for episodes whose target is ``target`` ('' is the root)."""
    return f"{target}/{name}" if target else name


def step_segments(array: str, start: int, stop: int, align: Align, next_array: str | None = None) -> tuple[Segment, ...]:
    """Frame rows scoring steps [start, stop) of one episode stored contiguously in ``array``.

    next: step t is scored by o_{t+1}; the last step by ``next_array`` (the stored next observation)
    when there is one, else by its own frame.
    """
    if align is Align.frame:
        return (Segment(array, start, stop),)
    last = Segment(next_array, stop - 1, stop) if next_array else Segment(array, stop - 1, stop)
    body = (Segment(array, start + 1, stop),) if stop - start > 1 else ()
    return body + (last,)


# A block of frames as read: a uint8 array (raw) or a sequence of byte arrays (encoded).
FrameBlock = Union[np.ndarray, Sequence[np.ndarray]]


class FrameSource(Protocol):
    """A dataset opened read-only. IO only: no model, no torch."""

    layout: str
    image_key: str
    frame_format: FrameFormat

    def episodes(self, align: Align) -> list[Episode]: ...

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]: ...

    def close(self) -> None: ...


class EmbeddingStore(Protocol):
    """A source that can hold an embedding cache: per frame array, stored rows and their metadata.

    Rows are indexed by the frame array's own rows (not by steps), so one cache serves every alignment.
    Sources without these methods simply relabel from frames.
    """

    def array_rows(self, array: str) -> int: ...

    def embedding_location(self, array: str) -> str: ...

    def read_embedding_meta(self, location: str) -> tuple[dict, np.ndarray | None, int] | None: ...

    def read_embedding_blocks(self, location: str, max_rows: int) -> Iterator[np.ndarray]: ...


def stores_embeddings(source: object) -> bool:
    return all(hasattr(source, name) for name in
               ("array_rows", "embedding_location", "read_embedding_meta", "read_embedding_blocks"))


class CachingSource(FrameSource, EmbeddingStore, Protocol):
    """A frame source that also holds an embedding cache (HDF5 today)."""
