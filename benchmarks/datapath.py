"""Frames/s of vlmlabel's data path alone (no model): per source kind, frame size and ``--workers``.

Builds, in a temporary folder, the same frames (smooth synthetic images with mild noise, as a camera gives)
as every kind of source below, then times ``reader.readahead.read_ahead`` — what feeds the model in ``relabel`` and
``embed``: reading, decoding into the batch buffers, handing batches over in order — consuming each batch
and giving its buffer back at once. Worker start-up is inside the timing (it is part of every run).

Beside it, a *bare* single-core loop over the same data, the ceiling one core reaches with nothing around
it: PIL decoding the same JPEG/PNG bytes already in memory, PyAV decoding and converting the video, h5py
slicing the (compressed) array, Arrow converting the list column to one array.

Repetitions are interleaved (every configuration once, then again) and medians reported, so a machine
shared with other work slows every configuration alike; ratios are taken between medians of one run.

The 16-core projection assumes each worker process decodes independently at the rate one worker reaches
here (``--workers 1``, after the first batch), limited by the main process: its CPU seconds per frame in that
run (handing out tasks, building batches) give the most frames/s one main process can hand over. Projected
f/s = min(workers x f/s at --workers 1, that ceiling), at the default 8 workers (16 cores minus one, capped at
8) and at 15. It is a projection from two cores, not a measurement. Video is not projected that way: PyAV's
own decoding threads already use both cores at ``--workers 1``. For LeRobot video a second table gives the
decoding work instead: N workers each taking every N-th batch, simulated in this process one worker after
another, with the reader's keyframe seeking and without it (the reader before it: forward only, back to the
file's start to go back): frames decoded per frame delivered and seeks per batch (exact counts), and the CPU
seconds of the largest worker's share (frames / that share: what N workers with a core each could deliver).

    python benchmarks/datapath.py [--frames 1024] [--sizes 84,224] [--workers 0,1,2] [--repeats 5] [--json]
        [--kinds lerobot_h264,lerobot_h264_g2,lerobot_av1] [--work-workers 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import av
import h5py
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.layouts import make_frames  # noqa: E402
from vlmlabel import engine  # noqa: E402
from vlmlabel.reader.readahead import read_ahead  # noqa: E402
from vlmlabel.sources import Align, open_source  # noqa: E402
from vlmlabel.sources.base import Reopenable  # noqa: E402

if TYPE_CHECKING:
    import datasets

# Heavy imports (datasets, the test builders) stay inside functions: a decoding worker runs this script's
# top level again when it starts (multiprocessing's rule for a script), which must stay cheap.
CPU = torch.device("cpu")
PROJECTED_WORKERS = (8, 15)  # the default on 16 cores (cores - 1, capped at 8), and every core but one
MICRO_MODEL = {  # a micro CLIP (the test suite's): the model costs little, the data path shows
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MICRO_PREPROCESS = {
    "mean": [0.5, 0.45, 0.4],
    "std": [0.25, 0.3, 0.27],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def camera_frames(count: int, size: int) -> np.ndarray:
    """Smooth images plus mild sensor-like noise (noise-free gradients would make PNG unrealistically cheap)."""
    frames = make_frames(count, size, size, seed=0).astype(np.int16)
    noise = np.random.default_rng(1).normal(0, 3, frames.shape).astype(np.int16)
    return np.clip(frames + noise, 0, 255).astype(np.uint8)


def encoded(frames: np.ndarray, fmt: str) -> list[bytes]:
    out = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format=fmt, quality=95)
        out.append(buffer.getvalue())
    return out


# -- the sources ---------------------------------------------------------------------------------------


def _h5(path: Path, frames: np.ndarray, **options) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("observations", data=frames, **options)


def build_hdf5_raw(root: Path, frames: np.ndarray) -> tuple[Path, str | None]:
    _h5(root / "raw.h5", frames, chunks=(64, *frames.shape[1:]))
    return root / "raw.h5", None


def build_hdf5_gzip(root: Path, frames: np.ndarray) -> tuple[Path, str | None]:
    _h5(root / "gzip.h5", frames, chunks=(16, *frames.shape[1:]), compression="gzip")
    return root / "gzip.h5", None


def build_hdf5_jpeg(root: Path, frames: np.ndarray) -> tuple[Path, str | None]:
    with h5py.File(root / "jpeg.h5", "w") as handle:
        data = handle.create_dataset("observations", (len(frames),), dtype=h5py.vlen_dtype(np.uint8))
        for row, blob in enumerate(encoded(frames, "JPEG")):
            data[row] = np.frombuffer(blob, np.uint8)
    return root / "jpeg.h5", None


def _image_table(frames: np.ndarray) -> datasets.Dataset:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "episode_index": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": None} for b in encoded(frames, "PNG")],
            "episode_index": (np.arange(len(frames)) // 100).tolist(),
        },
        features=features,
    )


def build_disk_png(root: Path, frames: np.ndarray) -> tuple[Path, str | None]:
    _image_table(frames).save_to_disk(str(root / "disk_png"))
    return root / "disk_png", "image"


def build_parquet_png(root: Path, frames: np.ndarray) -> tuple[Path, str | None]:
    _image_table(frames).to_parquet(str(root / "png.parquet"))
    return root / "png.parquet", "image"


def build_array3d(root: Path, frames: np.ndarray) -> tuple[Path, str | None]:
    import datasets

    size = frames.shape[1:]
    features = datasets.Features({"obs": datasets.Array3D(size, "uint8"), "episode_index": datasets.Value("int64")})
    datasets.Dataset.from_dict(
        {"obs": list(frames), "episode_index": (np.arange(len(frames)) // 100).tolist()}, features=features
    ).save_to_disk(str(root / "array3d"))
    return root / "array3d", "obs"


LEROBOT_EPISODES = 8  # episodes per video file: LeRobot v3.0 packs many into one file per chunk


def _lerobot_video(
    root: Path, frames: np.ndarray, encode: Callable[[Path, np.ndarray, int], None]
) -> tuple[Path, str | None]:
    """A LeRobot v3.0 folder (the test suite's builder), its videos replaced by ``frames`` encoded by ``encode``:
    ``LEROBOT_EPISODES`` episodes in one file, each at its from_timestamp offset."""
    from tests import table_layouts  # here, not at the top: workers re-run a script's imports

    lengths = [len(part) for part in np.array_split(np.arange(len(frames)), LEROBOT_EPISODES) if len(part)]
    case = table_layouts.build_lerobot(root, video=True, lengths=tuple(lengths), files=(len(lengths),))
    for camera in case.extra["cameras"]:
        encode(case.path / "videos" / camera / "chunk-000" / "file-000.mp4", frames, table_layouts.FPS)
        case.extra["info"]["features"][camera]["shape"] = list(frames.shape[1:])
    (case.path / "meta" / "info.json").write_text(json.dumps(case.extra["info"]))
    return case.path, "top"


def video_encoder(codec: str, **options: str) -> Callable[[Path, np.ndarray, int], None]:
    """Writes uint8 RGB frames as ``codec`` video in yuv420p, with the encoder's ``options``."""

    def encode(path: Path, frames: np.ndarray, fps: int) -> None:
        from tests.table_layouts import encode_mp4  # here, not at the top: workers re-run a script's imports

        encode_mp4(path, frames, fps, codec, "yuv420p", options)

    return encode


def build_lerobot_h264(root: Path, frames: np.ndarray) -> tuple[Path, str | None]:
    """H.264 yuv420p with x264's defaults: a keyframe every 250 frames at most, B-frames (a long-GOP file)."""
    return _lerobot_video(root, frames, video_encoder("libx264"))


# Video as LeRobot writes it (``lerobot.datasets.video_utils.encode_video_frames``: yuv420p, ``g=2``, ``crf=30``;
# libsvtav1 by default, libx264 as the common alternative).
def build_lerobot_h264_g2(root: Path, frames: np.ndarray) -> tuple[Path, str | None]:
    return _lerobot_video(root, frames, video_encoder("libx264", g="2", crf="30"))


def build_lerobot_av1(root: Path, frames: np.ndarray) -> tuple[Path, str | None]:
    return _lerobot_video(root, frames, video_encoder("libsvtav1", g="2", crf="30"))


# -- bare single-core loops over the same data ----------------------------------------------------------


def _pil(blobs: list[bytes]) -> Callable[[], int]:
    def run() -> int:
        for blob in blobs:
            np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        return len(blobs)

    return run


def bare_h5(path: Path, key: str | None) -> Callable[[], int]:
    def run() -> int:
        with h5py.File(path, "r") as handle:
            data = handle["observations"]
            for start in range(0, len(data), 64):
                data[start : start + 64]
            return len(data)

    return run


def bare_h5_bytes(path: Path, key: str | None) -> Callable[[], int]:
    with h5py.File(path, "r") as handle:
        blobs = [bytes(row) for row in handle["observations"][:]]
    return _pil(blobs)


def bare_table_bytes(path: Path, key: str | None) -> Callable[[], int]:
    import datasets

    table = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
    column = table.data.column("image").combine_chunks()
    return _pil([row["bytes"] for row in column.to_pylist()])


def bare_array3d(path: Path, key: str | None) -> Callable[[], int]:
    import datasets

    column = datasets.load_from_disk(str(path)).data.column("obs")

    def run() -> int:
        values = column.combine_chunks()
        values = values.storage if isinstance(values, pa.ExtensionArray) else values
        for _ in range(3):
            values = values.flatten()
        return len(np.asarray(values.to_numpy(zero_copy_only=False)).reshape(len(column), -1))

    return run


def bare_video(path: Path, key: str | None) -> Callable[[], int]:
    video = next((path / "videos").rglob("*.mp4"))

    def run() -> int:
        count = 0
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frame.to_ndarray(format="rgb24")
                count += 1
        return count

    return run


@dataclass(frozen=True)
class Kind:
    """A source kind: how to build it from frames, and its bare single-core loop (what it is, in words)."""

    label: str
    build: Callable[[Path, np.ndarray], tuple[Path, str | None]]
    bare: Callable[[Path, str | None], Callable[[], int]]
    bare_label: str
    projected: bool = True  # False for video: PyAV's own threads already use every core at --workers 1


KINDS: dict[str, Kind] = {
    "hdf5_raw": Kind("HDF5 raw uint8", build_hdf5_raw, bare_h5, "h5py slices"),
    "hdf5_gzip": Kind("HDF5 gzip raw", build_hdf5_gzip, bare_h5, "h5py slices (gunzip)"),
    "hdf5_jpeg": Kind("HDF5 JPEG bytes", build_hdf5_jpeg, bare_h5_bytes, "PIL decode"),
    "disk_png": Kind("save_to_disk PNG Image", build_disk_png, bare_table_bytes, "PIL decode"),
    "parquet_png": Kind("parquet PNG Image", build_parquet_png, bare_table_bytes, "PIL decode"),
    "array3d": Kind("HF Array3D (save_to_disk)", build_array3d, bare_array3d, "Arrow flatten"),
    "lerobot_h264": Kind(
        "LeRobot video h264 (x264 defaults)", build_lerobot_h264, bare_video, "PyAV decode + to_ndarray", False
    ),
    "lerobot_h264_g2": Kind(
        "LeRobot video h264 g=2", build_lerobot_h264_g2, bare_video, "PyAV decode + to_ndarray", False
    ),
    "lerobot_av1": Kind("LeRobot video AV1 g=2", build_lerobot_av1, bare_video, "PyAV decode + to_ndarray", False),
}


# -- timing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    kind: str
    size: int
    workers: int | None  # None: the bare loop
    model: bool = False  # consume batches with the micro model instead of dropping them


@dataclass
class Sample:
    seconds: float
    frames: int
    main_cpu: float  # CPU seconds of this process (workers not included)
    first_seconds: float  # until the first batch: worker start-up (forking, opening the source) and one batch
    first_frames: int
    first_cpu: float  # CPU seconds of this process until the first batch

    @property
    def steady_cpu_per_frame(self) -> float:
        return (self.main_cpu - self.first_cpu) / max(1, self.frames - self.first_frames)

    @property
    def steady(self) -> float:
        """Frames/s after the first batch: what a long run sees, where start-up is amortised."""
        rest = self.seconds - self.first_seconds
        return (self.frames - self.first_frames) / rest if rest > 0 else math.inf


def time_path(path: Path, key: str | None, workers: int, batch: int, scorer: engine.FrameScorer | None) -> Sample:
    with open_source(str(path), key) as source:
        episodes = source.episodes(Align.frame)
        count, first, first_frames, first_cpu = 0, 0.0, 0, 0.0
        start, cpu = time.perf_counter(), time.process_time()
        for batch_ in read_ahead(source, episodes, batch, CPU, workers):
            if not count:
                first, first_frames, first_cpu = time.perf_counter() - start, batch_.size, time.process_time() - cpu
            count += batch_.size
            if scorer is not None:
                scorer.score(batch_)
            batch_.release()
        return Sample(time.perf_counter() - start, count, time.process_time() - cpu, first, first_frames, first_cpu)


def time_bare(run: Callable[[], int]) -> Sample:
    start, cpu = time.perf_counter(), time.process_time()
    count = run()
    return Sample(time.perf_counter() - start, count, time.process_time() - cpu, 0.0, 0, 0.0)


@dataclass
class Row:
    kind: str
    label: str
    size: int
    workers: str  # a count, or "bare: <what>"
    model: bool
    frames_per_s: float  # median over repetitions, whole run (start-up included)
    steady_frames_per_s: float  # median over repetitions, after the first batch
    startup_s: float  # median seconds to the first batch
    runs_per_s: list[float]
    main_cpu_ms_per_frame: float  # after the first batch
    workers_used: bool  # False where the data path reads in this process whatever --workers says
    projected_16_cores: dict[str, float] | None = None


@dataclass
class WorkRow:
    kind: str
    size: int
    workers: int
    seeking: bool
    decoded_per_frame: float  # frames decoded, all workers together, per frame delivered
    seeks_per_batch: float
    largest_share_cpu_s: float  # median over repetitions: CPU seconds of the worker with the most work

    def frames_per_s(self, frames: int) -> float:
        return frames / self.largest_share_cpu_s if self.largest_share_cpu_s > 0 else math.inf


def video_work(
    path: Path, key: str | None, batch: int, counts: list[int], repeats: int, kind: str, size: int
) -> list[WorkRow]:
    """The decoding work of N workers over a LeRobot video when each takes every N-th batch (what the one task
    queue hands out when batches cost the same), run here one worker after another, with the reader's seeking
    and without it (decoding forward only and restarting from the file's start to go back: the reader before
    seeking). Each reader decodes on one thread, as a worker with a core of its own would. Deterministic counts
    (frames decoded, seeks) and CPU seconds per worker, so a busy machine changes the seconds less than the
    frames/s of a parallel run."""
    from vlmlabel.reader.batchfill import plan_batches
    from vlmlabel.sources import video
    from vlmlabel.sources.lerobot import VideoRecipe

    with open_source(str(path), key) as source:
        episodes = source.episodes(Align.frame)
        recipe = source.recipe()
    assert isinstance(recipe, VideoRecipe)
    batches = list(plan_batches(episodes, batch))
    frames = sum(len(piece) for pieces in batches for piece in pieces)
    found = video.seek_points
    runs: dict[tuple[int, bool], list[tuple[int, int, float]]] = {(n, s): [] for n in counts for s in (False, True)}
    for _ in range(repeats):
        for (count, seeking), samples in runs.items():
            video.seek_points = found if seeking else lambda path: None  # type: ignore[assignment]
            video.share_cores(1)  # a worker with a core of its own
            try:
                decoded, seeks, shares = 0, 0, []
                for worker in range(count):
                    reader = recipe.open()
                    start = time.process_time()
                    for pieces in batches[worker::count]:
                        for piece in pieces:
                            for _ in reader.read_blocks(piece, len(piece)):
                                pass
                    shares.append(time.process_time() - start)
                    decoded, seeks = decoded + reader.reader.decoded, seeks + reader.reader.seeks
                    reader.close()
            finally:
                video.seek_points = found
                video.share_cores(0)  # the whole machine again, as the main process decodes
            samples.append((decoded, seeks, max(shares)))
    return [
        WorkRow(
            kind,
            size,
            count,
            seeking,
            round(samples[0][0] / frames, 3),
            round(samples[0][1] / len(batches), 3),
            round(statistics.median(s[2] for s in samples), 4),
        )
        for (count, seeking), samples in runs.items()
    ]


def micro_scorer() -> engine.FrameScorer:
    """The micro CLIP, on one intra-op thread: on two shared cores its parallel regions would otherwise wait
    for a core held by a worker (the test suite runs tiny models the same way)."""
    from vlmlabel.model import create_untrained, load_model, save_local_dir

    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="vlmlabel-micro-") as parent:
        folder = save_local_dir(
            create_untrained(MICRO_MODEL), MICRO_MODEL, MICRO_PREPROCESS, Path(parent) / "micro-clip"
        )
        return engine.FrameScorer(load_model(str(folder), device="cpu", precision="fp32"), ["a photo"])


