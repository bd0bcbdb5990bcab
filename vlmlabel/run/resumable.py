"""Score a range of frames on a fixed batch grid, saving progress and stopping cleanly on request.

Frames are numbered in file order across all episodes, and batch k always holds frames
[k*B, (k+1)*B). fp32 results depend (in the last bits) on which frames share a batch, so a
resumed run and every shard cut their batches on this same grid: each frame is computed
with exactly the batch it would have had in one uninterrupted run over the whole file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vlmlabel.engine import FrameScorer, compute_rows
from vlmlabel.errors import SourceError
from vlmlabel.events import QUIET, Events
from vlmlabel.files.interrupt import GracefulStop
from vlmlabel.run.checkpoint import Checkpoint
from vlmlabel.sources.base import Episode, FrameSource, Segment

DEFAULT_CHECKPOINT_EVERY = 4096
# Test-only: seconds to wait after each batch, so tests can stop a run at a chosen point.
_BATCH_DELAY_ENV = "VLMLABEL_TEST_BATCH_DELAY"


def grid_span(first: int, stop: int, batch_size: int, total: int) -> tuple[int, int]:
    """The smallest range of whole grid batches covering frames [first, stop)."""
    if first >= stop:
        return first, first
    return (first // batch_size) * batch_size, min(total, -(-stop // batch_size) * batch_size)


def trim(episodes: Sequence[Episode], start: int, stop: int) -> list[Episode]:
    """The episodes' frames restricted to global frame numbers [start, stop), in order."""
    trimmed, position = [], 0
    for episode in episodes:
        segments = []
        for segment in episode.frames:
            lo, hi = max(start, position), min(stop, position + len(segment))
            if lo < hi:
                offset = segment.start - position
                segments.append(Segment(segment.array, lo + offset, hi + offset))
            position += len(segment)
        if segments:
            trimmed.append(Episode(episode.name, sum(len(s) for s in segments), tuple(segments), episode.target))
        if position >= stop:
            break
    return trimmed


def _kept(saved: int, total: int) -> str:
    return f"{saved:,} of {total:,} frames saved; run the same command again to resume"


@dataclass(frozen=True)
class SpanSettings:
    """How a span is scored: which rows (``span(batch_size)``, whole grid batches), the batch size asked for,
    whether saved progress is dropped (``restart``) and how often progress is saved."""

    span: Callable[[int], tuple[int, int]]
    batch_size: int
    restart: bool = False
    every: int = DEFAULT_CHECKPOINT_EVERY


# (first, stop, batch_size) -> the rows [first, stop) computed on the grid, block after block, in order. ``first``
# is always on the grid: a span starts on it, and progress is saved at the end of a batch.
Rows = Callable[[int, int, int], Iterator[np.ndarray]]


def frame_rows(source: FrameSource, scorer: FrameScorer, episodes: Sequence[Episode], workers: int) -> Rows:
    """The rows of frames: ``episodes``' frames numbered in file order through ``scorer``, ``workers`` decoding
    processes reading them (0: a reader thread)."""

    def rows(first: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        return compute_rows(
            source, trim(episodes, first, stop), batch_size, scorer.model.device, scorer.score, QUIET, workers
        )

    return rows


@dataclass
class ScoredSpan:
    start: int
    stop: int
    scores: np.ndarray  # (stop - start, goals) float32
    resumed: int  # frames taken from saved progress
    seconds: float
    batch_size: int


def _resume(
    checkpoint: Checkpoint,
    span: Callable[[int], tuple[int, int]],
    batch_size: int,
    restart: bool,
    events: Events,
) -> tuple[int, int, int, np.ndarray, int]:
    """Saved progress taken up, or a fresh one begun: the batch size, the frames [start, end), the scores array
    (filled up to the frame reached) and that frame."""
    progress = checkpoint.load(restart)
    if progress is not None and progress.batch_size != batch_size:
        events.note(
            f"resuming with --batch-size {progress.batch_size}, the size the saved progress was "
            f"computed with (instead of {batch_size}), so the rewards match an uninterrupted run"
        )
        batch_size = progress.batch_size
    start, end = span(batch_size)
    if progress is not None and (progress.start, progress.stop) != (start, end):
        events.note("saved progress covers other frames than this run; starting over")
        progress = None
    scores = np.empty((end - start, checkpoint.goals), dtype=np.float32)
    if progress is None:
        checkpoint.begin(batch_size, start, end)
        return batch_size, start, end, scores, start
    checkpoint.resume_from(progress)
    scores[: progress.done - start] = progress.rows
    if progress.done > start:
        events.note(f"resuming: {progress.done - start:,} of {end - start:,} frames were already scored")
    return batch_size, start, end, scores, progress.done


def score_span(rows: Rows, checkpoint: Checkpoint, settings: SpanSettings, events: Events = QUIET) -> ScoredSpan:
    """Scores of rows ``settings.span(batch_size)`` (frames, or a judge's queries), resuming saved progress and
    saving every ``settings.every`` rows. SIGINT/SIGTERM stop it between batches, progress saved
    (``GracefulStop``)."""
    every = settings.every
    with GracefulStop() as stop:  # from the start: a signal never finds saved progress half loaded
        batch_size, start, end, scores, position = _resume(
            checkpoint, settings.span, settings.batch_size, settings.restart, events
        )
        resumed = position - start
        events.start(end - start)
        if resumed:
            events.progress(resumed)
        delay = float(os.environ.get(_BATCH_DELAY_ENV, "0") or 0)
        began = time.perf_counter()
        saved = position
        try:
            stop.check(_kept(saved - start, end - start))
            for block in rows(position, end, batch_size):
                scores[position - start : position - start + len(block)] = block
                position += len(block)
                events.progress(len(block))
                if stop.requested or position - saved >= every:
                    checkpoint.save(position, scores[saved - start : position - start])
                    saved = position
                if stop.requested:
                    checkpoint.flush()
                    stop.check(_kept(saved - start, end - start))
                if delay:
                    time.sleep(delay)
            if position > saved:  # everything scored is kept: a write that fails after this resumes at once
                checkpoint.save(position, scores[saved - start : position - start])
            checkpoint.flush()
            stop.check(_kept(position - start, end - start))
        finally:
            checkpoint.close()
    if position != end:
        raise SourceError(f"read {position - start} frames but expected {end - start}; the file is inconsistent")
    return ScoredSpan(start, end, scores, resumed, time.perf_counter() - began, batch_size)
