"""evaluate on synthetic data with known correlations; plot writes pictures of the right size."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.stats import rankdata as ranks
from typer.testing import CliRunner

from tests import layouts
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError
from vlmlabel.evaluate import EvaluateRequest, evaluate_file, spearman
from vlmlabel.formulation import RewardConfig
from vlmlabel.plot import PlotRequest, figure_size, parse_episodes, plot_file
from vlmlabel.rewards import Normalize, Shaping
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_ranks_average_ties_and_spearman_is_rank_pearson():
    np.testing.assert_allclose(ranks(np.array([10.0, 20.0, 20.0, 5.0])), [2, 3.5, 3.5, 1])
    x = np.linspace(-2, 2, 30)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


@pytest.fixture()
def synthetic(tmp_path):
    """Flat file: 4 episodes of 50 steps; success flags and a reward that is success plus known noise."""
    rng = np.random.default_rng(0)
    lengths = [50] * 4
    n = sum(lengths)
    success = np.zeros(n, np.float32)
    success[40:50] = 1  # episode 0 succeeds at its end
    success[140:150] = 1  # episode 2 too
    ramp = np.concatenate([np.linspace(0, 1, k) for k in lengths])
    reward = (success + 0.5 * ramp + 0.3 * rng.normal(size=n)).astype(np.float32)
    terminals = np.zeros(n, bool)
    terminals[np.cumsum(lengths) - 1] = True
    path = tmp_path / "synthetic.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=layouts.make_frames(n, 8, 8, seed=2))
        f.create_dataset("terminals", data=terminals)
        f.create_dataset("rewards", data=ramp.astype(np.float32))
        f.create_dataset("success", data=success)
        f.create_dataset("vlm_reward", data=reward).attrs.update({"formula": "test", "goal": "g"})
    return path, reward, success, ramp, lengths


def test_evaluate_matches_direct_numpy(synthetic):
    path, reward, success, ramp, lengths = synthetic
    report = evaluate_file(EvaluateRequest(source=path, reward_key="vlm_reward", against="success", blank=False))
    r = np.corrcoef(reward, success)[0, 1]
    assert report.reference_binary and report.pearson == pytest.approx(r, abs=1e-6)
    assert report.epic_distance == pytest.approx(math.sqrt((1 - r) / 2), abs=1e-6)
    assert report.spearman == pytest.approx(np.corrcoef(ranks(reward), ranks(success))[0, 1], abs=1e-6)
    assert 0.5 < r < 0.95  # the synthetic correlation is strong but not perfect
    # Episodes 1 and 3 have constant success: only 0 and 2 give a per-episode correlation.
    assert report.per_episode_pearson["episodes"] == 2
    per_episode = [np.corrcoef(reward[a : a + 50], success[a : a + 50])[0, 1] for a in (0, 100)]
    assert report.per_episode_pearson["mean"] == pytest.approx(np.mean(per_episode), abs=1e-6)
    time_rho = [np.corrcoef(ranks(reward[a : a + 50]), np.arange(50))[0, 1] for a in (0, 100)]
    assert report.voc_successful_mean == pytest.approx(np.mean(time_rho), abs=1e-6)
    assert abs(report.shuffled_pearson) < 0.3 < report.pearson  # shuffling across episodes destroys it

    dense = evaluate_file(EvaluateRequest(source=path, reward_key="vlm_reward", against="rewards", blank=False))
    assert not dense.reference_binary and dense.epic_distance is None
    assert dense.pearson == pytest.approx(np.corrcoef(reward, ramp)[0, 1], abs=1e-6)
    assert dense.voc_successful_episodes == 2  # successful episodes found from the success key


def test_evaluate_cli_json_and_errors(synthetic):
    path = synthetic[0]
    done = _cli("evaluate", str(path), "--reward-key", "vlm_reward", "--against", "success", "--no-blank", "--json")
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    assert payload["against"] == "success" and payload["epic_distance"] is not None
    bad = _cli("evaluate", str(path), "--no-blank", "--reward-key", "nope")
    assert bad.exit_code == 2 and "unknown reward key 'nope'" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    with pytest.raises(VlmlabelError, match="--against missing"):
        evaluate_file(EvaluateRequest(source=path, reward_key="vlm_reward", against="missing", blank=False))


def test_evaluate_blank_baseline_uses_the_recorded_model(tiny_model_dir, tmp_path):
    truth = layouts.build_flat_d4rl(tmp_path / "d.h5")
    relabel_file(
        RelabelRequest(
            source=truth.path,
            goals=["red"],
            model=str(tiny_model_dir),
            device="cpu",
            formulation=RewardConfig(goals=["red"], normalize=Normalize.dataset),
        )
    )
    done = _cli("evaluate", str(truth.path), "--json")
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    assert set(payload["blank_scores"]) == {"black", "gray", "white"}
    assert all(-1 <= v <= 1 for v in payload["blank_scores"].values())  # raw cosine, not the z-scores
    with h5py.File(truth.path) as f:
        raw = f["vlm_reward_raw"][:]
    assert payload["above_blank_fraction"] == pytest.approx((raw > max(payload["blank_scores"].values())).mean())


def test_plot_writes_picture(tiny_model_dir, tmp_path):
    truth = layouts.build_minari_png(tmp_path / "m.h5")
    relabel_file(RelabelRequest(source=truth.path, goals=["red", "blue"], model=str(tiny_model_dir), device="cpu"))
    out = tmp_path / "rewards.png"
    done = _cli("plot", str(truth.path), "--episodes", "0,2", "--out", str(out))
    assert done.exit_code == 0, done.output
    assert "vlm_reward_0, vlm_reward_1" in done.stdout and out.stat().st_size > 1000
    with Image.open(out) as image:
        assert image.size == figure_size(2, 100)
    svg = plot_file(PlotRequest(source=truth.path, reward_key="vlm_reward", out=tmp_path / "r.svg"))
    assert svg.episodes == [0, 1, 2] and svg.out.read_text().lstrip().startswith("<?xml")
    bad = _cli("plot", str(truth.path), "--reward-key", "nope", "--out", str(out))
    assert bad.exit_code == 2 and "unknown reward key" in bad.stderr and bad.stderr.strip().count("\n") == 0
    for kwargs, words in ((dict(episodes=[9]), "out of range"), (dict(out=tmp_path / "x.gif"), "must end in")):
        with pytest.raises(VlmlabelError, match=words):
            plot_file(PlotRequest(**{"source": truth.path, "reward_key": "vlm_reward", **kwargs}))
    with pytest.raises(VlmlabelError, match="numbers"):
        parse_episodes("a,b")


def test_shuffled_baseline_reapplies_the_recorded_shaping(synthetic):
    path, reward, success, _, lengths = synthetic
    spec = RewardConfig(goals=["g"], shaping=Shaping.delta, gamma=0.5)
    raw = reward.copy()
    shaped = np.concatenate(spec.postprocess([r[:, None] for r in np.split(raw, np.cumsum(lengths)[:-1])]))[:, 0]
    with h5py.File(path, "r+") as f:
        f["vlm_reward_raw"] = raw
        del f["vlm_reward"]
        f["vlm_reward"] = shaped
        f["vlm_reward"].attrs.update({**spec.attrs(0, 1.0), "raw_key": "vlm_reward_raw"})
    report = evaluate_file(EvaluateRequest(source=path, reward_key="vlm_reward", against="success", blank=False))
    permuted = np.random.default_rng(0).permutation(raw)
    expected = np.concatenate(spec.postprocess([r[:, None] for r in np.split(permuted, np.cumsum(lengths)[:-1])]))
    assert report.shuffled_pearson == pytest.approx(np.corrcoef(expected[:, 0], success)[0, 1], abs=1e-6)
    assert [row["steps"] for row in report.per_episode] == lengths
    assert report.per_episode[0]["pearson"] == pytest.approx(np.corrcoef(shaped[:50], success[:50])[0, 1], abs=1e-6)


def test_evaluate_refuses_a_reference_that_is_not_one_number_per_step(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "r.h5")
    relabelled = runner.invoke(app, ["relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "x", "-q"])
    assert relabelled.exit_code == 0
    result = runner.invoke(
        app, ["evaluate", str(lf.path), "--against", "obs/agentview_image", "--no-blank"], terminal_width=400
    )
    assert result.exit_code == 2
    assert "not one number per step" in result.output and len(result.output.strip().splitlines()) == 1
