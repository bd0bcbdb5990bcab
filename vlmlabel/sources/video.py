"""Frames of video files at given times, decoded with PyAV (FFmpeg), seeking only where that is provably exact.

Each requested time gets the decoded frame whose presentation time is nearest; a request with no
frame within ``tolerance`` seconds (a video shorter than its episode, or timestamps that disagree
with the video) is an error rather than a silently wrong frame. Frames are converted to RGB by
FFmpeg's ``rgb24`` conversion, as LeRobot's PyAV backend does.

With an NVDEC GPU (``nvdec_gpu``, ``--video-decoder nvdec``) FFmpeg decodes on the GPU's video engine and the
decoded YUV frames come back to the host, where the same conversion makes them RGB: H.264, HEVC and AV1 decoders
are bit-exact by their standards, so the pixels are the CPU decoder's.

Decoding runs forward. A request behind the position reached, or so far ahead that a seek skips more than
``SEEK_MIN_SKIP`` frames, seeks to the last *seek point* at or before it and decodes on from there: LeRobot encodes
a keyframe every 2 frames (libsvtav1 or libx264, ``g=2``), so with ``--workers N`` each worker decodes about
its own batches instead of the whole file. A seek point is a keyframe from which decoding gives the very
frames a decode from the file's start gives (``seek_points`` says how that is proved); a file with none
(another codec, an open GOP) is decoded forward, from its start when a request goes back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from vlmlabel.errors import DeviceError, SourceError
from vlmlabel.sources.base import VideoDecoder

if TYPE_CHECKING:
    import torch

# A seek forward must skip more frames than this: it drops the frames a threaded decoder has in flight (about one
# per thread) and restarts its pipeline, so a short skip (an episode's last frame left unrequested) decodes on.
SEEK_MIN_SKIP = 16
_H264_IDR = 5
_HEVC_IRAP = range(16, 22)  # BLA, IDR, CRA: pictures after one in both orders never reference one before it
_AV1_SEQUENCE_HEADER, _AV1_FRAME_HEADER, _AV1_FRAME = 1, 3, 6


@dataclass(frozen=True)
class SeekPoints:
    """A video's seek points, with what a decode from each must give (checked as it runs)."""

    times: np.ndarray  # seconds, ascending, as ``frame.time`` computes them
    pts: np.ndarray  # the keyframe packet's pts and dts: the demuxer must land on that very packet
    dts: np.ndarray
    first: np.ndarray  # position of the keyframe's frame in ``shown``
    shown: np.ndarray  # pts of every frame of the file in presentation order

    def before(self, time: float) -> int | None:
        """The last seek point at or before ``time``."""
        found = int(np.searchsorted(self.times, time, side="right")) - 1
        return found if found >= 0 else None

    def skipped(self, pts: int, key: int) -> int:
        """Frames a seek to ``key`` leaves undecoded that decoding on from the frame ``pts`` would decode."""
        return int(self.first[key]) - int(np.searchsorted(self.shown, pts, side="right"))


