"""Relabel from the embedding cache: frames/s for a new goal on N cached frames (default 1M, D=512).

Builds a flat D4RL-style file whose cache holds random unit float16 embeddings recorded as made by a
random-weight CLIP with ViT-B-32's embedding width (so no download is needed), then runs `relabel_file`
with a new goal and prints the scoring rate and the wall time including the safe write (a full file copy).

    python benchmarks/cache_bench.py [--frames 1000000] [--dim 512] [--episodes 1000] [--folder /tmp]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlmlabel.cache import store  # noqa: E402
from vlmlabel.model import create_untrained, load_model, save_local_dir  # noqa: E402
from vlmlabel.run.lifecycle import relabel_file  # noqa: E402
from vlmlabel.run.request import RelabelRequest  # noqa: E402
from vlmlabel.sources import open_source  # noqa: E402
from vlmlabel.sources.base import content_fingerprint  # noqa: E402


def _random_unit_rows(rows: int, dim: int, block: int = 65536) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(0)
    for start in range(0, rows, block):
        values = rng.standard_normal((min(block, rows - start), dim), dtype=np.float32)
        yield (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float16)


def build(folder: Path, frames: int, dim: int, episodes: int) -> tuple[Path, Path]:
    cfg = {
        "embed_dim": dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    preprocess = {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}
    model_dir = save_local_dir(create_untrained(cfg), cfg, preprocess, folder / "model")
    path = folder / "bench.h5"
    terminals = np.zeros(frames, bool)
    terminals[np.linspace(0, frames, episodes + 1, dtype=np.int64)[1:] - 1] = True
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", shape=(frames, 8, 8, 3), dtype=np.uint8, chunks=(4096, 8, 8, 3))
        f.create_dataset("terminals", data=terminals)
    model = load_model(str(model_dir), None, "cpu", "fp32")
    with open_source(str(path)) as source:
        plans = store.plan(source)
        blocks = _random_unit_rows(sum(len(p.rows) for p in plans), dim)
        store.write(source, plans, blocks, model, content_fingerprint(source), path, path, None, True)
    return path, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        started = time.perf_counter()
        path, model_dir = build(Path(tmp), args.frames, args.dim, args.episodes)
        print(
            f"built {args.frames:,} cached frames x {args.dim} ({path.stat().st_size / 2**30:.2f} GiB) "
            f"in {time.perf_counter() - started:.1f} s"
        )
        for goal in ("a red block on a plate", "the drawer is open"):
            started = time.perf_counter()
            summary = relabel_file(
                RelabelRequest(source=path, goals=[goal], model=str(model_dir), device="cpu", overwrite=True)
            )
            wall = time.perf_counter() - started
            assert summary.used_cache, summary.cache_note
            print(
                f"goal {goal!r}: scored {summary.result.frames:,} frames from the cache in "
                f"{summary.result.seconds:.2f} s ({summary.result.frames_per_second:,.0f} frames/s); "
                f"{wall:.2f} s wall including model load and the safe write (file copy)"
            )


if __name__ == "__main__":
    main()
