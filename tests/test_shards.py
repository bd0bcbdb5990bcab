"""Shards of whole episodes, SLURM array defaults, and `vlmlabel merge`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.cluster_files import EPISODE_LENGTHS, make_dataset, read_attrs, read_rewards
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError
from vlmlabel.events import Events
from vlmlabel.formulation import RewardConfig
from vlmlabel.rewards import Normalize, Shaping
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.merge import merge_shards
from vlmlabel.run.request import RelabelRequest, ShardSummary
from vlmlabel.run.shards import ArrayNumbering, ShardSpec, SlurmArrayTask, plan, shard_from_options, work_dir


def _request(source: Path, model_dir: Path, **overrides) -> RelabelRequest:
    fields = dict(
        source=source, goals=["a red block", "an open drawer"], model=str(model_dir), device="cpu", batch_size=4
    )
    fields.update(overrides)
    return RelabelRequest(**fields)


def test_plan_is_contiguous_balanced_and_deterministic():
    steps = list(EPISODE_LENGTHS)
    shards = plan(steps, 3)
    assert shards == plan(steps, 3)
    assert shards[0][0] == 0 and shards[-1][1] == len(steps)
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))  # every episode exactly once, in order
    sizes = [sum(steps[lo:hi]) for lo, hi in shards]
    assert max(sizes) - min(sizes) <= max(steps)
    assert sizes == [52, 52, 47]
    assert plan([10, 10], 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]  # more shards than episodes: some are empty


def test_shard_defaults_from_slurm_array(tmp_path):
    assert SlurmArrayTask.from_env({}) is None
    slurm = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    shard = SlurmArrayTask.from_env(slurm).shard(tmp_path / "work")
    assert (shard.index, shard.count) == (2, 4) and shard.origin.startswith("SLURM array task 7 (")
    assert shard.numbering == ArrayNumbering(5, 1, 4)
    stepped = {
        "SLURM_ARRAY_TASK_COUNT": "3",
        "SLURM_ARRAY_TASK_ID": "20",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_STEP": "10",
        "SLURM_ARRAY_TASK_MAX": "20",
    }
    assert SlurmArrayTask.from_env(stepped).shard(tmp_path / "work").index == 2
    assert shard_from_options(1, 0) is None  # one shard: the whole file
    assert shard_from_options(1, None) is None
    assert shard_from_options(3, 1) == ShardSpec(1, 3, "--num-shards 3 --shard-index 1")
    with pytest.raises(VlmlabelError, match="needs --shard-index"):
        shard_from_options(3, None)
    with pytest.raises(VlmlabelError, match="needs --num-shards"):
        shard_from_options(None, 2)
    with pytest.raises(VlmlabelError, match=r"0\.\.2"):
        shard_from_options(3, 3)


SHORT = (7, 11, 3, 9, 5, 8, 6)  # shard edges fall inside batches of 4


def test_shards_then_merge_equal_a_single_run(tmp_path, tiny_model_dir):
    single = make_dataset(tmp_path / "single.h5", SHORT)
    relabel_file(_request(single, tiny_model_dir))
    sharded = make_dataset(tmp_path / "sharded.h5", SHORT)
    digest = hashlib.sha256(sharded.read_bytes()).hexdigest()
    for index in (2, 0, 1):
        summary = relabel_file(_request(sharded, tiny_model_dir, shard=ShardSpec(index, 3)))
        assert isinstance(summary, ShardSummary) and summary.path.exists()
    assert hashlib.sha256(sharded.read_bytes()).hexdigest() == digest  # no shard wrote the shared file
    merged = merge_shards(sharded, "vlm_reward")
    assert merged.shards == 3 and merged.frames == sum(SHORT)
    for key in ("vlm_reward_0", "vlm_reward_1"):
        expected, got = read_rewards(single, key), read_rewards(sharded, key)
        assert got.keys() == expected.keys() and len(got) == len(SHORT)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])  # bit for bit
        assert read_attrs(sharded, key) == read_attrs(single, key)
    assert not work_dir(sharded, "vlm_reward").exists()


def test_merge_refuses_missing_and_mismatched_shards(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", lengths=(6, 9, 5, 8))
    out = tmp_path / "out.h5"
    runner = CliRunner()
    for index in (0, 2):
        relabel_file(_request(source, tiny_model_dir, output=out, shard=ShardSpec(index, 3)))
    result = runner.invoke(app, ["merge", str(source), "--output", str(out)])
    assert result.exit_code == 2
    assert "missing shard(s) 1 of 3" in result.output and "--shard-index 1 " in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()
    # A requeued shard with the same options is not recomputed; one with other options replaces its result.
    notes: list[str] = []
    again = relabel_file(
        _request(source, tiny_model_dir, output=out, shard=ShardSpec(2, 3)), events=Events(on_note=notes.append)
    )
    assert again.already_done and any("already done" in n for n in notes)
    relabel_file(_request(source, tiny_model_dir, output=out, shard=ShardSpec(1, 3), goals=["a", "b"]))
    with pytest.raises(VlmlabelError, match=r"shard 1 was made with other options than shard 0 \(goals.* differ\)"):
        merge_shards(source, "vlm_reward", out)
    relabel_file(_request(source, tiny_model_dir, output=out, shard=ShardSpec(1, 3)))
    with h5py.File(source, "r+") as f:  # the frames changed after the shards ran
        f["data/demo_1/obs/agentview_image"][0] = 255 - f["data/demo_1/obs/agentview_image"][0]
    with pytest.raises(VlmlabelError, match="other frames"):
        merge_shards(source, "vlm_reward", out)
    assert not out.exists()


def test_slurm_array_defaults_through_the_cli(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", lengths=(6, 9, 5))
    runner = CliRunner()
    base = [
        "relabel",
        str(source),
        "-g",
        "a red block",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--quiet",
    ]
    for task in ("1", "2"):  # --array=1-2
        result = runner.invoke(
            app, base, env={"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": "1"}
        )
        assert result.exit_code == 0, result.output
        assert f"SLURM array task {task} (SLURM_ARRAY_TASK_ID={task}" in result.output
        assert f"scoring shard {int(task) - 1} of 2" in result.output
    assert sorted(p.name for p in work_dir(source, "vlm_reward").iterdir()) == ["shard-0-of-2.npz", "shard-1-of-2.npz"]
    result = runner.invoke(app, ["merge", str(source)])
    assert result.exit_code == 0, result.output
    assert set(read_rewards(source)) == {"demo_0", "demo_1", "demo_2"}


def test_merge_applies_dataset_normalisation_and_shaping_like_a_single_run(tmp_path, tiny_model_dir):
    formulation = RewardConfig(goals=["a red block"], normalize=Normalize.dataset, shaping=Shaping.delta, gamma=0.9)
    single = make_dataset(tmp_path / "single.h5", SHORT)
    relabel_file(_request(single, tiny_model_dir, goals=["a red block"], formulation=formulation))
    sharded = make_dataset(tmp_path / "sharded.h5", SHORT)
    for index in (0, 1):
        relabel_file(
            _request(sharded, tiny_model_dir, goals=["a red block"], formulation=formulation, shard=ShardSpec(index, 2))
        )
    merge_shards(sharded, "vlm_reward")
    for key in ("vlm_reward", "vlm_reward_raw"):
        expected, got = read_rewards(single, key), read_rewards(sharded, key)
        assert len(got) == len(SHORT)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
        assert read_attrs(sharded, key) == read_attrs(single, key)
