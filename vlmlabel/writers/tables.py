"""Write reward columns into a new copy of a table dataset (save_to_disk, parquet, Hub download).

Shards are rewritten record batch by record batch (or row group by row group) with the reward
columns appended: image data is copied as Arrow buffers, never decoded or re-encoded. Files that do
not change are hard-linked (copied across file systems). Everything is written into a hidden folder
beside the destination and renamed into place at the end; the source is only ever read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlabel.errors import OutputError
from vlmlabel.sources.tables import TableSource
from vlmlabel.fsutil import fsync

OUTPUT_SUFFIX = "-vlmlabel"
LEROBOT_OBSERVATION = "observation."


@dataclass
class RewardColumn:
    """One float32 column, aligned row by row with the source, and how it was made."""

    name: str
    values: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


# -- schema -----------------------------------------------------------------------------------------


def reward_schema(schema: pa.Schema, columns: list[RewardColumn]) -> pa.Schema:
    """``schema`` without old columns of the same names, plus float32 reward fields carrying their provenance.

    The ``huggingface`` metadata gets a ``Value('float32')`` feature per column, so `datasets` keeps every
    other feature (Image columns stay images); a ``vlmlabel`` key records each column's provenance.
    """
    names = {c.name for c in columns}
    kept = pa.schema([f for f in schema if f.name not in names], metadata=schema.metadata)
    metadata = dict(kept.metadata or {})
    if b"huggingface" in metadata:
        hf = json.loads(metadata[b"huggingface"])
        features = hf.setdefault("info", {}).setdefault("features", {})
        for name in names:
            features.pop(name, None)
        for column in columns:
            features[column.name] = {"dtype": "float32", "_type": "Value"}
        metadata[b"huggingface"] = json.dumps(hf).encode()
    recorded = json.loads(metadata.get(b"vlmlabel", b"{}")).get("columns", {})
    recorded.update({c.name: c.meta for c in columns})
    metadata[b"vlmlabel"] = json.dumps({"columns": recorded}).encode()
    fields = list(kept) + [pa.field(c.name, pa.float32(), metadata={"vlmlabel": json.dumps(c.meta)})
                           for c in columns]
    return pa.schema(fields, metadata=metadata)


def _with_rewards(batch: pa.RecordBatch | pa.Table, schema: pa.Schema, columns: list[RewardColumn],
                  offset: int) -> list[pa.Array]:
    arrays = [batch.column(f.name) for f in schema if f.name in batch.schema.names and
              f.name not in {c.name for c in columns}]
    rows = batch.num_rows
    return arrays + [pa.array(c.values[offset:offset + rows], type=pa.float32()) for c in columns]


def rewrite_shard(src: Path, dst: Path, fmt: str, schema: pa.Schema, columns: list[RewardColumn],
                  offset: int) -> int:
    """Copy one shard with the reward columns appended (rows from ``offset``); returns its row count."""
    rows = 0
    if fmt == "arrow":
        reader = pa.ipc.open_stream(pa.memory_map(str(src)))
        with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in reader:
                writer.write_batch(pa.RecordBatch.from_arrays(_with_rewards(batch, schema, columns, offset + rows),
                                                              schema=schema))
                rows += batch.num_rows
    else:
        source = pq.ParquetFile(src)
        compression = (source.metadata.row_group(0).column(0).compression.lower()
                       if source.metadata.num_row_groups else "snappy")
        compression = "none" if compression == "uncompressed" else compression
        with pq.ParquetWriter(dst, schema, compression=compression) as writer:
            for group in range(source.metadata.num_row_groups):
                table = source.read_row_group(group)
                writer.write_table(pa.Table.from_arrays(_with_rewards(table, schema, columns, offset + rows),
                                                        schema=schema), row_group_size=max(table.num_rows, 1))
                rows += table.num_rows
    fsync(dst)
    return rows


# -- staging ----------------------------------------------------------------------------------------



def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link the file itself (a Hub cache symlink is followed to its blob), else copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src_root: Path, dst_root: Path, skip: set[Path]) -> None:
    """Mirror ``src_root`` into ``dst_root`` with hard links (copies where links fail), except ``skip``."""
    for folder, _, files in os.walk(src_root):
        for name in files:
            path = Path(folder) / name
            if path.resolve() not in skip:
                link_or_copy(path, dst_root / path.relative_to(src_root))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def staged(dest: Path) -> Iterator[Path]:
    """A hidden path beside ``dest`` to write into; renamed onto ``dest`` only if the block succeeds."""
    tmp = dest.parent / f".{dest.name}.vlmlabel-{os.getpid()}.tmp"
    old = dest.parent / f".{dest.name}.vlmlabel-{os.getpid()}.old"
    _remove(tmp)
    try:
        yield tmp
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
        fsync(dest.parent)
    except BaseException:
        _remove(tmp)
        if old.exists() and not dest.exists():
            os.rename(old, dest)
        raise
    _remove(old)


# -- checks -----------------------------------------------------------------------------------------


def local_root(source: TableSource) -> Path | None:
    return None if source.kind in ("hub", "stream") else Path(str(source.root))


def default_output(source: TableSource) -> Path:
    """A new dataset beside the input: ``<name>-vlmlabel`` (a file for one parquet file)."""
    root = local_root(source)
    if root is None:  # a Hub id: into the working folder; a stream gets a parquet sidecar
        name = f"{str(source.root).split('/')[-1]}{OUTPUT_SUFFIX}"
        return Path.cwd() / (f"{name}.parquet" if source.kind == "stream" else name)
    if source.kind == "parquet" and root.is_file():
        return root.with_name(f"{root.stem}{OUTPUT_SUFFIX}{root.suffix}")
    if source.kind == "parquet" and not root.exists():  # a glob: mirror its base folder
        base = source.base.resolve()
        return base.with_name(f"{base.name}{OUTPUT_SUFFIX}")
    root = root.resolve()
    return root.with_name(f"{root.name}{OUTPUT_SUFFIX}")


def rewritten_bytes(source: TableSource) -> int:
    return sum(f.stat().st_size for f in source.shards.files)


def _replaceable(folder: Path) -> bool:
    """An empty folder or a dataset: --overwrite never deletes an arbitrary folder given by mistake."""
    markers = ("state.json", "dataset_dict.json", "meta/info.json")
    return (not any(folder.iterdir()) or any((folder / m).is_file() for m in markers)
            or next(folder.rglob("*.parquet"), None) is not None)


def check_output(source: TableSource, output: Path | None, names: list[str], overwrite: bool) -> Path:
    """Refuse early, before any compute, what the write would refuse; returns the destination."""
    if source.kind == "lerobot" and any(n.startswith(LEROBOT_OBSERVATION) for n in names):
        raise OutputError(f"--reward-key {names[0]!r}: LeRobot reserves {LEROBOT_OBSERVATION}* for observations; "
                          "choose another --reward-key")
    existing = [n for n in names if n in source.columns]
    if existing and not overwrite:
        raise OutputError(f"column(s) {', '.join(existing)} already exist in {source.root}; pass --overwrite to "
                          "replace them in the output, or choose another --reward-key")
    dest = (output or default_output(source)).absolute()
    root = local_root(source)
    if root is not None:
        root = root.resolve() if root.exists() else source.base.resolve()
        resolved = dest.resolve()
        if resolved == root or root in resolved.parents or (root.is_dir() and resolved in root.parents):
            raise OutputError(f"output {dest} overlaps the source {source.root}; vlmlabel never modifies a dataset "
                              "in place: choose an --output outside it")
    if dest.exists() and not overwrite:
        raise OutputError(f"output {dest} already exists; choose another --output or pass --overwrite")
    if dest.is_dir() and not _replaceable(dest):
        raise OutputError(f"output {dest} is a folder that holds no dataset; vlmlabel only replaces datasets "
                          "(--overwrite): choose a new --output")
    folder = dest.parent
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write in {folder}; vlmlabel writes the new dataset there")
    needed = rewritten_bytes(source) + 16 * 1024 * 1024
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"{folder} has {free / 2**20:.0f} MiB free but the new dataset needs about "
                          f"{needed / 2**20:.0f} MiB; free space or choose another --output")
    return dest


# -- writing ----------------------------------------------------------------------------------------


def rewrite_all(source: TableSource, targets: list[Path], columns: list[RewardColumn]) -> pa.Schema:
    schema = reward_schema(source.schema, columns)
    offset = 0
    for src, dst, expected in zip(source.shards.files, targets, source.rows_per_file):
        dst.parent.mkdir(parents=True, exist_ok=True)
        rows = rewrite_shard(src, dst, source.shards.fmt, schema, columns, offset)
        if rows != expected:
            raise OutputError(f"{src} changed while rewards were computed; nothing was written — run again")
        offset += rows
    if source.shards.stamp() != source.stamp:
        raise OutputError(f"{source.root} changed while rewards were computed; nothing was written — run again")
    return schema


def _features_json(schema: pa.Schema) -> dict | None:
    raw = (schema.metadata or {}).get(b"huggingface")
    return json.loads(raw).get("info", {}).get("features") if raw else None


def _fingerprint(previous: str, columns: list[RewardColumn]) -> str:
    digest = hashlib.sha256(previous.encode())
    for column in columns:
        digest.update(json.dumps([column.name, column.meta], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _write_disk_metadata(folder: Path, info: dict, state: dict, schema: pa.Schema, columns: list[RewardColumn],
                         data_files: list[str]) -> None:
    features = _features_json(schema)
    if features is not None:
        info["features"] = features
    state = {**state, "_data_files": [{"filename": f} for f in data_files],
             "_fingerprint": _fingerprint(str(state.get("_fingerprint", "")), columns)}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def write_dataset(source: TableSource, dest: Path, columns: list[RewardColumn]) -> Path:
    """Write the copy of ``source`` with ``columns`` at ``dest`` (format follows the source)."""
    files = list(source.shards.files)
    with staged(dest) as tmp:
        if source.kind == "disk":
            split_dir = files[0].parent
            root = Path(str(source.root))
            link_tree(root, tmp, {f.resolve() for f in files} |
                      {(split_dir / n).resolve() for n in ("state.json", "dataset_info.json")})
            out_dir = tmp / split_dir.relative_to(root)
            schema = rewrite_all(source, [out_dir / f.name for f in files], columns)
            info = json.loads((split_dir / "dataset_info.json").read_text())
            state = json.loads((split_dir / "state.json").read_text())
            _write_disk_metadata(out_dir, info, state, schema, columns, [f.name for f in files])
        elif source.kind == "hub":
            tmp.mkdir()
            names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
            schema = rewrite_all(source, [tmp / n for n in names], columns)
            state = {"_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                     "_output_all_columns": False, "_split": source.split, "_fingerprint": str(source.root)}
            _write_disk_metadata(tmp, dataclasses.asdict(source.hub_info), state, schema, columns, names)
        elif Path(str(source.root)).is_file():
            rewrite_all(source, [tmp], columns)
        else:
            base = source.base
            if Path(str(source.root)).is_dir():
                link_tree(base, tmp, {f.resolve() for f in files})
            rewrite_all(source, [tmp / f.relative_to(base) for f in files], columns)
    return dest
