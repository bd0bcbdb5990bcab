"""Rewards as new columns of a copy of a table dataset (save_to_disk, parquet, Hub download).

Files are rewritten record batch by record batch (or row group by row group) with the reward
columns appended: image data is copied as Arrow buffers, never decoded or re-encoded. Files that do
not change are cloned copy-on-write where the file system can, else copied (hard links only on request:
they would share storage with the source). Everything is written into a hidden folder
beside the destination (``atomic.staged``) and renamed into place at the end; the source is only read.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlmlabel.destinations.base import Present, RewardColumn, check_folder, check_space, refuse_replacing
from vlmlabel.errors import OutputError
from vlmlabel.files import atomic
from vlmlabel.files.provenance import PROVENANCE_KEY
from vlmlabel.files.stamp import Stamp
from vlmlabel.sources.base import PARQUET_SUFFIX, Episode, show_path, utf8_name
from vlmlabel.sources.tables import RowFiles, TableSource, field_provenance

OUTPUT_SUFFIX = "-vlmlabel"

# -- schema -----------------------------------------------------------------------------------------


def reward_schema(schema: pa.Schema, columns: list[RewardColumn], dropped: list[str] | None = None) -> pa.Schema:
    """``schema`` without old columns of the same names and without ``dropped``, plus float32 reward fields
    carrying their provenance.

    The ``huggingface`` metadata gets a ``Value('float32')`` feature per column, so `datasets` keeps every
    other feature (Image columns stay images); a ``vlmlabel`` key records each column's provenance.
    """
    names = {c.name for c in columns} | set(dropped or [])
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
    recorded = json.loads(metadata.get(PROVENANCE_KEY, b"{}")).get("columns", {})
    recorded = {name: attrs for name, attrs in recorded.items() if name not in names}
    recorded.update({c.name: c.attrs for c in columns})
    metadata[PROVENANCE_KEY] = json.dumps({"columns": recorded}).encode()
    fields = list(kept) + [
        pa.field(c.name, pa.float32(), metadata={PROVENANCE_KEY: json.dumps(c.attrs)}) for c in columns
    ]
    return pa.schema(fields, metadata=metadata)


def column_provenance(schema: pa.Schema, names: list[str]) -> dict[str, Present]:
    """Of ``names``, the columns of ``schema``, with the provenance vlmlabel recorded ({} for others)."""
    return {name: Present(name, field_provenance(schema.field(name))) for name in names if name in schema.names}


def read_schema(path: Path, fmt: str) -> pa.Schema | None:
    """The schema of one written file, or None when it is missing or unreadable."""
    try:
        if fmt == "arrow":
            return pa.ipc.open_stream(pa.memory_map(str(path))).schema
        return pq.read_schema(path)
    except (OSError, pa.ArrowInvalid):
        return None


def _with_rewards(
    batch: pa.RecordBatch | pa.Table, schema: pa.Schema, columns: list[RewardColumn], values: list, offset: int
) -> list[pa.Array]:
    names = {c.name for c in columns}
    arrays = [batch.column(f.name) for f in schema if f.name in batch.schema.names and f.name not in names]
    rows = batch.num_rows
    return arrays + [pa.array(v[offset : offset + rows], type=pa.float32()) for v in values]


def rewrite_file(
    src: Path, dst: Path, fmt: str, schema: pa.Schema, columns: list[RewardColumn], values: list, offset: int
) -> int:
    """Copy one file with the reward columns appended (rows from ``offset``); returns its row count."""
    rows = 0
    if fmt == "arrow":
        reader = pa.ipc.open_stream(pa.memory_map(str(src)))
        with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in reader:
                arrays = _with_rewards(batch, schema, columns, values, offset + rows)
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                rows += batch.num_rows
    else:
        source = pq.ParquetFile(src)
        compression = (
            source.metadata.row_group(0).column(0).compression.lower() if source.metadata.num_row_groups else "snappy"
        )
        compression = "none" if compression == "uncompressed" else compression
        with pq.ParquetWriter(dst, schema, compression=compression) as writer:
            for group in range(source.metadata.num_row_groups):
                table = source.read_row_group(group)
                arrays = _with_rewards(table, schema, columns, values, offset + rows)
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=max(table.num_rows, 1))
                rows += table.num_rows
    atomic.fsync(dst)
    return rows


_FICLONE = 0x40049409  # Linux ioctl: dst shares src's blocks copy-on-write (btrfs, xfs, bcachefs, ...)


def carry_over(src: Path, dst: Path, link: bool) -> None:
    """Put an unchanged file in the new dataset without sharing storage that can be edited: a copy-on-write
    clone where the file system has them, else a copy. ``link``: a hard link (the same file as the source's;
    an in-place edit of one is an edit of both), copied where links fail. Hub cache symlinks are followed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    if link:
        try:
            os.link(real, dst)
            return
        except OSError:
            pass
    elif _clone(real, dst):
        return
    shutil.copy2(real, dst)


def _clone(src: Path, dst: Path) -> bool:
    try:
        with open(src, "rb") as source, open(dst, "wb") as target:
            fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
    except OSError:
        dst.unlink(missing_ok=True)
        return False
    shutil.copystat(src, dst)
    return True


