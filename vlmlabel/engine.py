"""The relabelling loop: read frames -> device -> preprocess -> encode -> score.

A background thread reads (and, on the CPU, decodes) the next batches while the device
encodes the current one. Raw frames are copied into a few reusable host buffers (pinned on
CUDA, so the copy to the GPU is asynchronous and no memory is pinned per batch); uint8 bytes
cross to the device and become floats there. JPEG frames are decoded on the GPU when there is
one. Scores come back one batch late, so the GPU never waits for the host between batches.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from vlmlabel import rewards
from vlmlabel.errors import SourceError
from vlmlabel.formulation import ScoreFn
from vlmlabel.model import ClipModel
from vlmlabel.preprocess import DevicePreprocess
from vlmlabel.sources.base import Align, Episode, FrameSource, Segment

PREFETCH_BATCHES = 3
_DONE = object()
_JPEG_MAGIC = b"\xff\xd8\xff"
RAW_AXES = ("HWC", "CHW", "HW")


class HostBuffer:
    """One reusable host buffer for a batch of raw frames (``array`` is a numpy view of ``tensor``)."""

    def __init__(self, tensor: torch.Tensor, pool: BufferPool | None):
        self.tensor = tensor
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
    the copy recorded by its event has completed.
    """

    def __init__(self, count: int, shape: tuple[int, ...], pin: bool):
        self.free: queue.Queue[HostBuffer] = queue.Queue()
        for _ in range(count):
            buffer = HostBuffer(torch.empty(shape, dtype=torch.uint8, pin_memory=pin), self)
            buffer.busy = False
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

    form HWC/CHW/HW: one uint8 tensor of raw frames as stored (in ``buffer``); "decoded": CHW
    tensors of possibly different sizes; "jpeg": undecoded JPEG bytes, decoded on the device.
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


# Frames are scored exactly as open_clip's PIL transform scores the image as opened (resize and crop in the
# image's own mode, then convert("RGB")) only for these modes, found by experiment (tests/test_frames_exact.py).
_EXACT_MODES = frozenset({"RGB", "L"})
_ALPHA_MODES = frozenset({"RGBA", "LA"})  # exact where fully opaque: PIL resizes them in premultiplied alpha
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_REFUSED = {  # mode -> (what the frame is, why PIL's result differs, what to do)
    "P": ("a palette {fmt}", "PIL resizes palette images nearest-neighbour",
          "convert it to RGB first (PIL image.convert('RGB'))"),
    "1": ("a 1-bit {fmt}", "PIL resizes 1-bit images nearest-neighbour",
          "save it as 8-bit grayscale first (PIL image.convert('L'))"),
    "I;16": ("a 16-bit grayscale {fmt}", "PIL clips 16-bit gray to 0-255 when converting to RGB",
             "save it as 8-bit grayscale or RGB first"),
    "CMYK": ("a CMYK {fmt}", "PIL resizes it in CMYK before converting to RGB",
             "save it as RGB first (PIL image.convert('RGB'))"),
}


def frame_mode(data: bytes) -> tuple[str, str]:
    """(format, PIL mode) of an encoded frame, read from its header only; ("", "") when not recognised."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 26:
        depth, colour = data[24], data[25]
        if colour == 0:
            return "PNG", "1" if depth == 1 else "I;16" if depth == 16 else "L"
        return "PNG", _PNG_MODES.get(colour, f"colour type {colour}")
    if data.startswith(_JPEG_MAGIC):
        return "JPEG", _jpeg_mode(data)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # other formats: PIL reads the header only
            return str(image.format), image.mode
    except (UnidentifiedImageError, OSError, ValueError):
        return "", ""  # the decoder says what is wrong


def _jpeg_mode(data: bytes) -> str:
    """The mode PIL opens a JPEG in, from the component count of its SOF marker ("" if none is found)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return ""
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        elif marker in _JPEG_SOF:
            if pos + 9 >= len(data):
                return ""
            return _JPEG_MODES.get(data[pos + 9], f"{data[pos + 9]} components")
        elif marker == 0xDA:  # start of scan: no frame header before it
            return ""
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return ""


