"""Sources for the fresh hostile pass of issue 23 (round two): cases on classes the issue did not list.

Each builder makes its source at the path given (or beside it) and returns the path to relabel.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, Features, Image, Value

from tests import table_layouts
from tests.layouts import encode, make_frames

LENGTHS = (3, 4, 2)


def flat(path: Path, frames: np.ndarray, lengths: tuple[int, ...] = LENGTHS, **dataset_options) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=frames, **dataset_options)
        f.create_dataset("terminals", data=np.isin(np.arange(len(frames)), np.cumsum(lengths) - 1))
    return path


def noise(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB frames of any size (make_frames needs a few pixels)."""
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def two_cameras(path: Path, lengths_b: tuple[int, ...] = (3, 4), size_b: tuple[int, int] = (16, 16)) -> Path:
    """robomimic, cameras agentview_image and wrist_image; the wrist camera's steps and size as given."""
    a, b = make_frames(7, 16, 16, 0), make_frames(sum(lengths_b), *size_b, 1)
    with h5py.File(path, "w") as f:
        start_b = 0
        for demo, (start_a, length_b) in enumerate(zip((0, 3), lengths_b, strict=True)):
            length_a = (3, 4)[demo]
            f.create_dataset(f"data/demo_{demo}/obs/agentview_image", data=a[start_a : start_a + length_a])
            f.create_dataset(f"data/demo_{demo}/obs/wrist_image", data=b[start_b : start_b + length_b])
            f.create_dataset(f"data/demo_{demo}/actions", data=np.zeros((length_a, 2), np.float32))
            start_b += length_b
    return path


def zero_frames(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", shape=(0, 16, 16, 3), dtype=np.uint8)
    return path


def _episodes_meta(folder: Path) -> Path:
    return next((folder / "meta" / "episodes").rglob("*.parquet"))


def lerobot_meta(path: Path, how: str) -> Path:
    """A LeRobot v3.0 video dataset whose meta/episodes lists episode 0 twice (the second row elsewhere in the
    video), lacks episode 1's row, or starts episode 1 past the end of its video."""
    folder = table_layouts.build_lerobot(path, video=True).path
    rows = pq.read_table(_episodes_meta(folder)).to_pylist()
    if how == "twice":
        rows.append({**rows[0], "videos/observation.images.top/from_timestamp": 0.3})
    elif how == "missing":
        rows = [r for r in rows if r["episode_index"] != 1]
    elif how == "past the video":
        rows[1]["videos/observation.images.top/from_timestamp"] = 50.0
    pq.write_table(pa.Table.from_pylist(rows), _episodes_meta(folder))
    return folder


def lerobot_v21_missing_episode(path: Path) -> Path:
    folder = table_layouts.build_lerobot_v21(path).path
    lines = (folder / "meta" / "episodes.jsonl").read_text().splitlines()
    (folder / "meta" / "episodes.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    return folder


def _image_rows(frames: np.ndarray, episode: int, with_episode: bool = True) -> Dataset:
    columns: dict = {"image": [{"bytes": encode(f, "PNG"), "path": None} for f in frames]}
    features = {"image": Image()}
    if with_episode:
        columns["episode_index"] = [episode] * len(frames)
        features["episode_index"] = Value("int64")
    return Dataset.from_dict(columns, features=Features(features))


def parquet_two_schemas(path: Path) -> Path:
    """A folder of two parquet files: the second lacks episode_index."""
    path.mkdir()
    frames = make_frames(8, 16, 16, seed=7)
    _image_rows(frames[:4], 0).to_parquet(str(path / "a.parquet"))
    _image_rows(frames[4:], 1, with_episode=False).to_parquet(str(path / "b.parquet"))
    return path


def parquet_two_frame_sizes(path: Path) -> Path:
    """A folder of two parquet files of uint8 array frames, 16x16 in one and 24x30 in the other."""
    path.mkdir()
    Dataset.from_dict({"image": list(make_frames(4, 16, 16, 7)), "episode_index": [0] * 4}).to_parquet(
        str(path / "a.parquet")
    )
    Dataset.from_dict({"image": list(make_frames(4, 24, 30, 8)), "episode_index": [1] * 4}).to_parquet(
        str(path / "b.parquet")
    )
    return path


def parquet_no_rows(path: Path) -> Path:
    Dataset.from_dict(
        {"image": [], "episode_index": []}, features=Features({"image": Image(), "episode_index": Value("int64")})
    ).to_parquet(str(path))
    return path


def parquet_episodes(path: Path, episode: list[int]) -> Path:
    """A parquet file of PNG frames, one row per entry of ``episode`` (its episode_index; frame_index counted)."""
    frame = [episode[:row].count(e) for row, e in enumerate(episode)]
    features = Features({"image": Image(), "episode_index": Value("int64"), "frame_index": Value("int64")})
    columns = {"image": list(make_frames(len(episode), 16, 20, seed=4)), "episode_index": episode, "frame_index": frame}
    Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def symlink_to(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def info(folder: Path) -> dict:
    return json.loads((folder / "meta" / "info.json").read_text())
