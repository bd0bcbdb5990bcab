"""Every storage backend the one storage suite runs on: a dataset, the frames that must score each step,
where the rewards land, and how the backend's own ecosystem reads them back.

A new backend gets every case of ``tests/test_storage_suite.py`` by being added to ``BACKENDS``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests import layouts, table_layouts


@dataclass
class Case:
    """A built dataset and what a correct relabel of it gives."""

    source: Path
    image_key: str
    frames: np.ndarray  # RGB frames scoring each step (align=frame), in episode order
    steps: list[int]  # reward values per episode
    transitions: list[int]  # steps per episode, as the dataset's own per-step arrays count them
    reference_key: str  # a numeric per-step value already in the data, for `evaluate --against`
    output: Callable[[str], Path]  # an --output for a run tagged ``tag``
    read: Callable[[Path, str], np.ndarray]  # the reward ``name`` at a destination, all steps in episode order
    cameras: tuple[str, ...] = ()  # every camera the dataset has, when it has several (image_key first)
    fps: float | None = None  # the frame rate the dataset declares (LeRobot), else None


def _hdf5(builder: Callable[[Path], layouts.LayoutFile], reference_key: str) -> Callable[[Path], Case]:
    def build(root: Path) -> Case:
        lf = builder(root / "data.h5")

        def read(dest: Path, name: str) -> np.ndarray:
            with h5py.File(dest, "r") as handle:
                return np.concatenate([handle[p.replace("vlm_reward", name)][()] for p in lf.reward_paths])

        frames = np.concatenate(lf.frame_steps)
        return Case(
            lf.path,
            lf.image_key,
            frames,
            lf.steps,
            lf.transitions,
            reference_key,
            lambda tag: root / f"out-{tag}.h5",
            read,
        )

    return build


def _read_arrow_files(files: list[Path], name: str) -> np.ndarray:
    parts = []
    for path in files:
        if path.suffix == ".arrow":
            table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        else:
            table = pq.read_table(path, columns=[name])
        parts.append(table.column(name).to_numpy())
    return np.concatenate(parts)


def _table(
    builder: Callable[[Path], table_layouts.TableCase], reference_key: str, suffix: str = ""
) -> Callable[[Path], Case]:
    def build(root: Path) -> Case:
        tc = builder(root)

        def read(dest: Path, name: str) -> np.ndarray:
            if tc.kind == "disk":
                return np.asarray(datasets.load_from_disk(str(dest))[name], dtype=np.float32)
            data = dest / "data" if (dest / "meta" / "info.json").is_file() else dest  # LeRobot: not meta/
            files = [dest] if dest.is_file() else sorted(data.rglob("*.parquet"))
            return _read_arrow_files(files, name)

        steps = np.bincount(tc.episode_index).tolist() if tc.episode_index is not None else [len(tc.frames)]
        extra = tc.extra or {}
        return Case(
            tc.path,
            tc.image_key,
            tc.frames,
            steps,
            steps,
            reference_key,
            lambda tag: root / f"out-{tag}{suffix}",
            read,
            tuple(extra.get("cameras", ())),
            extra["info"]["fps"] if "info" in extra else None,
        )

    return build


BACKENDS: dict[str, Callable[[Path], Case]] = {
    "flat_d4rl": _hdf5(layouts.build_flat_d4rl, "rewards"),
    "robomimic": _hdf5(layouts.build_robomimic, "rewards"),
    "minari": _hdf5(layouts.build_minari, "rewards"),
    "save_to_disk": _table(table_layouts.build_disk_image, "frame_index"),
    "parquet": _table(table_layouts.build_parquet_folder, "frame_index"),
    "lerobot_image": _table(lambda root: table_layouts.build_lerobot(root, video=False), "frame_index"),
    "lerobot_video": _table(lambda root: table_layouts.build_lerobot(root, video=True), "frame_index"),
}


def tree_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under ``path`` (or of the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
