"""Write reward columns into a new LeRobot dataset folder that LeRobot's loader still reads.

Every data parquet file is rewritten with the float32 column(s) appended; ``meta/info.json``
declares each as a feature (dtype float32, shape [1]) and ``meta/stats.json`` gets its statistics.
Videos and the rest of ``meta`` are hard-linked (copied across file systems).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmlabel.sources.lerobot import LeRobotSource
from vlmlabel.writers.tables import RewardColumn, rewrite_all, link_tree, staged

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


def write_lerobot(source: LeRobotSource, dest: Path, columns: list[RewardColumn]) -> Path:
    root = source.folder
    files = list(source.shards.files)
    with staged(dest) as tmp:
        link_tree(root, tmp, {f.resolve() for f in files} | {(root / INFO).resolve(), (root / STATS).resolve()})
        rewrite_all(source, [tmp / f.relative_to(root) for f in files], columns)
        info = json.loads((root / INFO).read_text())
        features = info.setdefault("features", {})
        for column in columns:
            features[column.name] = feature_entry(info)
        (tmp / INFO).write_text(json.dumps(info, indent=4))
        if (root / STATS).is_file():
            stats = json.loads((root / STATS).read_text())
            stats.update({c.name: column_stats(c.values) for c in columns})
            (tmp / STATS).write_text(json.dumps(stats, indent=4))
    return dest
