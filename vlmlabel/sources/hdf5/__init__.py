"""HDF5 files as frame sources (D4RL, robomimic, Minari and per-episode layouts).

``source``: ``HDF5Source``, ``HDF5Recipe``; ``layouts``: one class per layout, tried in order; ``links``:
data read from other files, and a labels file's record of the one it links to; ``raw``: how rows are stored
and read, and the stored-frames digest; ``embeddings``: what the source says of the embedding cache kept in
the file. Here: the names the rest of vlmlabel imports.
"""

from vlmlabel.sources.hdf5.links import LinkedFile, all_external_links, virtual_sources
from vlmlabel.sources.hdf5.raw import PlainRows, open_read_only, plain_rows, read_rows
from vlmlabel.sources.hdf5.source import HDF5Source

__all__ = [
    "HDF5Source",
    "LinkedFile",
    "PlainRows",
    "all_external_links",
    "open_read_only",
    "plain_rows",
    "read_rows",
    "virtual_sources",
]
