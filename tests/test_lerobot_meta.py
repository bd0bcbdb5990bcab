"""LeRobot metadata of the rewards: per-episode stats in meta/episodes, quantiles in stats.json, provenance in
info.json, in the format LeRobot v3.0 writes for its own features (so its edits keep them). The quantiles are
LeRobot's histogram estimates, pinned to hand-computed values in tests/test_lerobot_stats.py."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import table_layouts
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest
from vlmlabel.sources import Align

datasets.disable_progress_bars()

GOALS = ["grasp the cube", "an empty table"]
KEYS = ["vlm.progress_0", "vlm.progress_1"]
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STATS = ["min", "max", "mean", "std", "count", *QUANTILES]
EPISODES_FILE = Path("meta") / "episodes" / "chunk-000" / "file-000.parquet"


def check_against_column(got: dict[str, list], values: np.ndarray) -> None:
    """Min, max and count those of the values; mean and std theirs up to float32 arithmetic; quantiles in order
    between min and max (their values: tests/test_lerobot_stats.py)."""
    values = np.asarray(values, dtype=np.float32).astype(np.float64)
    assert got["count"] == [values.size] and isinstance(got["count"][0], int)
    assert got["min"] == [values.min()] and got["max"] == [values.max()]
    np.testing.assert_allclose(got["mean"], [values.mean()], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["std"], [values.std()], rtol=1e-4, atol=1e-6)
    quantiles = [got[k][0] for k in QUANTILES]
    assert values.min() - 1e-9 <= quantiles[0] and quantiles[-1] <= values.max() + 1e-9
    assert quantiles == sorted(quantiles)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lerobot_meta")
    case = table_layouts.build_lerobot(root, video=False)
    summary = relabel_file(
        RelabelRequest(
            source=case.path,
            goals=GOALS,
            model=str(tiny_model_dir),
            device="cpu",
            image_key="top",
            reward_key="vlm.progress",
        )
    )
    return case, summary.written_to


def written_rewards(dest: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(episode_index, reward) of every row, read back from the written data files."""
    table = pa.concat_tables(
        pq.read_table(p, columns=["episode_index", key]) for p in sorted((dest / "data").rglob("*.parquet"))
    )
    return table.column("episode_index").to_numpy(), table.column(key).to_numpy()


def test_episode_stats_describe_each_episode(labelled):
    _, dest = labelled
    meta = pq.read_table(dest / EPISODES_FILE)
    for key in KEYS:
        episode, reward = written_rewards(dest, key)
        for name in STATS:
            field = meta.schema.field(f"stats/{key}/{name}")
            assert field.type == pa.list_(pa.int64() if name == "count" else pa.float64())
        for row, e in enumerate(meta.column("episode_index").to_pylist()):
            mine = reward[episode == e]
            got = {name: meta.column(f"stats/{key}/{name}")[row].as_py() for name in STATS}
            assert got["count"] == [meta.column("length")[row].as_py()]
            assert all(len(got[name]) == 1 for name in STATS)
            check_against_column(got, mine)


def test_episode_meta_otherwise_unchanged(labelled):
    case, dest = labelled
    before = pq.read_table(case.path / EPISODES_FILE)
    after = pq.read_table(dest / EPISODES_FILE)
    added = [f"stats/{key}/{name}" for key in KEYS for name in STATS]
    assert after.column_names == before.column_names + added
    assert after.select(before.column_names).equals(before)
    assert after.schema.metadata == before.schema.metadata
    # The other meta files are carried over byte for byte.
    assert (dest / "meta" / "tasks.parquet").read_bytes() == (case.path / "meta" / "tasks.parquet").read_bytes()


def test_stats_json_quantiles_like_every_feature(labelled):
    case, dest = labelled
    stats = json.loads((dest / "meta" / "stats.json").read_text())
    source = json.loads((case.path / "meta" / "stats.json").read_text())
    assert {k: v for k, v in stats.items() if k not in KEYS} == source
    for key in KEYS:
        _, reward = written_rewards(dest, key)
        assert list(stats[key]) == STATS
        check_against_column(stats[key], reward)


def test_per_episode_stats_aggregate_to_stats_json(labelled):
    """What LeRobot's aggregate_stats rebuilds from meta/episodes (count-weighted mean, parallel variance, min,
    max, count-weighted quantiles) after an edit such as delete_episodes agrees with stats.json."""
    _, dest = labelled
    episodes = pd.read_parquet(dest / EPISODES_FILE)
    stats = json.loads((dest / "meta" / "stats.json").read_text())
    for key in KEYS:
        col = {name: np.stack(episodes[f"stats/{key}/{name}"].to_numpy()) for name in STATS}
        assert all(isinstance(v, np.ndarray) and v.shape == (len(episodes), 1) for v in col.values())
        counts = col["count"].astype(np.float64)
        total = counts.sum(axis=0)
        mean = (col["mean"] * counts).sum(axis=0) / total
        var = ((col["std"] ** 2 + (col["mean"] - mean) ** 2) * counts).sum(axis=0) / total
        np.testing.assert_allclose(mean, stats[key]["mean"], rtol=1e-9)
        # stats.json squares the episodes' float32 std in float32, as recompute_stats does; an edit reading them
        # back as float64 squares in float64: the two agree to float32 precision.
        np.testing.assert_allclose(np.sqrt(var), stats[key]["std"], rtol=1e-6)
        assert col["min"].min(axis=0).tolist() == stats[key]["min"]
        assert col["max"].max(axis=0).tolist() == stats[key]["max"]
        assert total.tolist() == stats[key]["count"]
        for name in QUANTILES:
            np.testing.assert_allclose(
                (col[name] * counts).sum(axis=0) / total, stats[key][name], rtol=1e-12, err_msg=name
            )