def check_frame(data: bytes, row: int, array: str) -> str | None:
    """Refuse a frame vlmlabel cannot score exactly as CLIP's PIL pipeline does; for an alpha mode, the start of
    the message that refuses it if it turns out to be transparent once decoded (None: plainly exact)."""
    fmt, mode = frame_mode(data)
    if not mode or mode in _EXACT_MODES:
        return None
    if mode in _ALPHA_MODES:
        return f"frame {row} of {array} is a {fmt} with transparency ({mode})"
    what, why, fix = _REFUSED.get(mode, ("a {fmt} image in an unsupported mode", "vlmlabel scores RGB, grayscale "
                                         "and opaque RGBA frames", "convert it to RGB first"))
    raise SourceError(f"frame {row} of {array} is {what.format(fmt=fmt)} ({mode}); vlmlabel cannot score it "
                      f"exactly as CLIP's PIL pipeline does ({why}): {fix}")


def _decode(blobs: Sequence[torch.Tensor], where: str, alpha: Sequence[str | None] = ()) -> list[torch.Tensor]:
    """RGB uint8 frames, decoded on the CPU. ``alpha[i]`` (from ``check_frame``) marks frame i as having an alpha
    channel: it is refused where transparent, as PIL would resize it in premultiplied alpha, and dropped."""
    decoded = []
    for index, blob in enumerate(blobs):
        transparent = alpha[index] if index < len(alpha) else None
        try:
            frame = decode_image(blob, mode=ImageReadMode.RGB if transparent is None else ImageReadMode.RGB_ALPHA)
        except RuntimeError as exc:
            raise SourceError(f"a frame in {where} is not a decodable JPEG/PNG image ({exc}); "
                              "check the file or choose another --image-key") from None
        if frame.dtype != torch.uint8:  # 16-bit PNG: PIL keeps the high byte of each sample
            frame = (frame.to(torch.int32) >> 8).to(torch.uint8)
        if transparent is not None:
            if bool((frame[3] != 255).any()):
                raise SourceError(f"{transparent}; vlmlabel cannot score it exactly as CLIP's PIL pipeline does "
                                  "(PIL resizes it in premultiplied alpha): flatten it onto a background first "
                                  "(e.g. PIL Image.alpha_composite) or save it as RGB")
            frame = frame[:3]
        decoded.append(frame)
    return decoded


