"""What every source gives the engine: episodes as lists of frame rows, and the rows themselves."""

from __future__ import annotations

import enum
import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from vlmlabel.files.stamp import Stamp

# File names that say which format a file holds: open_source and the output families go by them.
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
PARQUET_SUFFIX = ".parquet"
FILE_SUFFIXES = (*HDF5_SUFFIXES, PARQUET_SUFFIX)
# The group an embedding cache occupies in an HDF5 file (``vlmlabel.cache`` lays it out): never frames, never
# an episode, wherever a source finds it.
EMBEDDING_GROUP = "vlm_embedding"


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8: bytes that are not UTF-8 (a shell's arguments, a file name, an
    attribute h5py decoded) reach Python as lone surrogates, which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_name(path: Path) -> bool:
    """Whether a path is UTF-8 (a Linux file name may be any bytes: HDF5 opens those, pyarrow does not)."""
    return is_utf8(str(path))


def show_path(path: Path) -> str:
    """A path for a message: as it is when UTF-8, else its bytes (those that are not UTF-8 escaped)."""
    return str(path) if utf8_name(path) else repr(os.fsencode(path))[2:-1]


class SourceKind(str, enum.Enum):
    """What a dataset is; ``vlmlabel.destinations`` maps each kind to the output family that keeps its format."""

    hdf5 = "hdf5"
    disk = "save_to_disk"
    parquet = "parquet"
    hub = "hub"
    stream = "hub (streaming)"
    lerobot = "lerobot"


class VideoDecoder(str, enum.Enum):
    """Where video is decoded: by FFmpeg on the CPU, or by the run's GPU's NVDEC engine (same pixels)."""

    cpu = "cpu"
    nvdec = "nvdec"


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
    identity: str = ""  # which episode of the data this is ('' : the name says it); runs of one episode share it
    per_observation: bool = False  # one value per observation, T+1 for T steps (Minari infos), not per step

    @property
    def key(self) -> str:
        return self.identity or self.name

    @property
    def transitions(self) -> int:
        """Steps (actions taken) in the episode: what per-step data such as the dataset's own rewards hold."""
        return self.steps - 1 if self.per_observation else self.steps


@dataclass(frozen=True)
class FrameFormat:
    """How frames are stored: raw arrays (HWC, CHW or HW grayscale) or encoded JPEG/PNG bytes."""

    axes: str  # pixel layout: "HWC" | "CHW" | "HW", or "encoded"
    frame_shape: tuple[int, ...]
    dtype: str

    @property
    def encoded(self) -> bool:
        return self.axes == "encoded"

    def describe(self) -> str:
        if self.encoded:
            return "encoded JPEG/PNG bytes"
        return f"{self.axes} {'x'.join(map(str, self.frame_shape))} {self.dtype}"


def reward_path(target: str, name: str) -> str:
    """Where a reward named ``name`` lands for episodes whose target is ``target`` ('' is the root)."""
    return f"{target}/{name}" if target else name


def step_segments(
    array: str, start: int, stop: int, align: Align, next_array: str | None = None
) -> tuple[Segment, ...]:
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
FrameBlock = np.ndarray | Sequence[np.ndarray]


class FrameSource(Protocol):
    """A dataset opened read-only. IO only: no model, no torch."""

    kind: SourceKind
    layout: str  # the file layout, for messages: "robomimic", "minari", "save_to_disk", "lerobot v3.0", ...
    image_key: str
    cameras: list[str]  # every image stream of the dataset (``image_key`` is the one read)
    frame_format: FrameFormat
    seekable: bool  # rows can be read in any order without reading those before them (not a stream)
    holds_outputs: bool  # vlmlabel writes rewards or its cache into the source's own files (HDF5)

    @property
    def paths(self) -> tuple[Path, ...]:
        """The files read, whose size and modification time tell that the dataset changed."""
        ...

    def episodes(self, align: Align) -> list[Episode]: ...

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]: ...

    def close(self) -> None: ...

    def __enter__(self) -> FrameSource: ...

    def __exit__(self, *exc: object) -> None: ...


class FrameReader(Protocol):
    """The rows of a source's frame arrays, and nothing else: what a decoding worker opens."""

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]: ...

    def close(self) -> None: ...


@runtime_checkable
class DirectReader(Protocol):
    """A reader of raw frames that can read rows straight into a caller's buffer (no intermediate array)."""

    def read_into(self, segment: Segment, out: np.ndarray) -> bool:
        """False, reading nothing, when the rows are not of ``out``'s dtype and frame shape."""
        ...


class SourceRecipe(Protocol):
    """How to open a source's frames again in another process: picklable, by path, read-only.

    Decoding workers cannot share open file handles, so each opens the source itself from this.
    """

    @property
    def decodes(self) -> bool:
        """Reading a row costs CPU beyond a copy (encoded images, compressed chunks, Arrow lists, video)."""
        ...

    def open(self) -> FrameReader: ...


@runtime_checkable
class Reopenable(Protocol):
    """A source that can say how to open its frames again elsewhere (None: it cannot, e.g. a stream)."""

    def recipe(self) -> SourceRecipe | None: ...