def test_info_json_records_provenance(labelled):
    case, dest = labelled
    info = json.loads((dest / "meta" / "info.json").read_text())
    source = case.extra["info"]
    assert {k: v for k, v in info.items() if k != "features"} == {k: v for k, v in source.items() if k != "features"}
    assert {k: v for k, v in info["features"].items() if k not in KEYS} == source["features"]
    for key, goal in zip(KEYS, GOALS, strict=True):
        feature = info["features"][key]
        assert {k: v for k, v in feature.items() if k != "info"} == {"dtype": "float32", "shape": [1], "names": None}
        provenance = feature["info"]
        assert provenance["goal"] == goal
        assert provenance["model"] and provenance["formula"]
        assert json.loads(provenance["reward_spec"])["goal"] == goal
        assert provenance["image_key"] == "observation.images.top"
        assert "result_id" not in provenance  # names one run: LeRobot's merge compares features
        assert all(v is None or isinstance(v, (str, int, float, bool)) for v in provenance.values())


def test_readers_still_read_everything(labelled):
    case, dest = labelled
    episodes_files = [str(p) for p in sorted((dest / "meta" / "episodes").rglob("*.parquet"))]
    loaded = datasets.load_dataset("parquet", data_files=episodes_files, split="train")
    assert len(loaded) == len(table_layouts.LENGTHS)
    assert loaded[0][f"stats/{KEYS[0]}/count"] == [table_layouts.LENGTHS[0]]
    # LeRobot's load_episodes keeps the columns that are not stats: the source's own.
    kept = [c for c in loaded.column_names if not c.startswith("stats/")]
    assert kept == pq.read_schema(case.path / EPISODES_FILE).names
    data_files = [str(p) for p in sorted((dest / "data").rglob("*.parquet"))]
    data = datasets.load_dataset("parquet", data_files=data_files, split="train")
    assert set(KEYS) <= set(data.column_names)


def test_relabelling_a_labelled_copy_replaces_its_stats(labelled, tmp_path, tiny_model_dir):
    _, dest = labelled
    summary = relabel_file(
        RelabelRequest(
            source=dest,
            goals=["a red block", "a robot arm"],
            model=str(tiny_model_dir),
            device="cpu",
            image_key="top",
            reward_key="vlm.progress",
            output=tmp_path / "again",
            overwrite=True,
        )
    )
    again = summary.written_to
    meta = pq.read_table(again / EPISODES_FILE)
    assert meta.column_names == pq.read_table(dest / EPISODES_FILE).column_names
    info = json.loads((again / "meta" / "info.json").read_text())
    assert info["features"][KEYS[0]]["info"]["goal"] == "a red block"
    episode, reward = written_rewards(again, KEYS[0])
    first = meta.column("episode_index")[0].as_py()
    assert meta.column(f"stats/{KEYS[0]}/mean")[0].as_py() == pytest.approx([reward[episode == first].mean()])


def test_lerobots_own_edits_drop_field_metadata_but_the_column_stays_ours(labelled, tmp_path, tiny_model_dir):
    """LeRobot's editors (delete/split/merge episodes) rewrite the data files without the columns' field
    metadata and keep info.json's features[key]["info"] (seen with lerobot 0.6.1, tools/clients): the reward
    must still count as vlmlabel's, for --overwrite and for evaluate."""
    import shutil

    from vlmlabel.sources import open_source

    _, dest = labelled
    edited = tmp_path / "edited"
    shutil.copytree(dest, edited)
    for path in (edited / "data").rglob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(
            table.replace_schema_metadata(None).cast(pa.schema([f.remove_metadata() for f in table.schema])), path
        )
    with open_source(str(edited), "top") as source:
        episode = source.episodes(Align.frame)[0]
        assert source.dataset_attrs(episode, KEYS[0])["goal"] == GOALS[0]
        assert KEYS[0] in source.reward_keys(episode) and source.dataset_attrs(episode, "frame_index") == {}
    again = relabel_file(
        RelabelRequest(
            source=edited,
            goals=["a red cube", "a blue cube"],
            model=str(tiny_model_dir),
            device="cpu",
            image_key="top",
            reward_key="vlm.progress",
            overwrite=True,
            output=tmp_path / "again",
        )
    )
    assert again.written_to == tmp_path / "again"
