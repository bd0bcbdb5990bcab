"""evaluate's VOC and success AUROC on hand-built labelled files, against scipy.stats and scikit-learn.

VOC (value-order correlation, GVL arXiv 2411.04549, TOPReward arXiv 2602.19313) is scipy's Spearman of each
episode's reward with its step index; success AUROC is scikit-learn's roc_auc_score of one score per episode
(its final-step reward, or its maximum). Undefined values (an episode of one step or of a constant reward, one
class only) are NaN, JSON null, and left out of means and medians.
"""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from tests import layouts, table_layouts
from vlmlabel.cli import app
from vlmlabel.evaluate import EvaluateRequest, evaluate_file, success_auroc

runner = CliRunner()


def labelled(path, rewards, env_reward=None, success=None):
    """A flat (D4RL-style) file of episodes with the written reward ``rewards`` (one array per episode), and
    optionally the environment's per-step reward and success flags."""
    lengths = [len(r) for r in rewards]
    n = sum(lengths)
    terminals = np.zeros(n, bool)
    terminals[np.cumsum(lengths) - 1] = True
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=layouts.make_frames(n, 8, 8, seed=3))
        f.create_dataset("terminals", data=terminals)
        f.create_dataset("vlm_reward", data=np.concatenate(rewards).astype(np.float32))
        f["vlm_reward"].attrs.update({"formula": "test", "goal": "g"})
        if env_reward is not None:
            f.create_dataset("rewards", data=np.concatenate(env_reward).astype(np.float32))
        if success is not None:
            f.create_dataset("success", data=np.concatenate(success).astype(np.float32))
    return path


def report(path, against=None):
    return evaluate_file(EvaluateRequest(source=path, reward_key="vlm_reward", against=against, blank=False))


def scipy_voc(reward):
    return stats.spearmanr(reward, np.arange(len(reward))).statistic


def test_voc_of_rising_falling_and_tied_rewards_is_scipys_spearman_with_time(tmp_path):
    rng = np.random.default_rng(0)
    rising, falling = np.linspace(0, 1, 12), np.linspace(1, 0, 9)
    tied = np.array([0.1, 0.1, 0.3, 0.2, 0.2, 0.5, 0.5, 0.5])  # ties share their average rank
    noisy = np.linspace(0, 1, 30) + rng.normal(0, 0.3, 30)
    found = report(labelled(tmp_path / "d.h5", [rising, falling, tied, noisy]))
    vocs = [row["voc"] for row in found.per_episode]
    assert vocs[0] == pytest.approx(1.0) and vocs[1] == pytest.approx(-1.0)
    expected = [scipy_voc(r.astype(np.float32)) for r in (rising, falling, tied, noisy)]
    np.testing.assert_allclose(vocs, expected, atol=1e-12)
    average_ranks = [1.5, 1.5, 5, 3.5, 3.5, 7, 7, 7]  # by hand: Spearman is Pearson of average ranks with time
    assert expected[2] == pytest.approx(np.corrcoef(average_ranks, np.arange(8))[0, 1])
    assert found.voc_mean == pytest.approx(np.mean(expected)) and found.voc_median == pytest.approx(np.median(expected))
    assert (found.voc_episodes, found.voc_episodes_undefined) == (4, 0)
    assert found.against is None and found.pearson is None and found.per_episode_pearson is None  # no reference


def test_constant_and_one_step_episodes_have_no_voc_and_are_counted(tmp_path):
    rising, constant, single = np.linspace(0, 1, 5), np.full(6, 0.4), np.array([0.7])
    falling = np.linspace(1, 0, 4)
    path = labelled(tmp_path / "d.h5", [rising, constant, single, falling])
    found = report(path)
    assert [row["voc"] for row in found.per_episode][1:3] == [pytest.approx(np.nan, nan_ok=True)] * 2
    with pytest.warns(stats.ConstantInputWarning):  # scipy's own answer: undefined
        assert np.isnan(scipy_voc(constant))
    assert (found.voc_episodes, found.voc_episodes_undefined) == (2, 2)
    assert found.voc_mean == pytest.approx(0.0) and found.voc_median == pytest.approx(0.0)  # mean of 1 and -1
    assert any("2 episode(s) of one step or of a constant reward have no VOC" in n for n in found.notes)
    done = runner.invoke(app, ["evaluate", str(path), "--no-blank", "--json"])
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    assert [row["voc"] for row in payload["per_episode"]][1:3] == [None, None]
    assert payload["voc_episodes_undefined"] == 2


