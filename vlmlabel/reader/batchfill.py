"""Filling one batch buffer from a source's rows: which rows make each batch, raw frames read into the
buffer, encoded frames decoded into it, and frames refused that cannot be scored exactly.

The same code runs in the reader thread (``reader.readahead``, ``--workers 0``) and in decoding worker
processes (``reader.decode_workers``), so a batch holds the same bytes whoever fills it. IO and decoding only:
no model, no device.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from vlmlabel.errors import SourceError
from vlmlabel.sources.base import DirectReader, Episode, FrameFormat, FrameReader, Segment

JPEG_MAGIC = b"\xff\xd8\xff"
# Decoded frames sit in batch buffers as RGB (H, W, 3), the memory decoders produce: simplejpeg decodes JPEGs
# straight into the buffer, torchvision's (3, H, W) PNG result is a view of it, copied with a plain memcpy; the
# device permutes the batch as it does for raw HWC frames. Writing them as (3, H, W) cost a strided copy per
# frame: 45 us at 224 px, a fifth of a JPEG decode.
DECODED_AXES = "HWC"

# Frames are scored exactly as open_clip's PIL transform scores the image as opened (resize and crop in the
# image's own mode, then convert("RGB")) only for these modes, found by experiment (tests/test_frames_exact.py).
_EXACT_MODES = frozenset({"RGB", "L"})
_ALPHA_MODES = frozenset({"RGBA", "LA"})  # exact where fully opaque: PIL resizes them in premultiplied alpha
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_REFUSED = {  # mode -> (what the frame is, why PIL's result differs, what to do)
    "P": (
        "a palette {fmt}",
        "PIL resizes palette images nearest-neighbour",
        "convert it to RGB first (PIL image.convert('RGB'))",
    ),
    "1": (
        "a 1-bit {fmt}",
        "PIL resizes 1-bit images nearest-neighbour",
        "save it as 8-bit grayscale first (PIL image.convert('L'))",
    ),
    "I;16": (
        "a 16-bit grayscale {fmt}",
        "PIL clips 16-bit gray to 0-255 when converting to RGB",
        "save it as 8-bit grayscale or RGB first",
    ),
    "CMYK": (
        "a CMYK {fmt}",
        "PIL resizes it in CMYK before converting to RGB",
        "save it as RGB first (PIL image.convert('RGB'))",
    ),
}


def frame_mode(data: bytes) -> tuple[str, str]:
    """(format, PIL mode) of an encoded frame, read from its header only; ("", "") when not recognised."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 26:
        depth, colour = data[24], data[25]
        if colour == 0:
            return "PNG", "1" if depth == 1 else "I;16" if depth == 16 else "L"
        return "PNG", _PNG_MODES.get(colour, f"colour type {colour}")
    if data.startswith(JPEG_MAGIC):
        return "JPEG", _jpeg_mode(data)
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
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return ""


def check_frame(data: bytes, row: int, array: str) -> str | None:
    """Refuse a frame vlmlabel cannot score exactly as CLIP's PIL pipeline does; for an alpha mode, the start of
    the message that refuses it if it turns out to be transparent once decoded (None: plainly exact)."""
    fmt, mode = frame_mode(data)
    if not mode or mode in _EXACT_MODES:
        return None
    if mode in _ALPHA_MODES:
        return f"frame {row} of {array} is a {fmt} with transparency ({mode})"
    what, why, fix = _REFUSED.get(
        mode,
        (
            "a {fmt} image in an unsupported mode",
            "vlmlabel scores RGB, grayscale and opaque RGBA frames",
            "convert it to RGB first",
        ),
    )
    raise SourceError(
        f"frame {row} of {array} is {what.format(fmt=fmt)} ({mode}); vlmlabel cannot score it "
        f"exactly as CLIP's PIL pipeline does ({why}): {fix}"
    )


def decode_frame(
    blob: torch.Tensor, frame_name: str, transparent: str | None = None, fix: str = "choose another --image-key"
) -> torch.Tensor:
    """One RGB uint8 (3, H, W) frame decoded on the CPU; ``frame_name`` says which in messages ("frame 3 of
    obs/image"). ``transparent`` (from ``check_frame``) marks a frame with an alpha channel: it is refused where
    transparent, as PIL would resize it in premultiplied alpha, and dropped where opaque. ``fix``: what else to
    do with an undecodable one."""
    try:
        frame = decode_image(blob, mode=ImageReadMode.RGB if transparent is None else ImageReadMode.RGB_ALPHA)
    except RuntimeError as exc:
        reason = _decoder_reason(str(exc))
        raise SourceError(
            f"{frame_name} is not a decodable JPEG/PNG image ({reason}); check the file or {fix}"
        ) from None
    if frame.dtype != torch.uint8:  # 16-bit PNG: PIL keeps the high byte of each sample
        frame = (frame.to(torch.int32) >> 8).to(torch.uint8)
    if transparent is not None:
        if bool((frame[3] != 255).any()):
            raise SourceError(
                f"{transparent}; vlmlabel cannot score it exactly as CLIP's PIL pipeline does "
                "(PIL resizes it in premultiplied alpha): flatten it onto a background first "
                "(e.g. PIL Image.alpha_composite) or save it as RGB"
            )
        frame = frame[:3]
    return frame


def _decoder_reason(message: str) -> str:
    """The reason in a torchvision decoder's message ("decode_jpeg, /path/decode_jpeg.cpp:171, Image is
    incomplete or truncated"): without its C++ source location, and only the first sentence (the rest names
    torchvision functions, not something a user of vlmlabel can act on)."""
    parts = message.split(", ", 2)
    reason = parts[2] if len(parts) == 3 and re.search(r":\d+$", parts[1]) else message
    return reason.split(". ", 1)[0].strip().rstrip(".")


