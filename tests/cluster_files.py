"""Files and commands shared by the resume, shard and torchrun tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from tests import layouts

# Uneven episode lengths so shard boundaries and batch edges do not line up.
EPISODE_LENGTHS = (12, 21, 4, 15, 27, 6, 19, 10, 13, 24)
ROOT = Path(__file__).resolve().parent.parent


def make_dataset(path: Path, lengths=EPISODE_LENGTHS) -> Path:
    """robomimic-style file: data/demo_K/obs/agentview_image, small frames, chunked and compressed."""
    with h5py.File(path, "w") as f:
        for k, length in enumerate(lengths):
            frames = layouts.make_frames(length, 20, 24, seed=100 + k)
            f.create_dataset(
                f"data/demo_{k}/obs/agentview_image",
                data=frames,
                chunks=(min(4, length), 20, 24, 3),
                compression="gzip",
            )
            f.create_dataset(f"data/demo_{k}/actions", data=np.zeros((length, 2), np.float32))
    return path


def read_rewards(path: Path, key: str = "vlm_reward") -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[f"data/{name}/{key}"][()] for name in f["data"] if key in f[f"data/{name}"]}


def read_attrs(path: Path, key: str = "vlm_reward") -> dict[str, object]:
    with h5py.File(path, "r") as f:
        return dict(f[f"data/demo_0/{key}"].attrs)


def relabel_args(source: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vlmlabel",
        "relabel",
        str(source),
        "--goal",
        "a red block",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def env(**extra: str) -> dict[str, str]:
    """Subprocess environment: this checkout first on the path, offline, one thread, no SLURM/torchrun."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    clean.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return clean


def run(args: list[str], timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env(**extra_env))


def interrupt_after(frames: int):
    """An on_progress callback that stops the run like Ctrl-C once ``frames`` frames are scored."""
    seen = []

    def on_progress(count: int) -> None:
        seen.append(count)
        if sum(seen) >= frames:
            raise KeyboardInterrupt

    return on_progress
