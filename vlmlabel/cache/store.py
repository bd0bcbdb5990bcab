"""Storing a cache (what ``embed`` writes): which rows of which frame arrays, and the one safe write.

Every row either alignment reads is stored: all rows of a frames array, and of a next-observation array only
the rows it contributes, with their indices (``layout``). The write is the rewards' all-or-nothing write
(``destinations.hdf5.write_file``), filled block by block as the embeddings are computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmlabel import __version__
from vlmlabel.cache.layout import EMBEDDING_ROWS_SUFFIX, identity, location
from vlmlabel.destinations.hdf5 import H5Dataset, RowStream, refuse_external, write_file
from vlmlabel.files.provenance import VERSION_ATTR
from vlmlabel.files.stamp import Stamp
from vlmlabel.model import ClipModel
from vlmlabel.sources.base import Align, CachingSource, Segment
from vlmlabel.sources.hdf5 import open_read_only

CACHE_CHUNK_ROWS = 8192


@dataclass
class ArrayPlan:
    """Rows of one frame array to embed, as contiguous segments; ``dense`` when they are all its rows."""

    array: str
    rows: np.ndarray
    segments: list[Segment]
    dense: bool


def plan(source: CachingSource) -> list[ArrayPlan]:
    """Which rows of which arrays the two alignments read; each array's rows sorted and unique."""
    ranges: dict[str, list[np.ndarray]] = {}
    for align in Align:
        for episode in source.episodes(align):
            for segment in episode.frames:
                ranges.setdefault(segment.array, []).append(np.arange(segment.start, segment.stop, dtype=np.int64))
    plans = []
    for array, parts in ranges.items():
        rows = np.unique(np.concatenate(parts))
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(rows)]])
        segments = [Segment(array, int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]
        plans.append(ArrayPlan(array, rows, segments, dense=len(rows) == source.array_rows(array)))
    return plans


def refuse_unsafe(source: CachingSource, target: Path, plans: list[ArrayPlan]) -> None:
    """Where the cache goes into the source's own file (``holds_outputs``: an HDF5 source, or its copy at
    ``target``), nothing the file links to may receive it, and a copy elsewhere must still find what the file
    reads from other files (``destinations.hdf5.refuse_external``). A cache file beside the data links nowhere."""
    if not source.holds_outputs or source.cache_file is None:
        return
    locations = [location(source, p.array) for p in plans]
    with open_read_only(source.cache_file) as handle:
        refuse_external(handle, source.cache_file, target, locations, [p.array for p in plans[:1]])


def cache_stream(
    source: CachingSource, plans: list[ArrayPlan], blocks: Iterator[np.ndarray], model: ClipModel, fingerprint: str
) -> tuple[list[H5Dataset], RowStream]:
    """What ``embed`` writes: per frame array a float16 (rows, D) dataset filled from ``blocks`` (the embeddings
    of every plan's rows, in plan order), plus the stored row indices where only some rows are kept."""
    indices, embedded = [], []
    for item in plans:
        where = location(source, item.array)
        attrs = {
            **identity(model, source.image_key, fingerprint),
            "precision": model.precision,
            "source_array": item.array,
            "source_rows": source.array_rows(item.array),
            "rows": "all" if item.dense else "indexed",
            VERSION_ATTR: __version__,
            "description": "unit CLIP image embeddings, one row per frame row of source_array",
        }
        embedded.append(H5Dataset(where, np.empty(0), attrs, dtype="float16", chunk_rows=CACHE_CHUNK_ROWS))
        if not item.dense:
            indices.append(
                H5Dataset(where + EMBEDDING_ROWS_SUFFIX, item.rows, {"source_array": item.array}, dtype="int64")
            )
    return indices, RowStream(embedded, [len(p.rows) for p in plans], blocks)


def write(
    source: CachingSource,
    plans: list[ArrayPlan],
    blocks: Iterator[np.ndarray],
    model: ClipModel,
    fingerprint: str,
    base: Path | None,
    target: Path,
    stamp: Stamp | None,
    keep_mode: bool,
) -> tuple[Path, int]:
    """``base`` (the cache file as it is; None: a new one) with the cache of ``plans`` filled from ``blocks``, put
    at ``target`` all or nothing; an older cache is replaced, and row indices an array no longer needs removed.
    Returns where it was written and the embeddings' width."""
    indices, stream = cache_stream(source, plans, blocks, model, fingerprint)
    stale_rows = [location(source, p.array) + EMBEDDING_ROWS_SUFFIX for p in plans if p.dense]
    written = write_file(base, target, indices, True, stamp, remove=stale_rows, stream=stream, keep_mode=keep_mode)
    return written, stream.width
