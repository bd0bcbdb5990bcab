"""Post-processing is defined on degenerate episodes: a series whose spread is rounding noise (identical frames,
a length-1 episode) is constant, so its z-scores and min-max values are 0, never noise scaled into a signal;
NaN or infinite scores are refused (by the engine at the first batch that gives one, else before post-processing)
and never written.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.layouts import make_frames
from vlmlabel import rewards
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import RewardConfig
from vlmlabel.rewards import Normalize, RewardMode

runner = CliRunner()
MODES = [Normalize.episode, Normalize.dataset, Normalize.minmax, Normalize.episode_minmax]

pytestmark = pytest.mark.usefixtures("one_thread")


def _column(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)[:, None]


@pytest.mark.parametrize("how", MODES)
def test_identical_scores_are_constant_however_their_mean_rounds(how):
    """37 copies of one fp32 score: their fp32 mean is not the score, which made every z-score exactly 1."""
    same = np.full((37, 1), 0.2278978, np.float32)
    for out in rewards.normalize([same, same[:5]], how):
        np.testing.assert_array_equal(out, np.zeros_like(out))


@pytest.mark.parametrize("how", MODES)
def test_float_noise_is_not_a_signal(how):
    """A spread of one fp32 ulp (6e-8: identical frames scored in other batches) was z-scored to +-1.22 and
    min-maxed to 0 and 1."""
    noise = np.float32(0.25) + _column(0, 3e-8, -3e-8, 3e-8, 0, -3e-8)
    assert 0 < np.ptp(noise) < 1e-7
    out = rewards.normalize([noise, noise[:2]], how)
    for values in out:
        np.testing.assert_array_equal(values, np.zeros_like(values))
        assert values.dtype == np.float32


def test_length_one_episodes():
    one, two = _column(0.5), _column(0.5, 0.7)
    episode = rewards.normalize([one, two], Normalize.episode)
    np.testing.assert_array_equal(episode[0], [[0.0]])
    np.testing.assert_allclose(episode[1], [[-1.0], [1.0]], atol=1e-6)
    dataset = rewards.normalize([one, two], Normalize.dataset)  # mean 0.5667, std 0.0943 over three values
    np.testing.assert_allclose(np.concatenate(dataset)[:, 0], [-1 / np.sqrt(2), -1 / np.sqrt(2), np.sqrt(2)], atol=1e-5)
    minmax = rewards.normalize([one, two], Normalize.minmax)
    np.testing.assert_allclose(np.concatenate(minmax)[:, 0], [0.0, 0.0, 1.0], atol=1e-6)
    episode_minmax = rewards.normalize([one, two], Normalize.episode_minmax)  # a one-step episode is constant
    np.testing.assert_allclose(np.concatenate(episode_minmax)[:, 0], [0.0, 0.0, 1.0], atol=1e-6)
    for how in MODES:  # length-1 episodes only, all one value: constant everywhere
        out = rewards.normalize([_column(0.3), _column(0.3)], how)
        np.testing.assert_array_equal(np.concatenate(out), [[0.0], [0.0]])


def test_empty_episodes_stay_empty():
    for how in MODES:
        out = rewards.normalize([np.zeros((0, 2), np.float32)], how)
        assert out[0].shape == (0, 2) and out[0].dtype == np.float32


@pytest.mark.parametrize(
    ("values", "flat"),
    [
        ((0.3, 0.3 + 0.9e-4), True),  # below 1e-4 for scores of size below 1
        ((0.3, 0.3 + 1.5e-4), False),  # a signal, however small, above it
        ((-2.0, -2.0 + 1.8e-4), True),  # contrastive scores reach 2: the tolerance scales with them
        ((1000.0, 1000.05), True),  # rewards of another scale (rewards.normalize on the user's own)
        ((1000.0, 1000.2), False),
    ],
)
def test_constant_below_the_documented_tolerance(values, flat):
    x = np.array(values, dtype=np.float64)[:, None]
    assert bool(rewards.constant(x)[0]) is flat
    expected = [[0.0], [0.0]] if flat else [[-1.0], [1.0]]
    np.testing.assert_allclose(rewards.normalize([x], Normalize.episode)[0], expected, atol=1e-3)
    assert rewards.CONSTANT_SPREAD == 1e-4  # the value README documents


def test_each_goal_column_is_judged_on_its_own():
    x = np.array([[0.2, 0.1], [0.2 + 1e-7, 0.3], [0.2, 0.5]], dtype=np.float32)
    out = rewards.normalize([x], Normalize.episode)[0]
    np.testing.assert_array_equal(out[:, 0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(out[:, 1], [-np.sqrt(1.5), 0.0, np.sqrt(1.5)], atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_is_refused_before_any_post_processing(bad):
    values = [_column(0.1, bad, 0.3)]
    for how in [Normalize.none, *MODES]:
        with pytest.raises(ValueError, match="finite"):
            rewards.normalize(values, how)
    # A threshold would have turned NaN into 0 silently: the formulation refuses the scores first.
    config = RewardConfig(goals=["g"], mode=RewardMode.softmax, negatives=["n"], threshold=0.5).validate()
    with pytest.raises(VlmlabelError, match="1 raw score"):
        config.postprocess(values)


# -- end to end ---------------------------------------------------------------------------------------------


def _identical_frames(path, lengths=(37, 5, 1)):
    frame = make_frames(1, 40, 48, seed=1)
    steps = sum(lengths)
    terminals = np.zeros(steps, bool)
    terminals[np.cumsum(lengths) - 1] = True
    with h5py.File(path, "w") as handle:
        handle["observations"] = np.repeat(frame, steps, axis=0)
        handle["terminals"] = terminals
    return path


@pytest.mark.parametrize("how", MODES)
def test_relabel_identical_frames_writes_zeros(how, tmp_path, tiny_model_dir):
    """Episodes of 37, 5 and 1 identical frames: every z-score (and min-max value) written is 0."""
    source = _identical_frames(tmp_path / "same.h5")
    done = runner.invoke(
        app,
        [
            "relabel",
            str(source),
            "--goal",
            "a red cube",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--normalize",
            how.value,
            "--align",
            "frame",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert done.exit_code == 0, done.output
    with h5py.File(source) as handle:
        raw, written = handle["vlm_reward_raw"][()], handle["vlm_reward"][()]
    assert np.ptp(raw) < 1e-6
    np.testing.assert_array_equal(written, np.zeros_like(written))


def _tree(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_model_giving_nan_is_refused_at_its_first_batches(tmp_path, tiny_model_dir, monkeypatch):
    """The engine checks every batch as it reaches the host: a model that overflows stops the run after two
    batches (rows come back one batch late), not after the last, and nothing is written."""
    source = _identical_frames(tmp_path / "same.h5")
    before = _tree(tmp_path)
    calls = []

    def nan_cosine(images: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return torch.full((len(images), len(goals)), float("nan"))

    monkeypatch.setattr(rewards, "cosine", nan_cosine)
    result = runner.invoke(
        app,
        [
            "relabel",
            str(source),
            "--goal",
            "a red cube",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--workers",
            "0",
        ],
        terminal_width=400,
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "4 NaN or infinite value(s) for frames 0-3" in lines[0], result.output
    assert len(calls) == 2  # of 11 batches
    assert _tree(tmp_path) == before  # the source untouched, no progress left beside it


def test_nan_in_a_cached_embedding_is_refused_before_writing(tmp_path, tiny_model_dir):
    source = _identical_frames(tmp_path / "same.h5")
    embedded = runner.invoke(
        app, ["embed", str(source), "--model", str(tiny_model_dir), "--device", "cpu", "--workers", "0", "-q"]
    )
    assert embedded.exit_code == 0, embedded.output
    with h5py.File(source, "r+") as handle:
        handle["vlm_embedding/observations"][3] = np.nan
    before = _tree(tmp_path)
    result = runner.invoke(
        app,
        [
            "relabel",
            str(source),
            "--goal",
            "a red cube",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        terminal_width=400,
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "1 raw score(s) are NaN or infinite" in lines[0], result.output
    assert "--no-cache" in lines[0]
    assert _tree(tmp_path) == before