def seek_points(path: Path) -> SeekPoints | None:
    """The keyframes of ``path`` from which a decode is exact; None where none can be proved (nothing to seek to).

    A keyframe qualifies when (1) its access unit resets every reference, so no later frame can depend on an
    earlier one: an H.264 IDR picture, an HEVC IRAP picture, an AV1 shown key frame first in its temporal unit
    (an H.264 I frame with only a recovery point, as open-GOP x264 writes, promises approximately correct
    frames at best, so it does not); and (2) it splits the stream: every packet before it in decoding order is
    shown before it and every packet after it is shown after it (no leading pictures, which could reference
    frames before it, and no frame decoded earlier but shown later, which a decode from it would miss). One pass
    over the packets (no decoding); packets without timestamps, discarded packets (edit lists) or repeated
    timestamps give no seek points."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            resets = _reset_check(stream.codec_context.name, bytes(stream.codec_context.extradata or b""))
            if resets is None:
                return None
            pts: list[int] = []
            dts: list[int] = []
            keys: list[int] = []
            for packet in container.demux(stream):
                if packet.size == 0:  # the end-of-stream packet that flushes the decoder
                    continue
                if packet.pts is None or packet.dts is None or packet.is_discard:
                    return None
                if packet.is_keyframe and resets(memoryview(packet)):
                    keys.append(len(pts))
                pts.append(packet.pts)
                dts.append(packet.dts)
            time_base = stream.time_base
    except (av.FFmpegError, OSError, IndexError):
        return None  # the forward decode reports what is wrong
    order = np.asarray(pts, dtype=np.int64)
    if not keys or time_base is None or len(np.unique(order)) != len(order):
        return None
    before = np.maximum.accumulate(np.concatenate([[np.iinfo(np.int64).min], order[:-1]]))
    after = np.minimum.accumulate(np.concatenate([order[1:], [np.iinfo(np.int64).max]])[::-1])[::-1]
    at = np.asarray(keys, dtype=np.int64)
    at = at[(before[at] < order[at]) & (after[at] > order[at])]
    if not len(at):
        return None
    # With the split, a seek point's place in presentation order is its place in decoding order.
    return SeekPoints(
        _seconds(order[at], time_base), order[at], np.asarray(dts, dtype=np.int64)[at], at, np.sort(order)
    )


def _seconds(pts: np.ndarray, time_base: Fraction) -> np.ndarray:
    """Seconds as PyAV's ``frame.time`` computes them (the same float operations), so times compare exactly."""
    return pts.astype(np.float64) * time_base.numerator / time_base.denominator


def _reset_check(codec: str, extradata: bytes) -> Callable[[memoryview], bool] | None:
    """A test of whether a keyframe packet resets every reference, for the codecs and packings known here."""
    if codec == "h264" and len(extradata) > 4 and extradata[0] == 1:  # avcC: length-prefixed NAL units
        size = (extradata[4] & 3) + 1
        return lambda data: _first_vcl(data, size, lambda b: b & 0x1F, range(1, 6)) == _H264_IDR
    if codec == "hevc" and len(extradata) > 21 and extradata[0] == 1:  # hvcC
        size = (extradata[21] & 3) + 1
        return lambda data: _first_vcl(data, size, lambda b: (b >> 1) & 0x3F, range(0, 32)) in _HEVC_IRAP
    if codec in ("av1", "libdav1d", "libaom-av1"):
        reduced = _av1_reduced_header(extradata[4:]) if len(extradata) > 4 else None  # av1C, then config OBUs
        return lambda data: _av1_shown_key(data, reduced)
    return None


def _first_vcl(data: memoryview, size: int, nal_type: Callable[[int], int], vcl: range) -> int | None:
    """The type of the first picture NAL unit of a length-prefixed access unit (None if there is none)."""
    pos = 0
    while pos + size < len(data):
        length = int.from_bytes(data[pos : pos + size], "big")
        pos += size
        if length == 0 or pos + length > len(data):
            return None
        kind = nal_type(data[pos])
        if kind in vcl:
            return kind
        pos += length
    return None


def _obus(data: bytes | memoryview) -> list[tuple[int, bytes | memoryview]] | None:
    """(type, payload) of each OBU of an AV1 temporal unit; None for layered (scalable) or malformed data."""
    found, pos = [], 0
    while pos < len(data):
        header = data[pos]
        if header & 0x84:  # forbidden bit, or an extension header: temporal/spatial layers are not handled
            return None
        pos += 1
        size = len(data) - pos
        if header & 0x02:  # obu_has_size_field: leb128
            size, shift = 0, 0
            while True:
                if pos >= len(data) or shift > 56:
                    return None
                byte = data[pos]
                size, shift, pos = size | (byte & 0x7F) << shift, shift + 7, pos + 1
                if not byte & 0x80:
                    break
        if pos + size > len(data):
            return None
        found.append(((header >> 3) & 0x0F, data[pos : pos + size]))
        pos += size
    return found


