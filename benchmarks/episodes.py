"""How the time outside the model grows with the number of episodes (issue 12, "Episode count").

Builds files of N short episodes (10 steps of 8x8 frames by default) in each layout whose episodes are
gathered differently: robomimic (`data/demo_K/obs/agentview_image`), Minari (`episode_K/observations`), a
flat D4RL file ended by `terminals`, and a parquet table with `episode_index`/`frame_index` columns. Each
is relabelled once by `relabel_file` (what `vlmlabel relabel` runs) with a micro CLIP (8x8 input, one layer)
into an `--output` file, and the time is split:

  open    opening the source, gathering the episodes, the destination's checks, the fingerprint
  score   reading the frames and scoring them, without the seconds spent inside the model
  model   seconds inside ``ClipModel.encode_images`` (reported apart: it is the model, not the data path)
  write   post-processing and the destination's one atomic write

and the process CPU seconds of the whole relabel (all threads, model included) and of each phase (model load
left out of open, the model's own seconds in score), which a machine shared with other work stretches less
than the wall clock. Model loading is measured apart and left out. Usage:

    python benchmarks/episodes.py [--episodes 12500,25000,50000,100000] [--layouts robomimic,minari,flat,parquet]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmlabel import model as model_module  # noqa: E402
from vlmlabel.events import Events  # noqa: E402
from vlmlabel.model import create_untrained, save_local_dir  # noqa: E402
from vlmlabel.run import lifecycle  # noqa: E402
from vlmlabel.run.lifecycle import relabel_file  # noqa: E402
from vlmlabel.run.request import RelabelRequest  # noqa: E402

MICRO_CFG = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 8, "layers": 1, "width": 16, "patch_size": 8, "head_width": 16, "mlp_ratio": 1.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}
MICRO_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def _frames(count: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (count, size, size, 3), dtype=np.uint8)


def build_robomimic(path: Path, episodes: int, steps: int, size: int) -> Path:
    frames = _frames(steps, size)
    with h5py.File(path, "w", libver="latest") as handle:
        data = handle.create_group("data")
        for k in range(episodes):
            data.create_dataset(f"demo_{k}/obs/agentview_image", data=frames)
    return path


def build_minari(path: Path, episodes: int, steps: int, size: int) -> Path:
    frames = _frames(steps + 1, size)  # Minari stores T+1 observations for T steps
    with h5py.File(path, "w", libver="latest") as handle:
        for k in range(episodes):
            handle.create_dataset(f"episode_{k}/observations", data=frames)
    return path


def build_flat(path: Path, episodes: int, steps: int, size: int) -> Path:
    terminals = np.zeros(episodes * steps, dtype=bool)
    terminals[steps - 1 :: steps] = True
    with h5py.File(path, "w") as handle:
        handle.create_dataset("observations", data=_frames(episodes * steps, size), chunks=(4096, size, size, 3))
        handle.create_dataset("terminals", data=terminals)
    return path


def build_parquet(path: Path, episodes: int, steps: int, size: int) -> Path:
    """A Hugging Face parquet file: an Array3D uint8 frame column with episode and frame indices."""
    from datasets import Array3D, Features, Value
    from datasets.features.features import Array3DExtensionType

    rows = episodes * steps
    pixels: pa.Array = pa.array(_frames(rows, size).reshape(-1))
    for width in (3, size, size):  # Array3D's storage: lists of rows of pixels of channels
        pixels = pa.ListArray.from_arrays(np.arange(0, len(pixels) + 1, width, dtype=np.int32), pixels)
    frames = pa.ExtensionArray.from_storage(Array3DExtensionType((size, size, 3), "uint8"), pixels)
    features = Features(
        {
            "observation": Array3D((size, size, 3), "uint8"),
            "episode_index": Value("int64"),
            "frame_index": Value("int64"),
        }
    )
    table = pa.table(
        {
            "observation": frames,
            "episode_index": np.repeat(np.arange(episodes, dtype=np.int64), steps),
            "frame_index": np.tile(np.arange(steps, dtype=np.int64), episodes),
        },
        schema=features.arrow_schema,
    )
    pq.write_table(table, path)
    return path


BUILDERS: dict[str, tuple[str, Callable[[Path, int, int, int], Path]]] = {
    "robomimic": (".h5", build_robomimic),
    "minari": (".h5", build_minari),
    "flat": (".h5", build_flat),
    "parquet": (".parquet", build_parquet),
}


@dataclass
class Split:
    """Seconds of one relabel, phase by phase."""

    load: float = 0.0
    model: float = 0.0
    started: float = 0.0  # when scoring began (after open, checks and model load)
    scored: float = 0.0  # when the last frame was scored
    total: float = 0.0
    cpu: float = 0.0  # process CPU seconds of the whole relabel, model included (all threads)
    cpu_load: float = 0.0  # ... spent loading the model
    cpu_model: float = 0.0  # CPU seconds of the thread running the model, inside it
    cpu_started: float = 0.0  # ... when scoring began
    cpu_scored: float = 0.0  # ... when the last frame was scored

    @property
    def open(self) -> float:
        return self.started - self.load

    @property
    def score(self) -> float:
        return self.scored - self.started - self.model

    @property
    def write(self) -> float:
        return self.total - self.scored

    @property
    def outside_model(self) -> float:
        return self.total - self.load - self.model

    def cpu_phases(self) -> tuple[float, float, float]:
        """CPU seconds of open (model load left out), score (the model's left out) and write."""
        return (
            self.cpu_started - self.cpu_load,
            self.cpu_scored - self.cpu_started - self.cpu_model,
            self.cpu - self.cpu_scored,
        )


@contextmanager
def _timing(split: Split) -> Iterator[None]:
    """Accumulate the seconds spent loading the model and inside the image encoder."""
    load, encode = lifecycle.load_model, model_module.ClipModel.encode_images

    def timed_load(*args: Any, **kwargs: Any) -> model_module.ClipModel:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return load(*args, **kwargs)
        finally:
            split.load += time.perf_counter() - start
            split.cpu_load += time.process_time() - cpu

    def timed_encode(self: model_module.ClipModel, pixels: torch.Tensor) -> torch.Tensor:
        start, cpu = time.perf_counter(), time.thread_time()  # one torch thread: the model runs in this one
        try:
            return encode(self, pixels)
        finally:
            split.model += time.perf_counter() - start
            split.cpu_model += time.thread_time() - cpu

    lifecycle.load_model = timed_load
    model_module.ClipModel.encode_images = timed_encode  # type: ignore[method-assign]
    try:
        yield
    finally:
        lifecycle.load_model = load
        model_module.ClipModel.encode_images = encode  # type: ignore[method-assign]


def relabel_timed(source: Path, model_dir: Path, output: Path) -> Split:
    split = Split()
    begin, cpu = time.perf_counter(), time.process_time()

    def started(total: int) -> None:
        split.started = time.perf_counter() - begin
        split.cpu_started = time.process_time() - cpu

    def progress(done: int) -> None:
        split.scored = time.perf_counter() - begin
        split.cpu_scored = time.process_time() - cpu

    request = RelabelRequest(
        source=source,
        goals=["a red cube"],
        model=str(model_dir),
        device="cpu",
        output=output,
        overwrite=True,
        batch_size=1024,
    )
    with _timing(split):
        relabel_file(request, events=Events(on_start=started, on_progress=progress))
    split.total = time.perf_counter() - begin
    split.cpu = time.process_time() - cpu
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", default="12500,25000,50000,100000", help="episode counts, comma separated")
    parser.add_argument("--layouts", default=",".join(BUILDERS), help="layouts, comma separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a micro model only loses from intra-op threads
    counts = [int(c) for c in args.episodes.split(",")]
    with tempfile.TemporaryDirectory(prefix="vlmlabel-episodes-") as folder:
        root = Path(folder)
        torch.manual_seed(0)
        model_dir = save_local_dir(create_untrained(MICRO_CFG), MICRO_CFG, MICRO_PREPROCESS, root / "micro")
        print(f"{args.steps} steps of {args.size}x{args.size} frames per episode; seconds (model load left out)")
        print(
            f"{'layout':10s} {'episodes':>9s} {'open':>7s} {'score':>7s} {'write':>7s} {'outside':>8s} "
            f"{'x prev':>6s} {'model':>7s} {'CPU s':>7s} {'CPU open/score/write':>22s}",
            flush=True,
        )
        for layout in args.layouts.split(","):
            suffix, build = BUILDERS[layout]
            previous = None
            for count in counts:
                source = build(root / f"{layout}-{count}{suffix}", count, args.steps, args.size)
                split = relabel_timed(source, model_dir, root / f"out-{layout}-{count}{suffix}")
                growth = f"{split.outside_model / previous:6.2f}" if previous else f"{'':6s}"
                phases = "/".join(f"{c:.2f}" for c in split.cpu_phases())
                print(
                    f"{layout:10s} {count:9,d} {split.open:7.2f} {split.score:7.2f} {split.write:7.2f} "
                    f"{split.outside_model:8.2f} {growth} {split.model:7.2f} {split.cpu:7.2f} {phases:>22s}",
                    flush=True,
                )
                previous = split.outside_model
                for leftover in root.glob(f"*{layout}-{count}*"):
                    if leftover.is_file():
                        leftover.unlink()


if __name__ == "__main__":
    main()