class EmbeddingStore(Protocol):
    """Where a source's embedding cache lives; ``vlmlabel.cache`` alone reads, matches and writes it.

    The cache is kept per frame array and indexed by that array's own rows (``array_rows`` of them), not by
    steps, so one cache serves every alignment. ``cache_file`` is the HDF5 file that holds it (the HDF5 source
    itself, or a file beside a table dataset); None when the source cannot keep one (a stream).
    ``cache_groups``: groups of that file whose frame arrays keep their cache inside them, beside the frames (an
    HDF5 source's episode groups). ``cache_scope``: a group the whole cache is kept under ('' for none; a table
    dataset's split).
    """

    cache_file: Path | None

    @property
    def cache_groups(self) -> frozenset[str]: ...

    @property
    def cache_scope(self) -> str: ...

    def array_rows(self, array: str) -> int: ...


class LabelledData(Protocol):
    """What ``evaluate`` and ``plot`` read back from a labelled dataset: per-step values and their provenance."""

    def step_values(self, episode: Episode, key: str) -> np.ndarray | None:
        """Values of ``key`` for ``episode`` as ``episodes(Align.frame)`` gives it (its frames are its rows)."""

    def dataset_attrs(self, episode: Episode, key: str) -> dict | None: ...

    def reward_keys(self, episode: Episode) -> list[str]: ...


class CachingSource(FrameSource, EmbeddingStore, Protocol):
    """A frame source that also holds an embedding cache."""


class DatasetSource(CachingSource, LabelledData, Protocol):
    """A dataset as ``open_source`` opens it: frames, an embedding cache, and the per-step values written to it."""

    def __enter__(self) -> DatasetSource: ...


FINGERPRINT_SAMPLES = 8


@runtime_checkable
class StorageDescribed(Protocol):
    """A source whose files vlmlabel writes into, so only the stored bytes of its frames say they changed."""

    def storage_digest(self, arrays: list[str]) -> str: ...


def content_fingerprint(source: FrameSource, frame_episodes: list[Episode] | None = None) -> str:
    """A digest of what the frames are: image key, format, episode lengths, and what says their content.

    Where vlmlabel never writes into the source's files (tables, LeRobot), their sizes and modification
    times are part of it too, so any edit counts. An HDF5 file receives rewards and caches in place, so there
    every stored byte of its frame arrays speaks for the content (``StorageDescribed``; read once per version
    of the file). Other sources add a few sampled frames; a stream, which cannot seek, its first frame only.
    ``frame_episodes``: the frame-aligned episodes when the caller already has them.
    """
    episodes = frame_episodes if frame_episodes is not None else source.episodes(Align.frame)
    digest = hashlib.sha256()
    digest.update(repr((source.image_key, source.frame_format, [e.steps for e in episodes])).encode())
    if not source.holds_outputs:
        digest.update(repr(Stamp.of(source.paths).files).encode())
    if isinstance(source, StorageDescribed):  # every stored byte already counts: sampled frames add nothing
        digest.update(source.storage_digest(sorted({s.array for e in episodes for s in e.frames})).encode())
        return digest.hexdigest()[:32]
    count = min(len(episodes), FINGERPRINT_SAMPLES if source.seekable else 1)
    picks = sorted({round(i * (len(episodes) - 1) / max(count - 1, 1)) for i in range(count)})
    for index in picks:
        first = episodes[index].frames[0]
        block = next(iter(source.read_blocks(Segment(first.array, first.start, first.start + 1), 1)))
        for frame in block:
            digest.update(np.ascontiguousarray(np.asarray(frame)).tobytes())
    return digest.hexdigest()[:32]


_MODES = {1: "grayscale", 3: "RGB", 4: "RGBA"}


def describe_frames(source: FrameSource, segment: Segment) -> str:
    """``frame_format.describe()`` plus the resolution of the frame at ``segment.start`` where the format does
    not state it (encoded images: their header is read; videos: the frame is decoded), e.g.
    "encoded PNG, first frame 24x32 RGB". Only for ``inspect``; falls back to the format alone."""
    fmt = source.frame_format
    video = "video" in fmt.dtype
    if not (fmt.encoded or video) or not source.seekable or len(segment) == 0:
        return fmt.describe()
    try:
        block = next(iter(source.read_blocks(Segment(segment.array, segment.start, segment.start + 1), 1)))
        if isinstance(block, np.ndarray):
            frame = block[0]
            height, width = frame.shape[:2] if fmt.axes != "CHW" else frame.shape[1:3]
            channels = 1 if frame.ndim == 2 else (frame.shape[-1] if fmt.axes != "CHW" else frame.shape[0])
            return f"{fmt.describe()}, first frame {height}x{width} {_MODES.get(channels, f'{channels} channels')}"
        with Image.open(io.BytesIO(np.asarray(block[0], dtype=np.uint8).tobytes())) as image:
            width, height = image.size
            return f"encoded {image.format or 'image'}, first frame {height}x{width} {image.mode}"
    except Exception:  # a frame that cannot be read is reported by relabel; inspect still shows the rest
        return fmt.describe()
