"""tools/identical.py, the bit-identity check between revisions: its digests repeat exactly from run to run,
and any change to one written value, or to how a run ends, is reported."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tools import identical

NAME = "robomimic-inplace-cosine-next"


@pytest.mark.slow
@pytest.mark.subprocess
def test_digests_repeat_and_one_ulp_changes_them(tmp_path):
    runs = {NAME: identical.RUNS[NAME]}
    first = identical.digest_tree(identical.ROOT, tmp_path / "a", runs, episodes=2)
    second = identical.digest_tree(identical.ROOT, tmp_path / "b", runs, episodes=2)
    lengths = identical.read_sample(identical.SAMPLE, 2).lengths
    record = first["runs"][NAME]
    assert record["exit"] == 0, record
    assert record["columns"]["vlm_reward"]["shape"] == [sum(lengths)]
    assert record["columns"]["vlm_reward"]["dtype"] == "float32"
    assert identical.compare(first, second) == []

    written = tmp_path / "b" / "runs" / NAME / "robomimic.h5"
    with h5py.File(written, "r+") as handle:
        values = handle["data/demo_1/vlm_reward"][()]
        values[3] = np.nextafter(values[3], np.float32(np.inf))
        handle["data/demo_1/vlm_reward"][...] = values
    changed = {**second, "runs": {NAME: {**second["runs"][NAME], "columns": identical.column_digests(written)}}}
    differences = identical.compare(first, changed)
    assert len(differences) == 1
    assert differences[0].startswith(f"{NAME}: vlm_reward:")


def test_compare_reports_missing_runs_columns_and_refusals():
    column = {"dtype": "float32", "shape": [3], "sha256": "0" * 64}
    before = {"runs": {"a": {"exit": 0, "columns": {"r": column}}, "b": {"exit": 0, "columns": {}}}}
    after = {
        "runs": {
            "a": {"exit": 0, "columns": {"r": {**column, "dtype": "float64"}, "r_raw": column}},
            "b": {"exit": 2, "error": "error: refused"},
            "c": {"exit": 0, "columns": {}},
        }
    }
    assert identical.compare(before, after) == [
        "a: r: {'dtype': 'float32', 'shape': [3], 'sha256': '" + "0" * 64 + "'} -> "
        "{'dtype': 'float64', 'shape': [3], 'sha256': '" + "0" * 64 + "'}",
        f"a: r_raw: None -> {column}",
        "b: exit 0 '' -> 2 'error: refused'",
        "c: only in after",
    ]
    assert identical.compare(before, before) == []
