"""Small Hugging Face and LeRobot datasets built offline, with the RGB frame each row must be scored on."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Array3D, Dataset, DatasetDict, Features, Image, Sequence, Value

from tests.layouts import make_frames

LENGTHS = (4, 6, 3)
HEIGHT, WIDTH = 24, 32
FPS = 10


@dataclass
class TableCase:
    """A dataset plus the truth: RGB frames in row order and the episode of each row (None: one episode)."""

    path: Path
    kind: str  # disk | parquet | lerobot
    frames: np.ndarray
    episode_index: np.ndarray | None
    image_key: str
    image_feature: bool  # the frame column is an Image feature that must stay one
    extra: dict | None = None


def _episode_columns(lengths=LENGTHS) -> dict[str, list[int]]:
    episode = np.repeat(np.arange(len(lengths)), lengths)
    frame = np.concatenate([np.arange(n) for n in lengths])
    return {"episode_index": episode.tolist(), "frame_index": frame.tolist(), "index": list(range(int(sum(lengths))))}


def image_dataset(frames: np.ndarray, lengths=LENGTHS) -> Dataset:
    columns = {
        "image": list(frames),
        **_episode_columns(lengths),
        "action": np.arange(len(frames) * 2, dtype=np.float32).reshape(-1, 2).tolist(),
    }
    features = Features(
        {
            "image": Image(),
            "episode_index": Value("int64"),
            "frame_index": Value("int64"),
            "index": Value("int64"),
            "action": Sequence(Value("float32")),
        }
    )
    return Dataset.from_dict(columns, features=features)


def build_disk_image(root: Path) -> TableCase:
    """save_to_disk folder, PNG `Image` column, three episodes, two arrow shards."""
    frames = make_frames(sum(LENGTHS), HEIGHT, WIDTH, seed=101)
    image_dataset(frames).save_to_disk(str(root / "disk_image"), num_shards=2)
    return TableCase(root / "disk_image", "disk", frames, np.repeat(np.arange(3), LENGTHS), "image", True)


def build_disk_array(root: Path) -> TableCase:
    """save_to_disk folder, uint8 HWC `Array3D` column, no episode column (one episode)."""
    frames = make_frames(9, HEIGHT, WIDTH, seed=102)
    ds = Dataset.from_dict(
        {"pixels": list(frames), "reward": [0.0] * 9},
        features=Features({"pixels": Array3D((HEIGHT, WIDTH, 3), "uint8"), "reward": Value("float32")}),
    )
    ds.save_to_disk(str(root / "disk_array"))
    return TableCase(root / "disk_array", "disk", frames, None, "pixels", False)


def build_dict_split(root: Path) -> TableCase:
    """DatasetDict folder: the `test` split is labelled, `train` is carried over untouched."""
    frames = make_frames(sum(LENGTHS), HEIGHT, WIDTH, seed=103)
    other = make_frames(3, HEIGHT, WIDTH, seed=104)
    train = Dataset.from_dict(
        {"image": list(other), "episode_index": [0, 0, 0]},
        features=Features({"image": Image(), "episode_index": Value("int64")}),
    )
    DatasetDict({"train": train, "test": image_dataset(frames)}).save_to_disk(str(root / "dict"))
    return TableCase(
        root / "dict", "disk", frames, np.repeat(np.arange(3), LENGTHS), "image", True, extra={"split": "test"}
    )


def build_parquet_float_chw(root: Path) -> TableCase:
    """One parquet file, float32 CHW frames in [0, 1] (x / 255), episodes from episode_index."""
    frames = make_frames(sum(LENGTHS), HEIGHT, WIDTH, seed=105)
    floats = frames.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    ds = Dataset.from_dict({"obs": list(floats), **_episode_columns()})
    ds.to_parquet(str(root / "float_chw.parquet"))
    return TableCase(root / "float_chw.parquet", "parquet", frames, np.repeat(np.arange(3), LENGTHS), "obs", False)


def build_parquet_folder(root: Path) -> TableCase:
    """A folder of parquet shards (Hub-style data/train-*.parquet) with an `Image` column."""
    frames = make_frames(sum(LENGTHS), HEIGHT, WIDTH, seed=106)
    ds = image_dataset(frames)
    folder = root / "pq_folder"
    (folder / "data").mkdir(parents=True)
    ds.select(range(0, 7)).to_parquet(str(folder / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(7, len(ds))).to_parquet(str(folder / "data" / "train-00001-of-00002.parquet"))
    (folder / "README.md").write_text("a dataset card\n")
    return TableCase(folder, "parquet", frames, np.repeat(np.arange(3), LENGTHS), "image", True)


def build_parquet_glob(root: Path) -> TableCase:
    """A glob over parquet files of grayscale (H, W) uint8 frames."""
    gray = make_frames(8, HEIGHT, WIDTH, seed=107, channels=1)[..., 0]
    folder = root / "pq_glob"
    folder.mkdir()
    for part, rows in enumerate((range(0, 5), range(5, 8))):
        Dataset.from_dict({"gray": [gray[i] for i in rows]}).to_parquet(str(folder / f"part-{part}.parquet"))
    (folder / "ignored.parquet.txt").write_text("not data")
    return TableCase(
        Path(str(folder / "part-*.parquet")), "parquet", np.repeat(gray[..., None], 3, axis=-1), None, "gray", False
    )


BUILDERS: dict[str, Callable[[Path], TableCase]] = {
    "disk_image": build_disk_image,
    "disk_array": build_disk_array,
    "dict_split": build_dict_split,
    "parquet_float_chw": build_parquet_float_chw,
    "parquet_folder": build_parquet_folder,
    "parquet_glob": build_parquet_glob,
}


# -- LeRobot ---------------------------------------------------------------------------------------


LOSSLESS = ("libx264rgb", "rgb24", {"qp": "0", "preset": "ultrafast"})  # decoded frames equal the originals


def encode_mp4(
    path: Path,
    frames: np.ndarray,
    fps: int = FPS,
    codec: str = LOSSLESS[0],
    pix_fmt: str = LOSSLESS[1],
    options: dict[str, str] | None = None,
) -> None:
    """Encode uint8 RGB frames as ``codec`` video in ``pix_fmt`` with the encoder's ``options`` (by default
    losslessly: libx264rgb, qp 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=LOSSLESS[2] if options is None else options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def decode_mp4(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def build_lerobot(
    root: Path,
    video: bool,
    lengths=LENGTHS,
    files: tuple[int, ...] = (2, 1),
    frames: dict[str, np.ndarray] | None = None,
) -> TableCase:
    """A LeRobot v3.0 folder by hand: two cameras, episodes packed into ``files`` data/video files.

    With ``video``, frames live in MP4 files holding several episodes (from_timestamp offsets);
    otherwise in `Image` columns of the data parquet files. ``frames`` (camera -> uint8 frames of every
    row) replaces the random frames of the cameras `top` and `wrist`.
    """
    folder = root / ("lerobot_video" if video else "lerobot_image")
    total = int(sum(lengths))
    if frames is None:
        default = ("observation.images.top", "observation.images.wrist")
        frames = {cam: make_frames(total, HEIGHT, WIDTH, seed=200 + i) for i, cam in enumerate(default)}
    cams = tuple(frames)
    height, width = frames[cams[0]].shape[1:3]
    cols = _episode_columns(lengths)
    episode = np.asarray(cols["episode_index"])
    cols["timestamp"] = (np.asarray(cols["frame_index"]) / FPS).astype(np.float32).tolist()
    cols["task_index"] = [0] * total
    cols["observation.state"] = np.zeros((total, 2), np.float32).tolist()
    cols["action"] = np.ones((total, 2), np.float32).tolist()
    features = {
        "observation.state": {"dtype": "float32", "shape": [2], "names": ["a", "b"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["a", "b"]},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    for cam in cams:
        features[cam] = {
            "dtype": "video" if video else "image",
            "shape": [height, width, 3],
            "names": ["height", "width", "channels"],
        }
    hf_features = {
        "timestamp": Value("float32"),
        "frame_index": Value("int64"),
        "episode_index": Value("int64"),
        "index": Value("int64"),
        "task_index": Value("int64"),
        "observation.state": Sequence(Value("float32"), length=2),
        "action": Sequence(Value("float32"), length=2),
    }
    if not video:
        for cam in cams:
            cols[cam] = list(frames[cam])
            hf_features[cam] = Image()
    table = Dataset.from_dict(cols, features=Features(hf_features))
    # Episodes go to data/video files in groups given by ``files``: file k holds files[k] episodes.
    bounds = np.cumsum([0, *lengths])
    ep_groups = np.split(np.arange(len(lengths)), np.cumsum(files)[:-1])
    meta_rows = []
    for file_index, group in enumerate(ep_groups):
        rows = range(int(bounds[group[0]]), int(bounds[group[-1] + 1]))
        data = folder / "data" / "chunk-000" / f"file-{file_index:03d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        table.select(rows).to_parquet(str(data))
        offset = 0.0
        for e in group.tolist():
            row = {
                "episode_index": e,
                "tasks": ["pick"],
                "length": int(lengths[e]),
                "data/chunk_index": 0,
                "data/file_index": file_index,
                "dataset_from_index": int(bounds[e]),
                "dataset_to_index": int(bounds[e + 1]),
            }
            for cam in cams:
                row.update(
                    {
                        f"videos/{cam}/chunk_index": 0,
                        f"videos/{cam}/file_index": file_index,
                        f"videos/{cam}/from_timestamp": offset,
                        f"videos/{cam}/to_timestamp": offset + lengths[e] / FPS,
                    }
                )
            offset += lengths[e] / FPS
            meta_rows.append(row)
        if video:
            for cam in cams:
                encode_mp4(
                    folder / "videos" / cam / "chunk-000" / f"file-{file_index:03d}.mp4",
                    frames[cam][rows.start : rows.stop],
                )
    meta_dir = folder / "meta" / "episodes" / "chunk-000"
    meta_dir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(meta_rows), meta_dir / "file-000.parquet")
    pq.write_table(pa.table({"task_index": [0], "task": ["pick"]}), folder / "meta" / "tasks.parquet")
    info = {
        "codebase_version": "v3.0",
        "robot_type": "test",
        "total_episodes": len(lengths),
        "total_frames": total,
        "total_tasks": 1,
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 500,
        "fps": FPS,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if video else None,
        "features": features,
    }
    (folder / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    (folder / "meta" / "stats.json").write_text(json.dumps({"action": {"min": [1, 1], "max": [1, 1]}}))
    truth = frames[cams[0]]
    if video:  # score against what the videos decode to, not the originals
        truth = np.concatenate(
            [decode_mp4(folder / "videos" / cams[0] / "chunk-000" / f"file-{k:03d}.mp4") for k in range(len(ep_groups))]
        )
    return TableCase(folder, "lerobot", truth, episode, cams[0], not video, extra={"cameras": cams, "info": info})


def build_lerobot_v21(root: Path) -> TableCase:
    """A LeRobot v2.1 folder: one parquet file and one MP4 per episode, meta/episodes.jsonl."""
    folder = root / "lerobot_v21"
    cam = "observation.images.front"
    total = int(sum(LENGTHS))
    frames = make_frames(total, HEIGHT, WIDTH, seed=300)
    cols = _episode_columns()
    cols["timestamp"] = (np.asarray(cols["frame_index"]) / FPS).astype(np.float32).tolist()
    table = Dataset.from_dict(cols)
    bounds = np.cumsum([0, *LENGTHS])
    (folder / "meta").mkdir(parents=True)
    with open(folder / "meta" / "episodes.jsonl", "w") as handle:
        for e, length in enumerate(LENGTHS):
            rows = range(int(bounds[e]), int(bounds[e + 1]))
            data = folder / "data" / "chunk-000" / f"episode_{e:06d}.parquet"
            data.parent.mkdir(parents=True, exist_ok=True)
            table.select(rows).to_parquet(str(data))
            encode_mp4(folder / "videos" / "chunk-000" / cam / f"episode_{e:06d}.mp4", frames[rows.start : rows.stop])
            handle.write(json.dumps({"episode_index": e, "tasks": ["pick"], "length": length}) + "\n")
    features = {
        name: {"dtype": "int64" if name != "timestamp" else "float32", "shape": [1], "names": None} for name in cols
    }
    features[cam] = {"dtype": "video", "shape": [HEIGHT, WIDTH, 3], "names": ["height", "width", "channels"]}
    info = {
        "codebase_version": "v2.1",
        "fps": FPS,
        "chunks_size": 1000,
        "total_episodes": len(LENGTHS),
        "total_frames": total,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": features,
    }
    (folder / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return TableCase(
        folder, "lerobot", frames, np.repeat(np.arange(len(LENGTHS)), LENGTHS), cam, False, extra={"info": info}
    )
