"""Write reward datasets into an HDF5 file without ever leaving it half-written.

The rewards go into a copy made beside the destination; the copy is flushed to disk and then
renamed over the destination in one atomic step. Until that rename the destination is the
untouched original, so a crash, kill or full disk at any moment loses nothing.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from vlmlabel.errors import OutputError
from vlmlabel.fsutil import fsync


@dataclass
class RewardDataset:
    """One dataset to write: its path in the file, its values and the attributes that say how it was made."""

    path: str
    values: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    chunk_rows: int | None = None  # rows per chunk for large 2-D arrays (embeddings); None: HDF5's choice


@dataclass
class RowStream:
    """Several 2-D datasets filled in order from one stream of row blocks (e.g. embeddings as they are computed).

    ``datasets`` give path, attrs, dtype and chunking; their ``values`` are ignored and ``rows`` says how many
    rows each takes. The width is the width of the first block.
    """

    datasets: list[RewardDataset]
    rows: list[int]
    blocks: Iterator[np.ndarray]
    width: int = 0  # set once the first block arrives


@dataclass(frozen=True)
class SourceStamp:
    """Size and modification time, to notice a source changed while rewards were computed."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> SourceStamp:
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns)


def destination(source: Path, output: Path | None) -> Path:
    return source if output is None else output


def check_destination(source: Path, output: Path | None, overwrite: bool) -> None:
    """Refuse, before anything is created or computed, a destination the final write could not use."""
    if output is not None and output.exists() and output.resolve() == source.resolve():
        raise OutputError(f"--output {output} is SOURCE itself; drop --output to add the rewards to SOURCE, "
                          "or name a new file")
    if output is not None and output.is_dir():
        raise OutputError(f"--output {output} is a folder; name the HDF5 file to write")
    if output is not None and output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists; choose another --output or pass --overwrite")
    folder = destination(source, output).resolve().parent
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write in {folder}; vlmlabel writes a copy there and renames it into place: "
                          "use --output in a folder you can write")
    if output is None and not os.access(source, os.W_OK):
        raise OutputError(f"{source} is read-only; use --output to write a labelled copy elsewhere")
    free = shutil.disk_usage(folder).free
    needed = source.stat().st_size + 16 * 1024 * 1024
    if free < needed:
        raise OutputError(f"{folder} has {free / 2**20:.0f} MiB free but the write needs about "
                          f"{needed / 2**20:.0f} MiB (a full copy of the source); free space or use --output elsewhere")


def check_writable(source: Path, output: Path | None, existing: list[str], overwrite: bool) -> None:
    """Refuse early, before any compute, what the final write would refuse."""
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise OutputError(f"{shown} already exist(s) in {source}; pass --overwrite to replace, "
                          "or choose another --reward-key")
    check_destination(source, output, overwrite)


def write_rewards(source: Path, output: Path | None, datasets: list[RewardDataset], overwrite: bool,
                  stamp: SourceStamp | None = None, remove: list[str] | None = None,
                  stream: RowStream | None = None) -> Path:
    """Copy ``source``, add ``datasets`` (and ``stream``) to the copy, deleting ``remove`` paths, then atomically
    put the copy at the destination."""
    dest = destination(source, output)
    tmp = dest.resolve().parent / f".{dest.name}.vlmlabel-{os.getpid()}.tmp"
    try:
        shutil.copyfile(source, tmp)
        mode = stat.S_IMODE(source.stat().st_mode)
        os.chmod(tmp, mode | stat.S_IWUSR)  # a read-only source still gives a copy we can write into
        with h5py.File(tmp, "r+") as handle:
            for path in remove or []:
                if path in handle:
                    del handle[path]
            for dataset in datasets:
                _put(handle, dataset, overwrite)
            if stream is not None:
                _fill(handle, stream, overwrite)
        if output is None:
            os.chmod(tmp, mode)  # in place: the file keeps its permissions
        fsync(tmp)
        if stamp is not None and SourceStamp.of(source) != stamp:
            raise OutputError(f"{source} changed while rewards were computed; nothing was written — run again")
        os.replace(tmp, dest)
        fsync(dest.resolve().parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _put(handle: h5py.File, dataset: RewardDataset, overwrite: bool) -> None:
    if dataset.path in handle:
        if not overwrite:
            raise OutputError(f"{dataset.path} already exists; pass --overwrite to replace it")
        del handle[dataset.path]
    values = np.asarray(dataset.values, dtype=dataset.dtype)
    chunks = None
    if dataset.chunk_rows is not None and values.ndim == 2 and len(values):
        chunks = (min(dataset.chunk_rows, len(values)), values.shape[1])
    written = handle.create_dataset(dataset.path, data=values, chunks=chunks)
    for key, value in dataset.attrs.items():
        written.attrs[key] = value


def _fill(handle: h5py.File, stream: RowStream, overwrite: bool) -> None:
    """Create the stream's datasets once the row width is known, then write them a whole chunk at a time."""
    blocks = iter(stream.blocks)
    first = next(blocks, None)
    if first is None:
        raise OutputError("nothing to write: the stream of rows is empty")
    stream.width = first.shape[1]
    targets = []
    for dataset, rows in zip(stream.datasets, stream.rows):
        if dataset.path in handle:
            if not overwrite:
                raise OutputError(f"{dataset.path} already exists; pass --overwrite to replace it")
            del handle[dataset.path]
        chunks = (min(dataset.chunk_rows, rows), first.shape[1]) if dataset.chunk_rows and rows else None
        created = handle.create_dataset(dataset.path, shape=(rows, first.shape[1]), dtype=dataset.dtype,
                                        chunks=chunks)
        created.attrs.update(dataset.attrs)
        targets.append(created)
    if not _fill_rows(targets, _chain(first, blocks)):
        raise OutputError(f"the frames read did not match the {sum(stream.rows)} rows planned; "
                          "the source changed while it was read")


def _write_rows(dataset: h5py.Dataset) -> int:
    """Rows per write for ``dataset``: its chunk height, so no chunk is read back and rewritten."""
    return dataset.chunks[0] if dataset.chunks else max(1, len(dataset))


def _fill_rows(targets: list[h5py.Dataset], blocks: Iterator[np.ndarray]) -> bool:
    """Fill ``targets`` in order from ``blocks``, buffering rows until a whole chunk (or the rest) can be written.

    True when the rows fill the targets exactly.
    """
    index, filled, pending, pending_rows = 0, 0, [], 0
    for block in blocks:
        pending.append(block)
        pending_rows += len(block)
        while index < len(targets):
            target = targets[index]
            want = min(_write_rows(target), len(target) - filled)
            if pending_rows < want:
                break
            rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
            if want:
                target[filled:filled + want] = rows[:want]
            pending, pending_rows = ([rows[want:]] if len(rows) > want else []), len(rows) - want
            filled += want
            if filled == len(target):
                index, filled = index + 1, 0
        if index == len(targets) and pending_rows:
            break
    return index == len(targets) and not pending_rows


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest

