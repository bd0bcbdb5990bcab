"""Hub datasets streamed with ``--streaming``: rows arrive batch by batch, nothing is downloaded first.

A stream cannot be rewritten in place, so its rewards go to a parquet sidecar keyed by
(episode_index, frame_index, index). Counting rows and reading the episode columns is one pass over
those small columns only (projected at the parquet reader when the dataset is parquet); scoring is a
second pass over the image column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from vlmlabel.errors import SourceError
from vlmlabel.sources import arrow_frames
from vlmlabel.sources.base import SourceKind
from vlmlabel.sources.tables import EPISODE_COLUMNS, READ_BATCH_ROWS, TableSource

Loader = Callable[[list[str] | None], Any]  # columns -> datasets.IterableDataset (untyped package)


def _short(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class StreamFiles:
    """The `TableFiles` interface over an IterableDataset: no files, one logical stream."""

    paths: tuple[Path, ...] = ()
    fmt = "stream"
    seekable = False

    def __init__(self, load: Loader, name: str):
        self._load, self._name = load, name

    def _tables(self, columns: list[str] | None, batch_rows: int) -> Iterator[pa.Table]:
        try:
            yield from self._load(columns).with_format("arrow").iter(batch_size=batch_rows)
        except SourceError:
            raise
        except Exception as exc:  # network, auth, decoding: datasets raises many types
            raise SourceError(f"streaming the Hub dataset {self._name} failed: {_short(exc)}") from None

    def schema(self) -> pa.Schema:
        first = next(self._tables(None, 1), None)
        if first is None:
            raise SourceError(f"{self._name} has no rows (empty split?); nothing to label")
        return first.schema

    def count_column(self, schema: pa.Schema) -> str:
        small = [n for n in EPISODE_COLUMNS if n in schema.names]
        plain = [f.name for f in schema if not arrow_frames.looks_like_frames(f, None)]
        return (small or plain or schema.names)[0]

    def rows_per_file(self) -> list[int]:
        column = self.count_column(self.schema())
        return [sum(batch.num_rows for batch in self.batches([column], 65536))]

    def batches(self, columns: list[str], batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        for table in self._tables(columns, batch_rows):
            yield from table.select(columns).to_batches()


def hub_loader(repo_id: str, split: str, revision: str | None) -> Loader:
    """Stream ``repo_id``; columns are projected by the parquet reader where the builder supports it."""
    import datasets  # only for a streamed Hub dataset: `datasets` is slow to import, and no local source needs it

    def load(columns: list[str] | None):
        if columns:
            try:
                return datasets.load_dataset(repo_id, split=split, revision=revision, streaming=True, columns=columns)
            except (TypeError, ValueError):  # a builder without a `columns` option
                pass
        stream = datasets.load_dataset(repo_id, split=split, revision=revision, streaming=True)
        return stream.select_columns(columns) if columns else stream

    return load


def open_streaming(
    repo_id: str, image_key: str | None, split: str, revision: str | None, load: Loader | None = None
) -> TableSource:
    files = StreamFiles(load or hub_loader(repo_id, split, revision), f"{repo_id} (split {split})")
    return TableSource(files, image_key, SourceKind.stream, repo_id)
