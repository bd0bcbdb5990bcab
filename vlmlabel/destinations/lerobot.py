"""Rewards as new columns of a copy of a LeRobot dataset folder that LeRobot's loader still reads.

Every data parquet file is rewritten with the float32 column(s) appended; ``meta/info.json``
declares each as a feature (dtype float32, shape [1]) and ``meta/stats.json`` gets its statistics.
Videos and the rest of ``meta`` are carried over as copy-on-write clones or copies (hard links on request).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmlabel.destinations import atomic
from vlmlabel.destinations.base import RewardColumn
from vlmlabel.destinations.tables import TableCopy, carry_tree
from vlmlabel.errors import OutputError
from vlmlabel.sources.lerobot import OBSERVATION_PREFIX, LeRobotSource

INFO = Path("meta") / "info.json"
STATS = Path("meta") / "stats.json"


def feature_entry(info: dict) -> dict:
    """A scalar float32 feature, shaped like LeRobot's own scalar features (with fps where they have it)."""
    entry = {"dtype": "float32", "shape": [1], "names": None}
    if any("fps" in f for f in (info.get("features") or {}).values() if f.get("dtype") != "video"):
        entry["fps"] = info.get("fps")
    return entry


def column_stats(values: np.ndarray) -> dict:
    values = values.astype(np.float64)
    return {"min": [float(values.min())], "max": [float(values.max())], "mean": [float(values.mean())],
            "std": [float(values.std())], "count": [int(values.size)]}


class LeRobotDestination(TableCopy):
    """A new LeRobot folder ``SOURCE-vlmlabel``: data files rewritten, features and stats declared."""

    source: LeRobotSource

    def check(self, names: list[str], overwrite: bool) -> None:
        reserved = [n for n in names if n.startswith(OBSERVATION_PREFIX)]
        if reserved:
            raise OutputError(f"--reward-key {reserved[0]!r}: LeRobot reserves {OBSERVATION_PREFIX}* for "
                              "observations; choose another --reward-key")
        super().check(names, overwrite)

    def targets(self, root: Path) -> list[Path]:
        return [root / f.relative_to(self.source.folder) for f in self.files.paths]

    def write(self, columns: list[RewardColumn], overwrite: bool) -> Path:
        root = self.source.folder
        skip = {f.resolve() for f in self.files.paths} | {(root / INFO).resolve(), (root / STATS).resolve()}
        with atomic.staged(self.path) as tmp:
            carry_tree(root, tmp, skip, self.link)
            self.rewrite_all(tmp, columns)
            info = json.loads((root / INFO).read_text())
            features = info.setdefault("features", {})
            for column in columns:
                features[column.name] = feature_entry(info)
            (tmp / INFO).write_text(json.dumps(info, indent=4))
            if (root / STATS).is_file():
                stats = json.loads((root / STATS).read_text())
                stats.update({c.name: column_stats(c.flat()) for c in columns})
                (tmp / STATS).write_text(json.dumps(stats, indent=4))
        return self.path
