"""The relabelling loop: read frames -> device -> preprocess -> encode -> score.

A background thread reads (and decodes) the next batches while the device encodes the
current one; uint8 frames cross to the device and become floats there.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from vlmlabel import rewards
from vlmlabel.errors import SourceError
from vlmlabel.formulation import ScoreFn
from vlmlabel.model import ClipModel
from vlmlabel.preprocess import DevicePreprocess
from vlmlabel.sources.base import Align, Episode, FrameSource, Segment

PREFETCH_BATCHES = 3
_DONE = object()


@dataclass
class Batch:
    """Frames ready for the device: one uint8 NCHW tensor, or decoded frames of varying size."""

    frames: torch.Tensor | list[torch.Tensor]
    size: int


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


def _to_nchw(block: np.ndarray, layout: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(block))
    if layout == "HWC":
        return tensor.permute(0, 3, 1, 2)
    if layout == "HW":
        return tensor.unsqueeze(1)
    return tensor


def _decode(blobs: Sequence[np.ndarray], where: str) -> list[torch.Tensor]:
    decoded = []
    for blob in blobs:
        data = torch.from_numpy(np.frombuffer(np.asarray(blob, dtype=np.uint8).tobytes(), dtype=np.uint8).copy())
        try:
            decoded.append(decode_image(data, mode=ImageReadMode.RGB))
        except RuntimeError as exc:
            raise SourceError(f"a frame in {where} is not a decodable JPEG/PNG image ({exc}); "
                              "check the file or choose another --image-key") from None
    return decoded


def iter_batches(source: FrameSource, episodes: list[Episode], batch_size: int) -> Iterator[Batch]:
    """Frames of all episodes in order, regrouped into batches of ``batch_size`` (the last may be short)."""
    layout = source.frame_format.layout
    pending: list = []
    count = 0

    def flush() -> Batch:
        nonlocal pending, count
        if layout == "encoded":
            batch = Batch([frame for part in pending for frame in part], count)
        else:
            batch = Batch(torch.cat(pending) if len(pending) > 1 else pending[0], count)
        pending, count = [], 0
        return batch

    for episode in episodes:
        for segment in episode.frames:
            for block in source.read_blocks(segment, batch_size):
                offset = 0
                while offset < len(block):
                    take = min(batch_size - count, len(block) - offset)
                    part = block[offset:offset + take]
                    pending.append(_decode(part, segment.array) if layout == "encoded" else _to_nchw(part, layout))
                    count += take
                    offset += take
                    if count == batch_size:
                        yield flush()
    if count:
        yield flush()


def _prefetch(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run ``batches`` in a background thread, ``depth`` batches ahead; errors surface in the caller."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                slots.put(batch)
            slots.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put(exc)

    worker = threading.Thread(target=produce, name="vlmlabel-reader", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)


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
        non_blocking = device.type == "cuda"
        if isinstance(batch.frames, torch.Tensor):
            frames = batch.frames.pin_memory() if non_blocking else batch.frames
            return self.model.encode_images(self.preprocess(frames.to(device, non_blocking=non_blocking)))
        # Decoded frames may differ in size: preprocess each size group, keep the original order.
        by_shape: dict[tuple, list[int]] = {}
        for index, frame in enumerate(batch.frames):
            by_shape.setdefault(tuple(frame.shape), []).append(index)
        embeddings: torch.Tensor | None = None
        for indices in by_shape.values():
            stacked = torch.stack([batch.frames[i] for i in indices]).to(device, non_blocking=non_blocking)
            encoded = self.model.encode_images(self.preprocess(stacked))
            if embeddings is None:
                embeddings = torch.empty((batch.size, encoded.shape[1]), device=device)
            embeddings[indices] = encoded
        assert embeddings is not None
        return embeddings

    def score(self, batch: Batch) -> torch.Tensor:
        return self.score_fn(self.embed(batch))


def _computed(source: FrameSource, episodes: list[Episode], batch_size: int,
              compute: Callable[[Batch], torch.Tensor], on_progress: Callable[[int], None] | None,
              ) -> Iterator[np.ndarray]:
    """The one loop: every frame of ``episodes`` in order through ``compute``, one block of rows per batch."""
    total = sum(e.steps for e in episodes)
    position = 0
    for batch in _prefetch(iter_batches(source, episodes, batch_size), PREFETCH_BATCHES):
        yield compute(batch).cpu().numpy()
        position += batch.size
        if on_progress is not None:
            on_progress(batch.size)
    if position != total:
        raise SourceError(f"read {position} frames but the episodes have {total} steps; the file is inconsistent")


def _run(source: FrameSource, episodes: list[Episode], batch_size: int, compute: Callable[[Batch], torch.Tensor],
         on_progress: Callable[[int], None] | None) -> np.ndarray:
    """All rows of ``_computed`` in one fp32 array."""
    total = sum(e.steps for e in episodes)
    out: np.ndarray | None = None
    position = 0
    for rows in _computed(source, episodes, batch_size, compute, on_progress):
        if out is None:
            out = np.empty((total, rows.shape[1]), dtype=np.float32)
        out[position:position + len(rows)] = rows
        position += len(rows)
    if out is None:
        raise SourceError("the episodes hold no frames; the file is inconsistent")
    return out


def split_episodes(values: np.ndarray, episodes: list[Episode]) -> list[np.ndarray]:
    bounds = np.cumsum([0] + [e.steps for e in episodes])
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def relabel(
    source: FrameSource,
    model: ClipModel,
    goals: Sequence[str] = (),
    align: Align = Align.frame,
    batch_size: int = 32,
    on_progress: Callable[[int], None] | None = None,
    score_fn: ScoreFn | None = None,
) -> RelabelResult:
    """Score every step of every episode (cosine to ``goals``, or ``score_fn``); nothing is written here."""
    episodes = source.episodes(align)
    scorer = FrameScorer(model, goals, score_fn)
    start = time.perf_counter()
    scores = _run(source, episodes, batch_size, scorer.score, on_progress)
    seconds = time.perf_counter() - start
    return RelabelResult(episodes, split_episodes(scores, episodes), len(scores), seconds)


def embed_segments(source: FrameSource, model: ClipModel, segments: Sequence[Segment], batch_size: int,
                   on_progress: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """Unit image embeddings (float16) of the rows of ``segments``, in order, block by block: what the cache
    stores, streamed so memory stays bounded by a batch whatever the dataset's length."""
    scorer = FrameScorer(model, score_fn=lambda x: x)
    parts = [Episode(s.array, len(s), (s,), "") for s in segments]
    for rows in _computed(source, parts, batch_size, scorer.embed, on_progress):
        yield rows.astype(np.float16)