def carry_tree(src_root: Path, dst_root: Path, skip: set[Path], link: bool) -> None:
    """Mirror ``src_root`` into ``dst_root`` (``carry_over`` each file), except ``skip``."""
    for folder, _, files in os.walk(src_root):
        for name in files:
            path = Path(folder) / name
            if path.resolve() not in skip:
                carry_over(path, dst_root / path.relative_to(src_root), link)


def _replaceable(path: Path) -> bool:
    """A parquet file, an empty folder or a dataset folder: --overwrite never deletes a file or folder given by
    mistake."""
    if path.is_file():
        with open(path, "rb") as handle:
            return path.suffix == ".parquet" and handle.read(4) == b"PAR1"
    markers = ("state.json", "dataset_dict.json", "meta/info.json")
    return (
        not any(path.iterdir())
        or any((path / m).is_file() for m in markers)
        or next(path.rglob("*.parquet"), None) is not None
    )


# -- destinations -----------------------------------------------------------------------------------


class TableCopy:
    """A new dataset beside the source with the reward columns appended to every data file.

    Subclasses say where the copy goes by default, where each data file lands in it, and write it (with what
    else is carried over) through ``atomic.staged``; checks and what is already there are shared.
    """

    def __init__(self, source: TableSource, output: Path | None, episodes: list[Episode], link: bool = False):
        self.source = source
        self.episodes = episodes
        self.link = link
        self.files: RowFiles = source.files
        self.path = (output or self.default_output(source)).absolute()
        self.stamp = Stamp.of(source.paths)

    @staticmethod
    def default_output(source: TableSource) -> Path:
        """``<name>-vlmlabel`` beside a local source (beside the link, for a symlinked one)."""
        root = Path(str(source.root)).absolute()
        return root.with_name(f"{root.name}{OUTPUT_SUFFIX}")

    @staticmethod
    def output_suffixes(source: TableSource) -> tuple[str, ...]:
        """A new dataset is a folder."""
        return ()

    def local_root(self) -> Path | None:
        """The source's own folder or file, which the output must not overlap (None: not local)."""
        root = Path(str(self.source.root))
        return root.resolve() if root.exists() else (self.source.base.resolve() if self.source.base else None)

    def check(self, names: list[str], overwrite: bool) -> None:
        refuse_replacing(names, self.replaced(names), self.source.root, overwrite)
        dest = self.path
        if not utf8_name(dest):
            raise OutputError(
                f"--output {show_path(dest)}: pyarrow writes files by UTF-8 names only, and this name "
                "is not UTF-8; choose a UTF-8 name"
            )
        root = self.local_root()
        if root is not None:
            resolved = dest.resolve()
            if resolved == root or root in resolved.parents or (root.is_dir() and resolved in root.parents):
                raise OutputError(
                    f"output {dest} overlaps the source {self.source.root}; vlmlabel never modifies "
                    "a dataset in place: choose an --output outside it"
                )
        if dest.exists() and not overwrite:
            raise OutputError(f"output {dest} already exists; choose another --output or pass --overwrite")
        if dest.exists() and not _replaceable(dest):
            what = "a folder that holds no dataset" if dest.is_dir() else "a file that is not a parquet dataset"
            raise OutputError(
                f"output {dest} is {what}; vlmlabel only replaces datasets (--overwrite): choose a new --output"
            )
        folder = atomic.real_target(dest).parent
        check_folder(folder)
        check_space(folder, sum(f.stat().st_size for f in self.files.paths), "the new dataset")

    def replaced(self, names: list[str]) -> dict[str, Present]:
        found = {name: self.source.column_provenance(name) for name in names}
        return {name: Present(name, attrs) for name, attrs in found.items() if attrs is not None}

    def carried(self) -> dict[str, dict[str, Any]]:
        return {name: field_provenance(self.source.schema.field(name)) for name in self.source.schema.names}

    def written(self, names: list[str]) -> dict[str, Present]:
        targets = self.targets(self.path)
        schema = read_schema(targets[0], self.files.fmt) if targets and self.path.exists() else None
        return column_provenance(schema, names) if schema is not None else {}

    def targets(self, root: Path) -> list[Path]:
        """Where each source data file lands in a copy rooted at ``root``."""
        raise NotImplementedError

    def rewrite_all(self, root: Path, columns: list[RewardColumn], dropped: list[str]) -> pa.Schema:
        """Every data file, rewritten under ``root`` with ``columns`` appended and ``dropped`` left out; refuses a
        changed source."""
        schema = reward_schema(self.source.schema, columns, dropped)
        values = [c.flat() for c in columns]
        offset = 0
        for src, dst, expected in zip(self.files.paths, self.targets(root), self.source.rows_per_file, strict=True):
            dst.parent.mkdir(parents=True, exist_ok=True)
            rows = rewrite_file(src, dst, self.files.fmt, schema, columns, values, offset)
            if rows != expected:
                raise OutputError(f"{src} changed while rewards were computed; nothing was written — run again")
            offset += rows
        self.stamp.verify(self.source.root)
        return schema


