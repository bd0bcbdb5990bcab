"""Reading ahead of the model: the batches of a list of episodes, in order, filled while the device encodes.

The next batches are read by decoding worker processes (``--workers N``, for frames that cost decoding:
encoded images, compressed chunks, Arrow lists, video) or by a background thread. Frames are read or decoded
straight into a few reusable host buffers (pinned on CUDA, so the copy to the GPU is asynchronous and no
memory is pinned per batch; in shared memory for workers); uint8 bytes cross to the device and become
floats there. JPEG frames stay bytes for a CUDA device to decode (``decode_jpegs``).
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from vlmlabel.reader.batchfill import (
    DECODED_AXES,
    JPEG_MAGIC,
    Filled,
    check_frame,
    decode_frame,
    fill,
    frame_bytes,
    plan_batches,
)
from vlmlabel.reader.buffers import Batch, BufferPool, HostBuffer, as_nchw
from vlmlabel.reader.decode_workers import DecodeWorkers, start_server
from vlmlabel.sources.base import Episode, FrameFormat, FrameSource, Reopenable, Segment, SourceRecipe

PREFETCH_BATCHES = 3
_DONE = object()
T = TypeVar("T")


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


def _release_batch(item: object) -> None:
    if isinstance(item, Batch):
        item.release()  # so a reader waiting for a free buffer can see the stop


def prefetch(
    items: Iterator[T], depth: int, release: Callable[[T], None] = _release_batch, name: str = "vlmlabel-reader"
) -> Generator[T, None, None]:
    """Run ``items`` in a background thread, ``depth`` items ahead; errors surface in the caller. Items made but
    never taken go to ``release``; a generator is closed in that thread when the caller stops or it ends."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    release(item)
                    return
                slots.put(item)
            slots.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put(exc)
        finally:
            if isinstance(items, Generator):
                items.close()  # its own clean-up (a reader it holds) runs here, in the thread that ran it

    worker = threading.Thread(target=produce, name=name, daemon=True)
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
                if item is not _DONE and not isinstance(item, BaseException):
                    release(item)
            except queue.Empty:
                worker.join(timeout=0.05)


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
    batches = prefetch(iter_batches(source, episodes, batch_size, pool, jpeg_on_device), PREFETCH_BATCHES)
    try:
        yield from batches
    finally:
        batches.close()
