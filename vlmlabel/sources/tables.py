"""Hugging Face datasets as frame sources: `save_to_disk` folders, parquet files and Hub datasets.

Only the image column and the episode columns are read, record batch by record batch, so memory
stays bounded by a batch whatever the dataset's size. Rows are scored in storage order; episodes are
runs of rows sharing an ``episode_index`` (the whole table is one episode without that column).
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlabel.errors import SourceError
from vlmlabel.files.provenance import PROVENANCE_KEY
from vlmlabel.metadata import NULL, JsonObject
from vlmlabel.sources import arrow_frames
from vlmlabel.sources.base import (
    Align,
    Episode,
    FrameBlock,
    FrameFormat,
    Segment,
    SourceKind,
    SourceRecipe,
    show_path,
    step_segments,
    utf8_name,
)
from vlmlabel.sources.cameras import CameraChooser

EPISODE_COLUMNS = ("episode_index", "frame_index", "index", "timestamp")
READ_BATCH_ROWS = 1024
CACHE_SUFFIX = ".vlmlabel-cache.h5"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class RowFiles(Protocol):
    """Where a table's rows come from: its files (``TableFiles``) or a stream (``streaming.StreamFiles``)."""

    @property
    def paths(self) -> tuple[Path, ...]: ...

    @property
    def fmt(self) -> str: ...

    @property
    def seekable(self) -> bool: ...

    def schema(self) -> pa.Schema: ...

    def rows_per_file(self) -> list[int]: ...

    def batches(self, columns: list[str], batch_rows: int = ...) -> Iterator[pa.RecordBatch]: ...


