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
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in table and table.count("| tiny-clip |") == 3
    assert not (tmp_path / "data").exists()  # the synthetic data is removed
