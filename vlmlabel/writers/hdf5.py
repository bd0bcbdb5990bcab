"""Write reward datasets into an HDF5 file without ever leaving it half-written.

The rewards go into a copy made beside the destination; the copy is flushed to disk and then
renamed over the destination in one atomic step. Until that rename the destination is the
untouched original, so a crash, kill or full disk at any moment loses nothing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vlmlabel.errors import OutputError


@dataclass
class RewardDataset:
    """One dataset to write: its path in the file, its values and the attributes that say how it was made."""

    path: str
    values: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    chunk_rows: int | None = None  # rows per chunk for large 2-D arrays (embeddings); None: HDF5's choice


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


def check_writable(source: Path, output: Path | None, existing: list[str], overwrite: bool) -> None:
    """Refuse early, before any compute, what the final write would refuse."""
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise OutputError(f"{shown} already exist(s) in {source}; pass --overwrite to replace, "
                          "or choose another --reward-key")
    dest = destination(source, output)
    in_place = output is None or (output.exists() and output.resolve() == source.resolve())
    if not in_place and output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists; choose another --output or pass --overwrite")
    folder = dest.resolve().parent
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write in {folder}; vlmlabel writes a copy there and renames it into place")
    free = shutil.disk_usage(folder).free
    needed = source.stat().st_size + 16 * 1024 * 1024
    if free < needed:
        raise OutputError(f"{folder} has {free / 2**20:.0f} MiB free but the write needs about "
                          f"{needed / 2**20:.0f} MiB (a full copy of the source); free space or use --output elsewhere")


def write_rewards(source: Path, output: Path | None, datasets: list[RewardDataset], overwrite: bool,
                  stamp: SourceStamp | None = None, remove: list[str] | None = None) -> Path:
    """Copy ``source``, add ``datasets`` to the copy (deleting ``remove`` paths), then atomically replace."""
    dest = destination(source, output)
    tmp = dest.resolve().parent / f".{dest.name}.vlmlabel-{os.getpid()}.tmp"
    try:
        shutil.copyfile(source, tmp)
        shutil.copymode(source, tmp)
        with h5py.File(tmp, "r+") as handle:
            for path in remove or []:
                if path in handle:
                    del handle[path]
            for dataset in datasets:
                _put(handle, dataset, overwrite)
        _fsync(tmp)
        if stamp is not None and SourceStamp.of(source) != stamp:
            raise OutputError(f"{source} changed while rewards were computed; nothing was written — run again")
        os.replace(tmp, dest)
        _fsync(dest.resolve().parent)
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