@dataclass(frozen=True)
class TableFiles:
    """The files holding a table, in row order: Arrow IPC streams (`datasets` cache/save_to_disk) or parquet."""

    paths: tuple[Path, ...]
    fmt: str  # "arrow" | "parquet"
    seekable = True  # rows can be read from anywhere (a stream cannot)

    def __post_init__(self) -> None:
        for path in self.paths:
            if not utf8_name(path):
                raise SourceError(
                    f"{show_path(path)}: pyarrow opens files by UTF-8 names only, and this name is not "
                    "UTF-8; rename it (e.g. convmv -f latin1 -t utf8), or its folder"
                )

    def _schema_of(self, path: Path) -> pa.Schema:
        handle = self._open(path)
        return handle.schema_arrow if self.fmt == "parquet" else handle.schema

    def schema(self) -> pa.Schema:
        """The first file's schema; every other file must have the same columns and types."""
        first = self._schema_of(self.paths[0])
        for path in self.paths[1:]:
            if not self._schema_of(path).equals(first, check_metadata=False):
                raise SourceError(
                    f"{path} has other columns or types than {self.paths[0]}; vlmlabel reads files "
                    "of one schema: pass them separately or as a narrower glob"
                )
        return first

    def _open(self, path: Path):
        try:
            if self.fmt == "arrow":
                return pa.ipc.open_stream(pa.memory_map(str(path)))
            return pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise SourceError(f"{path} cannot be read as {self.fmt} (truncated or corrupt?): {exc}") from None

    def rows_per_file(self) -> list[int]:
        counts = []
        for path in self.paths:
            handle = self._open(path)
            counts.append(handle.metadata.num_rows if self.fmt == "parquet" else sum(len(b) for b in handle))
        return counts

    def batches(self, columns: list[str], batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` across all files, in row order."""
        for path in self.paths:
            handle = self._open(path)
            try:
                if self.fmt == "parquet":
                    yield from (b.select(columns) for b in handle.iter_batches(batch_size=batch_rows, columns=columns))
                else:
                    yield from (b.select(columns) for b in handle)
            except (OSError, pa.ArrowInvalid) as exc:
                raise SourceError(f"reading {path} failed (truncated or corrupt?): {exc}") from None


class ColumnCursor:
    """Row ranges of one column read forward through record batches; a backward read restarts the scan."""

    def __init__(self, batches: Callable[[], Iterator[pa.Array]], where: str):
        self._factory, self._where = batches, where
        self._restart()

    def _restart(self) -> None:
        self._iter = self._factory()
        self._chunk: pa.Array | None = None
        self._chunk_start = 0
        self._chunk_stop = 0

    def _advance(self) -> None:
        chunk = next(self._iter, None)
        if chunk is None:
            raise SourceError(
                f"{self._where} ended at row {self._chunk_stop}; the dataset is shorter than its "
                "episode columns say (mismatched lengths)"
            )
        self._chunk, self._chunk_start, self._chunk_stop = chunk, self._chunk_stop, self._chunk_stop + len(chunk)

    def read(self, start: int, stop: int) -> list[pa.Array]:
        if start < self._chunk_start:
            self._restart()
        parts = []
        while start < stop:
            while self._chunk_stop <= start:
                self._advance()
            take = min(stop, self._chunk_stop) - start
            assert self._chunk is not None  # set by _advance: _chunk_stop > start >= 0
            parts.append(self._chunk.slice(start - self._chunk_start, take))
            start += take
        return parts


class ColumnRows:
    """The frames of one image column, read forward through the files' record batches."""

    def __init__(self, files: RowFiles, column: str, fmt: FrameFormat, base: Path | None):
        self.column, self.fmt, self.base = column, fmt, base
        self._cursor = ColumnCursor(lambda: (b.column(0) for b in files.batches([column])), f"column {column!r}")

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]:
        start = segment.start
        while start < segment.stop:
            stop = min(segment.stop, start + max_rows)
            column = pa.chunked_array(self._cursor.read(start, stop))
            yield arrow_frames.to_block(column, self.fmt, self.column, self.base)
            start = stop

    def close(self) -> None:
        """Nothing is held open: files are opened per scan."""


@dataclass(frozen=True)
class TableRecipe:
    """Opens a table's image column again in a decoding worker."""

    files: TableFiles
    column: str
    fmt: FrameFormat
    base: Path | None
    decodes: bool  # image bytes, or float arrays to convert; uint8 arrays are a copy (faster read in place)

    def open(self) -> ColumnRows:
        return ColumnRows(self.files, self.column, self.fmt, self.base)


def episode_runs(
    rows: int, episode_index: np.ndarray | None, frame_index: np.ndarray | None, align: Align, array: str
) -> list[Episode]:
    """Episodes as runs of consecutive rows with one episode_index, scoring rows in storage order.

    ``--align next`` needs each episode's rows together and in frame order; other orders are refused.
    """
    if rows == 0:
        raise SourceError("the dataset has no rows (empty split?); nothing to label")
    if episode_index is None:
        return [Episode(f"all rows (0-{rows - 1})", rows, step_segments(array, 0, rows, align), "")]
    starts = np.concatenate([[0], np.flatnonzero(episode_index[1:] != episode_index[:-1]) + 1])
    stops = np.concatenate([starts[1:], [rows]])
    if align is Align.next:
        ids = episode_index[starts]
        if len(np.unique(ids)) != len(ids):
            raise SourceError(
                "rows of one episode are not consecutive; --align next (the default) needs them "
                "grouped and in frame order: sort the dataset by episode_index, frame_index first, "
                "or pass --align frame to score each row's own frame"
            )
        if frame_index is not None:
            steps = np.diff(frame_index)
            inner = np.ones(len(steps), dtype=bool)
            inner[starts[1:] - 1] = False
            if np.any(steps[inner] <= 0):
                raise SourceError(
                    "frame_index is not increasing within an episode; --align next (the default) "
                    "needs frames in order: sort the dataset by episode_index, frame_index first, "
                    "or pass --align frame to score each row's own frame"
                )
    return [
        Episode(
            f"episode {episode_index[a]} (rows {a}-{b - 1})",
            int(b - a),
            step_segments(array, int(a), int(b), align),
            "",
            f"episode {episode_index[a]}",
        )
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True)
    ]


def field_provenance(field: pa.Field) -> dict:
    """The provenance vlmlabel recorded in a column's field metadata ({} for a column it did not write)."""
    metadata = field.metadata or {}
    try:
        attrs = json.loads(metadata[PROVENANCE_KEY]) if PROVENANCE_KEY in metadata else {}
    except ValueError:
        return {}
    return attrs if isinstance(attrs, dict) else {}


class TableSource:
    """A table of rows with an image column, read-only (see module docstring)."""

    cache_groups: frozenset[str] = frozenset()  # its cache file holds only the cache, from the root down

    def __init__(
        self,
        files: RowFiles,
        image_key: str | None,
        kind: SourceKind,
        root: Path | str,
        base: Path | None = None,
        cache_file: Path | None = None,
    ):
        self.files, self.kind, self.root, self.base = files, kind, root, base
        self.layout = kind.value
        self.seekable = files.seekable
        self.holds_outputs = False  # outputs and caches go beside the dataset, never into it
        self.cache_file = cache_file
        self.hub_info: Any = None  # the `datasets` DatasetInfo of a Hub download
        self.split: str | None = None
        self.schema = files.schema()
        where = files.paths[0] if files.paths else root
        self.features = arrow_frames.hf_features(self.schema, where)
        recorded = (self.schema.metadata or {}).get(PROVENANCE_KEY)
        if recorded:  # what vlmlabel wrote into the table, which a labelled copy adds to
            JsonObject.parse(
                recorded,
                f"the 'vlmlabel' metadata of {where}",
                "the file's schema metadata is damaged: write the dataset again",
            ).object("columns")
        self.rows_per_file = files.rows_per_file()
        self.rows = sum(self.rows_per_file)
        self._rows: ColumnRows | None = None
        self._index: dict[str, np.ndarray] = {}
        self._choose_key(image_key)

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def _candidates(self) -> list[str]:
        return [
            f.name
            for f in self.schema
            if not f.name.startswith("next_") and arrow_frames.looks_like_frames(f, self.features.get(f.name))
        ]

    def _choose_key(self, image_key: str | None) -> None:
        found = self._candidates()
        self.cameras = found
        names, columns = self.schema.names, ", ".join(self.schema.names[:20])
        chooser = CameraChooser(
            "image columns", self.root, f"is not a column of {self.root}", f" (all columns: {columns})"
        )
        self.image_key = chooser.choose(
            found,
            image_key,
            lambda key: key if key in names else None,
            lambda: SourceError(
                f"no image column found in {self.root} (columns: {columns}); name the frames with --image-key"
            ),
        )
        self.frame_format = self._format_of(self.image_key)

    def _format_of(self, key: str) -> FrameFormat:
        field = self.schema.field(key)
        sample = next(self.files.batches([key], batch_rows=1), None)
        if sample is None or sample.num_rows == 0:
            raise SourceError(f"{self.root} has no rows (empty split?); nothing to label")
        return arrow_frames.frame_format(field, self.features.get(key), sample.column(0))

    def index_columns(self, names: tuple[str, ...] = EPISODE_COLUMNS) -> dict[str, np.ndarray]:
        """The episode/frame/index/timestamp columns present, read in one pass (and kept: they are small)."""
        present = [n for n in names if n in self.schema.names]
        if not present:
            return {}
        if all(n in self._index for n in present):
            return {n: self._index[n] for n in present}
        parts: dict[str, list[np.ndarray]] = {n: [] for n in present}
        for batch in self.files.batches(present, batch_rows=65536):
            for name in present:
                column = batch.column(name)
                if column.null_count:
                    raise SourceError(f"column {name!r} has empty (null) values; it must be set on every row")
                parts[name].append(column.to_numpy(zero_copy_only=False))
        self._index.update({n: np.concatenate(p) if p else np.empty(0) for n, p in parts.items()})
        return {n: self._index[n] for n in present}

    def episodes(self, align: Align) -> list[Episode]:
        index = self.index_columns(("episode_index", "frame_index"))
        return episode_runs(self.rows, index.get("episode_index"), index.get("frame_index"), align, self.image_key)

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]:
        if self._rows is None:
            self._rows = ColumnRows(self.files, self.image_key, self.frame_format, self.base)
        yield from self._rows.read_blocks(segment, max_rows)

    def recipe(self) -> SourceRecipe | None:
        """How a decoding worker reads the image column again; None for a stream, which only this process
        can read, front to back."""
        if not isinstance(self.files, TableFiles):
            return None
        fmt = self.frame_format
        return TableRecipe(self.files, self.image_key, fmt, self.base, fmt.encoded or fmt.dtype != "uint8")

    @property
    def paths(self) -> tuple[Path, ...]:
        return self.files.paths

    # -- embedding cache: an HDF5 file beside the dataset ------------------------------------------

    def array_rows(self, array: str) -> int:
        return self.rows

    @property
    def cache_scope(self) -> str:
        """The split, where the dataset has several: one cache file serves them all."""
        return self.split or ""

    # -- per-step values, for evaluate and plot ----------------------------------------------------

    def _column(self, key: str) -> np.ndarray | None:
        if key not in self.schema.names or arrow_frames.looks_like_frames(self.schema.field(key), None):
            return None
        return self.index_columns((key,))[key]

    def step_values(self, episode: Episode, key: str) -> np.ndarray | None:
        """A per-row column (rewards, success, a written reward...) over the rows of one episode."""
        column = self._column(key)
        if column is None:
            return None
        start = episode.frames[0].start
        return column[start : start + episode.steps]

    def column_provenance(self, name: str) -> dict | None:
        """How vlmlabel made column ``name``; {} for a column it did not write, None where there is no column."""
        return field_provenance(self.schema.field(name)) if name in self.schema.names else None

    def dataset_attrs(self, episode: Episode, key: str) -> dict | None:
        return self.column_provenance(key)

    def reward_keys(self, episode: Episode) -> list[str]:
        """Columns vlmlabel wrote (their provenance records how)."""
        return sorted(name for name in self.schema.names if self.column_provenance(name))

    def close(self) -> None:
        self._rows = None

    def __enter__(self) -> TableSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- opening ---------------------------------------------------------------------------------------


def cache_beside(path: Path) -> Path:
    """Where a table dataset's embedding cache lives: ``NAME.vlmlabel-cache.h5`` beside its file or folder."""
    resolved = path.resolve()
    name = resolved.stem if resolved.is_file() else resolved.name
    return resolved.with_name(f"{name}{CACHE_SUFFIX}")


def is_disk_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _plain_name(name: str) -> bool:
    """A name of a file right inside a folder: no path, not '.' or '..'."""
    return name not in ("", ".", "..") and Path(name).name == name


_SAVED = "is this a folder written by save_to_disk? (save the dataset again with save_to_disk)"


def open_disk(folder: Path, image_key: str | None, split: str) -> TableSource:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (then ``split`` is used).

    Its JSON files are checked here, before any scoring: ``dataset_dict.json`` lists the splits, ``state.json``
    the data files (plain names inside the split's folder), and ``dataset_info.json``, which the labelled copy
    carries over, is an object."""
    split_dir = folder
    if (folder / "dataset_dict.json").is_file():
        index = JsonObject.read(folder / "dataset_dict.json", _SAVED)
        splits = index.list_of("splits", str, [])
        for name in splits:
            if not _plain_name(name):
                index.refuse(f"'splits' names {name!r}, which is not a folder of {folder}")
        if split not in splits:
            raise SourceError(
                f"{folder} has splits {', '.join(splits) or 'none'}, not {split!r}; choose one with --split"
            )
        split_dir = folder / split
    state = JsonObject.read(split_dir / "state.json", _SAVED)
    if state.get("_indices_data_files", (list, NULL), None):
        raise SourceError(f"{split_dir} stores an indices mapping; save it again with flatten_indices() first")
    names = [entry.get("filename", str) for entry in state.objects("_data_files", [])]
    for name in names:
        if not _plain_name(name):
            state.refuse(f"'_data_files' names {name!r}, which is not a file of {split_dir}")
    JsonObject.read(split_dir / "dataset_info.json", _SAVED)
    files = tuple(split_dir / name for name in names)
    if not files:
        raise SourceError(f"{split_dir} has no rows (empty split?): state.json lists no data files; nothing to label")
    source = TableSource(
        TableFiles(files, "arrow"), image_key, SourceKind.disk, folder, base=split_dir, cache_file=cache_beside(folder)
    )
    source.split = split if split_dir != folder else None
    return source


def parquet_files(path: str) -> tuple[Path, list[Path]]:
    """Base folder and parquet files named by a file, a folder (searched recursively) or a glob."""
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if p.endswith(".parquet"))
        if not files:
            raise SourceError(f"no parquet file matches {path}; check the pattern")
        return Path(_glob_base(path)), files
    given = Path(path)
    if given.is_dir():
        files = sorted(given.rglob("*.parquet"))
        return given, [f for f in files if not any(part.startswith(".") for part in f.relative_to(given).parts)]
    return given.parent, [given]


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def open_parquet(path: str, image_key: str | None) -> TableSource:
    base, files = parquet_files(path)
    if not files:
        raise SourceError(f"{path} holds no parquet files")
    given = Path(path)
    return TableSource(
        TableFiles(tuple(files), "parquet"),
        image_key,
        SourceKind.parquet,
        path,
        base=base,
        cache_file=cache_beside(given if given.exists() else base),
    )


def open_hub(repo_id: str, image_key: str | None, split: str, revision: str | None) -> TableSource:
    """Download (or reuse the cache of) a Hub dataset's split; never runs dataset scripts."""
    import datasets  # only for a Hub id: `datasets` is slow to import, and no local source needs it

    try:
        dataset = datasets.load_dataset(repo_id, split=split, revision=revision)
    except Exception as exc:  # datasets raises many types (network, missing split, missing repo)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SourceError(
            f"{repo_id} is not a local path, and loading it as a Hub dataset (split {split!r}) failed: {first}"
        ) from None
    if dataset._indices is not None:
        dataset = dataset.flatten_indices()
    files = tuple(Path(f["filename"]) for f in dataset.cache_files)
    source = TableSource(
        TableFiles(files, "arrow"),
        image_key,
        SourceKind.hub,
        repo_id,
        cache_file=Path.cwd() / f"{repo_id.split('/')[-1]}{CACHE_SUFFIX}",
    )
    source.hub_info = dataset.info
    source.split = split
    return source
