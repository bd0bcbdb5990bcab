"""Several cameras, one reward: each camera scored on its own, combined by --camera-reduce, each camera's
scores kept; on HDF5 (robomimic with two cameras), a table dataset and LeRobot with two video cameras."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, Value
from typer.testing import CliRunner

from tests import table_layouts
from tests.layouts import make_frames
from vlmlabel.cli import app
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.merge import merge_shards
from vlmlabel.run.request import RelabelRequest
from vlmlabel.run.shards import ShardSpec

GOALS = ["a red cube on the table", "an empty table"]
LENGTHS = (4, 6, 3)
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class TwoCameras:
    source: Path
    keys: tuple[str, str]
    frames: tuple[np.ndarray, np.ndarray]  # each camera's frames scoring each step, episode order
    read: Callable[[Path, str], np.ndarray]
    output: Path


def robomimic(root: Path) -> TwoCameras:
    path = root / "robo.h5"
    frames: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    with h5py.File(path, "w") as f:
        for k, length in enumerate(LENGTHS):
            for cam, name in enumerate(("agentview_image", "robot0_eye_in_hand_image")):
                shot = make_frames(length, 30, 34, seed=300 + 10 * cam + k)
                f.create_dataset(f"data/demo_{k}/obs/{name}", data=shot)
                frames[cam].append(shot)
            f.create_dataset(f"data/demo_{k}/actions", data=np.zeros((length, 2), np.float32))

    def read(dest: Path, name: str) -> np.ndarray:
        with h5py.File(dest, "r") as handle:
            return np.concatenate([handle[f"data/demo_{k}/{name}"][()] for k in range(len(LENGTHS))])

    return TwoCameras(
        path,
        ("obs/agentview_image", "obs/robot0_eye_in_hand_image"),
        (np.concatenate(frames[0]), np.concatenate(frames[1])),
        read,
        root / "out.h5",
    )


def save_to_disk(root: Path) -> TwoCameras:
    total = sum(LENGTHS)
    front, wrist = make_frames(total, 24, 32, seed=401), make_frames(total, 24, 32, seed=402)
    episode = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
    features = Features({"front": Image(), "wrist": Image(), "episode_index": Value("int64")})
    Dataset.from_dict(
        {"front": list(front), "wrist": list(wrist), "episode_index": episode.tolist()}, features=features
    ).save_to_disk(str(root / "ds"))

    def read(dest: Path, name: str) -> np.ndarray:
        return np.asarray(datasets.load_from_disk(str(dest))[name], dtype=np.float32)

    return TwoCameras(root / "ds", ("front", "wrist"), (front, wrist), read, root / "out")


def lerobot_video(root: Path) -> TwoCameras:
    case = table_layouts.build_lerobot(root, video=True)
    cams = case.extra["cameras"]
    decoded = [
        np.concatenate(
            [table_layouts.decode_mp4(case.path / "videos" / cam / "chunk-000" / f"file-{k:03d}.mp4") for k in range(2)]
        )
        for cam in cams
    ]

    def read(dest: Path, name: str) -> np.ndarray:
        files = sorted((dest / "data").rglob("*.parquet"))
        return np.concatenate([pq.read_table(f, columns=[name]).column(name).to_numpy() for f in files])

    return TwoCameras(case.path, tuple(cams), (decoded[0], decoded[1]), read, root / "out")


BACKENDS = {"robomimic": robomimic, "save_to_disk": save_to_disk, "lerobot_video": lerobot_video}


@pytest.fixture(params=sorted(BACKENDS))
def two(request, tmp_path) -> TwoCameras:
    return BACKENDS[request.param](tmp_path)


def _short(key: str) -> str:
    return key.rsplit("/", 1)[-1].removeprefix("observation.images.")


def test_mean_of_two_cameras_equals_the_mean_of_their_references(two, tiny_model_dir, reference):
    args = [
        "relabel",
        str(two.source),
        "--image-key",
        two.keys[0],
        "--image-key",
        two.keys[1],
        "--camera-reduce",
        "mean",
        "--goal",
        GOALS[0],
        "--goal",
        GOALS[1],
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--output",
        str(two.output),
        "--align",
        "frame",
        "--quiet",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    per_camera = [reference(frames, GOALS) for frames in two.frames]
    for goal in range(2):
        written = two.read(two.output, f"vlm_reward_{goal}")
        np.testing.assert_allclose(written, (per_camera[0][:, goal] + per_camera[1][:, goal]) / 2, atol=2e-3)
        for key, expected in zip(two.keys, per_camera, strict=True):
            kept = two.read(two.output, f"vlm_reward_{goal}_cam_{_short(key)}")
            np.testing.assert_allclose(kept, expected[:, goal], atol=2e-3)


def test_max_reduce_and_shards_of_two_cameras_equal_a_single_run(tmp_path, tiny_model_dir):
    two = save_to_disk(tmp_path)

    def request(output: Path, **extra) -> RelabelRequest:
        return RelabelRequest(
            source=two.source,
            goals=GOALS[:1],
            model=str(tiny_model_dir),
            device="cpu",
            image_key=list(two.keys),
            camera_reduce="max",
            output=output,
            batch_size=4,
            **extra,
        )

    single = relabel_file(request(tmp_path / "single"))
    assert single.camera_names == ["vlm_reward_cam_front", "vlm_reward_cam_wrist"]
    cams = [two.read(single.written_to, name) for name in single.camera_names]
    np.testing.assert_array_equal(two.read(single.written_to, "vlm_reward"), np.maximum(*cams))
    for index in range(3):
        relabel_file(request(tmp_path / "sharded", shard=ShardSpec(index, 3)))
    merged = merge_shards(two.source, "vlm_reward", tmp_path / "sharded", image_key="front")
    for name in ["vlm_reward", *single.camera_names]:
        np.testing.assert_array_equal(two.read(merged.written_to, name), two.read(single.written_to, name))


def test_inspect_lists_every_camera_and_the_refusal_names_the_multi_camera_option(tmp_path):
    two = save_to_disk(tmp_path)
    shown = runner.invoke(app, ["inspect", str(two.source)], terminal_width=300)
    assert shown.exit_code == 0, shown.output
    assert "front, wrist" in shown.output
    refused = runner.invoke(app, ["relabel", str(two.source), "--goal", "x", "--model", "nowhere"], terminal_width=300)
    assert refused.exit_code == 2 and "--image-key A --image-key B" in refused.output
