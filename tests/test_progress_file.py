"""`vlmlabel progress`: a written reward as the per-frame progress parquet LeRobot's RA-BC reads.

The oracle for the values is numpy's min-max of the reward as each backend's own reader gives it back; the
columns and metadata are those of lerobot 0.6.1's ``RABCWeights`` (``index``, ``episode_index``,
``progress_sparse``/``progress_dense``) and LeRobot main's frame-signal contract (``rewards/scoring/schema.py``):
int64 reserved columns, rows ordered by episode, ``index`` strictly increasing and ``index - frame_index``
constant per episode, format/version/provenance/descriptors/episodes in the parquet key-value metadata.
LeRobot's own ``RABCWeights`` reads the file in ``tools/clients/check_lerobot_rabc.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, Value
from typer.testing import CliRunner

from tests.layouts import make_frames
from tests.storage_backends import BACKENDS, Case
from vlmlabel.cli import app

runner = CliRunner()
GOAL = "a red cube on the table"
META = "lerobot.reward_scoring."

pytestmark = pytest.mark.usefixtures("one_thread")


def relabel(source: Path, model: Path, output: Path, *extra: str) -> Path:
    args = ["relabel", str(source), "--goal", GOAL, "--model", str(model), "--device", "cpu", "--output", str(output)]
    result = runner.invoke(app, args + list(extra), terminal_width=400)
    assert result.exit_code == 0, result.output
    return output


def progress(dest: Path, output: Path, *extra: str):
    return runner.invoke(app, ["progress", str(dest), "--output", str(output), *extra], terminal_width=400)


def said(result) -> str:
    """The output as one line (rich wraps it at the console's width)."""
    return " ".join(result.output.split())


def read(path: Path):
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return table, meta


def minmax(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def check_contract(table, meta: dict[str, str], column: str) -> None:
    """LeRobot main's frame-signal rules (schema.validate_frame_signal_table), written out here."""
    assert table.column_names == ["index", "episode_index", "frame_index", column]
    assert [str(table.schema.field(n).type) for n in table.column_names] == ["int64"] * 3 + ["float"]
    assert meta[META + "format"] == "lerobot.frame_signals" and meta[META + "schema_version"] == "1"
    descriptors = json.loads(meta[META + "descriptors"])
    assert list(descriptors) == [column]
    assert descriptors[column]["direction"] == "higher" and descriptors[column]["bounds"] == [0.0, 1.0]
    assert descriptors[column]["missing_values"] == "forbidden" and descriptors[column]["allow_nan"] is False
    assert json.loads(meta[META + "provenance"])["producer"] == "vlmlabel"
    index, episode, frame = (table[n].to_numpy() for n in ("index", "episode_index", "frame_index"))
    assert json.loads(meta[META + "episode_indices"]) == sorted(set(episode.tolist()))
    assert np.all(np.diff(index) > 0) and np.all(np.diff(episode) >= 0)
    for e in np.unique(episode):
        rows = episode == e
        assert np.all(np.diff(index[rows]) == 1)  # RABCWeights: index + chunk_size is chunk_size frames later
        assert len(np.unique(index[rows] - frame[rows])) == 1 and frame[rows].min() >= 0
    values = table[column].to_numpy()
    assert np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0


@pytest.fixture(params=sorted(BACKENDS))
def case(request, tmp_path) -> Case:
    root = tmp_path / request.param
    root.mkdir()
    return BACKENDS[request.param](root)


@pytest.mark.slow
def test_every_format_gives_per_episode_minmax_of_its_written_reward(case, tiny_model_dir, tmp_path):
    dest = relabel(case.source, tiny_model_dir, case.output("labelled"), "--image-key", case.image_key)
    out = tmp_path / "progress.parquet"
    result = progress(dest, out, "--image-key", case.image_key)
    assert result.exit_code == 0, result.output
    table, meta = read(out)
    check_contract(table, meta, "progress_sparse")
    written = np.asarray(case.read(dest, "vlm_reward"), np.float64)  # the backend's own reader, episode order
    bounds = np.cumsum([0, *case.steps])
    expected = [minmax(written[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    episode = table["episode_index"].to_numpy()
    got = table["progress_sparse"].to_numpy()
    assert len(got) == sum(case.steps) and len(np.unique(episode)) == len(case.steps)
    for position, e in enumerate(np.unique(episode)):  # the backends store episodes in episode order
        np.testing.assert_allclose(got[episode == e], expected[position], atol=1e-6)
        assert got[episode == e].min() == 0.0 and got[episode == e].max() == 1.0
    if dest.is_dir() or dest.suffix == ".parquet":  # the tables hold LeRobot's index: the file keeps it
        assert "dataset's own index" in said(result)
        np.testing.assert_array_equal(table["index"].to_numpy(), np.arange(sum(case.steps)))
    else:  # HDF5: the running row number over episodes in reading order
        assert "running row number" in said(result)
        np.testing.assert_array_equal(table["index"].to_numpy(), np.arange(sum(case.steps)))
    provenance = json.loads(meta[META + "provenance"])
    assert provenance["reward_key"] == "vlm_reward" and provenance["normalize"] == "episode-minmax"
    assert provenance["reward"]["goal"] == GOAL and provenance["reward"]["result_id"]


def flat_with_constant_episode(path: Path) -> Path:
    """Three episodes (4, 5, 3 steps); the second shows one frame throughout, so its reward is constant."""
    frames = make_frames(12, 16, 20, seed=3)
    frames[4:9] = frames[4]
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=frames)
        f.create_dataset("actions", data=np.zeros((12, 2), np.float32))
        f.create_dataset("terminals", data=np.isin(np.arange(12), [3, 8, 11]))
    return path


def test_a_constant_episode_is_zero_and_the_others_span_zero_to_one(tiny_model_dir, tmp_path):
    dest = relabel(
        flat_with_constant_episode(tmp_path / "data.h5"), tiny_model_dir, tmp_path / "out.h5", "--align", "frame"
    )
    out = tmp_path / "p.parquet"
    result = progress(dest, out, "--column", "progress_dense")
    assert result.exit_code == 0, result.output
    assert "1 with a constant reward" in said(result)
    table, meta = read(out)
    check_contract(table, meta, "progress_dense")
    episode, got = table["episode_index"].to_numpy(), table["progress_dense"].to_numpy()
    np.testing.assert_array_equal(np.bincount(episode), [4, 5, 3])
    assert np.all(got[episode == 1] == 0.0)
    for e in (0, 2):
        assert got[episode == e].min() == 0.0 and got[episode == e].max() == 1.0
    with h5py.File(dest, "r") as f:
        written = f["vlm_reward"][()].astype(np.float64)
    np.testing.assert_allclose(got[episode == 0], minmax(written[:4]), atol=1e-6)
    assert json.loads(meta[META + "descriptors"])["progress_dense"]["comparison_scope"] == "episode"


def test_dataset_minmax_and_none(tiny_model_dir, tmp_path):
    source = flat_with_constant_episode(tmp_path / "data.h5")
    dest = relabel(source, tiny_model_dir, tmp_path / "out.h5")
    with h5py.File(dest, "r") as f:
        written = f["vlm_reward"][()].astype(np.float64)
    out = tmp_path / "dataset.parquet"
    assert progress(dest, out, "--normalize", "dataset-minmax").exit_code == 0
    table, meta = read(out)
    check_contract(table, meta, "progress_sparse")
    np.testing.assert_allclose(table["progress_sparse"].to_numpy(), minmax(written), atol=1e-6)
    assert json.loads(meta[META + "descriptors"])["progress_sparse"]["comparison_scope"] == "dataset"
    # a reward already in [0, 1] (relabel's own --normalize minmax) is written as it is
    scaled = relabel(source, tiny_model_dir, tmp_path / "scaled.h5", "--normalize", "minmax")
    with h5py.File(scaled, "r") as f:
        scaled_values = f["vlm_reward"][()]
    out = tmp_path / "none.parquet"
    assert progress(scaled, out, "--normalize", "none").exit_code == 0
    table, meta = read(out)
    check_contract(table, meta, "progress_sparse")
    np.testing.assert_array_equal(table["progress_sparse"].to_numpy(), scaled_values.astype(np.float32))


def table_with_keys(path: Path, episode: list[int], index: list[int]) -> Path:
    """A parquet file of PNG frames with the given ``episode_index`` and ``index`` columns (frame_index counted)."""
    frame = [episode[:row].count(e) for row, e in enumerate(episode)]
    columns = {"image": list(make_frames(len(episode), 16, 20, seed=4)), "episode_index": episode}
    columns.update(frame_index=frame, index=index)
    features = Features({"image": Image(), **{k: Value("int64") for k in ("episode_index", "frame_index", "index")}})
    Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def test_a_table_keeps_its_own_index_and_episode_numbers(tiny_model_dir, tmp_path):
    source = table_with_keys(tmp_path / "t.parquet", [3] * 3 + [5] * 2 + [7] * 3, list(range(100, 108)))
    dest = relabel(source, tiny_model_dir, tmp_path / "out.parquet", "--align", "frame")
    out = tmp_path / "p.parquet"
    result = progress(dest, out)
    assert result.exit_code == 0, result.output
    table, meta = read(out)
    check_contract(table, meta, "progress_sparse")
    np.testing.assert_array_equal(table["index"].to_numpy(), np.arange(100, 108))
    np.testing.assert_array_equal(table["episode_index"].to_numpy(), [3, 3, 3, 5, 5, 7, 7, 7])
    np.testing.assert_array_equal(table["frame_index"].to_numpy(), [0, 1, 2, 0, 1, 0, 1, 2])
    assert json.loads(meta[META + "episode_indices"]) == [3, 5, 7]


# -- refusals: exit 2, one line, nothing written --------------------------------------------------------------


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _zscored(tmp_path: Path, model: Path) -> Path:
    return relabel(flat_with_constant_episode(tmp_path / "src.h5"), model, tmp_path / "z.h5", "--normalize", "episode")


def _parquet_folder(tmp_path: Path, model: Path) -> Path:
    return relabel(BACKENDS["parquet"](tmp_path).source, model, tmp_path / "labelled", "--image-key", "image")


def _interleaved(tmp_path: Path, model: Path) -> Path:
    source = table_with_keys(tmp_path / "t.parquet", [0, 0, 1, 1, 0, 0], list(range(6)))
    return relabel(source, model, tmp_path / "out.parquet", "--align", "frame")


def _index_gap(tmp_path: Path, model: Path) -> Path:
    source = table_with_keys(tmp_path / "t.parquet", [0, 0, 0, 1, 1], [0, 1, 3, 4, 5])
    return relabel(source, model, tmp_path / "out.parquet", "--align", "frame")


# name: (make the labelled dataset, the --output (relative to tmp_path, {dest} filled in), extra args, words)
REFUSED = {
    "unknown reward key": (
        _zscored,
        "p.parquet",
        ["--reward-key", "nope"],
        ["unknown reward key 'nope'", "vlm_reward"],
    ),
    "output named as the labelled HDF5 file": (_zscored, "z.h5", [], ["--output", "must end in .parquet"]),
    "output exists without --overwrite": (_zscored, "old.parquet", [], ["already exists", "--overwrite"]),
    "output not .parquet": (_zscored, "p.csv", [], ["must end in .parquet"]),
    "output folder missing": (_zscored, "nowhere/p.parquet", [], ["does not exist", "create it first"]),
    "reward outside [0, 1] with --normalize none": (
        _zscored,
        "p.parquet",
        ["--normalize", "none"],
        ["outside [0, 1]", "--normalize episode-minmax"],
    ),
    "an episode in two runs of rows": (_interleaved, "p.parquet", [], ["episode 0", "not one consecutive run"]),
    "index not consecutive in an episode": (_index_gap, "p.parquet", [], ["not consecutive within episode 0"]),
    "output inside a parquet dataset folder": (
        _parquet_folder,
        "labelled/progress.parquet",
        ["--image-key", "image"],
        ["inside the dataset folder", "read as part of the dataset"],
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_in_one_line_and_nothing_written(name, tiny_model_dir, tmp_path):
    make, output, extra, words = REFUSED[name]
    dest = make(tmp_path, tiny_model_dir)
    (tmp_path / "old.parquet").write_bytes(b"keep me")
    before = digest(tmp_path)
    result = progress(dest, tmp_path / output, *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert digest(tmp_path) == before  # nothing replaced, nothing left beside it


def test_a_parquet_source_file_is_not_replaced(tiny_model_dir, tmp_path):
    labelled = relabel(
        BACKENDS["parquet"](tmp_path).source, tiny_model_dir, tmp_path / "labelled", "--image-key", "image"
    )
    data = sorted(labelled.rglob("*.parquet"))[0]
    single = tmp_path / "single.parquet"
    single.write_bytes(data.read_bytes())
    before = digest(tmp_path)
    result = progress(single, single, "--overwrite", "--image-key", "image")
    assert result.exit_code == 2 and "is a file of SOURCE itself" in said(result), result.output
    assert digest(tmp_path) == before
