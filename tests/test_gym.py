"""Gymnasium wrappers on a real CartPole-v1 rendered offline, against open_clip's reference on the same frames."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # rgb_array rendering, no display

import gymnasium as gym  # noqa: E402  (in the test extra: pip install -e ".[test]")
from gymnasium.vector import AutoresetMode  # noqa: E402
from gymnasium.wrappers import Autoreset  # noqa: E402

from vlmlabel import RewardModel  # noqa: E402
from vlmlabel.errors import VlmlabelError  # noqa: E402
from vlmlabel.gym import VLMReward, VLMRewardVector  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models only lose from intra-op threads

GOAL = "a pole standing upright on a cart"
TOL = 2e-3
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rm(tiny_model_dir) -> RewardModel:
    return RewardModel(model=str(tiny_model_dir), goals=[GOAL], device="cpu")


def _cartpole(**kwargs):
    return gym.make("CartPole-v1", render_mode="rgb_array", **kwargs)


def _expected(reference, frame: np.ndarray) -> float:
    return float(reference(frame[None], [GOAL])[0, 0])


def test_replace_scores_the_rendered_frame(rm, reference):
    env = VLMReward(_cartpole(), reward_model=rm)
    env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(5):
        _, reward, terminated, _, info = env.step(env.action_space.sample())
        assert not terminated
        # Rendering is deterministic for a state: the frame the wrapper scored is the one rendered now.
        expected = _expected(reference, env.render())
        assert reward == pytest.approx(expected, abs=TOL)
        assert info["vlm_reward"] == reward
        assert info["env_reward"] == 1.0 and reward != 1.0
    env.close()


def test_add_and_info_modes(rm):
    results = {}
    for mode in ("replace", "add", "info"):
        env = VLMReward(_cartpole(), mode=mode, reward_model=rm)
        env.reset(seed=3)
        results[mode] = [(step[1], step[4]) for step in (env.step(a) for a in (0, 1, 1, 0))]
        env.close()
    for (replaced, r_info), (added, a_info), (kept, k_info) in zip(results["replace"], results["add"], results["info"]):
        assert r_info["vlm_reward"] == a_info["vlm_reward"] == k_info["vlm_reward"] == replaced
        assert added == pytest.approx(1.0 + replaced, abs=1e-6)
        assert kept == 1.0 == k_info["env_reward"]


def test_the_wrapper_builds_its_model_from_options(tiny_model_dir, reference):
    env = VLMReward(_cartpole(), goal=GOAL, model=str(tiny_model_dir), device="cpu")
    env.reset(seed=1)
    _, reward, _, _, _ = env.step(0)
    assert reward == pytest.approx(_expected(reference, env.render()), abs=TOL)
    env.close()


def test_autoreset_step_is_not_scored(rm, reference):
    env = VLMReward(Autoreset(_cartpole()), reward_model=rm)
    env.reset(seed=0)
    for _ in range(200):  # always pushing right ends an episode within a few dozen steps
        _, reward, terminated, truncated, info = env.step(1)
        assert info["env_reward"] == 1.0
        if terminated or truncated:
            assert reward == pytest.approx(_expected(reference, env.render()), abs=TOL)  # the last frame is scored
            break
    else:
        pytest.fail("CartPole did not terminate")
    _, reward, terminated, _, info = env.step(1)  # the autoreset step: a new episode's first frame
    assert (reward, info["env_reward"], info["vlm_reward"], terminated) == (0.0, 0.0, 0.0, False)
    _, reward, _, _, info = env.step(0)  # scored again
    assert info["env_reward"] == 1.0
    assert reward == pytest.approx(_expected(reference, env.render()), abs=TOL) and reward != 0.0
    env.close()


def test_reset_after_termination_clears_the_autoreset(rm):
    env = VLMReward(_cartpole(), reward_model=rm)
    env.reset(seed=0)
    while not env.step(1)[2]:
        pass
    env.reset()
    _, reward, _, _, info = env.step(0)
    assert info["env_reward"] == 1.0 and reward == info["vlm_reward"] != 0.0
    env.close()


def test_vector_env_scores_all_sub_envs_in_one_batch(rm, reference):
    vec = VLMRewardVector(
        gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="sync", render_mode="rgb_array"), reward_model=rm
    )
    vec.reset(seed=0)
    autoreset_seen = False
    ended = np.zeros(4, dtype=bool)
    for step in range(60):
        actions = np.array([1, 1, 0, step % 2])  # two sub-envs fall fast, at different times
        _, rewards, terminated, truncated, info = vec.step(actions)
        frames = vec.render()
        assert isinstance(frames, tuple) and len(frames) == 4
        assert rewards.shape == (4,) and info["vlm_reward"].shape == (4,) and info["env_reward"].shape == (4,)
        np.testing.assert_array_equal(info["_vlm_reward"], ~ended)  # autoreset sub-envs are not scored
        np.testing.assert_array_equal(info["env_reward"], np.where(ended, 0.0, 1.0))
        np.testing.assert_array_equal(rewards[ended], 0.0)
        scored = ~ended
        one_by_one = np.array([rm(f)[0] for f in frames])
        np.testing.assert_allclose(rewards[scored], one_by_one[scored], atol=1e-5)  # batch == per-env scoring
        expected = reference(np.stack(frames), [GOAL])[:, 0]
        np.testing.assert_allclose(rewards[scored], expected[scored], atol=TOL)
        autoreset_seen |= bool(ended.any() and scored.any())
        ended = np.logical_or(terminated, truncated)
    assert autoreset_seen
    vec.close()


def test_vector_modes_and_refusals(rm, tiny_model_dir):
    vec = VLMRewardVector(
        gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync", render_mode="rgb_array"),
        mode="add",
        reward_model=rm,
    )
    vec.reset(seed=0)
    _, rewards, _, _, info = vec.step(np.array([0, 1]))
    np.testing.assert_allclose(rewards, 1.0 + info["vlm_reward"], atol=1e-6)
    vec.close()
    same_step = gym.make_vec(
        "CartPole-v1",
        num_envs=2,
        vectorization_mode="sync",
        render_mode="rgb_array",
        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
    )
    with pytest.raises(VlmlabelError, match="SAME_STEP"):
        VLMRewardVector(same_step, reward_model=rm)
    with pytest.raises(VlmlabelError, match="rgb_array"):
        VLMRewardVector(gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync"), reward_model=rm)


def test_refusals(rm, tiny_model_dir):
    with pytest.raises(VlmlabelError, match="render_mode"):
        VLMReward(gym.make("CartPole-v1"), reward_model=rm)
    with pytest.raises(VlmlabelError, match="unknown mode"):
        VLMReward(_cartpole(), mode="multiply", reward_model=rm)
    with pytest.raises(VlmlabelError, match="drop goal"):
        VLMReward(_cartpole(), goal="another goal", reward_model=rm)
    with pytest.raises(VlmlabelError, match="2 goals"):
        VLMReward(_cartpole(), reward_model=RewardModel(model=str(tiny_model_dir), goals=["a", "b"], device="cpu"))
    with pytest.raises(VlmlabelError, match="whole episodes"):
        VLMReward(_cartpole(), goal=GOAL, model=str(tiny_model_dir), normalize="episode")


def test_missing_gymnasium_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import gymnasium now raises ImportError
    monkeypatch.delitem(sys.modules, "vlmlabel.gym")
    with pytest.raises(ImportError, match=r"pip install \"vlmlabel\[gym\]\""):
        importlib.import_module("vlmlabel.gym")


@pytest.mark.subprocess
def test_cartpole_example_runs(tiny_model_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmlabel.examples.cartpole",
            "--model",
            str(tiny_model_dir),
            "--steps",
            "50",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "SDL_VIDEODRIVER": "dummy"},
    )
    assert result.returncode == 0, result.stderr
    assert "vlm reward over 50 scored steps: min" in result.stdout
    assert "env reward sum:" in result.stdout and "episodes ended:" in result.stdout