def _av1_reduced_header(data: bytes) -> bool | None:
    """reduced_still_picture_header of the first sequence header among these OBUs (None if there is none)."""
    for kind, payload in _obus(data) or []:
        if kind == _AV1_SEQUENCE_HEADER and payload:
            return bool(payload[0] & 0x08)  # after seq_profile (3 bits) and still_picture (1 bit)
    return None


def _av1_shown_key(data: memoryview, reduced: bool | None) -> bool:
    """Whether a temporal unit's first frame is a shown key frame (it refreshes every reference slot)."""
    obus = _obus(data)
    if obus is None:
        return False
    for kind, payload in obus:
        if kind == _AV1_SEQUENCE_HEADER and payload:
            reduced = bool(payload[0] & 0x08)
        elif kind in (_AV1_FRAME_HEADER, _AV1_FRAME):
            if reduced is None or not payload:
                return False
            if reduced:  # a still picture: one shown key frame
                return True
            first = payload[0]  # show_existing_frame (1 bit), frame_type (2 bits, 0 = KEY_FRAME), show_frame (1 bit)
            return not first & 0x80 and (first >> 5) & 0x03 == 0 and bool(first & 0x10)
    return False


_decoder_threads = 0  # 0: FFmpeg's choice, from every core of the machine


def share_cores(cores: int) -> None:
    """Give each video decoder this process opens from now on the threads FFmpeg gives a machine of ``cores``
    cores (one per core, plus one when there are several; 0: the whole machine, FFmpeg's choice): a decoding
    worker's share of the cores. More threads would only fight the other workers, and every seek drops the
    frames a decoder has in flight, about one per thread."""
    global _decoder_threads
    _decoder_threads = cores + 1 if cores > 1 else cores


class _Diverged(Exception):
    """A decode from a seek point did not give the frames the index promised: decode from the start instead."""


def nvdec_gpu(decoder: VideoDecoder, device: torch.device) -> int | None:
    """The CUDA device whose NVDEC decodes the video (the run's own GPU), or None for the CPU."""
    if decoder is VideoDecoder.cpu:
        return None
    if device.type != "cuda":
        raise DeviceError(
            f"--video-decoder nvdec decodes on the run's CUDA GPU, and this run is on {device.type}; "
            "use --device cuda, or drop --video-decoder nvdec"
        )
    return 0 if device.index is None else device.index