def decode_jpegs(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG bytes in one batched call on ``device`` (nvJPEG on CUDA); CPU decoding if that fails."""
    try:
        decoded = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        # nvJPEG refuses some valid files (e.g. CMYK); the CPU decoder says precisely what is wrong if anything.
        decoded = [frame.to(device) for frame in _decode(blobs, "the file")]
    return list(decoded)


def iter_batches(source: FrameSource, episodes: list[Episode], batch_size: int,
                 pool: BufferPool | None = None, jpeg_on_device: bool = False) -> Iterator[Batch]:
    """Frames of all episodes in order, regrouped into batches of ``batch_size`` (the last may be short).

    Raw frames are copied into buffers from ``pool`` (fresh buffers without one); encoded frames
    are decoded here, except JPEGs when ``jpeg_on_device`` asks the device to decode them.
    """
    if source.frame_format.encoded:
        return _encoded_batches(source, episodes, batch_size, jpeg_on_device)
    return _raw_batches(source, episodes, batch_size, pool)


def _raw_batches(source: FrameSource, episodes: list[Episode], batch_size: int,
                 pool: BufferPool | None) -> Iterator[Batch]:
    fmt = source.frame_format
    shape = (batch_size, *fmt.frame_shape)
    acquire = pool.acquire if pool is not None else lambda: HostBuffer(torch.empty(shape, dtype=torch.uint8), None)
    buffer, filled = None, 0
    for episode in episodes:
        for segment in episode.frames:
            for block in source.read_blocks(segment, batch_size):
                assert isinstance(block, np.ndarray)  # raw frames are read as arrays
                if block.shape[1:] != fmt.frame_shape or block.dtype != np.uint8:
                    raise SourceError(f"{segment.array} holds {block.dtype} frames of shape {block.shape[1:]}, "
                                      f"but {source.image_key} has uint8 {fmt.frame_shape}; frames must all match")
                offset = 0
                while offset < len(block):
                    if buffer is None:
                        buffer = acquire()
                    take = min(batch_size - filled, len(block) - offset)
                    buffer.array[filled:filled + take] = block[offset:offset + take]
                    filled += take
                    offset += take
                    if filled == batch_size:
                        yield Batch(buffer.tensor, filled, fmt.axes, buffer)
                        buffer, filled = None, 0
    if filled:
        assert buffer is not None  # rows were copied into it
        yield Batch(buffer.tensor[:filled], filled, fmt.axes, buffer)


def _encoded_batches(source: FrameSource, episodes: list[Episode], batch_size: int,
                     jpeg_on_device: bool) -> Iterator[Batch]:
    pending: list[torch.Tensor] = []
    alpha: list[str | None] = []  # per pending frame: check_frame's verdict

    def flush() -> Batch:
        nonlocal pending, alpha
        (blobs, pending), (marks, alpha) = (pending, []), (alpha, [])
        if jpeg_on_device and all(bytes(b[:3].numpy()) == _JPEG_MAGIC for b in blobs):
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


def _prefetch(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
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


def compute_rows(source: FrameSource, episodes: list[Episode], batch_size: int, device: torch.device,
              compute: Callable[[Batch], torch.Tensor], on_progress: Callable[[int], None] | None,
              ) -> Iterator[np.ndarray]:
    """The one loop: every frame of ``episodes`` in order through ``compute``, one block of rows per batch.

    Rows come back one batch late: the copy to the host that waits for batch i is made after batch
    i + 1 has been queued, so a GPU never idles between batches.
    """
    total = sum(e.steps for e in episodes)
    fmt = source.frame_format
    pool = None
    if not fmt.encoded:
        pool = BufferPool(PREFETCH_BATCHES + 2, (batch_size, *fmt.frame_shape), pin=device.type == "cuda")
    batches = iter_batches(source, episodes, batch_size, pool, jpeg_on_device=device.type == "cuda")
    position = 0
    pending: torch.Tensor | None = None
    for batch in _prefetch(batches, PREFETCH_BATCHES):
        queued = compute(batch)
        if pending is not None:
            yield pending.cpu().numpy()
            if on_progress is not None:
                on_progress(len(pending))
        pending = queued
        position += batch.size
    if pending is not None:
        yield pending.cpu().numpy()
        if on_progress is not None:
            on_progress(len(pending))
    if position != total:
        raise SourceError(f"read {position} frames but the episodes have {total} steps; the file is inconsistent")


def _run(source: FrameSource, episodes: list[Episode], batch_size: int, device: torch.device,
         compute: Callable[[Batch], torch.Tensor], on_progress: Callable[[int], None] | None) -> np.ndarray:
    """All rows of ``compute_rows`` in one fp32 array."""
    total = sum(e.steps for e in episodes)
    out: np.ndarray | None = None
    position = 0
    for rows in compute_rows(source, episodes, batch_size, device, compute, on_progress):
        if out is None:
            out = np.empty((total, rows.shape[1]), dtype=np.float32)
        out[position:position + len(rows)] = rows
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
    on_progress: Callable[[int], None] | None = None,
    score_fn: ScoreFn | None = None,
    episodes: list[Episode] | None = None,
) -> RelabelResult:
    """Score every step of every episode (cosine to ``goals``, or ``score_fn``); nothing is written here.

    Pass ``episodes`` when the caller already has them: for table sources they cost a pass over the columns."""
    episodes = source.episodes(align) if episodes is None else episodes
    scorer = FrameScorer(model, goals, score_fn)
    start = time.perf_counter()
    scores = _run(source, episodes, batch_size, model.device, scorer.score, on_progress)
    seconds = time.perf_counter() - start
    return RelabelResult(episodes, split_episodes(scores, episodes), len(scores), seconds)


def embed_segments(source: FrameSource, model: ClipModel, segments: Sequence[Segment], batch_size: int,
                   on_progress: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """Unit image embeddings (float16) of the rows of ``segments``, in order, block by block: what the cache
    stores, streamed so memory stays bounded by a batch whatever the dataset's length."""
    scorer = FrameScorer(model, score_fn=lambda x: x)
    parts = [Episode(s.array, len(s), (s,), "") for s in segments]
    for rows in compute_rows(source, parts, batch_size, model.device, scorer.embed, on_progress):
        yield rows.astype(np.float16)
