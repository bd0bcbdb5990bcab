"""What an HDF5 source says of its embedding cache, kept in the file itself: its frame arrays' row counts and
the episode groups each keeping the cache of its own frames (``vlmlabel.cache`` places, reads and writes it)."""

from __future__ import annotations

import h5py


class HDF5Embeddings:
    """``EmbeddingStore`` for ``HDF5Source``: the cache beside the frames it embeds, in the same file."""

    file: h5py.File
    _group_names: frozenset  # the episode groups (none for a flat file)
    cache_scope = ""

    def array_rows(self, array: str) -> int:
        return self.file[array].shape[0]

    @property
    def cache_groups(self) -> frozenset[str]:
        """The episode groups: each keeps the cache of its frame arrays inside it (``vlmlabel.cache.layout``)."""
        return self._group_names