def measure(args: argparse.Namespace, root: Path) -> tuple[dict, list[Row], list[WorkRow]]:
    """Build every source under ``root`` and time each configuration, repetitions interleaved."""
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(w) for w in args.workers.split(",")]
    kinds = args.kinds.split(",")
    built: dict[tuple[str, int], tuple[Path, str | None]] = {}
    bares: dict[tuple[str, int], Callable[[], int]] = {}
    reopened: dict[tuple[str, int], bool] = {}
    for size in sizes:
        frames = camera_frames(args.frames, size)
        for name in kinds:
            folder = root / f"{name}-{size}"
            folder.mkdir()
            path, key = KINDS[name].build(folder, frames)
            built[name, size] = (path, key)
            bares[name, size] = KINDS[name].bare(path, key)
            with open_source(str(path), key) as source:
                source.episodes(Align.frame)
                recipe = source.recipe() if isinstance(source, Reopenable) else None
                reopened[name, size] = recipe is not None and recipe.decodes
            print(f"built {name} {size}px", file=sys.stderr)
    configs = [Config(k, s, w) for s in sizes for k in kinds for w in [None, *counts]]
    scorer = None
    if args.micro_model and "disk_png" in kinds:
        scorer = micro_scorer()
        configs += [Config("disk_png", s, w, model=True) for s in sizes for w in counts]
    samples: dict[Config, list[Sample]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        print(f"repetition {repeat + 1}/{args.repeats}", file=sys.stderr)
        for config in configs:
            path, key = built[config.kind, config.size]
            if config.workers is None:
                sample = time_bare(bares[config.kind, config.size])
            else:
                sample = time_path(path, key, config.workers, args.batch_size, scorer if config.model else None)
            samples[config].append(sample)
    rows = [summarise(c, samples[c], reopened[c.kind, c.size], samples) for c in configs]
    work_counts = [int(w) for w in args.work_workers.split(",") if w]
    work = [
        row
        for size in sizes
        for name in kinds
        if name.startswith("lerobot") and work_counts
        for row in video_work(*built[name, size], args.batch_size, work_counts, args.repeats, name, size)
    ]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "command": "python " + " ".join(sys.argv),
        "frames": args.frames,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "rows": [asdict(r) for r in rows],
        "video_work": [asdict(w) for w in work],
    }
    return report, rows, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--sizes", default="84,224")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--micro-model",
        action="store_true",
        help="also time save_to_disk PNG end to end through a micro CLIP (the issue's target)",
    )
    parser.add_argument(
        "--work-workers",
        default="1,2,4,8,16",
        help="worker counts of the video decoding-work table (simulated in this process); '' for none",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--table-from", type=Path, help="print the table of a --json report saved earlier")
    args = parser.parse_args()
    if args.table_from is not None:
        report = json.loads(args.table_from.read_text())
        print_table(
            report, [Row(**row) for row in report["rows"]], [WorkRow(**row) for row in report.get("video_work", [])]
        )
        return
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="vlmlabel-datapath-") as folder:  # GBs of sources: never left behind
        report, rows, work = measure(args, Path(folder))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report, rows, work)


