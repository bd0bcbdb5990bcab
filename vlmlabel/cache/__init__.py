"""The embedding cache: every frame's unit image embedding stored beside the frames, so new goals are cheap.

A cache is kept per frame array and indexed by that array's rows, not by steps, so one cache serves
both alignments (``--align frame`` and ``next``). ``embed`` stores the rows that either alignment reads:
all rows of the frames array (Minari's T+1 observations included) and, of a next-observation array, only
the rows it contributes (each episode's last step), recorded in a companion row-index dataset.
A cache is used only when it was made by the same model, weights, preprocessing and image key.

The package: ``layout`` (where a cache lies in its file, what it records, reading it), ``store`` (which rows,
and the safe write ``embed`` makes), and here, matching a stored cache to a run and scoring from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from vlmlabel.cache.layout import CacheFile, Stored, identity, location
from vlmlabel.engine import RelabelResult
from vlmlabel.events import QUIET, Events
from vlmlabel.formulation import ScoreFn
from vlmlabel.model import Described
from vlmlabel.sources.base import CachingSource, Episode, Segment

SCORE_BLOCK_ROWS = 65536
_MATCH_KEYS = ("model", "pretrained", "model_weights", "preprocess", "image_key", "source_fingerprint")


@dataclass
class CacheMatch:
    """Usable caches per frame array: location and stored row indices (None: every row)."""

    locations: dict[str, tuple[str, np.ndarray | None, int]]


@dataclass
class CacheMiss:
    """Why no cache serves a run, as a sentence for the run's note."""

    reason: str


def first_stored(source: CachingSource, episodes: list[Episode]) -> Stored | None:
    """The cache (made by any model) stored for the first frame array ``episodes`` read, if there is one."""
    if source.cache_file is None or not episodes or not episodes[0].frames:
        return None
    with CacheFile(source) as file:
        return file.stored(location(source, episodes[0].frames[0].array))


def find(source: CachingSource, episodes: list[Episode], model: Described, fingerprint: str) -> CacheMatch | CacheMiss:
    """The caches covering every frame ``episodes`` read, or a sentence saying why they cannot be used."""
    if source.cache_file is None:
        return CacheMiss("this source keeps no embedding cache")
    wanted = identity(model, source.image_key, fingerprint)
    locations: dict[str, tuple[str, np.ndarray | None, int]] = {}
    needed: dict[str, list[Segment]] = {}
    for episode in episodes:
        for segment in episode.frames:
            needed.setdefault(segment.array, []).append(segment)
    with CacheFile(source) as file:
        for array, segments in needed.items():
            where = location(source, array)
            found = file.stored(where)
            if found is None:
                return CacheMiss("no embedding cache (run `vlmlabel embed` to make one)")
            refused = _refusal(source, array, where, found, segments, wanted)
            if refused is not None:
                return CacheMiss(refused)
            locations[array] = (where, found.rows, found.count)
    return CacheMatch(locations)


def _refusal(
    source: CachingSource, array: str, where: str, found: Stored, segments: list[Segment], wanted: dict[str, str]
) -> str | None:
    """Why the cache of ``array`` at ``where`` cannot serve ``segments``, or None when it can."""
    attrs, rows, count = found.attrs, found.rows, found.count
    for key in _MATCH_KEYS:
        if key == "source_fingerprint" and str(attrs.get(key)) != wanted[key]:
            return (
                f"embedding cache at {where} was made from other frames (the data changed since "
                "`vlmlabel embed`, or an older vlmlabel made it): ignored"
            )
        if key == "model_weights" and str(attrs.get(key)) != wanted[key]:
            return (
                f"embedding cache at {where} was made with other model weights (they changed since "
                "`vlmlabel embed`, or an older vlmlabel made it): ignored"
            )
        if str(attrs.get(key)) != wanted[key]:
            return f"embedding cache at {where} was made with {key} {attrs.get(key)!r}, not {wanted[key]!r}: ignored"
    if attrs.get("source_rows") != source.array_rows(array):
        return (
            f"embedding cache at {where} has {attrs.get('source_rows')} rows but {array} has "
            f"{source.array_rows(array)}: stale, ignored"
        )
    if rows is None and count != source.array_rows(array) or rows is not None and count != len(rows):
        return f"embedding cache at {where} is inconsistent: ignored"
    if rows is not None:
        wanted_rows = np.concatenate([np.arange(s.start, s.stop) for s in segments])
        found_at = np.searchsorted(rows, wanted_rows)
        if (found_at >= len(rows)).any() or (rows[np.minimum(found_at, len(rows) - 1)] != wanted_rows).any():
            return f"embedding cache at {where} lacks rows this alignment needs: ignored"
    return None


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
    with CacheFile(source) as file:
        for array, (where, _, count) in match.locations.items():
            out: np.ndarray | None = None
            position = 0
            for block in file.blocks(where, SCORE_BLOCK_ROWS):
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
