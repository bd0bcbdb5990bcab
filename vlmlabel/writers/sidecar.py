"""Rewards of a streamed dataset as a parquet sidecar keyed by (episode_index, frame_index, index).

The sidecar has one row per source row, in stream order, with whichever of the key columns the
source has (a ``row`` number when it has none) and the reward columns with their provenance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlabel.sources.tables import TableSource
from vlmlabel.fsutil import fsync
from vlmlabel.writers.tables import RewardColumn, reward_schema, staged

SIDECAR_KEYS = ("episode_index", "frame_index", "index")


def write_sidecar(source: TableSource, dest: Path, columns: list[RewardColumn]) -> Path:
    keys = source.index_columns(SIDECAR_KEYS) or {"row": np.arange(source.rows, dtype=np.int64)}
    key_arrays = [pa.array(values) for values in keys.values()]
    base = pa.schema([pa.field(name, array.type) for name, array in zip(keys, key_arrays)])
    schema = reward_schema(base, columns)
    arrays = key_arrays + [pa.array(c.values, type=pa.float32()) for c in columns]
    with staged(dest) as tmp:
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), tmp)
        fsync(tmp)
    return dest
