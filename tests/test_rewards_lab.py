"""Reward formulations, prompt ensembles, shaping and normalisation against direct NumPy computations."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from tests import layouts
from vlmlabel import rewards
from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import RewardConfig, build_score_fn
from vlmlabel.rewards import Normalize, RewardMode, Shaping
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest


def _unit(rng: np.random.Generator, rows: int, dim: int = 16) -> np.ndarray:
    x = rng.normal(size=(rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def emb():
    rng = np.random.default_rng(3)
    return _unit(rng, 50), _unit(rng, 2), _unit(rng, 1)[0], _unit(rng, 3)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).float()


def test_cosine_is_dot_product(emb):
    x, g, _, _ = emb
    np.testing.assert_allclose(rewards.cosine(_t(x), _t(g)).numpy(), x @ g.T, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_projection_matches_numpy(emb, alpha):
    x, g, b, _ = emb
    expected = np.empty((len(x), len(g)))
    for j, goal in enumerate(g):
        d = goal - b
        projector = alpha * np.outer(d, d) / (d @ d) + (1 - alpha) * np.eye(len(d))
        expected[:, j] = 1 - 0.5 * np.sum(((x - goal) @ projector) ** 2, axis=1)
    got = rewards.projection(_t(x), _t(g), _t(b), alpha).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_projection_alpha_zero_is_cosine(emb):
    """1 - 0.5|x - g|^2 = x.g for unit x and g: alpha = 0 is cosine up to the affine map (here the identity)."""
    x, g, b, _ = emb
    np.testing.assert_allclose(rewards.projection(_t(x), _t(g), _t(b), 0.0).numpy(), x @ g.T, atol=1e-5)


def test_softmax_uses_logit_scale(emb):
    x, g, _, n = emb
    scale = 100.0
    expected = np.empty((len(x), len(g)))
    for j, goal in enumerate(g):
        logits = scale * np.concatenate([x @ goal[:, None], x @ n.T], axis=1)
        logits -= logits.max(axis=1, keepdims=True)
        expected[:, j] = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)
    got = rewards.softmax(_t(x), _t(g), _t(n), scale).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Without the scale the distribution over 4 prompts is nearly uniform.
    assert np.abs(rewards.softmax(_t(x), _t(g), _t(n), 1.0).numpy() - 0.25).max() < 0.25
    assert np.abs(got - 0.25).max() > 0.5


def test_contrastive_matches_numpy(emb):
    x, g, _, n = emb
    expected = x @ g.T - (x @ n.T).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(rewards.contrastive(_t(x), _t(g), _t(n)).numpy(), expected, atol=1e-5)


def test_delta_shaping_stays_within_episodes():
    phi = [np.array([[1.0], [2.0], [4.0]]), np.array([[10.0], [20.0]])]
    shaped = rewards.delta_shaping(phi, gamma=0.5)
    np.testing.assert_allclose(shaped[0][:, 0], [0.5 * 2 - 1, 0.5 * 4 - 2, 0.5 * 4 - 4])
    # The first episode's last step never sees the second episode's first potential (10).
    np.testing.assert_allclose(shaped[1][:, 0], [0.5 * 20 - 10, 0.5 * 20 - 20])


def test_normalize_per_episode_dataset_minmax():
    values = [np.array([[1.0, 0.0], [3.0, 0.0]]), np.array([[10.0, 1.0], [20.0, 3.0], [30.0, 5.0]])]
    per_episode = rewards.normalize(values, Normalize.episode)
    for got, raw in zip(per_episode, values):
        std = raw.std(axis=0)
        np.testing.assert_allclose(got, (raw - raw.mean(axis=0)) / np.where(std > 0, std, 1), atol=1e-6)
    assert np.all(per_episode[0][:, 1] == 0)  # a constant column is centred, not divided by zero
    everything = np.concatenate(values)
    dataset = np.concatenate(rewards.normalize(values, Normalize.dataset))
    np.testing.assert_allclose(dataset, (everything - everything.mean(0)) / everything.std(0), atol=1e-6)
    minmax = np.concatenate(rewards.normalize(values, Normalize.minmax))
    np.testing.assert_allclose(minmax, (everything - everything.min(0)) / np.ptp(everything, axis=0), atol=1e-6)
    # per episode onto 0..1 (TOPReward's progress), each goal column on its own; a constant column is 0
    per_episode_minmax = rewards.normalize(values, Normalize.episode_minmax)
    np.testing.assert_allclose(per_episode_minmax[0], [[0.0, 0.0], [1.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(per_episode_minmax[1], [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]], atol=1e-7)
    for got, raw in zip(per_episode_minmax, values, strict=True):
        span = np.ptp(raw, axis=0)
        np.testing.assert_allclose(got, (raw - raw.min(0)) / np.where(span > 0, span, 1), atol=1e-6)
        assert got.dtype == np.float32


def test_prompt_ensemble_averages_then_normalises():
    encoded = {"a photo of cat": np.array([1.0, 0.0, 0.0]), "a drawing of cat": np.array([0.0, 1.0, 0.0])}
    config = RewardConfig(goals=["cat"], templates=["a photo of {}", "a drawing of {}"]).validate()
    score = build_score_fn(config, lambda texts: torch.tensor(np.stack([encoded[t] for t in texts])).float(), 1.0)
    x = torch.tensor([[1.0, 1.0, 0.0]]) / np.sqrt(2)
    np.testing.assert_allclose(score(x).numpy(), [[1.0]], atol=1e-6)  # goal = (1, 1, 0)/sqrt(2)


def test_projection_goal_and_baseline_are_not_renormalised():
    encoded = {"g one": [1.0, 0.0], "g two": [0.0, 1.0], "b one": [-1.0, 0.0], "b two": [-1.0, 0.0]}
    encode = lambda texts: torch.tensor([encoded[t] for t in texts]).float()  # noqa: E731
    config = RewardConfig(
        goals=["g"], templates=["{} one", "{} two"], mode=RewardMode.projection, baselines=["b"], alpha=0.0
    ).validate()
    x = torch.tensor([[0.6, 0.8]])
    # g = (0.5, 0.5) as averaged (a re-normalised g would give 0.98995).
    np.testing.assert_allclose(build_score_fn(config, encode, 1.0)(x).numpy(), [[1 - 0.5 * 0.1]], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode=RewardMode.projection), "needs --baseline"),
        (dict(mode=RewardMode.projection, baselines=["b"], alpha=1.5), "--alpha must be in"),
        (dict(mode=RewardMode.softmax), "needs at least one --negative"),
        (dict(mode=RewardMode.contrastive), "needs at least one --negative"),
        (dict(negatives=["n"]), "only applies to --reward softmax or contrastive"),
        (dict(threshold=0.5), "--threshold only applies"),
        (dict(mode=RewardMode.softmax, negatives=["n"], threshold=2.0), "--threshold must be in"),
        (dict(gamma=1.5), "--gamma must be in"),
        (dict(templates=["no placeholder"]), "must contain"),
    ],
)
def test_bad_combinations_are_refused(kwargs, message):
    with pytest.raises(VlmlabelError, match=message):
        RewardConfig(goals=["g"], **kwargs).validate()


def test_relabel_writes_formula_shaped_and_raw(tiny_model_dir, tmp_path):
    truth = layouts.build_minari(tmp_path / "m.h5")
    config = RewardConfig(
        goals=["a red block"],
        mode=RewardMode.softmax,
        negatives=["a blue block", "a table"],
        templates=["a photo of {}", "{}"],
        shaping=Shaping.delta,
        gamma=0.9,
        normalize=Normalize.episode,
    )
    summary = relabel_file(
        RelabelRequest(
            source=truth.path,
            goals=config.goals,
            model=str(tiny_model_dir),
            device="cpu",
            formulation=config,
            use_cache=False,
        )
    )
    assert summary.raw_names == ["vlm_reward_raw"]
    with h5py.File(truth.path) as f:
        raw = [f[p.replace("vlm_reward", "vlm_reward_raw")][:].astype(np.float64) for p in truth.reward_paths]
        shaped = [f[p][:] for p in truth.reward_paths]
        attrs = dict(f[truth.reward_paths[0]].attrs)
    assert all(((r > 0) & (r < 1)).all() for r in raw)  # probabilities
    for got, r in zip(shaped, raw):
        z = (r - r.mean()) / r.std()
        np.testing.assert_allclose(got, 0.9 * np.append(z[1:], z[-1]) - z, atol=1e-5)
    spec = json.loads(attrs["reward_spec"])
    assert spec["reward"] == "softmax" and spec["negatives"] == ["a blue block", "a table"]
    assert spec["prompts"] == ["a photo of a red block", "a red block"]
    assert spec["gamma"] == 0.9 and spec["normalize"] == "episode" and spec["logit_scale"] > 1
    assert "delta shaping" in attrs["formula"] and attrs["raw_key"] == "vlm_reward_raw"
    assert RewardConfig.from_attrs(attrs).negatives == ["a blue block", "a table"]


def test_threshold_then_normalise_then_shape_order():
    config = RewardConfig(
        goals=["g"], mode=RewardMode.softmax, negatives=["n"], threshold=0.5, shaping=Shaping.delta, gamma=1.0
    ).validate()
    raw = [np.array([[0.2], [0.5], [0.9]], np.float32), np.array([[0.7]], np.float32)]
    binary = [np.array([[0.0], [1.0], [1.0]]), np.array([[1.0]])]
    for got, b in zip(config.postprocess(raw), binary):
        np.testing.assert_allclose(got, np.concatenate([b[1:], b[-1:]]) - b)
    assert config.keeps_raw and not RewardConfig(goals=["g"]).validate().keeps_raw
