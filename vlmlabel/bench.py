"""`vlmlabel bench`: how fast is the real pipeline next to the model alone and to a typical script?

Three paths over the same frames, model, precision and batch size:
  model-only  -- preprocessed tensors already on the device, encode only (the ceiling);
  end-to-end  -- ``engine.score_episodes`` from the file to rewards in memory (file reading included);
  naive       -- what a typical script does: open_clip's PIL transform per frame on the CPU,
                 stack, copy float32 to the device, encode under autocast, cosine.
Model loading is excluded. Each path first runs a short warm-up over the real reading path,
then ``repeats`` timed runs, interleaved so a busy shared machine slows all paths alike; the
median is reported.
"""

from __future__ import annotations

import io
import math
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import encode_jpeg

from vlmlabel import __version__
from vlmlabel.device import default_batch_size, resolve_device, resolve_precision
from vlmlabel.engine import score_episodes
from vlmlabel.errors import VlmlabelError
from vlmlabel.model import DEFAULT_MODEL, ClipModel, load_model
from vlmlabel.preprocess import DevicePreprocess
from vlmlabel.reader.buffers import RAW_AXES, as_nchw
from vlmlabel.reader.readahead import iter_batches
from vlmlabel.rewards import cosine
from vlmlabel.sources import Align, Episode, FrameSource, Segment, open_source
from vlmlabel.sources.base import FrameBlock, VideoDecoder
from vlmlabel.sources.video import nvdec_gpu

BENCH_GOAL = "a robot arm grasping a red cube"
EPISODE_STEPS = 500
CHUNK_BYTES = 1 << 20  # raw frames chunked by ~1 MiB, as h5py's own chunking does
ENCODED_CHUNK_ROWS = 256
DEFAULT_FRAMES = {"cuda": 20_000, "mps": 2_000, "cpu": 256}

