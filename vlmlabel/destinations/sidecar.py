"""Rewards of a streamed dataset as a parquet sidecar keyed by (episode_index, frame_index, index).

The sidecar has one row per source row, in stream order, with whichever of the key columns the
source has (a ``row`` number when it has none) and the reward columns with their provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlabel.destinations.base import RewardColumn
from vlmlabel.destinations.tables import HubCopy, reward_schema
from vlmlabel.files import atomic
from vlmlabel.sources.base import PARQUET_SUFFIX
from vlmlabel.sources.tables import TableSource

SIDECAR_KEYS = ("episode_index", "frame_index", "index")


class SidecarDestination(HubCopy):
    """``./NAME-vlmlabel.parquet``: the keys and the rewards, nothing of the stream itself."""

    suffix = PARQUET_SUFFIX

    @staticmethod
    def output_suffixes(source: TableSource) -> tuple[str, ...]:
        return (PARQUET_SUFFIX,)

    def targets(self, root: Path) -> list[Path]:
        return [root]

    def carried(self) -> dict[str, dict[str, Any]]:
        """Nothing: the sidecar holds the keys and this run's rewards only."""
        return {}

    def write(self, columns: list[RewardColumn], overwrite: bool, dropped: list[str]) -> Path:
        keys = self.source.index_columns(SIDECAR_KEYS) or {"row": np.arange(self.source.rows, dtype=np.int64)}
        key_arrays = [pa.array(values) for values in keys.values()]
        base = pa.schema([pa.field(name, array.type) for name, array in zip(keys, key_arrays, strict=True)])
        schema = reward_schema(base, columns)
        arrays = key_arrays + [pa.array(c.flat(), type=pa.float32()) for c in columns]
        with atomic.staged(self.path) as tmp:
            pq.write_table(pa.Table.from_arrays(arrays, schema=schema), tmp)
        return self.path