def as_planar(frame: av.VideoFrame) -> av.VideoFrame:
    """A frame as a CPU decoder gives it: NVDEC's NV12 (chroma interleaved) as planar YUV 4:2:0 with the same
    samples and colour tags, so the rgb24 conversion takes the CPU path's route through FFmpeg's scaler (NV12
    converted directly takes another, up to 52 levels apart); planar formats (what CPU decoders give, and NVDEC for
    4:4:4) as they are. Other semi-planar formats (P010 for 10-bit video) are refused rather than converted
    along another route."""
    if len(frame.planes) != 2:
        return frame
    if frame.format.name != "nv12":
        raise SourceError(
            f"NVDEC gave {frame.format.name} frames, which vlmlabel cannot yet convert exactly as "
            "the CPU decoder's; drop --video-decoder nvdec to decode on the CPU"
        )
    if frame.width % 2 or frame.height % 2:
        raise SourceError(
            f"NVDEC gave {frame.width}x{frame.height} frames, which vlmlabel cannot convert exactly "
            "(odd sizes); drop --video-decoder nvdec to decode on the CPU"
        )
    rows = frame.to_ndarray()  # (H * 3 / 2, W): luma, then one row of interleaved chroma per two rows
    luma, chroma = rows[: frame.height], rows[frame.height :].reshape(frame.height // 2, frame.width // 2, 2)
    planes = [luma.reshape(-1), chroma[..., 0].reshape(-1), chroma[..., 1].reshape(-1)]
    samples = np.asarray(np.concatenate(planes).reshape(-1, frame.width), dtype=np.uint8)
    planar = av.VideoFrame.from_ndarray(samples, format="yuv420p")
    planar.colorspace, planar.color_range = frame.colorspace, frame.color_range
    return planar


class VideoReader:
    """One open video at a time, decoded forward, seeking to proven seek points when that saves decoding."""

    def __init__(self, tolerance: float, nvdec_gpu: int | None = None):
        self.tolerance = tolerance
        self.nvdec_gpu = nvdec_gpu  # the CUDA device whose NVDEC decodes; None: the CPU
        self.decoded = 0  # frames decoded (all files), and seeks made: what the tests and benchmarks look at
        self.seeks = 0
        self._path: Path | None = None
        self._container: av.container.InputContainer | None = None
        self._points: tuple[Path, SeekPoints | None] | None = None  # the last file's, found when first needed
        # One converter for every frame: it keeps FFmpeg's scaler between frames, where frame.to_ndarray builds a
        # new one per frame (3-5x slower at 224 px). The pixels are the same.
        self._rgb = VideoReformatter()

    def _open(self, path: Path) -> None:
        """Open ``path`` at its start: the reference every seek must agree with."""
        self.close()
        self._path = path
        try:
            accel = self._nvdec()  # only then passed: PyAV before 14 has no hwaccel argument
            self._container = av.open(str(path)) if accel is None else av.open(str(path), hwaccel=accel)
            self._stream = self._container.streams.video[0]
            if self.nvdec_gpu is None:
                self._stream.thread_type = "AUTO"
                self._stream.codec_context.thread_count = _decoder_threads
            elif not self._stream.codec_context.is_hwaccel:
                raise SourceError(
                    f"NVDEC cannot decode {self._stream.codec_context.name} video {path}; drop "
                    "--video-decoder nvdec to decode on the CPU"
                )
            self._frames = self._container.decode(self._stream)
        except (av.FFmpegError, OSError, IndexError) as exc:
            self.close()
            raise self._fail(exc) from None
        except SourceError:
            self.close()
            raise
        self._start(None, [])
        if self._next is None:
            raise SourceError(f"video {path} holds no frames; re-encode or replace the file")

    def _nvdec(self) -> Any:
        """NVDEC on ``nvdec_gpu`` (a PyAV ``HWAccel``), without falling back to the CPU unseen (asked for, it is
        checked to run)."""
        if self.nvdec_gpu is None:
            return None
        try:
            from av.codec.hwaccel import HWAccel
        except ImportError:  # PyAV before 14
            raise SourceError(
                f"--video-decoder nvdec needs PyAV 14 or later (this is {av.__version__}): "
                "pip install -U av, or drop --video-decoder nvdec"
            ) from None
        return HWAccel(device_type="cuda", device=str(self.nvdec_gpu), allow_software_fallback=False)

    def _fail(self, exc: Exception) -> SourceError:
        if self.nvdec_gpu is not None:
            return SourceError(
                f"video {self._path} cannot be decoded by NVDEC on GPU {self.nvdec_gpu} ({exc}); "
                "drop --video-decoder nvdec to decode on the CPU"
            )
        return SourceError(f"video {self._path} cannot be decoded ({exc}); re-encode or replace the file")

    def _start(self, shown: np.ndarray | None, first: list[Any]) -> None:
        """Decoding starts at the file's start (``shown`` None) or at a seek point, from which it must give the
        frames ``shown`` (pts, in order), checked as they come; ``first``: frames of the first packet, decoded."""
        self._shown, self._taken = shown, 0
        self._ready = deque(first)
        self._prev: tuple[float, Any] | None = None  # (time, frame) at or before the last request
        self._next: tuple[float, Any] | None = None
        self._next = self._decode_next()

    def _seek_points(self, path: Path) -> SeekPoints | None:
        if self._points is None or self._points[0] != path:
            self._points = (path, seek_points(path))
        return self._points[1]

    def _decode_next(self) -> tuple[float, Any] | None:
        try:
            frame = self._ready.popleft() if self._ready else next(self._frames, None)
        except (av.FFmpegError, OSError) as exc:
            if self._shown is not None:
                raise _Diverged from None
            raise self._fail(exc) from None
        if self._shown is not None:  # after a seek: exactly the indexed frames, in order, to the end
            if frame is None and self._taken != len(self._shown):
                raise _Diverged
            if frame is not None and (self._taken >= len(self._shown) or frame.pts != self._shown[self._taken]):
                raise _Diverged
            self._taken += 1
        if frame is None:
            return None
        self.decoded += 1
        time = frame.time
        if time is None:
            raise SourceError(f"video {self._path} has frames without timestamps; re-encode or replace the file")
        return time, frame

    def _seek(self, points: SeekPoints, key: int) -> None:
        """Decode from seek point ``key``; the demuxer must land on its very packet."""
        assert self._container is not None
        self.seeks += 1
        pts, dts = int(points.pts[key]), int(points.dts[key])
        for offset in dict.fromkeys((pts, dts)):  # demuxers search their index by pts or by dts
            try:
                self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
                first = next(self._container.demux(self._stream), None)
                if first is not None and (first.pts, first.dts, first.is_keyframe) == (pts, dts, True):
                    frames = first.decode()
                    self._frames = self._container.decode(self._stream)  # on from the packet after it
                    self._start(points.shown[int(points.first[key]) :], frames)
                    return
            except av.FFmpegError:
                break
        raise _Diverged

    def _position(self, path: Path, target: float) -> None:
        """Seek when ``target`` lies behind the position reached, or beyond a seek point not reached yet."""
        here = self._prev or self._next
        behind = (
            here is not None
            and target < here[0] - self.tolerance
            and (self._prev is not None or self._shown is not None)
        )  # before the file's first frame: nothing to find
        # Ahead by more frames than a seek must skip (at the interval of the last two frames), or the index is not
        # even looked at: reading on in order (an episode's last frame left unrequested) never needs it.
        interval = self._next[0] - self._prev[0] if self._next is not None and self._prev is not None else 0.0
        ahead = self._next is not None and target > self._next[0] + max(self.tolerance, SEEK_MIN_SKIP * interval)
        if not (behind or ahead):
            return
        points = self._seek_points(path)
        key = None if points is None else points.before(target)
        if points is None or key is None:
            if behind:
                self._open(path)
        elif behind or (self._next is not None and points.skipped(self._next[1].pts, key) > SEEK_MIN_SKIP):
            self._seek(points, key)

    def _nearest(self, path: Path, target: float) -> Any:
        self._position(path, target)
        while self._next is not None and self._next[0] <= target:
            self._prev, self._next = self._next, self._decode_next()
        options = [c for c in (self._prev, self._next) if c is not None]
        best = min(options, key=lambda c: abs(c[0] - target))
        if abs(best[0] - target) > self.tolerance:
            raise SourceError(
                f"video {path} has no frame at {target:.3f} s (nearest {best[0]:.3f} s); the "
                "video is shorter than its episode or the timestamps disagree with it"
            )
        return best[1]

    def frames(self, path: Path, times: np.ndarray) -> np.ndarray:
        """RGB uint8 frames (N, H, W, 3) of ``path`` nearest to each time in ``times`` (seconds)."""
        if path != self._path or self._container is None:
            self._open(path)
        out: list[np.ndarray] = []
        converted: tuple[object, Any] = (None, None)  # (frame, its RGB array) last converted
        for target in times.tolist():
            try:
                frame = self._nearest(path, target)
            except _Diverged:  # never seek in this file again: decode it forward, from its start
                self._points = (path, None)
                self._open(path)
                frame = self._nearest(path, target)
            if converted[0] is not frame:
                converted = (frame, self._rgb.reformat(as_planar(frame), format="rgb24").to_ndarray())
            out.append(converted[1])
        return np.stack(out)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = None


def probe(path: Path) -> None:
    """Fail early, with one clear line, on a missing or unreadable video."""
    if not path.is_file():
        raise SourceError(f"video {path} is missing; the dataset is incomplete (download the videos too)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SourceError(f"{path} holds no video stream; re-encode or replace the file")
    except (av.FFmpegError, OSError) as exc:
        raise SourceError(f"video {path} cannot be read ({exc}); re-encode or replace the file") from None
