"""The embedding cache of an HDF5 source, kept in the file itself: where it lives and how it is read back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from vlmlabel.sources.hdf5.raw import read_rows

EMBEDDING_GROUP = "vlm_embedding"
EMBEDDING_ROWS_SUFFIX = "__rows"


def read_embedding_meta(handle: h5py.File, location: str) -> tuple[dict, np.ndarray | None, int] | None:
    """Attributes, stored row indices (None when every row is stored) and row count of a cache, if any."""
    item = handle.get(location)
    if not isinstance(item, h5py.Dataset) or item.ndim != 2:
        return None
    rows_item = handle.get(location + EMBEDDING_ROWS_SUFFIX)
    rows = np.asarray(rows_item[:], dtype=np.int64) if isinstance(rows_item, h5py.Dataset) else None
    return dict(item.attrs), rows, item.shape[0]


class HDF5Embeddings:
    """``EmbeddingStore`` for ``HDF5Source``: the cache beside the frames it embeds, in the same file."""

    file: h5py.File
    path: Path
    _group_names: frozenset  # the episode groups (none for a flat file)

    def array_rows(self, array: str) -> int:
        return self.file[array].shape[0]

    def embedding_location(self, array: str) -> str:
        """Where the cached embeddings of ``array`` live: ``<episode group>/vlm_embedding/<key>`` (flat: at the root).

        Inside the episode group, so per-episode readers keep seeing one episode per group, and under its
        own group, so it is never mistaken for frames or for a reward.
        """
        parts = array.split("/")
        for depth in (1, 2):
            group = "/".join(parts[:depth])
            if depth < len(parts) and group in self._group_names:
                return f"{group}/{EMBEDDING_GROUP}/{'/'.join(parts[depth:])}"
        return f"{EMBEDDING_GROUP}/{array}"

    def read_embedding_meta(self, location: str) -> tuple[dict, np.ndarray | None, int] | None:
        return read_embedding_meta(self.file, location)

    def read_embedding_blocks(self, location: str, max_rows: int) -> Iterator[np.ndarray]:
        """Stored embeddings in chunk-aligned blocks of about ``max_rows`` rows."""
        dataset = self.file[location]
        yield from read_rows(dataset, 0, dataset.shape[0], max_rows, self.path)