def plan_batches(episodes: Sequence[Episode], batch_size: int) -> Iterator[tuple[Segment, ...]]:
    """The rows of each batch, in order: the episodes' segments cut every ``batch_size`` rows (the last batch
    may be short). A batch is described by rows, not frames, so any process can fill it."""
    pieces: list[Segment] = []
    filled = 0
    for episode in episodes:
        for segment in episode.frames:
            start = segment.start
            while start < segment.stop:
                take = min(batch_size - filled, segment.stop - start)
                pieces.append(Segment(segment.array, start, start + take))
                filled, start = filled + take, start + take
                if filled == batch_size:
                    yield tuple(pieces)
                    pieces, filled = [], 0
    if pieces:
        yield tuple(pieces)


@dataclass(frozen=True)
class Filled:
    """What a fill left in its buffer: the shape of each frame packed from the buffer's start, in order, then
    the frames that did not fit (decoded frames larger than the buffer was sized for), in order after them."""

    shapes: tuple[tuple[int, ...], ...]
    spill: tuple[np.ndarray, ...] = ()

    @property
    def size(self) -> int:
        return len(self.shapes) + len(self.spill)


def fill(reader: FrameReader, pieces: Sequence[Segment], out: np.ndarray, fmt: FrameFormat, where: str) -> Filled:
    """Read (and decode) the rows of ``pieces`` into the flat uint8 buffer ``out``; ``where`` names raw frames in
    messages (the image key; encoded frames are named by row)."""
    if fmt.encoded:
        return _fill_decoded(reader, pieces, out)
    return _fill_raw(reader, pieces, out, fmt, where)


def _fill_raw(reader: FrameReader, pieces: Sequence[Segment], out: np.ndarray, fmt: FrameFormat, where: str) -> Filled:
    rows = sum(len(p) for p in pieces)
    frames = out[: rows * math.prod(fmt.frame_shape)].reshape(rows, *fmt.frame_shape)
    count = 0
    for piece in pieces:
        if isinstance(reader, DirectReader) and reader.read_into(piece, frames[count : count + len(piece)]):
            count += len(piece)
            continue
        for block in reader.read_blocks(piece, len(piece)):
            assert isinstance(block, np.ndarray)  # raw frames are read as arrays
            if block.shape[1:] != fmt.frame_shape or block.dtype != np.uint8:
                raise SourceError(
                    f"{piece.array} holds {block.dtype} frames of shape {block.shape[1:]}, "
                    f"but {where} has uint8 {fmt.frame_shape}; frames must all match"
                )
            taken = min(len(block), rows - count)
            frames[count : count + taken] = block[:taken]
            count += taken
    return Filled((fmt.frame_shape,) * count)


def _fill_decoded(reader: FrameReader, pieces: Sequence[Segment], out: np.ndarray) -> Filled:
    shapes: list[tuple[int, ...]] = []
    spill: list[np.ndarray] = []
    offset = 0
    for piece in pieces:
        row = piece.start
        for block in reader.read_blocks(piece, len(piece)):
            for blob in block:
                data = np.array(blob, dtype=np.uint8).reshape(-1)  # a writable copy: torch decodes from it
                transparent = check_frame(data.tobytes(), row, piece.array)  # header only; refuses inexact frames
                room = out[offset:] if not spill else out[:0]
                pixels = _jpeg_into(data, room) if transparent is None else None
                placed = pixels is not None and pixels.size <= room.size  # decoded into the buffer
                if pixels is None:  # PNG, or a JPEG simplejpeg refuses: torchvision decodes it or says what is wrong
                    frame = decode_frame(torch.from_numpy(data), f"frame {row} of {piece.array}", transparent)
                    pixels = frame.permute(1, 2, 0).numpy()  # DECODED_AXES
                    if pixels.size <= room.size:
                        np.copyto(room[: pixels.size].reshape(pixels.shape), pixels)
                        placed = True
                if placed:
                    shapes.append(pixels.shape)
                    offset += pixels.size
                else:
                    spill.append(pixels)
                row += 1
    return Filled(tuple(shapes), tuple(spill))


def _jpeg_into(data: np.ndarray, room: np.ndarray) -> np.ndarray | None:
    """A JPEG decoded as RGB (H, W, 3) by libjpeg-turbo, into the start of ``room`` when it fits (else into an
    array of its own); None when it is not a JPEG simplejpeg decodes. On 224 px camera frames simplejpeg decodes
    in about 0.7x torchvision's time, straight into the batch buffer, with the same pixels as PIL (the accurate
    DCT and upsampling, and ``strict``: a truncated file is refused as PIL refuses it)."""
    if data[:3].tobytes() != JPEG_MAGIC:
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        size = height * width * 3
        return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=room[:size] if size <= room.size else None)
    except ValueError:
        return None


def frame_bytes(reader: FrameReader, segment: Segment, fmt: FrameFormat, where: str) -> int:
    """Bytes of one frame once in a buffer: the stored shape for raw frames, the first decoded frame's for
    encoded ones (batch buffers are sized from it; a later, larger frame spills out of the buffer)."""
    if not fmt.encoded:
        return math.prod(fmt.frame_shape)
    first = fill(reader, (Segment(segment.array, segment.start, segment.start + 1),), np.empty(0, np.uint8), fmt, where)
    return first.spill[0].size if first.spill else 1
