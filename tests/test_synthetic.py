"""The synthetic domain, the sample-model training loop, and the semantic end-to-end test on sample_data."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tools.synthetic import reach, scenes
from tools.synthetic.train import TrainConfig, contrastive_loss, sample_batch, train
from vlmlabel.cli import app
from vlmlabel.model import load_model

pytestmark = pytest.mark.slow

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
SAMPLE_MODEL = SAMPLE_DATA / "reach-clip"
SAMPLE_REACH = SAMPLE_DATA / "reach.h5"
WRONG_GOALS = ("the blue ball is on the green square", "the red ball is on the yellow square")

TRAIN_TEST_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1, "mlp_ratio": 2.0},
}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation with average ranks for ties (scipy is not a dependency)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def test_spearman_matches_known_values():
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # Ties get average ranks: [1, 2.5, 2.5, 4] against [1, 2, 3, 4].
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(0.9486833, abs=1e-6)


def test_render_is_deterministic_and_draws_the_objects():
    ball = scenes.SceneObject("red", "ball", 20.0, 30.0, 6.0)
    square = scenes.SceneObject("green", "square", 60.0, 30.0, 8.0)
    scene = scenes.Scene(objects=(square, ball), background=(120, 120, 120), texture="noise", texture_seed=3)
    frame = scenes.render(scene)
    assert frame.shape == (84, 84, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame, scenes.render(scene))
    assert tuple(frame[30, 20]) == scenes.COLOURS["red"]
    assert tuple(frame[30, 60]) == scenes.COLOURS["green"]
    on_top = scenes.scene_with(scene, 1, x=60.0, y=30.0)
    assert tuple(scenes.render(on_top)[30, 60]) == scenes.COLOURS["red"]  # the later object is drawn on top


def test_relations_follow_the_geometry():
    square = scenes.SceneObject("green", "square", 40.0, 40.0, 8.0)
    at = lambda x, y: scenes.SceneObject("red", "ball", x, y, 6.0)  # noqa: E731
    assert scenes.relations(at(42, 41), square) == ["on"]
    assert scenes.relations(at(20, 40), square) == ["near", "left of"]
    assert scenes.relations(at(40, 80), square) == ["far from", "below"]
    assert "above" in scenes.relations(at(40, 10), square)


def test_training_batches_hold_true_captions():
    rng = np.random.default_rng(0)
    frames, captions = sample_batch(rng, 16, 4)
    assert frames.shape == (16, 84, 84, 3)
    assert all(c.startswith(("the ", "a ")) for c in captions)
    frames_again, captions_again = sample_batch(np.random.default_rng(0), 16, 4)
    assert captions == captions_again and np.array_equal(frames, frames_again)


def test_contrastive_loss_rewards_matching_pairs():
    import torch

    features = torch.eye(4)
    same = torch.eye(4)
    matched = contrastive_loss(features, features, torch.tensor(2.0), same)
    shuffled = contrastive_loss(features, features.roll(1, dims=0), torch.tensor(2.0), same)
    assert matched < shuffled


def test_training_loss_falls_in_a_few_steps():
    config = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup=5, seed=1, model_cfg=TRAIN_TEST_CFG)
    result = train(config)
    assert len(result.losses) == 40
    assert np.mean(result.losses[-8:]) < np.mean(result.losses[:8]) - 0.1


def test_reach_dataset_is_robomimic_with_ground_truth(tmp_path):
    path = reach.write_dataset(tmp_path / "reach.h5", episodes=4, seed=3)
    with h5py.File(path) as f:
        demo = f["data/demo_0"]
        steps = demo.attrs["num_samples"]
        assert demo["obs/agentview_image"].shape == (steps, 84, 84, 3)
        assert np.array_equal(demo["obs/agentview_image"][1:], demo["next_obs/agentview_image"][:-1])
        distance = np.hypot(*(demo["next_obs/agent_pos"][:] - demo["next_obs/target_pos"][:]).T)
        np.testing.assert_allclose(demo["rewards"][:], -distance / scenes.CANVAS, rtol=1e-5)
        assert np.array_equal(demo["success"][:], distance < reach.SUCCESS_RADIUS)
        assert demo["dones"][-1] and not demo["dones"][:-1].any()


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory) -> dict[str, np.ndarray]:
    """The shipped reach file, relabelled through the CLI (on a copy) with the true goal and wrong goals."""
    copy = tmp_path_factory.mktemp("reach") / "reach.h5"
    shutil.copyfile(SAMPLE_REACH, copy)
    args = [
        "relabel",
        str(copy),
        "--model",
        str(SAMPLE_MODEL),
        "--device",
        "cpu",
        "--align",
        "next",
        "-q",
        "--goal",
        reach.GOAL,
    ]
    for goal in WRONG_GOALS:
        args += ["--goal", goal]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    truth, vlm, final, final_success = [], [], [], []
    with h5py.File(copy) as f:
        for demo in f["data"].values():
            truth.append(demo["rewards"][:])
            vlm.append(demo["vlm_reward_0"][:])
            final.append([demo[f"vlm_reward_{i}"][-1] for i in range(1 + len(WRONG_GOALS))])
            final_success.append(bool(demo["success"][-1]))
    return {
        "truth": np.concatenate(truth),
        "vlm": np.concatenate(vlm),
        "final": np.array(final),
        "final_success": np.array(final_success),
    }


def test_sample_model_loads_through_the_users_path():
    model = load_model(str(SAMPLE_MODEL))
    assert model.preprocess.size == (64, 64)
    texts = model.encode_texts([reach.GOAL, *WRONG_GOALS])
    assert texts.shape[0] == 3 and not np.allclose(texts[0].numpy(), texts[1].numpy())


def test_vlm_reward_tracks_the_ground_truth(relabelled):
    rho = spearman(relabelled["vlm"], relabelled["truth"])
    print(f"Spearman(VLM reward, ground truth) = {rho:.3f} over {len(relabelled['vlm'])} steps")
    assert rho >= 0.6


@pytest.mark.parametrize("wrong", range(len(WRONG_GOALS)))
def test_true_goal_beats_a_wrong_goal_on_successful_final_frames(relabelled, wrong):
    final = relabelled["final"][relabelled["final_success"]]
    assert len(final) >= 10
    wins = float(np.mean(final[:, 0] > final[:, 1 + wrong]))
    print(f"true goal > {WRONG_GOALS[wrong]!r} on {wins:.0%} of {len(final)} successful final frames")
    assert wins >= 0.9


def test_training_is_reproducible_from_its_seed():
    config = TrainConfig(steps=3, batch_size=16, warmup=1, seed=2, threads=1, model_cfg=TRAIN_TEST_CFG)
    first, second = train(config), train(config)
    assert first.losses == second.losses
    assert first.preprocess_cfg == second.preprocess_cfg
