"""Where an embedding cache lies in its HDF5 file, what it records, and reading it back.

Per frame array, one (rows, D) dataset at ``location``: inside the group that holds the array where the source
names such groups (``cache_groups``: an HDF5 file's episode groups), as ``<group>/vlm_embedding/<rest>``; else
``vlm_embedding/[<cache_scope>/]<array>``. Where it keeps only some rows of the array, their indices lie beside
it at ``<location>__rows``. Sources only say where the cache file is and how their frame arrays are grouped;
this module alone reads the file (with h5py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlmlabel.model import Described
from vlmlabel.sources.base import EMBEDDING_GROUP, CachingSource, EmbeddingStore
from vlmlabel.sources.hdf5 import read_rows

EMBEDDING_ROWS_SUFFIX = "__rows"


def location(source: EmbeddingStore, array: str) -> str:
    """Where the cached embeddings of ``array`` live: inside its episode group (so per-episode readers keep seeing
    one episode per group), else at the root; always under a group of their own, so they are never mistaken for
    frames or for a reward."""
    parts = array.split("/")
    for depth in (1, 2):
        group = "/".join(parts[:depth])
        if depth < len(parts) and group in source.cache_groups:
            return f"{group}/{EMBEDDING_GROUP}/{'/'.join(parts[depth:])}"
    scope = source.cache_scope
    return f"{EMBEDDING_GROUP}/{scope}/{array}" if scope else f"{EMBEDDING_GROUP}/{array}"


def identity(model: Described, image_key: str, fingerprint: str) -> dict[str, str]:
    """What must be equal for a cache to be reused (precision is not: it changes values only by rounding).

    ``fingerprint`` (``sources.base.content_fingerprint``) ties the cache to the frames it was computed from."""
    described = model.describe()
    return {
        "model": described["model"],
        "pretrained": described["pretrained"],
        "model_weights": model.weights_identity(),  # same path, other weights: another cache
        "preprocess": described["preprocess"],
        "image_key": image_key,
        "source_fingerprint": fingerprint,
    }


@dataclass(frozen=True)
class Stored:
    """A cache as its file holds it: attributes, stored row indices (None: every row of the array), row count."""

    attrs: dict
    rows: np.ndarray | None
    count: int


class CacheFile:
    """A source's cache file, open for reading while in a ``with`` (closed: nothing is stored).

    A file beside the data that is missing or cannot be read holds no cache; the source's own file
    (``holds_outputs``: an HDF5 source, just opened) failing to read is an error, as any read of it."""

    def __init__(self, source: CachingSource):
        self.path: Path | None = source.cache_file
        self._own = source.holds_outputs
        self._handle: h5py.File | None = None

    def __enter__(self) -> CacheFile:
        if self.path is not None and self.path.is_file():
            try:
                self._handle = h5py.File(self.path, "r")
            except OSError:
                if self._own:
                    raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def stored(self, location: str) -> Stored | None:
        """The cache at ``location``, if one is there."""
        if self._handle is None:
            return None
        try:
            item = self._handle.get(location)
            if not isinstance(item, h5py.Dataset) or item.ndim != 2:
                return None
            rows_item = self._handle.get(location + EMBEDDING_ROWS_SUFFIX)
            rows = np.asarray(rows_item[:], dtype=np.int64) if isinstance(rows_item, h5py.Dataset) else None
            return Stored(dict(item.attrs), rows, item.shape[0])
        except OSError:
            if self._own:
                raise
            return None

    def blocks(self, location: str, max_rows: int) -> Iterator[np.ndarray]:
        """Stored embeddings in chunk-aligned blocks of about ``max_rows`` rows."""
        assert self.path is not None  # a matched cache was read from this file
        if self._handle is None:  # gone since it was matched: opening it says why, in h5py's words
            self._handle = h5py.File(self.path, "r")
        dataset = self._handle[location]
        yield from read_rows(dataset, 0, dataset.shape[0], max_rows, self.path)