def test_success_flags_give_voc_on_successful_episodes_and_auroc_as_sklearn(tmp_path):
    rng = np.random.default_rng(1)
    rewards, flags, outcome = [], [], []
    for i in range(12):
        succeeds = i % 3 != 0
        length = int(rng.integers(5, 15))
        reward = np.round(rng.normal(0.3 * succeeds, 0.6, length) + np.linspace(0, succeeds, length), 1)  # ties
        flag = np.zeros(length)
        flag[-2:] = succeeds
        rewards.append(reward), flags.append(flag), outcome.append(succeeds)
    path = labelled(tmp_path / "d.h5", rewards, success=flags)
    found = report(path)
    outcome = np.array(outcome)
    final = np.array([r[-1] for r in rewards], np.float32)
    peak = np.array([r.max() for r in rewards], np.float32)
    assert found.success_auroc_final == pytest.approx(roc_auc_score(outcome, final))
    assert found.success_auroc_max == pytest.approx(roc_auc_score(outcome, peak))
    # informative but not perfect, and episodes tie on their scores: the comparison is not vacuous
    assert 0.5 < found.success_auroc_final < 1 and 0.5 < found.success_auroc_max < 1
    assert len(np.unique(final)) < len(final) and len(np.unique(peak)) < len(peak)
    assert (found.successful_episodes, found.failed_episodes) == (8, 4)
    kept = [scipy_voc(r.astype(np.float32)) for r, s in zip(rewards, outcome) if s]
    assert found.voc_successful_episodes == 8
    assert found.voc_successful_mean == pytest.approx(np.mean(kept))
    assert found.voc_successful_median == pytest.approx(np.median(kept))
    assert [row["success"] for row in found.per_episode] == outcome.tolist()


def test_without_a_success_flag_auroc_is_skipped_and_with_one_class_it_is_undefined(tmp_path):
    rewards = [np.linspace(0, 1, 5), np.linspace(0, 2, 6)]
    found = report(labelled(tmp_path / "none.h5", rewards))
    assert found.voc_successful_mean is None and found.success_auroc_final is None and found.success_auroc_max is None
    assert any("no success flag" in n for n in found.notes)
    every = report(labelled(tmp_path / "all.h5", rewards, success=[np.ones(5), np.ones(6)]))
    assert np.isnan(sklearn_auc_of_one_class())  # undefined for scikit-learn as well
    assert np.isnan(every.success_auroc_final) and np.isnan(every.success_auroc_max)
    assert every.voc_successful_episodes == 2 and any("every episode succeeds" in n for n in every.notes)
    assert every.as_json()["success_auroc_max"] is None


