"""`vlmlabel bench` in a tiny configuration: it runs all three paths and honours its JSON contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from vlmlabel.bench import BenchConfig, parse_batch_sizes, parse_frame_size, peak_tflops, run_bench
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError

CONTRACT = {
    "device": str,
    "model": str,
    "precision": str,
    "batch_size": int,
    "frames": int,
    "model_only_fps": float,
    "end_to_end_fps": float,
    "naive_fps": float,
    "ratio_vs_model_only": float,
    "ratio_vs_naive": float,
    "tflops": float,
    "peak_fraction": (float, type(None)),
    "peak_rss_mb": float,
    "peak_device_mb": (float, type(None)),
}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only cost on a shared CPU
    return subprocess.run(
        [sys.executable, "-m", "vlmlabel", "bench", *args], capture_output=True, text=True, env=env, timeout=600
    )


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_json_has_every_contract_key(tiny_model_dir):
    done = _run_cli(
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--frames",
        "20",
        "--batch-size",
        "8",
        "--frame-size",
        "40x48",
        "--repeats",
        "2",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is exactly one JSON object
    for key, kind in CONTRACT.items():
        assert isinstance(result[key], kind), (key, result[key])
    assert (result["device"], result["precision"], result["batch_size"], result["frames"]) == ("cpu", "fp32", 8, 20)
    for key in ("model_only_fps", "end_to_end_fps", "naive_fps", "tflops", "peak_rss_mb"):
        assert result[key] > 0, key
    assert result["ratio_vs_model_only"] == pytest.approx(result["end_to_end_fps"] / result["model_only_fps"])
    assert result["ratio_vs_naive"] == pytest.approx(result["end_to_end_fps"] / result["naive_fps"])
    assert result["peak_fraction"] is None and result["peak_device_mb"] is None  # no known GPU peak on a CPU
    assert all(len(seconds) == 2 for seconds in result["seconds"].values())
    # The end-to-end rewards equal the naive PIL script's within preprocessing rounding.
    assert result["max_abs_reward_diff_vs_naive"] < 2e-3
    assert result["random_weights"] is False


def test_bench_sweep_on_jpeg_frames(tiny_model_dir):
    config = BenchConfig(
        model=str(tiny_model_dir),
        device="cpu",
        frames=12,
        batch_sizes=[4, 8],
        frame_size=(36, 44),
        encoding="jpeg",
        repeats=1,
    )
    result = run_bench(config)
    assert [run["batch_size"] for run in result["sweep"]] == [4, 8]
    assert result["batch_size"] in (4, 8)
    assert result["frame_format"] == "encoded JPEG/PNG bytes"
    assert result["max_abs_reward_diff_vs_naive"] < 2e-3
    json.dumps(result)  # serialisable as it stands


def test_bench_on_a_source_file_limits_frames(tiny_model_dir, tmp_path):
    from tests import layouts

    layout_file = layouts.build_robomimic(tmp_path / "robomimic.h5")
    result = run_bench(
        BenchConfig(
            model=str(tiny_model_dir), device="cpu", frames=9, batch_sizes=[4], source=layout_file.path, repeats=1
        )
    )
    assert result["frames"] == 9  # spans two episodes of the file
    assert result["max_abs_reward_diff_vs_naive"] < 2e-3


def test_bench_refuses_a_bad_frame_size_in_one_line(tiny_model_dir):
    done = _run_cli("--model", str(tiny_model_dir), "--frame-size", "84", "--json")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "HEIGHTxWIDTH" in done.stderr


def test_option_parsing():
    assert parse_frame_size("84x96") == (84, 96)
    assert parse_batch_sizes("32") == [32] and parse_batch_sizes("16,32,64") == [16, 32, 64]
    for bad in ("0", "a,b", "", "-4"):
        with pytest.raises(VlmlabelError):
            parse_batch_sizes(bad)


@pytest.mark.parametrize(
    "name, card, peak",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA L40S", "L40S", 362.05),
        ("NVIDIA L4", "L4", 121.0),
        ("NVIDIA A10", "A10", 125.0),
        ("NVIDIA GeForce RTX 3060", None, None),
    ],
)
def test_peak_table_recognises_cards(monkeypatch, name, card, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0), "bf16") == (card, peak)


def test_no_peak_on_cpu():
    assert peak_tflops(torch.device("cpu"), "fp32") == (None, None)


def test_bench_with_random_weights_of_a_real_architecture():
    result = run_bench(
        BenchConfig(model="ViT-B-32", pretrained="random", device="cpu", frames=2, batch_sizes=[2], repeats=1)
    )
    assert result["random_weights"] is True and result["pretrained"] == "random"
    # ViT-B-32 is quoted at 4.4 GMACs (8.8 GFLOPs) per 224 px image.
    assert 8.0e9 < result["flops_per_image"] < 9.5e9


VLM_CONTRACT = {
    "scorer": str,
    "device": str,
    "model": str,
    "family": str,
    "precision": str,
    "frames": int,
    "episodes": int,
    "queries": int,
    "batch_size": int,
    "batches": int,
    "end_to_end_qps": float,
    "end_to_end_fps": float,
    "model_only_qps": float,
    "model_only_fps": float,
    "forward_only_qps": float,
    "naive_qps": float,
    "naive_fps": float,
    "ratio_vs_model_only": float,
    "ratio_vs_naive": float,
    "paired_ratio_vs_model_only": float,
    "paired_ratio_vs_naive": float,
    "tokens_per_query": dict,
    "queries_per_episode": dict,
    "definitions": dict,
    "max_abs_readout_diff_vs_naive": float,
    "peak_rss_mb": float,
    "environment": dict,
}


@pytest.mark.slow
@pytest.mark.subprocess
def test_bench_vlm_with_a_tiny_judge_reports_every_field():
    done = _run_cli(
        "--scorer",
        "vlm",
        "--tiny",
        "qwen2_vl",
        "--device",
        "cpu",
        "--frames",
        "10",
        "--episode-steps",
        "5",
        "--batch-size",
        "4",
        "--anchors",
        "3",
        "--repeats",
        "1",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is exactly one JSON object
    for key, kind in VLM_CONTRACT.items():
        assert isinstance(result[key], kind), (key, result[key])
    assert (result["scorer"], result["family"], result["tiny"], result["precision"]) == (
        "vlm",
        "qwen2_vl",
        "qwen2_vl",
        "fp32",
    )
    # 2 episodes of 5 steps, 3 anchors each: 6 queries in batches of 4 (4 + 2)
    assert (result["frames"], result["episodes"], result["queries"]) == (10, 2, 6)
    assert result["queries_per_episode"] == {"mean": 3.0, "min": 3, "max": 3}
    assert (result["batch_size"], result["batches"], result["anchors"]) == (4, 2, 3)
    for path in ("end_to_end", "model_only", "forward_only", "naive"):
        assert result[f"{path}_qps"] > 0 and len(result["seconds"][path]) == 1, path
        assert result[f"{path}_fps"] == pytest.approx(result[f"{path}_qps"] * 10 / 6), path  # steps vs queries
        assert path in result["definitions"]
    assert result["ratio_vs_model_only"] == pytest.approx(result["end_to_end_qps"] / result["model_only_qps"])
    assert result["ratio_vs_naive"] == pytest.approx(result["end_to_end_qps"] / result["naive_qps"])
    tokens = result["tokens_per_query"]
    assert 0 < tokens["min"] <= tokens["mean"] <= tokens["max"]
    # the batched readouts equal generate's, one query at a time (fp32)
    assert result["max_abs_readout_diff_vs_naive"] < 1e-5
    assert result["judge"]["context"] == "prefix" and result["environment"]["transformers"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--scorer", "vlm"), "--model FOLDER (a judge) or --tiny FAMILY"),
        (("--scorer", "vlm", "--tiny", "qwen2_vl", "--compile"), "--compile does not apply to bench --scorer vlm"),
        (("--scorer", "vlm", "--tiny", "qwen2_vl", "--batch-size", "2,4"), "takes one size"),
        (("--tiny", "qwen2_vl"), "--tiny does not apply to bench --scorer clip"),
        (("--anchors", "3"), "--context/--context-frames/--anchors does not apply to bench --scorer clip"),
    ],
)
def test_bench_refuses_options_of_the_other_scorer_in_one_line(args, message):
    done = CliRunner().invoke(app, ["bench", *args, "--device", "cpu", "--json"], prog_name="vlmlabel")
    assert done.exit_code == 2, done.output
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr, done.stderr
