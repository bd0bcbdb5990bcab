"""Video frames by seeking: whatever order frames are asked for in, and however batches are shared between
workers, the reader returns the very frames a decode of the whole file front to back gives; it seeks only to
keyframes proved exact (H.264 IDR, HEVC IRAP, AV1 shown key frames, each splitting the stream), decodes forward
elsewhere (open GOPs, long GOPs), and falls back to decoding from the start when a seek does not land where the
index says."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from tests import table_layouts
from vlmlabel.reader.batchfill import plan_batches
from vlmlabel.sources import Align, open_source, video
from vlmlabel.sources.lerobot import VideoRecipe
from vlmlabel.sources.video import SeekPoints, VideoReader, seek_points

FPS = 10
TOLERANCE = 0.5 / FPS


def moving_frames(count: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A textured scene panning one pixel a frame, with a square moving across it: what a camera gives, so the
    encoders predict frames from each other (B-frames, references across a GOP)."""
    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 256, (height, width + count, 3)).astype(np.float32)
    scene = (scene + np.roll(scene, 1, 0) + np.roll(scene, 1, 1) + np.roll(scene, 1, (0, 1))) / 4
    frames = np.stack([scene[:, i : i + width] for i in range(count)])
    for i, frame in enumerate(frames):
        y, x = (2 * i) % (height - 8), (3 * i) % (width - 8)
        frame[y : y + 8, x : x + 8] = (255, 40, 40)
    return frames.astype(np.uint8)


# name -> (encoder, options, a keyframe beyond the first is a seek point, some keyframe is refused)
ENCODINGS: dict[str, tuple[str, dict[str, str], bool, bool]] = {
    # LeRobot's own settings (lerobot.datasets.video_utils.encode_video_frames: g=2, crf=30, yuv420p)
    "h264_lerobot_g2": ("libx264", {"g": "2", "crf": "30"}, True, False),
    "av1_lerobot_g2": ("libsvtav1", {"g": "2", "crf": "30"}, True, False),
    "av1_g24": ("libsvtav1", {"g": "24", "crf": "30"}, True, False),
    # B-frames in every GOP (b-adapt=0 places them whatever the content), closed and open GOPs
    "h264_bframes_closed": ("libx264", {"g": "12", "x264-params": "b-adapt=0:bframes=3:scenecut=0"}, True, False),
    "h264_bframes_open": (
        "libx264",
        {"g": "12", "x264-params": "b-adapt=0:bframes=3:scenecut=0:open-gop=1"},
        False,
        True,
    ),
    "h264_long_gop": ("libx264", {"x264-params": "b-adapt=0:scenecut=0"}, False, False),  # one keyframe in 250
    "hevc_bframes_closed": (
        "libx265",
        {"g": "12", "x265-params": "b-adapt=0:scenecut=0:open-gop=0:log-level=0"},
        True,
        False,
    ),
    # x265 writes open GOPs by default: CRA pictures, refused when leading (RASL) pictures follow them, seek
    # points when none do (without B-frames)
    "hevc_bframes_open": ("libx265", {"g": "12", "x265-params": "b-adapt=0:scenecut=0:log-level=0"}, False, True),
    "hevc_cra_no_bframes": ("libx265", {"g": "12", "x265-params": "bframes=0:scenecut=0:log-level=0"}, True, False),
}


def _available(encoder: str) -> bool:
    try:
        av.codec.Codec(encoder, "w")
        av.codec.Codec({"libx264": "h264", "libsvtav1": "av1", "libx265": "hevc"}[encoder], "r")
    except (av.FFmpegError, ValueError):
        return False
    return True


def encode(path: Path, frames: np.ndarray, name: str, fps: int = FPS) -> Path:
    encoder, options, _, _ = ENCODINGS[name]
    if not _available(encoder):
        pytest.skip(f"this FFmpeg has no {encoder} encoder or no decoder for it")
    table_layouts.encode_mp4(path, frames, fps, encoder, "yuv420p", options)
    return path


