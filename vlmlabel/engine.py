"""The relabelling loop: read frames -> device -> preprocess -> encode -> score.

The next batches are read while the device encodes the current one: by decoding worker processes
(``--workers N``, for frames that cost decoding: encoded images, compressed chunks, Arrow lists, video)
or by a background thread. Frames are read or decoded straight into a few reusable host buffers
(pinned on CUDA, so the copy to the GPU is asynchronous and no memory is pinned per batch; in shared
memory for workers); uint8 bytes cross to the device and become floats there. JPEG frames are decoded
on the GPU when there is one. Scores come back one batch late, so the GPU never waits for the host
between batches.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from vlmlabel import rewards
from vlmlabel.batchfill import (
    DECODED_AXES,
    JPEG_MAGIC,
    Filled,
    check_frame,
    decode_frame,
    fill,
    frame_bytes,
    plan_batches,
)
from vlmlabel.decode_workers import DecodeWorkers, start_server
from vlmlabel.errors import SourceError, VlmlabelError
from vlmlabel.events import QUIET, Events
from vlmlabel.formulation import ScoreFn
from vlmlabel.model import ClipModel
from vlmlabel.preprocess import DevicePreprocess
from vlmlabel.run.interrupt import pause_at
from vlmlabel.sources.base import Align, Episode, FrameFormat, FrameSource, Reopenable, Segment, SourceRecipe

PREFETCH_BATCHES = 3
_DONE = object()
RAW_AXES = ("HWC", "CHW", "HW")


class HostBuffer:
    """One reusable host buffer for a batch of frames (``array`` is a numpy view of ``tensor``; ``slot``: its
    place in its pool, which names it to decoding workers)."""

    def __init__(self, tensor: torch.Tensor, pool: BufferPool | None, slot: int = 0):
        self.tensor = tensor
        self.slot = slot
        self.array = tensor.numpy()
        self.pool = pool
        self.event: torch.cuda.Event | None = None
        self.busy = True

    def release(self, event: torch.cuda.Event | None = None) -> None:
        """Give the buffer back; ``event`` marks the end of its copy to the device. Idempotent."""
        if self.busy and self.pool is not None:
            self.busy = False
            self.event = event
            self.pool.free.put(self)


class BufferPool:
    """A fixed set of host buffers: memory stays flat whatever the file length.

    Pinned on CUDA so copies to the GPU are asynchronous; a buffer is written again only once
    the copy recorded by its event has completed. ``shared``: in shared memory, so decoding worker
    processes write into them (not pinned then).
    """

    def __init__(self, count: int, shape: tuple[int, ...], pin: bool, shared: bool = False):
        self.free: queue.Queue[HostBuffer] = queue.Queue()
        self.buffers = []
        for slot in range(count):
            tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=pin and not shared)
            buffer = HostBuffer(tensor.share_memory_() if shared else tensor, self, slot)
            buffer.busy = False
            self.buffers.append(buffer)
            self.free.put(buffer)

    def acquire(self) -> HostBuffer:
        buffer = self.free.get()
        if buffer.event is not None:
            buffer.event.synchronize()
            buffer.event = None
        buffer.busy = True
        return buffer


@dataclass
class Batch:
    """Frames ready for the device.

    form HWC/CHW/HW: one uint8 tensor of frames as stored, or decoded (``DECODED_AXES``), in ``buffer``;
    "decoded": CHW tensors (views) of different sizes; "jpeg": undecoded JPEG bytes, decoded on the device.
    """

    frames: torch.Tensor | list[torch.Tensor]
    size: int
    form: str
    buffer: HostBuffer | None = field(default=None, repr=False)

    def release(self, event: torch.cuda.Event | None = None) -> None:
        if self.buffer is not None:
            self.buffer.release(event)


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


def as_nchw(frames: torch.Tensor, axes: str) -> torch.Tensor:
    """A view of raw frames as (N, C, H, W); done on the device so host copies stay plain memcpy."""
    if axes == "HWC":
        return frames.permute(0, 3, 1, 2)
    if axes == "HW":
        return frames.unsqueeze(1)
    return frames


def _decode(blobs: Sequence[torch.Tensor], where: str, alpha: Sequence[str | None] = ()) -> list[torch.Tensor]:
    """RGB uint8 frames decoded on the CPU, one tensor each (``alpha[i]``: ``check_frame``'s verdict on frame i)."""
    return [
        decode_frame(blob, f"a frame in {where}", alpha[i] if i < len(alpha) else None) for i, blob in enumerate(blobs)
    ]


def decode_jpegs(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG bytes in one batched call on ``device`` (nvJPEG on CUDA); CPU decoding if that fails."""
    try:
        decoded = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        # nvJPEG refuses some valid files (e.g. CMYK); the CPU decoder says precisely what is wrong if anything.
        decoded = [frame.to(device) for frame in _decode(blobs, "the file")]
    return list(decoded)


def iter_batches(
    source: FrameSource,
    episodes: list[Episode],
    batch_size: int,
    pool: BufferPool | None = None,
    jpeg_on_device: bool = False,
) -> Iterator[Batch]:
    """Frames of all episodes in order, regrouped into batches of ``batch_size`` (the last may be short), read
    in this thread.

    Frames are read (raw) or decoded (encoded) straight into buffers from ``pool`` (fresh buffers without
    one): one tensor per batch, no per-frame list. JPEGs stay bytes when ``jpeg_on_device`` asks the device
    to decode them.
    """
    if jpeg_on_device and source.frame_format.encoded:
        return _encoded_batches(source, episodes, batch_size)
    return _filled_batches(source, episodes, batch_size, pool)


def _batch_of(buffer: HostBuffer, filled: Filled, axes: str) -> Batch | None:
    """The frames a fill left in ``buffer``: one tensor when they share a shape (form ``axes``), else a list
    ("decoded"); None when there were none."""
    if filled.size == 0:
        buffer.release()
        return None
    flat = buffer.tensor.view(-1)
    if not filled.spill and len(set(filled.shapes)) == 1:
        shape, count = filled.shapes[0], len(filled.shapes)
        return Batch(flat[: count * math.prod(shape)].view(count, *shape), count, axes, buffer)
    frames, offset = [], 0
    for shape in filled.shapes:
        frames.append(flat[offset : offset + math.prod(shape)].view(1, *shape))
        offset += math.prod(shape)
    frames.extend(torch.from_numpy(frame).unsqueeze(0) for frame in filled.spill)
    return Batch([as_nchw(frame, axes).squeeze(0) for frame in frames], filled.size, "decoded", buffer)


def _axes(fmt: FrameFormat) -> str:
    return DECODED_AXES if fmt.encoded else fmt.axes


def _filled_batches(
    source: FrameSource, episodes: list[Episode], batch_size: int, pool: BufferPool | None
) -> Iterator[Batch]:
    fmt = source.frame_format
    plan = plan_batches(episodes, batch_size)
    first = next(plan, None)
    if first is None:
        return
    if pool is not None:
        acquire = pool.acquire
    else:  # the caller may keep every batch: each gets a buffer of its own
        size = batch_size * frame_bytes(source, first[0], fmt, source.image_key)
        acquire = lambda: HostBuffer(torch.empty(size, dtype=torch.uint8), None)  # noqa: E731
    for pieces in itertools.chain([first], plan):
        buffer = acquire()
        filled = fill(source, pieces, buffer.array.reshape(-1), fmt, source.image_key)
        batch = _batch_of(buffer, filled, _axes(fmt))
        if batch is not None:
            yield batch


def _worker_batches(
    source: FrameSource, recipe: SourceRecipe, episodes: list[Episode], batch_size: int, workers: int
) -> Iterator[Batch]:
    """Batches filled by ``workers`` processes into shared buffers, handed out in order; ``workers + 2`` batches
    are in flight, so each worker finds its next batch queued when it finishes one."""
    fmt = source.frame_format
    plan = plan_batches(episodes, batch_size)
    first = next(plan, None)
    if first is None:
        return
    in_flight = workers + 2
    size = batch_size * frame_bytes(source, first[0], fmt, source.image_key)
    pool = BufferPool(in_flight + 2, (size,), pin=False, shared=True)  # + the model's batch and one to spare
    pending: deque[tuple[int, HostBuffer]] = deque()

    def take(decoders: DecodeWorkers) -> Batch | None:
        index, buffer = pending.popleft()
        return _batch_of(buffer, decoders.result(index), _axes(fmt))

    with DecodeWorkers(recipe, [b.tensor for b in pool.buffers], workers, fmt, source.image_key) as decoders:
        for index, pieces in enumerate(itertools.chain([first], plan)):
            while len(pending) >= in_flight:
                if (batch := take(decoders)) is not None:
                    yield batch
            buffer = pool.acquire()
            decoders.submit(index, buffer.slot, pieces)
            pending.append((index, buffer))
        while pending:
            if (batch := take(decoders)) is not None:
                yield batch


def _first_is_jpeg(source: FrameSource, episodes: list[Episode]) -> bool:
    first = next((s for e in episodes for s in e.frames if len(s)), None)
    if first is None:
        return False
    block = next(iter(source.read_blocks(Segment(first.array, first.start, first.start + 1), 1)))
    return np.asarray(block[0], dtype=np.uint8)[:3].tobytes() == JPEG_MAGIC


def _encoded_batches(source: FrameSource, episodes: list[Episode], batch_size: int) -> Iterator[Batch]:
    """Undecoded JPEG batches for the device's decoder (any other frame in a batch: decoded here)."""
    pending: list[torch.Tensor] = []
    alpha: list[str | None] = []  # per pending frame: check_frame's verdict

    def flush() -> Batch:
        nonlocal pending, alpha
        (blobs, pending), (marks, alpha) = (pending, []), (alpha, [])
        if all(bytes(b[:3].numpy()) == JPEG_MAGIC for b in blobs):
            return Batch(blobs, len(blobs), "jpeg")
        return Batch(_decode(blobs, source.image_key, marks), len(blobs), "decoded")

    for episode in episodes:
        for segment in episode.frames:
            row = segment.start
            for block in source.read_blocks(segment, batch_size):
                for blob in block:
                    data = np.asarray(blob, dtype=np.uint8).tobytes()
                    alpha.append(check_frame(data, row, segment.array))  # header only; refuses inexact frames
                    pending.append(torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()))
                    row += 1
                    if len(pending) == batch_size:
                        yield flush()
    if pending:
        yield flush()


def _prefetch(batches: Iterator[Batch], depth: int) -> Generator[Batch, None, None]:
    """Run ``batches`` in a background thread, ``depth`` batches ahead; errors surface in the caller."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    batch.release()
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
                item = slots.get_nowait()
                if isinstance(item, Batch):
                    item.release()  # so a reader waiting for a free buffer can see the stop
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
) -> Iterator[np.ndarray]:
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
                yield _finite(pending.cpu().numpy(), position - len(pending))
                events.progress(len(pending))
            pending = queued
            position += batch.size
    finally:
        batches.close()  # stops the reader thread or the workers, also when the caller stops early
    if pending is not None:
        yield _finite(pending.cpu().numpy(), position - len(pending))
        events.progress(len(pending))
    if position != total:
        raise SourceError(f"read {position} frames but the episodes have {total} steps; the file is inconsistent")


def _finite(rows: np.ndarray, first: int) -> np.ndarray:
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


def worker_recipe(source: FrameSource, workers: int) -> SourceRecipe | None:
    """How decoding workers reopen ``source``, when ``workers`` are asked for and its rows cost decoding
    (raw uncompressed frames are a copy: read in this process whatever ``workers`` says)."""
    recipe = source.recipe() if workers > 0 and isinstance(source, Reopenable) else None
    return recipe if recipe is not None and recipe.decodes else None


def prepare_workers(source: FrameSource, workers: int) -> None:
    """Before the model loads: start what the workers will fork from, if they will be used."""
    if worker_recipe(source, workers) is not None:
        start_server()


def read_ahead(
    source: FrameSource, episodes: list[Episode], batch_size: int, device: torch.device, workers: int
) -> Generator[Batch, None, None]:
    """The batches of ``episodes`` in order, read ahead of the model: by ``workers`` processes when the rows
    cost decoding and the source can be opened again elsewhere, else by a reader thread. JPEGs go to a CUDA
    device undecoded (nvJPEG) when the first frame is one."""
    fmt = source.frame_format
    jpeg_on_device = device.type == "cuda" and fmt.encoded and _first_is_jpeg(source, episodes)
    recipe = worker_recipe(source, workers)
    if recipe is not None and not jpeg_on_device:
        yield from _worker_batches(source, recipe, episodes, batch_size, workers)
        return
    pool = None
    if not jpeg_on_device:
        first = next((s for e in episodes for s in e.frames if len(s)), None)
        size = batch_size * frame_bytes(source, first, fmt, source.image_key) if first is not None else 1
        pool = BufferPool(PREFETCH_BATCHES + 2, (size,), pin=device.type == "cuda")
    batches = _prefetch(iter_batches(source, episodes, batch_size, pool, jpeg_on_device), PREFETCH_BATCHES)
    try:
        yield from batches
    finally:
        batches.close()


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
    on_progress: Callable[[int], None] | None = None,
    workers: int = 0,
) -> Iterator[np.ndarray]:
    """Unit image embeddings (float16) of the rows of ``segments``, in order, block by block: what the cache
    stores, streamed so memory stays bounded by a batch whatever the dataset's length."""
    scorer = FrameScorer(model, score_fn=lambda x: x)
    parts = [Episode(s.array, len(s), (s,), "") for s in segments]
    progress = Events(on_progress=on_progress)
    for rows in compute_rows(source, parts, batch_size, model.device, scorer.embed, progress, workers):
        yield rows.astype(np.float16)
