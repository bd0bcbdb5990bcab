"""torchrun: two CPU ranks (gloo) each score a shard; rank 0 merges into the same file as a single run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.cluster_files import ROOT, env, make_dataset, read_attrs, read_rewards
from vlmlabel.run.distributed import TorchrunEnv, rank_device, torchrun_env
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest
from vlmlabel.run.shards import work_dir

pytestmark = pytest.mark.subprocess


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_env_detection():
    base = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert torchrun_env(base) == TorchrunEnv(1, 2, 1)
    assert torchrun_env({**base, "WORLD_SIZE": "1"}) is None  # a single process is an ordinary run
    assert torchrun_env({k: v for k, v in base.items() if k != "MASTER_ADDR"}) is None
    assert rank_device("cpu", 1) == "cpu"


def test_torchrun_two_cpu_ranks_equal_a_single_run(tmp_path, tiny_model_dir):
    lengths = (7, 11, 3, 9, 5, 8, 6)  # the two shards meet inside a batch of 4
    single = make_dataset(tmp_path / "single.h5", lengths)
    relabel_file(
        RelabelRequest(source=single, goals=["a red block"], model=str(tiny_model_dir), device="cpu", batch_size=4)
    )
    source = make_dataset(tmp_path / "data.h5", lengths)
    out = tmp_path / "out.h5"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "vlmlabel",
        "relabel",
        str(source),
        "--goal",
        "a red block",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--output",
        str(out),
    ]
    done = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 shards merged" in done.stdout
    expected, got = read_rewards(single), read_rewards(out)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert read_attrs(out) == read_attrs(single)
    assert not work_dir(out, "vlm_reward").exists()
    assert read_rewards(source) == {}  # the source itself untouched: rewards went to --output


def test_torchrun_rank_failure_is_reported_and_nothing_is_written(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", lengths=(6, 9, 5))
    out = tmp_path / "out.h5"
    # Shard 1 looks taken by a run on another node: rank 1 fails, rank 0 must not merge.
    lock = work_dir(out, "vlm_reward") / "shard-1-of-2.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 77, "host": "node-elsewhere", "started": "now", "command": "vlmlabel"}))
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "vlmlabel",
        "relabel",
        str(source),
        "--goal",
        "a red block",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--output",
        str(out),
        "--quiet",
    ]
    done = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "error: rank 1 failed: shard-1-of-2" in done.stderr and "PID 77 on node-elsewhere" in done.stderr
    assert not out.exists()
