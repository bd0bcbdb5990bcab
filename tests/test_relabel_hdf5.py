"""relabel on every HDF5 layout: right datasets, right place, right values (against open_clip's own pipeline)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests import layouts
from vlmlabel import __version__
from vlmlabel.cli import app
from vlmlabel.sources.base import Align
from vlmlabel.sources.hdf5 import HDF5Source

runner = CliRunner()
GOALS = ["a red block on a plate", "the drawer is open"]


def run_cli(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


def read_rewards(lf: layouts.LayoutFile, name: str) -> list[np.ndarray]:
    with h5py.File(lf.path, "r") as f:
        values = [f[p.replace("vlm_reward", name)][()] for p in lf.reward_paths]
    if lf.flat:
        return np.split(values[0], np.cumsum(lf.steps)[:-1])
    return values


@pytest.mark.parametrize("align", ["frame", "next", None])  # None: no --align, the default is next
def test_rewards_match_open_clip_reference(layout_file, tiny_model_dir, reference, align):
    option = [] if align is None else ["--align", align]
    result = run_cli(
        "relabel",
        str(layout_file.path),
        "--model",
        str(tiny_model_dir),
        *option,
        "--goal",
        GOALS[0],
        "--goal",
        GOALS[1],
        "--batch-size",
        "5",
    )
    assert result.exit_code == 0, result.output
    expected_frames = layout_file.frame_steps if align == "frame" else layout_file.next_steps
    for goal_index in range(2):
        got = read_rewards(layout_file, f"vlm_reward_{goal_index}")
        assert [len(g) for g in got] == layout_file.steps
        for episode_rewards, frames in zip(got, expected_frames):
            assert episode_rewards.dtype == np.float32
            want = reference(frames, GOALS)[:, goal_index]
            np.testing.assert_allclose(episode_rewards, want, atol=5e-4)


def test_attributes_record_how_each_reward_was_made(layout_file, tiny_model_dir):
    result = run_cli(
        "relabel",
        str(layout_file.path),
        "--model",
        str(tiny_model_dir),
        "-q",
        "--goal",
        GOALS[0],
        "--goal",
        GOALS[1],
        "--align",
        "next",
        "--reward-key",
        "clip_r",
    )
    assert result.exit_code == 0, result.output
    with h5py.File(layout_file.path, "r") as f:
        for goal_index, goal in enumerate(GOALS):
            attrs = f[layout_file.reward_paths[0].replace("vlm_reward", f"clip_r_{goal_index}")].attrs
            assert attrs["goal"] == goal
            assert attrs["model"] == str(tiny_model_dir)
            assert attrs["pretrained"] == "bundled"
            assert attrs["precision"] == "fp32"
            assert attrs["align"] == "next"
            assert attrs["formula"] == "cos(CLIP_image(o), CLIP_text(goal))"
            assert attrs["vlmlabel_version"] == __version__
            assert attrs["image_key"] == layout_file.image_key


def test_single_goal_uses_plain_name_and_minari_root_untouched(tmp_path, tiny_model_dir):
    lf = layouts.build_minari(tmp_path / "m.h5")
    with h5py.File(lf.path, "r") as f:
        root_before = sorted(f.keys())
    result = run_cli("relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "x", "-q")
    assert result.exit_code == 0, result.output
    with h5py.File(lf.path, "r") as f:
        assert sorted(f.keys()) == root_before
        for path, steps in zip(lf.reward_paths, lf.steps):
            assert f[path].shape == (steps,)


@pytest.mark.parametrize("align", ["next", "frame"])
def test_minari_infos_hold_one_score_per_observation_and_evaluate_reads_steps(
    tmp_path, tiny_model_dir, reference, align
):
    """Minari's infos have T+1 rows (the reset's, then one per step): the reward lines up with them, and
    evaluate gives step t the row its alignment names (t+1 next, t frame) against T per-step rewards."""
    lf = layouts.build_minari(tmp_path / "m.h5")
    with h5py.File(lf.path, "r+") as f:
        for k, transitions in enumerate(lf.transitions):
            obs_scores = reference(lf.frame_steps[k], ["x"])[:, 0]
            env = obs_scores[1:] if align == "next" else obs_scores[:-1]
            f[f"episode_{k}/rewards"][...] = env  # the env's reward is exactly the score: r = 1
            f[f"episode_{k}/infos/success"] = np.r_[0, (np.arange(transitions) % 2)].astype(bool)
    result = run_cli("relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "x", "--align", align, "-q")
    assert result.exit_code == 0, result.output
    with h5py.File(lf.path, "r") as f:
        for k, path in enumerate(lf.reward_paths):
            assert f[path].shape == f[f"episode_{k}/observations"].shape[:1] == (lf.transitions[k] + 1,)
            assert f[path].shape == f[f"episode_{k}/infos/success"].shape
            np.testing.assert_allclose(f[path][()], reference(lf.frame_steps[k], ["x"])[:, 0], atol=2e-3)
            assert f[path].attrs["rows"] == "observations" and f[path].attrs["align"] == align
    report = run_cli("evaluate", str(lf.path), "--against", "rewards", "--no-blank", "--json")
    assert report.exit_code == 0, report.output
    parsed = json.loads(report.stdout)
    assert parsed["steps"] == sum(lf.transitions) and parsed["pearson"] > 0.999
    against_infos = run_cli("evaluate", str(lf.path), "--against", "success", "--no-blank", "--json")
    assert against_infos.exit_code == 0, against_infos.output
    assert json.loads(against_infos.stdout)["steps"] == sum(lf.transitions)


def test_each_frame_encoded_once_whatever_the_number_of_goals(tmp_path, tiny_model_dir, monkeypatch):
    from vlmlabel.model import ClipModel

    lf = layouts.build_robomimic(tmp_path / "r.h5")
    seen = []
    original = ClipModel.encode_images
    monkeypatch.setattr(ClipModel, "encode_images", lambda self, px: seen.append(len(px)) or original(self, px))
    goals = [f"goal {i}" for i in range(5)]
    args = ["relabel", str(lf.path), "--model", str(tiny_model_dir), "-q"] + [a for g in goals for a in ("--goal", g)]
    assert run_cli(*args).exit_code == 0
    assert sum(seen) == sum(lf.steps)


def test_output_copy_leaves_source_byte_identical(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "r.h5")
    before = lf.path.read_bytes()
    out = tmp_path / "labelled.h5"
    result = run_cli("relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "x", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert lf.path.read_bytes() == before
    with h5py.File(out, "r") as f:
        assert all(f[p].shape == (n,) for p, n in zip(lf.reward_paths, lf.steps))
        np.testing.assert_array_equal(f["data/demo_0/obs/agentview_image"][()], lf.frame_steps[0])
    assert not list(tmp_path.glob(".*.tmp"))


def test_overwrite_replaces_existing_reward(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "r.h5")
    args = ["relabel", str(lf.path), "--model", str(tiny_model_dir), "-q"]
    assert run_cli(*args, "--goal", "first").exit_code == 0
    assert run_cli(*args, "--goal", "second").exit_code == 2
    assert run_cli(*args, "--goal", "second", "--overwrite").exit_code == 0
    with h5py.File(lf.path, "r") as f:
        assert f["data/demo_0/vlm_reward"].attrs["goal"] == "second"


def test_summary_reports_episodes_frames_and_reward_range(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "r.h5")
    result = run_cli("relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "a cup")
    assert result.exit_code == 0, result.output
    assert "3 episodes, 16 frames" in result.output
    assert "frames/s" in result.output
    with h5py.File(lf.path, "r") as f:
        values = np.concatenate([f[p][()] for p in lf.reward_paths])
    assert f"{values.min():.4f}" in result.output and f"{values.max():.4f}" in result.output


def test_quiet_prints_nothing(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "r.h5")
    result = run_cli("relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "a cup", "--quiet")
    assert result.exit_code == 0
    assert result.output.strip() == ""


def test_inspect_reports_layout(layout_file):
    result = run_cli("inspect", str(layout_file.path))
    assert result.exit_code == 0, result.output
    assert layout_file.layout in result.output
    assert layout_file.image_key in result.output
    assert f"{sum(layout_file.steps)}" in result.output


def test_models_lists_architectures_and_tags():
    result = run_cli("models", "ViT-B-32")
    assert result.exit_code == 0
    assert "laion2b_s34b_b79k" in result.output and "ViT-B-32" in result.output


def test_write_opens_each_group_once_and_still_finds_every_name_taken(tmp_path):
    """The fast path (each reward's group opened once, missing groups created) writes what h5py's own path did,
    and a name already there, in any episode, is still refused with the file unchanged."""
    from vlmlabel.destinations.hdf5 import H5Dataset, write_file
    from vlmlabel.errors import OutputError

    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as handle:
        handle.create_group("e0")  # no infos/ yet
        handle.create_group("e1/infos").create_dataset("other", data=[1])  # infos/ with data of its own
        handle.create_group("deep")  # two levels missing below it
    attrs = {"goal": "a cup", "vlmlabel_version": "test"}
    paths = ["e0/infos/r", "e1/infos/r", "deep/a/b/r", "r", "/e0/r"]
    rewards = [H5Dataset(p, np.full(3, i, np.float32), attrs) for i, p in enumerate(paths)]
    write_file(path, path, rewards, overwrite=False)
    with h5py.File(path, "r") as handle:
        for i, p in enumerate(paths):
            assert handle[p][:].tolist() == [i] * 3 and dict(handle[p].attrs) == attrs, p
        assert handle["e1/infos/other"][:].tolist() == [1]
    before = path.read_bytes()
    taken = [H5Dataset(p, np.zeros(3, np.float32), attrs) for p in ("e0/infos/s", "e1/infos/other")]
    with pytest.raises(OutputError, match="e1/infos/other already exists"):
        write_file(path, path, taken, overwrite=False)
    assert path.read_bytes() == before


def test_an_image_key_naming_the_only_frames_at_the_root_reads_them_as_flat(tmp_path):
    """Frames never listed as a camera (next_obs), the file's only ones, named with --image-key: read as flat
    rows, as when other flat frames are present (the source was once left without a layout)."""
    path = tmp_path / "d.h5"
    frames = layouts.make_frames(6, 8, 8, seed=1)
    with h5py.File(path, "w") as f:
        f["next_obs"] = frames
        f["terminals"] = np.array([0, 0, 1, 0, 0, 1], bool)
    with HDF5Source(path, "next_obs") as source:
        assert (source.layout, source.image_key, source.cameras) == ("flat", "next_obs", [])
        episodes = source.episodes(Align.frame)
        assert [e.steps for e in episodes] == [3, 3]
        assert np.array_equal(next(source.read_blocks(episodes[1].frames[0], 10)), frames[3:])