def sklearn_auc_of_one_class() -> float:
    """scikit-learn >= 1.6 warns and answers NaN; earlier versions raise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(roc_auc_score([1, 1], [1.0, 2.0]))
    except ValueError:
        return float("nan")


def test_success_auroc_is_sklearns_roc_auc_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n).astype(bool)
        labels[:2] = [True, False]
        scores = rng.integers(0, 5, n).astype(float)  # many ties
        assert success_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_nan_in_the_environment_reward_is_left_out_of_the_correlations_only(tmp_path):
    rng = np.random.default_rng(3)
    rewards = [np.linspace(0, 1, 10) + rng.normal(0, 0.2, 10) for _ in range(3)]
    env = [r + rng.normal(0, 0.3, len(r)) for r in rewards]
    env[0][[2, 5]] = np.nan
    env[2][:] = np.nan  # one episode with no reference at all
    path = labelled(tmp_path / "d.h5", rewards, env_reward=env)
    found = report(path, against="rewards")
    reward, reference = (np.concatenate(v).astype(np.float32).astype(np.float64) for v in (rewards, env))  # as stored
    kept = np.isfinite(reference)
    assert found.reference_nan_steps == 12
    assert found.pearson == pytest.approx(stats.pearsonr(reward[kept], reference[kept]).statistic, abs=1e-9)
    assert found.spearman == pytest.approx(stats.spearmanr(reward, reference, nan_policy="omit").statistic)
    assert [row["pearson"] is not None and np.isfinite(row["pearson"]) for row in found.per_episode] == [
        True,
        True,
        False,
    ]
    assert found.per_episode_pearson["episodes"] == 2
    assert found.voc_episodes == 3  # VOC needs no reference
    assert found.voc_mean == pytest.approx(np.mean([scipy_voc(r.astype(np.float32)) for r in rewards]))
    assert any("NaN at 12 step(s)" in n for n in found.notes)
    assert report(path).against == "rewards"  # without --against: the environment's rewards when present


def test_infinity_in_the_reference_is_refused_in_one_line(tmp_path):
    rewards = [np.linspace(0, 1, 4)]
    path = labelled(tmp_path / "d.h5", rewards, env_reward=[np.array([0.0, np.inf, 1.0, 2.0])])
    done = runner.invoke(app, ["evaluate", str(path), "--no-blank"], terminal_width=400)
    assert done.exit_code == 2 and done.output.count("\n") == 1
    assert "'rewards' holds 1 infinite value(s)" in done.output


def test_cli_reports_voc_without_a_reference_and_refuses_a_named_one_that_is_absent(tmp_path):
    rewards = [np.linspace(0, 1, 6), np.linspace(1, 0, 5)]
    path = labelled(tmp_path / "d.h5", rewards, success=[np.ones(6), np.zeros(5)])
    done = runner.invoke(app, ["evaluate", str(path), "--no-blank", "--json"])
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    for name in (
        "voc_mean",
        "voc_median",
        "voc_episodes",
        "voc_episodes_undefined",
        "voc_successful_mean",
        "voc_successful_median",
        "success_auroc_final",
        "success_auroc_max",
        "shuffled_voc_mean",
    ):
        assert name in payload
    assert payload["voc_mean"] == pytest.approx(0.0) and payload["voc_successful_mean"] == pytest.approx(1.0)
    assert payload["success_auroc_final"] == pytest.approx(1.0)  # final rewards 1 against 0
    assert payload["success_auroc_max"] == pytest.approx(0.5)  # both peak at 1: a tie counts one half
    assert payload["against"] is None and payload["pearson"] is None
    table = runner.invoke(app, ["evaluate", str(path), "--no-blank"], terminal_width=200)
    assert table.exit_code == 0 and "(no reference)" in table.output and "VOC" in table.output
    assert "note: no reference (rewards, reward, next.reward) in the data" in table.output
    assert "success AUROC" in table.output
    absent = runner.invoke(app, ["evaluate", str(path), "--no-blank", "--against", "rewards"], terminal_width=400)
    assert absent.exit_code == 2 and "--against rewards" in absent.output


@pytest.mark.slow
def test_a_lerobot_dataset_with_no_reward_column_gets_its_voc(tmp_path, tiny_model_dir):
    """The case the issue names: demonstrations with no environment reward still get VOC, from the table."""
    import pyarrow.parquet as pq

    case = table_layouts.build_lerobot(tmp_path, video=False)
    relabelled = runner.invoke(
        app, ["relabel", str(case.path), "--model", str(tiny_model_dir), "--image-key", case.image_key, "--goal", "red"]
    )
    assert relabelled.exit_code == 0, relabelled.output
    out = case.path.parent / f"{case.path.name}-vlmlabel"
    args = ["evaluate", str(out), "--image-key", case.image_key, "--no-blank"]
    table = runner.invoke(app, args, terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "(no reference)" in table.output and "VOC (Spearman of reward with step index" in table.output
    payload = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    rows = pq.read_table(sorted((out / "data").rglob("*.parquet"))).to_pandas().sort_values("index")
    expected = [scipy_voc(group["vlm_reward"].to_numpy(np.float64)) for _, group in rows.groupby("episode_index")]
    np.testing.assert_allclose([row["voc"] for row in payload["per_episode"]], expected, atol=1e-12)
    assert payload["voc_mean"] == pytest.approx(np.mean(expected)) and payload["against"] is None