def summarise(config: Config, runs: list[Sample], reopened: bool, everything: dict[Config, list[Sample]]) -> Row:
    rates = [s.frames / s.seconds for s in runs]
    cpu = statistics.median(s.steady_cpu_per_frame for s in runs) * 1000
    kind = KINDS[config.kind]
    workers = f"bare: {kind.bare_label}" if config.workers is None else str(config.workers)
    steady = statistics.median(s.steady for s in runs) if config.workers is not None else statistics.median(rates)
    row = Row(
        config.kind,
        kind.label,
        config.size,
        workers,
        config.model,
        round(statistics.median(rates), 1),
        round(steady, 1),
        round(statistics.median(s.first_seconds for s in runs), 3),
        [round(r, 1) for r in rates],
        round(cpu, 4),
        reopened and bool(config.workers),
    )
    if config.workers == 1 and reopened and kind.projected:
        ceiling = 1000 / cpu if cpu > 0 else math.inf
        row.projected_16_cores = {
            f"workers_{n}": round(min(n * row.steady_frames_per_s, ceiling), 1) for n in PROJECTED_WORKERS
        }
        row.projected_16_cores["main_process_ceiling"] = round(ceiling, 1)
    elif config.workers == 0 and not reopened:
        row.projected_16_cores = {"reader_thread": row.steady_frames_per_s}  # read here whatever --workers says
    return row


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{platform.processor() or platform.machine()}, {cores} usable cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, h5py {h5py.__version__}, PyAV {av.__version__}, pyarrow {pa.__version__}"
    )


