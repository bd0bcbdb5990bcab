"""Goal images (--goal-image FILE, --goal-frame EPISODE:STEP): the reward is cos(frame embedding, goal embedding).

The oracle is open_clip's own computation, one image at a time: its PIL transform of the goal image as PIL opens
the file (or of the goal frame) and of each frame, ``encode_image`` on both, the cosine
(``tests/goal_image_files.py``). vlmlabel scores in batches through the relabel path. Every format, and the
embedding cache, are covered by the storage suite (tests/test_storage_suite.py); refusals by the hostile-input
table (tests/test_hostile_inputs.py, "issue 22: goal images").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests import layouts
from tests.cluster_files import make_dataset, read_attrs, read_rewards
from tests.goal_image_files import open_clip_image_cosines, opened, write_goal_image
from vlmlabel import goal_images
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import GoalImageRef, GoalSource, RewardConfig, build_score_fn
from vlmlabel.rewards import RewardMode

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
TEXT = "a red block on a plate"
ATOL = {"robomimic": 5e-4, "episodes_jpeg": 2e-3}  # tests/test_relabel_hdf5.py, tests/test_frames_exact.py


def _relabel(source: Path, model_dir: Path, *extra: str):
    return runner.invoke(app, ["relabel", str(source), "--model", str(model_dir), *extra], terminal_width=300)


def _at(lf: layouts.LayoutFile, name: str, path: str) -> np.ndarray:
    with h5py.File(lf.path, "r") as f:
        return f[path.replace("vlm_reward", name)][()]


@pytest.mark.parametrize("layout", sorted(ATOL))
def test_goal_images_equal_open_clips_own_cosines(tmp_path, tiny_model_dir, reference, layout):
    """A text goal, a PNG and a JPEG goal image and a goal frame (by its episode's name) in one run (--align next:
    STEP -1 is the episode's last scored frame, its final observation)."""
    lf = layouts.BUILDERS[layout](tmp_path / "data.h5")
    png = write_goal_image(tmp_path / "goal.png")
    jpeg = write_goal_image(tmp_path / "goal.jpg", "JPEG", seed=12, size=(33, 41))
    episode = lf.reward_paths[1].rsplit("/", 2)[-2]  # demo_1, episode_1: the group's own name
    result = _relabel(
        lf.path,
        tiny_model_dir,
        *("--goal", TEXT, "--goal-image", str(png), "--goal-image", str(jpeg), "--goal-frame", f"{episode}:-1"),
        *("--batch-size", "5", "-q"),
    )
    assert result.exit_code == 0, result.output
    goal_frame = lf.next_steps[1][-1]
    for path, frames in zip(lf.reward_paths, lf.next_steps, strict=True):
        want = open_clip_image_cosines(tiny_model_dir, frames, [opened(png), opened(jpeg), goal_frame])
        got = np.stack([_at(lf, f"vlm_reward_{i}", path) for i in (1, 2, 3)], axis=1)
        np.testing.assert_allclose(got, want, atol=ATOL[layout])
        np.testing.assert_allclose(_at(lf, "vlm_reward_0", path), reference(frames, [TEXT])[:, 0], atol=ATOL[layout])
    assert _at(lf, "vlm_reward_3", lf.reward_paths[1])[-1] == pytest.approx(1.0, abs=1e-5)  # the goal frame itself


def test_provenance_and_result_id_name_the_goal_image(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    goal = write_goal_image(tmp_path / "goal.png")
    args = ("--goal-image", str(goal), "--goal-frame", "0:2", "-q")
    assert _relabel(lf.path, tiny_model_dir, *args).exit_code == 0
    with h5py.File(lf.path, "r") as f:
        image = dict(f[lf.reward_paths[0].replace("vlm_reward", "vlm_reward_0")].attrs)
        frame = dict(f[lf.reward_paths[0].replace("vlm_reward", "vlm_reward_1")].attrs)
        # --align next: step 2 of episode 0 scores o_3, read from obs (next_obs only at the episode's last step)
        stored = f["data/demo_0/obs/agentview_image"][3].tobytes()
    assert (
        image["goal_image"] == str(goal) and image["goal_image_sha256"] == hashlib.sha256(goal.read_bytes()).hexdigest()
    )
    assert image["goal"] == f"image:{goal} sha256:{image['goal_image_sha256']}"
    assert frame["goal_frame"] == "0:2" and frame["goal_image_sha256"] == hashlib.sha256(stored).hexdigest()
    assert json.loads(frame["reward_spec"])["goal_image_sha256"] == frame["goal_image_sha256"]
    assert image["formula"].startswith("cos(")
    rebuilt = RewardConfig.from_attrs(image)
    assert rebuilt.goal_images == rebuilt.goals == [image["goal"]]
    # The same file name with other content is another result: it is scored again, not taken as done.
    write_goal_image(goal, seed=13)
    again = _relabel(lf.path, tiny_model_dir, *args, "--overwrite")
    assert again.exit_code == 0 and "already written" not in again.output
    with h5py.File(lf.path, "r") as f:
        changed = dict(f[lf.reward_paths[0].replace("vlm_reward", "vlm_reward_0")].attrs)
    assert changed["result_id"] != image["result_id"]
    assert changed["goal_image_sha256"] == hashlib.sha256(goal.read_bytes()).hexdigest()
    same = _relabel(lf.path, tiny_model_dir, *args)
    assert same.exit_code == 0 and "already written" in same.output
    judged = runner.invoke(app, ["evaluate", str(lf.path), "--reward-key", "vlm_reward_1", "--against", "rewards"])
    assert judged.exit_code == 0, judged.output  # no blank-frame scores for a goal image: nothing to refuse


def test_goal_frame_through_shards_and_merge_equals_a_single_run(tmp_path, tiny_model_dir):
    single = make_dataset(tmp_path / "single.h5", lengths=(5, 7, 4, 6))
    args = ("--goal-frame", "demo_2:-1", "--goal", TEXT, "-q")
    assert _relabel(single, tiny_model_dir, *args).exit_code == 0
    sharded = make_dataset(tmp_path / "sharded.h5", lengths=(5, 7, 4, 6))
    for index in (1, 0):
        assert _relabel(sharded, tiny_model_dir, *args, "--num-shards", "2", "--shard-index", str(index)).exit_code == 0
    assert runner.invoke(app, ["merge", str(sharded)]).exit_code == 0
    for key in ("vlm_reward_0", "vlm_reward_1"):
        expected, got = read_rewards(single, key), read_rewards(sharded, key)
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
    assert read_attrs(sharded, "vlm_reward_1")["goal"] == read_attrs(single, "vlm_reward_1")["goal"]
    # goals: the --goal texts first, then goal images: vlm_reward_1 is the goal frame
    assert read_rewards(single, "vlm_reward_1")["demo_2"][-1] == pytest.approx(1.0, abs=1e-5)


def test_goal_texts_and_the_configuration():
    ref = GoalImageRef(GoalSource.file, "my goals/a:b.png", "ab" * 32)
    assert GoalImageRef.parse(ref.text) == ref and ref.text == f"image:my goals/a:b.png sha256:{'ab' * 32}"
    assert GoalImageRef.parse("frame:demo_0:-1") == GoalImageRef(GoalSource.frame, "demo_0:-1")
    assert goal_images.frame_goal(" demo_0:-1 ") == "frame:demo_0:-1"
    with pytest.raises(VlmlabelError, match="names no frame"):
        goal_images.frame_goal("demo_0:last")
    # Runs without goal images keep their serialisation (and so their result ids).
    assert "goal_images" not in RewardConfig(goals=["a"]).to_json()
    config = RewardConfig(goals=["a", ref.text], goal_images=[ref.text]).validate()
    assert RewardConfig.from_json(config.to_json()) == config
    assert config.attrs(0, 1.0)["prompts"] == '["a"]' and config.attrs(1, 1.0)["prompts"] == "[]"
    with pytest.raises(VlmlabelError, match="--reward contrastive does not apply to goal images"):
        RewardConfig(goals=[ref.text], goal_images=[ref.text], mode=RewardMode.contrastive, negatives=["n"]).validate()
    # Text goals and goal images keep the order of ``goals``.
    texts = {"a": torch.tensor([[1.0, 0.0]])}
    encode = lambda goals: torch.cat([texts[g] for g in goals])  # noqa: E731
    mixed = RewardConfig(goals=[ref.text, "a"], goal_images=[ref.text])
    score = build_score_fn(mixed, encode, 1.0, None, lambda goals: torch.tensor([[0.0, 1.0]] * len(goals)))
    np.testing.assert_allclose(score(torch.tensor([[0.6, 0.8]])).numpy(), [[0.8, 0.6]], rtol=1e-6)
    with pytest.raises(VlmlabelError, match="is an image, which only relabel reads.*--no-blank"):
        build_score_fn(mixed, encode, 1.0)  # evaluate's blank scores: no image to embed
