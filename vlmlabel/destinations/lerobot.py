"""Rewards as new columns of a copy of a LeRobot dataset folder that LeRobot's loader and tools keep intact.

Every data parquet file is rewritten with the float32 column(s) appended; ``meta/info.json``
declares each as a feature (dtype float32, shape [1], its provenance under ``info``), ``meta/stats.json`` gets
its statistics and every ``meta/episodes`` parquet file its per-episode ``stats/<key>/<stat>`` columns, as
LeRobot v3.0 keeps them for every feature (``compute_stats.get_feature_stats``: min, max, mean, std, count and
the quantiles q01 q10 q50 q90 q99; flattened by ``flatten_dict({"stats": ...})``). LeRobot's edits
(``dataset_tools.delete_episodes``/``split_dataset``, ``aggregate``) rebuild ``stats.json`` from those columns,
so a reward without them would lose its statistics there. Both are computed by LeRobot's own algorithm
(``lerobot_stats``: histogram quantiles per episode, count-weighted across episodes), so that ``recompute_stats``
and those edits give back the same numbers. Videos and the rest of ``meta`` are carried over as copy-on-write
clones or copies (hard links on request).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlabel.destinations.base import RewardColumn
from vlmlabel.destinations.lerobot_stats import STAT_NAMES, Stats, aggregate, episode_stats
from vlmlabel.destinations.tables import TableCopy, carry_tree
from vlmlabel.errors import OutputError
from vlmlabel.files import atomic
from vlmlabel.files.provenance import RESULT_ATTR
from vlmlabel.sources.base import Episode
from vlmlabel.sources.lerobot import OBSERVATION_PREFIX, LeRobotSource

INFO = Path("meta") / "info.json"
STATS = Path("meta") / "stats.json"
EPISODES = Path("meta") / "episodes"
# Attributes that name one run over one dataset, not what the reward is: kept out of info.json, where LeRobot's
# aggregate compares features (``features_equal_for_merge``) and would refuse to merge two labelled datasets.
RUN_ONLY_ATTRS = (RESULT_ATTR, "embeddings")


def _json_value(value: object) -> object:
    if isinstance(value, np.generic):
        value = value.item()
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def provenance(attrs: dict) -> dict:
    """How the reward was made (goal, model, formula, ...), as plain JSON values for ``features[key]["info"]``."""
    return {k: _json_value(v) for k, v in attrs.items() if k not in RUN_ONLY_ATTRS}


def feature_entry(info: dict, attrs: dict | None = None) -> dict:
    """A scalar float32 feature, shaped like LeRobot's own scalar features (with fps where they have it), its
    provenance under ``info`` (the key LeRobot keeps per feature and copies through its edits)."""
    entry: dict = {"dtype": "float32", "shape": [1], "names": None}
    if any("fps" in f for f in (info.get("features") or {}).values() if f.get("dtype") != "video"):
        entry["fps"] = info.get("fps")
    if attrs:
        entry["info"] = provenance(attrs)
    return entry


def episode_values(column: RewardColumn, episodes: list[Episode]) -> dict[int, np.ndarray]:
    """A column's rewards per LeRobot episode_index (runs of one episode joined), {} when episodes are not named."""
    found: dict[int, list[np.ndarray]] = {}
    for episode, values in zip(episodes, column.values, strict=True):
        prefix, _, number = episode.key.partition(" ")
        if prefix != "episode" or not number.lstrip("-").isdigit():
            return {}
        found.setdefault(int(number), []).append(np.asarray(values, dtype=np.float32))
    return {e: np.concatenate(parts) for e, parts in found.items()}


def per_episode_stats(column: RewardColumn, episodes: list[Episode]) -> dict[int, Stats]:
    """A column's statistics per LeRobot episode_index ({} when episodes are not named)."""
    return {e: episode_stats(values) for e, values in sorted(episode_values(column, episodes).items())}


def dataset_stats(column: RewardColumn, per_episode: dict[int, Stats]) -> Stats:
    """The column's ``stats.json`` entry: its episodes' statistics aggregated (the column as one episode when
    its episodes are not named)."""
    return aggregate(list(per_episode.values())) if per_episode else episode_stats(column.flat())


