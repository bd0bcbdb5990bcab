"""LeRobot v3.0 folders: cameras from image columns or videos, info.json/parquet agreement, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests import table_layouts
from tests.test_hf_sources import hdf5_rewards, tree_digest
from vlmlabel.cli import app
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest
from vlmlabel.sources import Align

datasets.disable_progress_bars()


def lerobot_hf_features(info: dict) -> datasets.Features:
    """The features LeRobot's loader builds from meta/info.json to read data/*.parquet (videos skipped)."""
    features = {}
    for key, ft in info["features"].items():
        shape = tuple(ft["shape"])
        if ft["dtype"] == "video":
            continue
        if ft["dtype"] == "image":
            features[key] = datasets.Image()
        elif shape == (1,):
            features[key] = datasets.Value(ft["dtype"])
        else:
            features[key] = datasets.Sequence(length=shape[0], feature=datasets.Value(ft["dtype"]))
    return datasets.Features(features)


def run(args: list[str]):
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("video", [True, False], ids=["video", "image"])
def test_info_json_and_parquet_agree(video, tmp_path, tiny_model_dir):
    case = table_layouts.build_lerobot(tmp_path, video=video)
    before = tree_digest(case.path)
    summary = relabel_file(
        RelabelRequest(
            source=case.path,
            goals=["grasp the cube"],
            model=str(tiny_model_dir),
            device="cpu",
            image_key="top",
            reward_key="vlm.progress",
            align=Align.frame,
        )
    )
    dest = summary.written_to
    assert dest == tmp_path / f"{case.path.name}-vlmlabel"
    assert tree_digest(case.path) == before
    info = json.loads((dest / "meta" / "info.json").read_text())
    declared = info["features"]["vlm.progress"]
    assert {k: v for k, v in declared.items() if k != "info"} == {"dtype": "float32", "shape": [1], "names": None}
    assert declared["info"]["goal"]  # provenance travels with the feature (tests/test_lerobot_meta.py)
    assert {k: v for k, v in info.items() if k != "features"} == {
        k: v for k, v in case.extra["info"].items() if k != "features"
    }
    non_video = {k for k, f in info["features"].items() if f["dtype"] != "video"}
    data_files = sorted((dest / "data").rglob("*.parquet"))
    assert [p.relative_to(dest) for p in data_files] == [
        p.relative_to(case.path) for p in sorted((case.path / "data").rglob("*.parquet"))
    ]
    rows = 0
    for path in data_files:
        table = pq.read_table(path)
        assert set(table.column_names) == non_video
        assert table.schema.field("vlm.progress").type == pa.float32()
        rows += table.num_rows
    assert rows == info["total_frames"]
    # LeRobot's loader path: the data files cast to the features info.json declares.
    loaded = datasets.load_dataset(
        "parquet", data_files=[str(p) for p in data_files], split="train", features=lerobot_hf_features(info)
    )
    expected = hdf5_rewards(tmp_path, case.frames, case.episode_index, tiny_model_dir, Align.frame, ["grasp the cube"])[
        :, 0
    ]
    np.testing.assert_allclose(np.asarray(loaded["vlm.progress"], dtype=np.float32), expected, atol=2e-6)
    stats = json.loads((dest / "meta" / "stats.json").read_text())
    assert stats["vlm.progress"]["count"] == [rows]
    np.testing.assert_allclose(stats["vlm.progress"]["mean"], [expected.mean()], rtol=1e-5)
    assert stats["action"] == {"min": [1, 1], "max": [1, 1]}
    # Untouched files are carried over unchanged (meta/episodes gains the reward's per-episode stats).
    for rel in ["meta/tasks.parquet"] + (["videos/observation.images.top/chunk-000/file-000.mp4"] if video else []):
        assert (dest / rel).read_bytes() == (case.path / rel).read_bytes()


def test_second_camera_from_video_by_short_name(tmp_path, tiny_model_dir):
    case = table_layouts.build_lerobot(tmp_path, video=True)
    wrist = case.extra["cameras"][1]
    truth = np.concatenate(
        [table_layouts.decode_mp4(case.path / "videos" / wrist / "chunk-000" / f"file-{k:03d}.mp4") for k in range(2)]
    )
    summary = relabel_file(
        RelabelRequest(
            source=case.path,
            goals=["a gripper"],
            model=str(tiny_model_dir),
            device="cpu",
            image_key="wrist",
            batch_size=3,
            align=Align.frame,
        )
    )
    assert summary.image_key == wrist
    got = pq.read_table(summary.written_to / "data").column("vlm_reward").to_numpy()
    expected = hdf5_rewards(tmp_path, truth, case.episode_index, tiny_model_dir, Align.frame, ["a gripper"])
    np.testing.assert_allclose(got, expected[:, 0], atol=2e-6)