# Dense (no structured sparsity) peak TFLOP/s from NVIDIA's data sheets:
# H100 https://www.nvidia.com/en-us/data-center/h100/  H200 https://www.nvidia.com/en-us/data-center/h200/
# A100 https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
# L4 https://www.nvidia.com/en-us/data-center/l4/  L40S https://www.nvidia.com/en-us/data-center/l40s/
# A10 https://www.nvidia.com/en-us/data-center/products/a10-gpu/
# The sheets quote tensor-core figures "with sparsity"; these are half of those.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
}
# Most specific first: "H100 NVL" before "H100", "L40S" before "L4".
_CARD_PATTERNS = (
    (r"H100.*NVL", "H100 NVL"),
    (r"H100.*PCIe", "H100 PCIe"),
    (r"H100", "H100 SXM"),
    (r"H200.*NVL", "H200 NVL"),
    (r"H200", "H200 SXM"),
    (r"A100", "A100"),
    (r"L40S", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bA10\b", "A10"),
)


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    precision: str = "auto"
    batch_sizes: list[int] | None = None  # None: the device's default batch size
    device: str = "auto"
    frames: int | None = None  # None: a default per device (synthetic) or the whole file (SOURCE)
    frame_size: tuple[int, int] = (84, 84)
    encoding: str = "raw"
    compile: bool = False
    source: Path | None = None
    image_key: str | None = None
    repeats: int = 3
    goal: str = BENCH_GOAL
    video_decoder: VideoDecoder = VideoDecoder.cpu


@dataclass
class PathTimes:
    """Wall-clock and process CPU seconds of each timed repetition of one path.

    CPU seconds (all threads of this process) say how much work a path costs even when other
    processes share the CPU and stretch the wall clock.
    """

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    def time(self, run: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        out = run()
        self.seconds.append(time.perf_counter() - wall)
        self.cpu_seconds.append(time.process_time() - cpu)
        return out

    def fps(self, frames: int) -> float:
        return frames / statistics.median(self.seconds)

    def cpu_fps(self, frames: int) -> float:
        return frames / statistics.median(self.cpu_seconds)


def parse_frame_size(text: str) -> tuple[int, int]:
    """'84x84' -> (84, 84)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise VlmlabelError(f"--frame-size {text!r} is not HEIGHTxWIDTH; write e.g. 84x84")
    return int(match[1]), int(match[2])


def parse_batch_sizes(text: str) -> list[int]:
    """'32' or a sweep '32,64,128'."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise VlmlabelError(f"--batch-size {text!r} must be a positive integer or a comma list like 32,64,128")
    return sizes


def peak_tflops(device: torch.device, precision: str) -> tuple[str | None, float | None]:
    """The card's dense peak for the precision the matmuls really run in, when the card is known."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for pattern, card in _CARD_PATTERNS:
        if re.search(pattern, name):
            mode = precision
            if precision == "fp32":
                mode = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
            return card, PEAK_TFLOPS[card][mode]
    return None, None


def image_flops(model: ClipModel) -> int:
    """FLOPs of one preprocessed image through the image tower, counted by torch (2 per multiply-add).

    Counted with autograd on: in inference nn.MultiheadAttention takes a fused kernel that the
    counter does not know, which would drop the attention projections (a third of ViT-B-32).
    """
    height, width = model.preprocess.size
    pixels = torch.zeros((1, 3, height, width), device=model.device)
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        model.module.encode_image(pixels)
    return int(counter.get_total_flops())


# -- the synthetic file --------------------------------------------------------------------------


def _synthetic_frames(count: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour gradients with mild noise: compressible like camera frames, never constant."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[None, :, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, None, :, None]
    base = rng.uniform(0, 255, (count, 1, 1, 3)).astype(np.float32)
    slope_y = rng.uniform(-120, 120, (count, 1, 1, 3)).astype(np.float32)
    slope_x = rng.uniform(-120, 120, (count, 1, 1, 3)).astype(np.float32)
    noise = rng.normal(0, 6, (count, height, width, 3)).astype(np.float32)
    return np.clip(base + ys * slope_y + xs * slope_x + noise, 0, 255).astype(np.uint8)


def write_synthetic(
    path: Path,
    frames: int,
    frame_size: tuple[int, int],
    encoding: str,
    seed: int = 0,
    episode_steps: int = EPISODE_STEPS,
) -> Path:
    """A D4RL-style flat file: `observations` (raw HWC uint8 or JPEG bytes), `terminals` every
    ``episode_steps`` steps."""
    height, width = frame_size
    rng = np.random.default_rng(seed)
    terminals = np.zeros(frames, dtype=bool)
    terminals[episode_steps - 1 :: episode_steps] = True
    with h5py.File(path, "w") as f:
        if encoding == "raw":
            rows = max(1, min(frames, CHUNK_BYTES // (height * width * 3)))
            dset = f.create_dataset(
                "observations", (frames, height, width, 3), np.uint8, chunks=(rows, height, width, 3)
            )
        else:
            dset = f.create_dataset(
                "observations", (frames,), h5py.vlen_dtype(np.uint8), chunks=(min(frames, ENCODED_CHUNK_ROWS),)
            )
        for start in range(0, frames, 1024):
            block = _synthetic_frames(min(1024, frames - start), height, width, rng)
            dset[start : start + len(block)] = block if encoding == "raw" else _jpeg_blobs(block)
        f.create_dataset("terminals", data=terminals)
        f.create_dataset("actions", data=np.zeros((frames, 2), np.float32))
    return path


def _jpeg_blobs(block: np.ndarray) -> np.ndarray:
    encoded = encode_jpeg(list(torch.from_numpy(block).permute(0, 3, 1, 2)), quality=90)
    blobs = np.empty(len(encoded), dtype=object)
    blobs[:] = [blob.numpy() for blob in encoded]
    return blobs


class Prefix:
    """The first ``limit`` steps of a source (warm-up passes, --frames on a SOURCE file)."""

    def __init__(self, source: FrameSource, limit: int):
        self.source, self.limit = source, limit
        self.layout, self.image_key, self.frame_format = source.layout, source.image_key, source.frame_format
        self.kind, self.seekable, self.cameras = source.kind, source.seekable, source.cameras
        self.holds_outputs = source.holds_outputs

    @property
    def paths(self) -> tuple[Path, ...]:
        return self.source.paths

    def episodes(self, align: Align) -> list[Episode]:
        kept, left = [], self.limit
        for episode in self.source.episodes(align):
            if left <= 0:
                break
            steps = min(episode.steps, left)
            segments, need = [], steps
            for segment in episode.frames:
                take = min(len(segment), need)
                if take:
                    segments.append(Segment(segment.array, segment.start, segment.start + take))
                need -= take
            kept.append(replace(episode, steps=steps, frames=tuple(segments)))
            left -= steps
        return kept

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]:
        return self.source.read_blocks(segment, max_rows)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Prefix:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the three paths -----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_pixels(source: FrameSource, model: ClipModel, batch_size: int) -> torch.Tensor:
    """One batch of the file's frames, preprocessed on the device: the model-only input."""
    batch = next(iter_batches(source, source.episodes(Align.frame), batch_size))
    if batch.form in RAW_AXES:
        assert isinstance(batch.frames, torch.Tensor)  # raw batches hold one uint8 tensor
        frames = as_nchw(batch.frames, batch.form)
    else:
        assert isinstance(batch.frames, list)  # decoded batches hold one tensor per frame
        frames = torch.stack(batch.frames)
    pixels = DevicePreprocess(model.preprocess, model.device)(frames.to(model.device))
    return pixels.repeat(math.ceil(batch_size / len(pixels)), 1, 1, 1)[:batch_size].contiguous()


def run_model_only(model: ClipModel, pixels: torch.Tensor, frames: int) -> None:
    batch_size = len(pixels)
    for first in range(0, frames, batch_size):
        model.encode_images(pixels[: min(batch_size, frames - first)])
    _sync(model.device)


def run_end_to_end(model: ClipModel, source: FrameSource, goal: str, batch_size: int) -> np.ndarray:
    return score_episodes(source, model, [goal], Align.frame, batch_size).all_rewards()[:, 0]


def _pil_images(block: Any, axes: str) -> list:
    """Frames as PIL RGB images, one at a time, as a typical script builds them."""
    if axes == "encoded":
        return [Image.open(io.BytesIO(np.asarray(blob, np.uint8).tobytes())).convert("RGB") for blob in block]
    if axes == "CHW":
        block = block.transpose(0, 2, 3, 1)
    if axes == "HW" or block.shape[-1] == 1:
        return [Image.fromarray(frame.reshape(frame.shape[:2])).convert("RGB") for frame in block]
    return [Image.fromarray(frame) for frame in block]


def run_naive(model: ClipModel, source: FrameSource, goal: str, batch_size: int) -> np.ndarray:
    """The baseline: the per-frame PIL loop is the point (it is what vlmlabel is measured against)."""
    transform = model.reference_transform()
    goal_embedding = model.encode_texts([goal])
    axes = source.frame_format.axes
    out: list[np.ndarray] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        pixels = torch.stack(pending).to(model.device)
        out.append(cosine(model.encode_images(pixels), goal_embedding).cpu().numpy())
        pending.clear()

    for episode in source.episodes(Align.frame):
        for segment in episode.frames:
            for block in source.read_blocks(segment, batch_size):
                for image in _pil_images(block, axes):
                    pending.append(transform(image))
                    if len(pending) == batch_size:
                        flush()
    if pending:
        flush()
    return np.concatenate(out)[:, 0]


# -- the benchmark -------------------------------------------------------------------------------


def _bench_batch(
    model: ClipModel,
    source: FrameSource,
    config: BenchConfig,
    frames: int,
    batch_size: int,
    flops: int,
    status: Callable[[str], None],
) -> dict[str, Any]:
    """Warm up, then time the three paths ``repeats`` times, interleaved; medians and ratios."""
    pixels = _first_pixels(source, model, batch_size)
    rest = frames % batch_size
    warm = Prefix(source, min(frames, batch_size + rest if rest else batch_size))
    warm_frames = sum(e.steps for e in warm.episodes(Align.frame))
    status(f"batch {batch_size}: warm-up")
    run_model_only(model, pixels, warm_frames)
    run_end_to_end(model, warm, config.goal, batch_size)
    run_naive(model, warm, config.goal, batch_size)
    times = {"model_only": PathTimes(), "end_to_end": PathTimes(), "naive": PathTimes()}
    max_diff = 0.0
    for repeat in range(config.repeats):
        status(f"batch {batch_size}: repetition {repeat + 1}/{config.repeats}")
        times["model_only"].time(lambda: run_model_only(model, pixels, frames))
        fast = times["end_to_end"].time(lambda: run_end_to_end(model, source, config.goal, batch_size))
        naive = times["naive"].time(lambda: run_naive(model, source, config.goal, batch_size))
        max_diff = max(max_diff, float(np.abs(fast - naive).max()))
    fps = {name: t.fps(frames) for name, t in times.items()}
    cpu_fps = {name: t.cpu_fps(frames) for name, t in times.items()}
    card, peak = peak_tflops(model.device, model.precision)
    tflops = fps["model_only"] * flops / 1e12
    end_to_end_tflops = fps["end_to_end"] * flops / 1e12
    return {
        "batch_size": batch_size,
        "model_only_fps": fps["model_only"],
        "end_to_end_fps": fps["end_to_end"],
        "naive_fps": fps["naive"],
        "ratio_vs_model_only": fps["end_to_end"] / fps["model_only"],
        "ratio_vs_naive": fps["end_to_end"] / fps["naive"],
        "tflops": tflops,
        "end_to_end_tflops": end_to_end_tflops,
        "peak_tflops": peak,
        "gpu": card,
        "peak_fraction": tflops / peak if peak else None,
        "end_to_end_peak_fraction": end_to_end_tflops / peak if peak else None,
        "cpu_ratio_vs_model_only": cpu_fps["end_to_end"] / cpu_fps["model_only"],
        "cpu_ratio_vs_naive": cpu_fps["end_to_end"] / cpu_fps["naive"],
        "seconds": {name: t.seconds for name, t in times.items()},
        "cpu_seconds": {name: t.cpu_seconds for name, t in times.items()},
        "max_abs_reward_diff_vs_naive": max_diff,
    }


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _environment(device: torch.device) -> dict[str, Any]:
    info = {
        "vlmlabel": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(config: BenchConfig, status: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the benchmark; the result holds every key of the --json contract (see module docstring)."""
    if config.repeats < 1:
        raise VlmlabelError(f"--repeats must be at least 1, not {config.repeats}")
    if config.frames is not None and config.frames < 1:
        raise VlmlabelError(f"--frames must be at least 1, not {config.frames}")
    if config.encoding not in ("raw", "jpeg"):
        raise VlmlabelError(f"--encoding {config.encoding!r}: use raw or jpeg")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    batch_sizes = config.batch_sizes or [default_batch_size(device)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    status(f"loading {config.model} on {device}")
    model = load_model(config.model, config.pretrained, device, precision, allow_random=True)
    flops = image_flops(model)
    if config.compile:
        model.compile_image_tower()
    with tempfile.TemporaryDirectory(prefix="vlmlabel-bench-") as folder:
        path = config.source
        frames = config.frames
        if path is None:
            frames = frames or DEFAULT_FRAMES.get(device.type, DEFAULT_FRAMES["cpu"])
            status(f"writing {frames:,} synthetic {config.encoding} frames")
            path = write_synthetic(Path(folder) / "bench.h5", frames, config.frame_size, config.encoding)
        with open_source(str(path), config.image_key, nvdec_gpu=nvdec_gpu(config.video_decoder, device)) as opened:
            total = sum(e.steps for e in opened.episodes(Align.frame))
            frames = min(frames or total, total)
            source = Prefix(opened, frames)
            runs = [_bench_batch(model, source, config, frames, size, flops, status) for size in batch_sizes]
            frame_desc = opened.frame_format.describe()
    best = max(runs, key=lambda run: run["end_to_end_fps"])
    return {
        "device": str(device),
        "model": config.model,
        "pretrained": model.pretrained,
        "random_weights": model.pretrained == "random",
        "precision": precision,
        "compile": config.compile,
        "frames": frames,
        "source": str(config.source)
        if config.source
        else f"synthetic {config.encoding} {config.frame_size[0]}x{config.frame_size[1]}",
        "frame_format": frame_desc,
        "flops_per_image": flops,
        **best,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "sweep": runs if len(runs) > 1 else None,
        "environment": _environment(device),
    }
