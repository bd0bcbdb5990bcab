"""HDF5 files as frame sources (D4RL, robomimic, Minari and per-episode layouts): what the rest of vlmlabel
imports from here."""

from vlmlabel.sources.hdf5.source import (
    EMBEDDING_GROUP,
    EMBEDDING_ROWS_SUFFIX,
    LINKED_ATTR,
    ExternalRef,
    HDF5Source,
    LinkedFile,
    PlainRows,
    all_external_links,
    open_read_only,
    plain_rows,
    read_embedding_meta,
    read_rows,
    stored_elsewhere,
    unreadable,
    virtual_sources,
)

__all__ = [
    "EMBEDDING_GROUP",
    "EMBEDDING_ROWS_SUFFIX",
    "LINKED_ATTR",
    "ExternalRef",
    "HDF5Source",
    "LinkedFile",
    "PlainRows",
    "all_external_links",
    "open_read_only",
    "plain_rows",
    "read_embedding_meta",
    "read_rows",
    "stored_elsewhere",
    "unreadable",
    "virtual_sources",
]
