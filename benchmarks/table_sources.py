"""Read throughput of the table sources (frames/s through the engine's reader, no model).

Builds, in a temporary folder, the same frames as: an HDF5 flat file (uint8), a save_to_disk folder
with a uint8 array column, a parquet file with a PNG `Image` column, and a LeRobot v3.0 folder with
an H.264 (yuv420p) video; then times `engine.iter_batches` (read + decode, as the background
thread does while the GPU encodes), best of three passes. Usage: python benchmarks/table_sources.py [FRAMES] [SIZE]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import av
import datasets
import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import table_layouts  # noqa: E402
from tests.layouts import make_frames  # noqa: E402
from vlmlabel.engine import iter_batches  # noqa: E402
from vlmlabel.sources import Align, open_source  # noqa: E402


def h264(path: Path, frames: np.ndarray, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def timed(path: str, image_key: str | None, batch: int = 256, repeats: int = 3) -> float:
    """Best of ``repeats`` full passes (the machine may be shared), in frames/s."""
    best = 0.0
    for _ in range(repeats):
        with open_source(path, image_key) as source:
            episodes = source.episodes(Align.frame)
            start = time.perf_counter()
            count = sum(b.size for b in iter_batches(source, episodes, batch))
            best = max(best, count / (time.perf_counter() - start))
    return best


def main(count: int, size: int) -> None:
    datasets.disable_progress_bars()
    root = Path(tempfile.mkdtemp(prefix="vlmlabel-bench-"))
    frames = make_frames(count, size, size, seed=0)
    episodes = np.repeat(np.arange(count // 100 + 1), 100)[:count]
    with h5py.File(root / "flat.h5", "w") as handle:
        handle.create_dataset("observations", data=frames, chunks=(64, size, size, 3))
    columns = {"episode_index": episodes.tolist()}
    array = datasets.Features({"obs": datasets.Array3D((size, size, 3), "uint8"),
                               "episode_index": datasets.Value("int64")})
    datasets.Dataset.from_dict({"obs": list(frames), **columns}, features=array).save_to_disk(str(root / "disk"))
    image = datasets.Features({"image": datasets.Image(), "episode_index": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": list(frames), **columns}, features=image).to_parquet(str(root / "png.parquet"))
    lerobot = table_layouts.build_lerobot(root, video=True, lengths=(count,), files=(1,))
    for camera in lerobot.extra["cameras"]:  # the same frames as lossy H.264 yuv420p, as LeRobot datasets are
        h264(lerobot.path / "videos" / camera / "chunk-000" / "file-000.mp4", frames, table_layouts.FPS)
    print(f"{count} frames of {size}x{size}")
    for label, path, key in [("HDF5 uint8", root / "flat.h5", None),
                             ("save_to_disk Array3D uint8", root / "disk", None),
                             ("parquet PNG Image", root / "png.parquet", None),
                             ("LeRobot H.264 video", lerobot.path, "top")]:
        print(f"{label:28s} {timed(str(path), key):10,.0f} frames/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, int(sys.argv[2]) if len(sys.argv) > 2 else 128)