def episode_stats_table(table: pa.Table, stats: dict[str, dict[int, Stats]], dropped: list[str]) -> pa.Table | None:
    """``table`` (one meta/episodes file) without the statistics of the columns ``dropped`` and with
    ``stats/<key>/<stat>`` columns per reward, from ``stats`` (reward -> episode_index -> statistics), typed as
    LeRobot writes them (list<double>, count list<int64>); when some row's episode has no rewards, without the
    dropped statistics only, and None when that leaves it as it is."""
    gone = [n for n in table.column_names if any(n.startswith(f"stats/{name}/") for name in dropped)]
    table = trimmed = table.drop_columns(gone)
    if "episode_index" not in table.column_names:
        return trimmed if gone else None
    rows = table.column("episode_index").to_pylist()
    for name, per_episode in stats.items():
        if not rows or any(e not in per_episode for e in rows):
            return trimmed if gone else None
        prefix = f"stats/{name}/"
        table = table.drop_columns([n for n in table.column_names if n.startswith(prefix)])
        for stat in STAT_NAMES:
            kind = pa.int64() if stat == "count" else pa.float64()
            table = table.append_column(
                pa.field(prefix + stat, pa.list_(kind)),
                pa.array([per_episode[e][stat] for e in rows], type=pa.list_(kind)),
            )
    return table


class LeRobotDestination(TableCopy):
    """A new LeRobot folder ``SOURCE-vlmlabel``: data files rewritten, features and stats declared."""

    source: LeRobotSource

    def check(self, names: list[str], overwrite: bool) -> None:
        reserved = [n for n in names if n.startswith(OBSERVATION_PREFIX)]
        if reserved:
            raise OutputError(
                f"--reward-key {reserved[0]!r}: LeRobot reserves {OBSERVATION_PREFIX}* for "
                "observations; choose another --reward-key"
            )
        super().check(names, overwrite)

    def targets(self, root: Path) -> list[Path]:
        return [root / f.relative_to(self.source.folder) for f in self.files.paths]

    def episode_files(self, stats: dict[str, dict[int, Stats]], dropped: list[str]) -> dict[Path, pa.Table]:
        """The meta/episodes parquet files (v3.0) with the rewards' per-episode statistics added (and those of the
        columns ``dropped`` removed)."""
        rewritten = {}
        for path in sorted((self.source.folder / EPISODES).rglob("*.parquet")):
            table = episode_stats_table(pq.read_table(path), stats, dropped)
            if table is not None:
                rewritten[path] = table
        return rewritten

    def write(self, columns: list[RewardColumn], overwrite: bool, dropped: list[str]) -> Path:
        """The copy, with ``dropped`` gone from the data files, the features, stats.json and the episodes' stats."""
        root = self.source.folder
        stats_by_episode = {c.name: per_episode_stats(c, self.episodes) for c in columns}
        episode_files = self.episode_files(stats_by_episode, dropped)
        skip = (
            {f.resolve() for f in self.files.paths}
            | {(root / INFO).resolve(), (root / STATS).resolve()}
            | {p.resolve() for p in episode_files}
        )
        with atomic.staged(self.path) as tmp:
            carry_tree(root, tmp, skip, self.link)
            self.rewrite_all(tmp, columns, dropped)
            for path, table in episode_files.items():
                target = tmp / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, target, compression=_compression(path))
                atomic.fsync(target)
            info = json.loads((root / INFO).read_text())
            features = info.setdefault("features", {})
            for name in dropped:
                features.pop(name, None)
            for column in columns:
                features[column.name] = feature_entry(info, column.attrs)
            (tmp / INFO).write_text(json.dumps(info, indent=4))
            if (root / STATS).is_file():
                stats = json.loads((root / STATS).read_text())
                for name in dropped:
                    stats.pop(name, None)
                stats.update({c.name: dataset_stats(c, stats_by_episode[c.name]) for c in columns})
                (tmp / STATS).write_text(json.dumps(stats, indent=4))
        return self.path


def _compression(path: Path) -> str:
    """The codec a parquet file was written with (snappy when it has no columns to tell)."""
    meta = pq.ParquetFile(path).metadata
    if not meta.num_row_groups or not meta.num_columns:
        return "snappy"
    codec = meta.row_group(0).column(0).compression.lower()
    return "none" if codec == "uncompressed" else codec
