"""benchmarks/gpu_check.sh cannot rot: its dry run (tiny model, tiny data, CPU) goes through every step."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_writes_the_json_and_the_table(tmp_path):
    done = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["command"] == f"benchmarks/gpu_check.sh --dry-run --out {tmp_path}"
    assert report["tests"]["ran"] and report["tests"]["failures"] == report["tests"]["errors"] == 0
    assert {"torch", "open_clip", "gpu", "nvidia_smi"} <= set(report["environment"])
    assert [run["source"] for run in report["benches"]] == ["raw HDF5", "JPEG HDF5", "LeRobot video"]
    for run in report["benches"]:
        assert run["command"].startswith("vlmlabel bench ") and run["result"]["precision"] == "bf16"
        assert run["result"]["model_only_fps"] > 0 and run["result"]["naive_fps"] > 0
    [vlm] = report["vlm_benches"]  # the VLM judge's bench, on the dry run's tiny judge
    assert vlm["command"].startswith("vlmlabel bench --scorer vlm --tiny qwen2_vl ") and vlm["error"] == ""
    assert vlm["result"]["end_to_end_qps"] > 0 and vlm["result"]["naive_qps"] > 0
    assert vlm["result"]["tokens_per_query"]["mean"] > 0 and vlm["result"]["queries_per_episode"]["mean"] == 6
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in table and table.count("| tiny-clip |") == 3
    assert table.count("| tiny qwen2_vl |") == 1 and "targets met" in table
    assert not (tmp_path / "data").exists()  # the synthetic data is removed


def test_gpu_check_scripts_parse():
    for script in ("gpu_check.sh", "build_wheels.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_the_full_size_judge_has_qwen3_vl_2b_parameters(tiny_vlm):
    """The GPU bench's judge (benchmarks/full_size_vlm.py) counted on the meta device: about 2.13 B parameters,
    the published size of Qwen3-VL-2B, with the tiny tokenizer's special tokens and the real vocabulary."""
    from benchmarks.full_size_vlm import PARAMETERS, VOCAB_SIZE, full_size_config, parameter_count

    tiny = json.loads((tiny_vlm("qwen3_vl") / "config.json").read_text())
    config = full_size_config(tiny)
    assert parameter_count(config) == pytest.approx(PARAMETERS, rel=0.01)
    assert config.text_config.vocab_size == VOCAB_SIZE and config.video_token_id == tiny["video_token_id"]
    assert (config.vision_config.patch_size, config.text_config.num_hidden_layers) == (16, 28)