def _features_json(schema: pa.Schema) -> dict | None:
    raw = (schema.metadata or {}).get(b"huggingface")
    return json.loads(raw).get("info", {}).get("features") if raw else None


def _fingerprint(previous: str, columns: list[RewardColumn]) -> str:
    digest = hashlib.sha256(previous.encode())
    for column in columns:
        digest.update(json.dumps([column.name, column.attrs], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def write_disk_metadata(
    folder: Path, info: dict, state: dict, schema: pa.Schema, columns: list[RewardColumn], data_files: list[str]
) -> None:
    """``dataset_info.json`` and ``state.json`` of a save_to_disk split, declaring the new columns."""
    features = _features_json(schema)
    if features is not None:
        info["features"] = features
    state = {
        **state,
        "_data_files": [{"filename": f} for f in data_files],
        "_fingerprint": _fingerprint(str(state.get("_fingerprint", "")), columns),
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


class DiskDestination(TableCopy):
    """A ``save_to_disk`` folder (or one split of a DatasetDict folder, the other splits carried over)."""

    def _split_dir(self) -> Path:
        return self.files.paths[0].parent

    def targets(self, root: Path) -> list[Path]:
        split = self._split_dir().relative_to(Path(str(self.source.root)))
        return [root / split / f.name for f in self.files.paths]

    def write(self, columns: list[RewardColumn], overwrite: bool, dropped: list[str]) -> Path:
        split_dir = self._split_dir()
        skip = {f.resolve() for f in self.files.paths} | {
            (split_dir / n).resolve() for n in ("state.json", "dataset_info.json")
        }
        with atomic.staged(self.path) as tmp:
            carry_tree(Path(str(self.source.root)), tmp, skip, self.link)
            schema = self.rewrite_all(tmp, columns, dropped)
            out_dir = self.targets(tmp)[0].parent
            info = json.loads((split_dir / "dataset_info.json").read_text())
            state = json.loads((split_dir / "state.json").read_text())
            write_disk_metadata(out_dir, info, state, schema, columns, [f.name for f in self.files.paths])
        return self.path


class HubCopy(TableCopy):
    """Output of a Hub dataset: in the working folder, ``./NAME-vlmlabel`` plus ``suffix``; nothing local to overlap."""

    suffix = ""

    @classmethod
    def default_output(cls, source: TableSource) -> Path:
        return Path.cwd() / f"{str(source.root).split('/')[-1]}{OUTPUT_SUFFIX}{cls.suffix}"

    def local_root(self) -> Path | None:
        return None


class HubDownloadDestination(HubCopy):
    """A Hub dataset's split (from the `datasets` cache) written as a ``save_to_disk`` folder ``./NAME-vlmlabel``."""

    def targets(self, root: Path) -> list[Path]:
        count = len(self.files.paths)
        return [root / f"data-{i:05d}-of-{count:05d}.arrow" for i in range(count)]

    def write(self, columns: list[RewardColumn], overwrite: bool, dropped: list[str]) -> Path:
        with atomic.staged(self.path) as tmp:
            tmp.mkdir()
            schema = self.rewrite_all(tmp, columns, dropped)
            state: dict[str, object] = {
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": self.source.split,
                "_fingerprint": str(self.source.root),
            }
            info = dataclasses.asdict(self.source.hub_info) if self.source.hub_info is not None else {}
            write_disk_metadata(tmp, info, state, schema, columns, [t.name for t in self.targets(tmp)])
        return self.path


class ParquetDestination(TableCopy):
    """Parquet again: ``FILE-vlmlabel.parquet`` for one file; ``FOLDER-vlmlabel`` mirroring a folder or a glob."""

    @staticmethod
    def default_output(source: TableSource) -> Path:
        root = Path(str(source.root))
        if root.is_file():
            return root.with_name(f"{root.stem}{OUTPUT_SUFFIX}{root.suffix}")
        base = (root if root.exists() else source.base or root).absolute()
        return base.with_name(f"{base.name}{OUTPUT_SUFFIX}")

    @staticmethod
    def output_suffixes(source: TableSource) -> tuple[str, ...]:
        """A file's (.parquet, or the source file's own ending) for one file; () for a folder or a glob."""
        root = Path(str(source.root))
        return tuple(dict.fromkeys((PARQUET_SUFFIX, root.suffix.lower()))) if root.is_file() else ()

    def _single_file(self) -> bool:
        return Path(str(self.source.root)).is_file()

    def targets(self, root: Path) -> list[Path]:
        if self._single_file():
            return [root]
        base = self.source.base or Path(str(self.source.root))
        return [root / f.relative_to(base) for f in self.files.paths]

    def write(self, columns: list[RewardColumn], overwrite: bool, dropped: list[str]) -> Path:
        with atomic.staged(self.path) as tmp:
            if Path(str(self.source.root)).is_dir() and self.source.base is not None:
                carry_tree(self.source.base, tmp, {f.resolve() for f in self.files.paths}, self.link)
            self.rewrite_all(tmp, columns, dropped)
        return self.path
