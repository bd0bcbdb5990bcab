"""The embedding cache: every frame's unit image embedding stored beside the frames, so new goals are cheap.

A cache is kept per frame array and indexed by that array's rows, not by steps, so one cache serves
both alignments (``--align frame`` and ``next``). ``embed`` stores the rows that either alignment reads:
all rows of the frames array (Minari's T+1 observations included) and, of a next-observation array, only
the rows it contributes (each episode's last step), recorded in a companion row-index dataset.
A cache is used only when it was made by the same model, weights, preprocessing and image key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vlmlabel import __version__
from vlmlabel.destinations.hdf5 import H5Dataset, RowStream
from vlmlabel.engine import RelabelResult
from vlmlabel.events import QUIET, Events
from vlmlabel.formulation import ScoreFn
from vlmlabel.model import ClipModel, Described
from vlmlabel.sources.base import Align, CachingSource, Episode, Segment
from vlmlabel.sources.hdf5 import EMBEDDING_ROWS_SUFFIX

CACHE_CHUNK_ROWS = 8192
SCORE_BLOCK_ROWS = 65536
_MATCH_KEYS = ("model", "pretrained", "model_weights", "preprocess", "image_key", "source_fingerprint")


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


def identity(model: Described, image_key: str, fingerprint: str) -> dict[str, str]:
    """What must be equal for a cache to be reused (precision is not: it changes values only by rounding).

    ``fingerprint`` (``sources.base.content_fingerprint``) ties the cache to the frames it was computed from."""
    described = model.describe()
    return {
        "model": described["model"],
        "pretrained": described["pretrained"],
        "model_weights": model.weights_identity(),  # same path, other weights: another cache
        "preprocess": described["preprocess"],
        "image_key": image_key,
        "source_fingerprint": fingerprint,
    }


def cache_stream(
    source: CachingSource, plans: list[ArrayPlan], blocks: Iterator[np.ndarray], model: ClipModel, fingerprint: str
) -> tuple[list[H5Dataset], RowStream]:
    """What ``embed`` writes: per frame array a float16 (rows, D) dataset filled from ``blocks`` (the embeddings
    of every plan's rows, in plan order), plus the stored row indices where only some rows are kept."""
    indices, embedded = [], []
    for item in plans:
        location = source.embedding_location(item.array)
        attrs = {
            **identity(model, source.image_key, fingerprint),
            "precision": model.precision,
            "source_array": item.array,
            "source_rows": source.array_rows(item.array),
            "rows": "all" if item.dense else "indexed",
            "vlmlabel_version": __version__,
            "description": "unit CLIP image embeddings, one row per frame row of source_array",
        }
        embedded.append(H5Dataset(location, np.empty(0), attrs, dtype="float16", chunk_rows=CACHE_CHUNK_ROWS))
        if not item.dense:
            indices.append(
                H5Dataset(location + EMBEDDING_ROWS_SUFFIX, item.rows, {"source_array": item.array}, dtype="int64")
            )
    return indices, RowStream(embedded, [len(p.rows) for p in plans], blocks)


@dataclass
class CacheMatch:
    """Usable caches per frame array: location and stored row indices (None: every row)."""

    locations: dict[str, tuple[str, np.ndarray | None, int]]


@dataclass(frozen=True)
class CacheMiss:
    """No usable cache, and why (a sentence for the run's summary)."""

    reason: str


def stored(source: CachingSource, episodes: list[Episode]) -> bool:
    """Whether a cache (made by any model) is stored for the first frame array ``episodes`` read: a cheap sign
    that ``find`` may serve the run, so the model is loaded for texts only (and whole if ``find`` says no)."""
    if source.cache_file is None or not episodes or not episodes[0].frames:
        return False
    return source.read_embedding_meta(source.embedding_location(episodes[0].frames[0].array)) is not None


def find(source: CachingSource, episodes: list[Episode], model: Described, fingerprint: str) -> CacheMatch | CacheMiss:
    """The caches covering every frame ``episodes`` read, or why they cannot be used. ``model``: a loaded model
    or the card of one to load (``model.describe_model``)."""
    if source.cache_file is None:
        return CacheMiss("this source keeps no embedding cache")
    wanted = identity(model, source.image_key, fingerprint)
    locations: dict[str, tuple[str, np.ndarray | None, int]] = {}
    needed: dict[str, list[Segment]] = {}
    for episode in episodes:
        for segment in episode.frames:
            needed.setdefault(segment.array, []).append(segment)
    for array, segments in needed.items():
        location = source.embedding_location(array)
        meta = source.read_embedding_meta(location)
        if meta is None:
            return CacheMiss("no embedding cache (run `vlmlabel embed` to make one)")
        attrs, rows, count = meta
        for key in _MATCH_KEYS:
            if key == "source_fingerprint" and str(attrs.get(key)) != wanted[key]:
                return CacheMiss(
                    f"embedding cache at {location} was made from other frames (the data changed since "
                    "`vlmlabel embed`, or an older vlmlabel made it): ignored"
                )
            if key == "model_weights" and str(attrs.get(key)) != wanted[key]:
                return CacheMiss(
                    f"embedding cache at {location} was made with other model weights (they changed since "
                    "`vlmlabel embed`, or an older vlmlabel made it): ignored"
                )
            if str(attrs.get(key)) != wanted[key]:
                return CacheMiss(
                    f"embedding cache at {location} was made with {key} {attrs.get(key)!r}, "
                    f"not {wanted[key]!r}: ignored"
                )
        if attrs.get("source_rows") != source.array_rows(array):
            return CacheMiss(
                f"embedding cache at {location} has {attrs.get('source_rows')} rows but {array} has "
                f"{source.array_rows(array)}: stale, ignored"
            )
        if rows is None and count != source.array_rows(array) or rows is not None and count != len(rows):
            return CacheMiss(f"embedding cache at {location} is inconsistent: ignored")
        if rows is not None:
            wanted_rows = np.concatenate([np.arange(s.start, s.stop) for s in segments])
            found = np.searchsorted(rows, wanted_rows)
            if (found >= len(rows)).any() or (rows[np.minimum(found, len(rows) - 1)] != wanted_rows).any():
                return CacheMiss(f"embedding cache at {location} lacks rows this alignment needs: ignored")
        locations[array] = (location, rows, count)
    return CacheMatch(locations)


def score_cached(
    source: CachingSource,
    match: CacheMatch,
    episodes: list[Episode],
    score_fn: ScoreFn,
    device: torch.device,
    events: Events = QUIET,
) -> RelabelResult:
    """Score each cached row once (chunk-aligned blocks, one matrix product each), then gather the steps."""
    start = time.perf_counter()
    scored: dict[str, np.ndarray] = {}
    for array, (location, _, count) in match.locations.items():
        out: np.ndarray | None = None
        position = 0
        for block in source.read_embedding_blocks(location, SCORE_BLOCK_ROWS):
            values = score_fn(torch.from_numpy(np.asarray(block)).to(device, torch.float32)).cpu().numpy()
            if out is None:
                out = np.empty((count, values.shape[1]), dtype=np.float32)
            out[position : position + len(block)] = values
            position += len(block)
        assert out is not None  # a matched cache holds the rows the episodes need, so at least one block
        scored[array] = out
    steps = []
    for episode in episodes:
        parts = []
        for segment in episode.frames:
            _, rows, _ = match.locations[segment.array]
            if rows is None:
                parts.append(scored[segment.array][segment.start : segment.stop])
            else:
                parts.append(scored[segment.array][np.searchsorted(rows, np.arange(segment.start, segment.stop))])
        steps.append(np.concatenate(parts) if len(parts) > 1 else parts[0])
        events.progress(episode.steps)
    total = sum(e.steps for e in episodes)
    return RelabelResult(episodes, steps, total, time.perf_counter() - start)
