"""The mapper: frames -> device -> preprocess -> encode -> score, one batch at a time.

``compute_rows`` is the one loop. The reader (``vlmlabel.reader.readahead.read_ahead``) fills the next batches
while the device encodes the current one; scores come back one batch late, so the GPU never waits for the
host between batches. JPEG frames are decoded on the GPU when there is one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmlabel import rewards
from vlmlabel.errors import SourceError, VlmlabelError
from vlmlabel.events import QUIET, Events
from vlmlabel.files.interrupt import pause_at
from vlmlabel.formulation import ScoreFn
from vlmlabel.model import ClipModel
from vlmlabel.preprocess import DevicePreprocess
from vlmlabel.reader.buffers import RAW_AXES, Batch, as_nchw
from vlmlabel.reader.readahead import decode_jpegs, read_ahead
from vlmlabel.sources.base import Align, Episode, FrameSource, Segment


@dataclass
class RelabelResult:
    episodes: list[Episode]
    rewards: list[np.ndarray]  # one (steps, goals) float32 array per episode
    frames: int
    seconds: float
    resumed: int = 0  # frames taken from saved progress, not scored in ``seconds``

    @property
    def frames_per_second(self) -> float:
        scored = self.frames - self.resumed
        return scored / self.seconds if self.seconds > 0 else float("inf")

    def all_rewards(self) -> np.ndarray:
        return np.concatenate(self.rewards, axis=0)


class FrameScorer:
    """Encodes frames on the model's device and turns the embeddings into rewards with ``score_fn``."""

    def __init__(self, model: ClipModel, goals: Sequence[str] = (), score_fn: ScoreFn | None = None):
        self.model = model
        self.preprocess = DevicePreprocess(model.preprocess, model.device)
        if score_fn is None:
            goal_embeddings = model.encode_texts(goals)
            score_fn = lambda x: rewards.cosine(x, goal_embeddings)  # noqa: E731
        self.score_fn = score_fn

    def embed(self, batch: Batch) -> torch.Tensor:
        """Unit fp32 image embeddings of a batch, in the batch's order."""
        device = self.model.device
        if batch.form in RAW_AXES:
            frames = self._to_device(batch)
            features = self.model.encode_images(self.preprocess(as_nchw(frames, batch.form)))
            batch.release()  # on the CPU the frames were read in place until now
            return features
        assert isinstance(batch.frames, list)  # "jpeg" and "decoded" batches hold one tensor per frame
        decoded = decode_jpegs(batch.frames, device) if batch.form == "jpeg" else batch.frames
        # Decoded frames may differ in size: preprocess each size group, keep the original order.
        by_shape: dict[tuple, list[int]] = {}
        for index, frame in enumerate(decoded):
            by_shape.setdefault(tuple(frame.shape), []).append(index)
        embeddings: torch.Tensor | None = None
        for indices in by_shape.values():
            stacked = torch.stack([decoded[i] for i in indices]).to(device)
            encoded = self.model.encode_images(self.preprocess(stacked))
            if embeddings is None:
                embeddings = torch.empty((batch.size, encoded.shape[1]), device=device)
            embeddings[indices] = encoded
        batch.release()  # every frame was copied by the stack
        assert embeddings is not None
        return embeddings

    def _to_device(self, batch: Batch) -> torch.Tensor:
        """Copy the batch's uint8 frames to the device and give its host buffer back (not on the CPU)."""
        device = self.model.device
        assert isinstance(batch.frames, torch.Tensor)  # raw batches hold one uint8 tensor
        if device.type == "cpu":
            return batch.frames
        cuda = device.type == "cuda"
        frames = batch.frames.to(device, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        batch.release(event)
        return frames

    def score(self, batch: Batch) -> torch.Tensor:
        return self.score_fn(self.embed(batch))


def compute_rows(
    source: FrameSource,
    episodes: list[Episode],
    batch_size: int,
    device: torch.device,
    compute: Callable[[Batch], torch.Tensor],
    events: Events = QUIET,
    workers: int = 0,
) -> Generator[np.ndarray, None, None]:
    """The one loop: every frame of ``episodes`` in order through ``compute``, one block of rows per batch;
    ``workers`` decoding processes (0: a reader thread in this process).

    Rows come back one batch late: the copy to the host that waits for batch i is made after batch
    i + 1 has been queued, so a GPU never idles between batches.
    """
    total = sum(e.steps for e in episodes)
    position = 0
    pending: torch.Tensor | None = None
    batches = read_ahead(source, episodes, batch_size, device, workers)
    try:
        for index, batch in enumerate(batches):
            if index == 1:
                pause_at("score")
            queued = compute(batch)
            if pending is not None:
                yield finite_rows(pending.cpu().numpy(), position - len(pending))
                events.progress(len(pending))
            pending = queued
            position += batch.size
    finally:
        batches.close()  # stops the reader thread or the workers, also when the caller stops early
    if pending is not None:
        yield finite_rows(pending.cpu().numpy(), position - len(pending))
        events.progress(len(pending))
    if position != total:
        raise SourceError(f"read {position} frames but the episodes have {total} steps; the file is inconsistent")


def finite_rows(rows: np.ndarray, first: int) -> np.ndarray:
    """``rows`` (the model's output for the frames from ``first`` of this pass on), refused when any is NaN or
    infinite: nothing made of them means anything, so the run stops at the first such batch, not after the last."""
    bad = int(np.count_nonzero(~np.isfinite(rows)))
    if bad:
        raise VlmlabelError(
            f"the model gave {bad} NaN or infinite value(s) for frames {first}-{first + len(rows) - 1} "
            "of this pass (an overflow in fp16/bf16, or NaN in its weights?); nothing was written: "
            "run with --precision fp32, or check the checkpoint"
        )
    return rows


def _run(
    source: FrameSource,
    episodes: list[Episode],
    batch_size: int,
    device: torch.device,
    compute: Callable[[Batch], torch.Tensor],
    events: Events,
    workers: int = 0,
) -> np.ndarray:
    """All rows of ``compute_rows`` in one fp32 array."""
    total = sum(e.steps for e in episodes)
    out: np.ndarray | None = None
    position = 0
    for rows in compute_rows(source, episodes, batch_size, device, compute, events, workers):
        if out is None:
            out = np.empty((total, rows.shape[1]), dtype=np.float32)
        out[position : position + len(rows)] = rows
        position += len(rows)
    if out is None:
        raise SourceError("the episodes hold no frames; the file is inconsistent")
    return out


def split_episodes(values: np.ndarray, episodes: list[Episode]) -> list[np.ndarray]:
    bounds = np.cumsum([0] + [e.steps for e in episodes])
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def score_episodes(
    source: FrameSource,
    model: ClipModel,
    goals: Sequence[str] = (),
    align: Align = Align.frame,
    batch_size: int = 32,
    events: Events = QUIET,
    score_fn: ScoreFn | None = None,
    episodes: list[Episode] | None = None,
    workers: int = 0,
) -> RelabelResult:
    """Score every step of every episode (cosine to ``goals``, or ``score_fn``); nothing is written here.

    Pass ``episodes`` when the caller already has them: for table sources they cost a pass over the columns.
    ``workers``: decoding processes (0: a reader thread in this process)."""
    episodes = source.episodes(align) if episodes is None else episodes
    scorer = FrameScorer(model, goals, score_fn)
    start = time.perf_counter()
    scores = _run(source, episodes, batch_size, model.device, scorer.score, events, workers)
    seconds = time.perf_counter() - start
    return RelabelResult(episodes, split_episodes(scores, episodes), len(scores), seconds)


def embed_segments(
    source: FrameSource,
    model: ClipModel,
    segments: Sequence[Segment],
    batch_size: int,
    events: Events = QUIET,
    workers: int = 0,
) -> Iterator[np.ndarray]:
    """Unit image embeddings (float16) of the rows of ``segments``, in order, block by block: what the cache
    stores, streamed so memory stays bounded by a batch whatever the dataset's length."""
    scorer = FrameScorer(model, score_fn=lambda x: x)
    parts = [Episode(s.array, len(s), (s,), "") for s in segments]
    for rows in compute_rows(source, parts, batch_size, model.device, scorer.embed, events, workers):
        yield rows.astype(np.float16)