def decode_forward(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame, front to back, with plain PyAV (the reference), and its time."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return np.stack([f.to_ndarray(format="rgb24") for f in frames]), np.asarray([f.time for f in frames])


def _keyframes(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        return [p.pts for p in container.demux(video=0) if p.size and p.is_keyframe]


def _requests(rng: np.random.Generator, count: int, runs: int) -> list[np.ndarray]:
    """Runs of frame indices in random order: forward, backward, short and long jumps."""
    out = []
    for _ in range(runs):
        start = int(rng.integers(0, count))
        out.append(np.arange(start, min(count, start + int(rng.integers(1, 30)))))
    return out


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_any_request_order_gives_the_frames_of_a_forward_decode(tmp_path, name, monkeypatch):
    path = encode(tmp_path / f"{name}.mp4", moving_frames(120), name)
    reference, times = decode_forward(path)
    assert len(reference) == 120
    _, _, seekable, refused = ENCODINGS[name]
    points = seek_points(path)
    assert points is not None and points.times[0] == times[0]  # the file's start is always one
    assert (len(points.times) > 1) is seekable
    assert (len(points.times) < len(_keyframes(path))) is refused
    rng = np.random.default_rng(7)
    requests = _requests(rng, len(times), 40)
    jitter = [rng.uniform(-0.4, 0.4, len(r)) / FPS for r in requests]  # timestamps are never exact
    decoded = {}
    for seeking in (True, False):
        if not seeking:  # the reader as it was: forward only, back to the start to go back
            monkeypatch.setattr(video, "seek_points", lambda path: None)
        reader = VideoReader(TOLERANCE)
        for rows, noise in zip(requests, jitter):
            np.testing.assert_array_equal(reader.frames(path, times[rows] + noise), reference[rows])
        decoded[seeking] = reader.decoded
    if seekable:
        assert decoded[True] < decoded[False] / 2
    else:  # going back seeks to the file's start instead of opening it again: the same frames decoded
        assert decoded[True] == decoded[False]


def test_open_gop_keyframes_are_refused_for_the_reason_given(tmp_path):
    """x264's open-GOP keyframes are I frames with a recovery point, followed by B-frames shown before them."""
    path = encode(tmp_path / "open.mp4", moving_frames(60), "h264_bframes_open")
    with av.open(str(path)) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]
    leading = [
        i for i, (pts, key) in enumerate(packets) if key and i and any(later < pts for later, _ in packets[i + 1 :])
    ]
    assert leading  # the file does have open GOPs
    points = seek_points(path)
    assert points is not None and not set(points.pts.tolist()) & {packets[i][0] for i in leading}


def _misleading(points: SeekPoints, how: str) -> SeekPoints:
    if how == "wrong packet":  # a seek point the demuxer cannot land on (a frame that is no keyframe)
        return SeekPoints(points.times + 1 / FPS, points.pts + 1, points.dts + 1, points.first + 1, points.shown)
    return SeekPoints(points.times, points.pts, points.dts, points.first, points.shown[::-1])  # frames out of order


@pytest.mark.parametrize("how", ["wrong packet", "unexpected frames"])
def test_a_seek_that_does_not_go_as_indexed_falls_back_to_a_forward_decode(tmp_path, monkeypatch, how):
    path = encode(tmp_path / "g2.mp4", moving_frames(60), "h264_lerobot_g2")
    reference, times = decode_forward(path)
    true = seek_points(path)
    assert true is not None
    monkeypatch.setattr(video, "seek_points", lambda p: _misleading(true, how))
    reader = VideoReader(TOLERANCE)
    for rows in (np.arange(40, 45), np.arange(5, 9), np.arange(30, 33), np.arange(50, 60)):
        np.testing.assert_array_equal(reader.frames(path, times[rows]), reference[rows])
    assert reader.seeks == 1  # tried once; then this file is decoded forward only


def lerobot_video(root: Path, name: str, lengths: tuple[int, ...]) -> table_layouts.TableCase:
    """A LeRobot v3.0 folder whose episodes share one video file per camera, encoded as ``name``."""
    case = table_layouts.build_lerobot(root, video=True, lengths=lengths, files=(len(lengths),))
    for i, camera in enumerate(case.extra["cameras"]):
        frames = moving_frames(sum(lengths), table_layouts.HEIGHT, table_layouts.WIDTH, seed=i)
        encode(case.path / "videos" / camera / "chunk-000" / "file-000.mp4", frames, name, table_layouts.FPS)
    return case


def _shared(recipe: VideoRecipe, batches: list, owners: np.ndarray, workers: int) -> tuple[list[np.ndarray], int]:
    """Each batch's frames read by the reader of the worker ``owners`` gives it, batch by batch in order."""
    readers = [recipe.open() for _ in range(workers)]
    out = []
    for owner, pieces in zip(owners.tolist(), batches, strict=True):
        reader = readers[owner]
        out.append(np.concatenate([block for piece in pieces for block in reader.read_blocks(piece, len(piece))]))
    seeks = sum(r.reader.seeks for r in readers)
    for reader in readers:
        reader.close()
    return out, seeks


@pytest.mark.parametrize("name", ["h264_lerobot_g2", "av1_lerobot_g2", "h264_bframes_closed"])
def test_batches_shared_between_workers_give_the_frames_of_one_forward_reader(tmp_path, name):
    case = lerobot_video(tmp_path, name, (37, 50, 23, 61, 29))
    with open_source(str(case.path), case.image_key) as source:
        episodes = source.episodes(Align.frame)
        recipe = source.recipe()
    assert isinstance(recipe, VideoRecipe)
    reference, _ = decode_forward(case.path / "videos" / case.image_key / "chunk-000" / "file-000.mp4")
    rng = np.random.default_rng(3)
    for batch in (20, 32):
        batches = list(plan_batches(episodes, batch))
        for workers in (2, 3, 5):
            # in turn, and as the queue hands them out: any worker, any batch
            for owners in (np.arange(len(batches)) % workers, rng.integers(0, workers, len(batches))):
                frames, seeks = _shared(recipe, batches, owners, workers)
                np.testing.assert_array_equal(np.concatenate(frames), reference)
                assert seeks > 0


def test_reading_in_order_never_looks_for_seek_points(tmp_path, monkeypatch):
    """--workers 0 reads every row in order: no pass over the file's packets, no seek, each frame decoded once
    (the episodes' float32 timestamps leave each episode's last frame as the decoder's next one)."""
    case = lerobot_video(tmp_path, "h264_lerobot_g2", (37, 50, 23, 61, 29))
    with open_source(str(case.path), case.image_key) as source:
        episodes = source.episodes(Align.frame)
        recipe = source.recipe()
    assert isinstance(recipe, VideoRecipe)

    def refuse(path: Path) -> None:
        raise AssertionError("a reader going forward in order needs no seek points")

    monkeypatch.setattr(video, "seek_points", refuse)
    reference, _ = decode_forward(case.path / "videos" / case.image_key / "chunk-000" / "file-000.mp4")
    batches = list(plan_batches(episodes, 32))
    frames, seeks = _shared(recipe, batches, np.zeros(len(batches), dtype=np.int64), 1)
    np.testing.assert_array_equal(np.concatenate(frames), reference)
    assert seeks == 0


@pytest.mark.parametrize(
    "pix_fmt,tags", [("yuv420p", {}), ("yuvj420p", {}), ("yuv420p", {"colorspace": "bt709", "color_range": "pc"})]
)
def test_nvdec_frames_as_planar_convert_to_the_cpu_decoders_pixels(tmp_path, pix_fmt, tags):
    """NVDEC's frames reach the host as NV12: split into planar YUV 4:2:0 (with the colour tags kept), the rgb24
    conversion gives the CPU decoder's pixels bit for bit, where NV12 converted directly does not."""
    path = tmp_path / "v.mp4"
    table_layouts.encode_mp4(path, moving_frames(12, 96, 128), FPS, "libx264", pix_fmt, {"g": "2", "crf": "30", **tags})
    direct, planar = av.video.reformatter.VideoReformatter(), av.video.reformatter.VideoReformatter()
    differs = False
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            want = frame.to_ndarray(format="rgb24")
            nv12 = frame.reformat(format="nv12")  # what NVDEC hands over: the same samples, chroma interleaved
            np.testing.assert_array_equal(planar.reformat(video.as_planar(nv12), format="rgb24").to_ndarray(), want)
            differs |= not np.array_equal(direct.reformat(nv12, format="rgb24").to_ndarray(), want)
    assert differs  # why the split is needed
    with pytest.raises(video.SourceError, match="NVDEC gave p010le frames"):  # 10-bit: another route, refused
        video.as_planar(frame.reformat(format="p010le"))


def test_nvdec_where_there_is_none_is_refused_in_one_line(tmp_path):
    path = encode(tmp_path / "v.mp4", moving_frames(6), "h264_lerobot_g2")
    with pytest.raises(video.SourceError) as info:
        VideoReader(TOLERANCE, nvdec_gpu=0).frames(path, np.asarray([0.0]))
    message = str(info.value)
    assert "cannot be decoded by NVDEC on GPU 0" in message and "drop --video-decoder nvdec" in message
    assert "\n" not in message


def test_cpu_decoding_passes_no_hwaccel_argument(tmp_path, monkeypatch):
    """PyAV before 14 has no ``hwaccel`` argument to ``av.open`` (pyproject allows av >= 12): only NVDEC passes it."""
    path = encode(tmp_path / "v.mp4", moving_frames(6), "h264_lerobot_g2")
    reference, times = decode_forward(path)
    real_open = av.open

    def open_without_hwaccel(file, *args, **kwargs):
        assert "hwaccel" not in kwargs
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", open_without_hwaccel)
    np.testing.assert_array_equal(VideoReader(TOLERANCE).frames(path, times), reference)