def print_table(report: dict, rows: list[Row], work: list[WorkRow]) -> None:
    print(f"{report['date']}; {report['machine']}; load average {report['load_average']}")
    print(
        f"{report['command']}  ({report['frames']} frames, batch {report['batch_size']}, "
        f"median of {report['repeats']} interleaved repetitions)"
    )
    print()
    print(
        "| source | px | workers | steady f/s | vs bare | whole run f/s | start-up s | main CPU ms/frame "
        "| 16 cores (projected f/s) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    bare = {(r.kind, r.size): r.steady_frames_per_s for r in rows if r.workers.startswith("bare")}
    for row in rows:
        label = row.label + (" + micro CLIP" if row.model else "")
        workers = (
            row.workers
            if row.workers_used or row.workers.startswith("bare") or row.workers == "0"
            else f"{row.workers} (reads here)"
        )
        ratio = row.steady_frames_per_s / bare[row.kind, row.size]
        projected = ""
        if row.projected_16_cores:
            projected = ", ".join(f"{k.replace('_', ' ')} {v:,.0f}" for k, v in row.projected_16_cores.items())
        print(
            f"| {label} | {row.size} | {workers} | {row.steady_frames_per_s:,.0f} | {ratio:.2f} | "
            f"{row.frames_per_s:,.0f} | {row.startup_s:.2f} | {row.main_cpu_ms_per_frame:.3f} | {projected} |"
        )
    if not work:
        return
    print()
    print("Video decoding work, N workers each taking every N-th batch (simulated here, one after another):")
    print()
    print(
        "| source | px | workers | seeking | decoded / delivered | seeks / batch | CPU s, largest share "
        "| frames / largest share (f/s) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for w in work:
        print(
            f"| {KINDS[w.kind].label} | {w.size} | {w.workers} | {'yes' if w.seeking else 'no'} | "
            f"{w.decoded_per_frame:.2f} | {w.seeks_per_batch:.2f} | {w.largest_share_cpu_s:.3f} | "
            f"{w.frames_per_s(report['frames']):,.0f} |"
        )


if __name__ == "__main__":
    main()