def test_one_line_errors(tmp_path, tiny_model_dir):
    case = table_layouts.build_lerobot(tmp_path, video=True)
    base = ["relabel", str(case.path), "--goal", "x", "--model", str(tiny_model_dir), "--device", "cpu"]

    def error(args: list[str]) -> str:
        result = run(args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        return lines[0]

    assert "several cameras" in error(base)
    assert "reserves observation." in error(base + ["--image-key", "top", "--reward-key", "observation.reward"])
    assert "cameras there" in error(base + ["--image-key", "side"])
    assert not (tmp_path / "lerobot_video-vlmlabel").exists()


def _break(case_path: Path, how: str) -> None:
    video = case_path / "videos" / "observation.images.top" / "chunk-000" / "file-001.mp4"
    if how == "unreadable_video":
        video.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 4)
    elif how == "missing_video":
        video.unlink()
    elif how == "short_video":
        frames = table_layouts.make_frames(2, table_layouts.HEIGHT, table_layouts.WIDTH, seed=5)
        table_layouts.encode_mp4(video, frames)  # episode 2 needs 3 frames
    elif how == "mismatched_lengths":
        meta = case_path / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
        table = pq.read_table(meta)
        lengths = table.column("length").to_pylist()
        lengths[1] += 1
        pq.write_table(
            table.set_column(table.schema.get_field_index("length"), "length", pa.array(lengths, pa.int64())), meta
        )


@pytest.mark.parametrize(
    "how, expect",
    [
        ("unreadable_video", "cannot be read"),
        ("missing_video", "is missing"),
        ("short_video", "no frame at"),
        ("mismatched_lengths", "mismatched lengths"),
    ],
)
def test_broken_dataset_exit_2_source_untouched(how, expect, tmp_path, tiny_model_dir):
    case = table_layouts.build_lerobot(tmp_path, video=True)
    _break(case.path, how)
    before = tree_digest(case.path)
    result = run(
        [
            "relabel",
            str(case.path),
            "--goal",
            "x",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--image-key",
            "top",
        ]
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and expect in lines[0], result.output
    assert tree_digest(case.path) == before
    assert sorted(os.listdir(tmp_path)) == ["lerobot_video"], "no output or staging folder may remain"


def test_inspect_lerobot(tmp_path):
    case = table_layouts.build_lerobot(tmp_path, video=True)
    result = run(["inspect", str(case.path), "--image-key", "observation.images.wrist"])
    assert result.exit_code == 0, result.output
    for text in ("lerobot v3.0", "observation.images.wrist", "video", "new float32 column"):
        assert text in result.output.replace("\n", "")


def test_lerobot_v21_one_video_per_episode(tmp_path, tiny_model_dir):
    case = table_layouts.build_lerobot_v21(tmp_path)
    summary = relabel_file(
        RelabelRequest(source=case.path, goals=["a cube"], model=str(tiny_model_dir), device="cpu", align=Align.next)
    )
    assert summary.layout == "lerobot v2.1"
    files = sorted((summary.written_to / "data").rglob("*.parquet"))
    assert [f.name for f in files] == [f"episode_{e:06d}.parquet" for e in range(3)]
    got = np.concatenate([pq.read_table(f).column("vlm_reward").to_numpy() for f in files])
    expected = hdf5_rewards(tmp_path, case.frames, case.episode_index, tiny_model_dir, Align.next, ["a cube"])
    np.testing.assert_allclose(got, expected[:, 0], atol=2e-6)
    info = json.loads((summary.written_to / "meta" / "info.json").read_text())
    assert info["features"]["vlm_reward"]["dtype"] == "float32"


def test_hub_cache_symlinks_are_followed(tmp_path, tiny_model_dir):
    """Hub snapshots hold relative symlinks into a blob store: the output must hold the real files."""
    case = table_layouts.build_lerobot(tmp_path, video=True)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for rel in ("meta/tasks.parquet", "videos/observation.images.top/chunk-000/file-000.mp4"):
        path = case.path / rel
        blob = blobs / path.name
        path.rename(blob)
        path.symlink_to(os.path.relpath(blob, path.parent))
    summary = relabel_file(
        RelabelRequest(
            source=case.path,
            goals=["x"],
            model=str(tiny_model_dir),
            device="cpu",
            image_key="top",
            output=tmp_path / "out",
        )
    )
    for rel in ("meta/tasks.parquet", "videos/observation.images.top/chunk-000/file-000.mp4"):
        written = summary.written_to / rel
        assert not written.is_symlink() and written.read_bytes() == (case.path / rel).read_bytes()
