"""Read frames and episode boundaries from HDF5 files in the D4RL, robomimic, Minari and per-episode layouts.

The file is opened read-only; its layout is found by ``layouts.detect`` and says where the episodes are. Rows
are read in chunk-aligned blocks (``raw``), so memory stays bounded by one block whatever the file's length and
compressed chunks are decompressed once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlmlabel.errors import SourceError
from vlmlabel.sources import stored_digest
from vlmlabel.sources.base import (
    Align,
    Episode,
    FrameBlock,
    Segment,
    SourceKind,
    content_fingerprint,
    reward_path,
)
from vlmlabel.sources.cameras import CameraChooser
from vlmlabel.sources.hdf5.embeddings import HDF5Embeddings
from vlmlabel.sources.hdf5.layouts import (
    Layout,
    Survey,
    _float_image_like,
    _image_candidates,
    _member,
    detect,
    find_key,
    key_paths,
    next_obs_path,
)
from vlmlabel.sources.hdf5.links import (
    LinkedFile,
    all_external_links,
    frames_dataset,
    refuse_missing_files,
    stored_elsewhere,
)
from vlmlabel.sources.hdf5.raw import (
    PlainRows,
    _plain_crcs,
    _pread_into,
    _stored_bytes,
    frame_format_of,
    open_read_only,
    plain_rows,
    read_rows,
    read_rows_into,
    unreadable,
)


class _Unsure(Exception):
    """A low-level lookup met something it does not judge (a broken link, a path through a dataset): the caller
    asks h5py's own lookup instead."""


def _lookup(group: h5py.h5g.GroupID, path: str) -> h5py.h5d.DatasetID | None:
    """The dataset at ``path`` under ``group``, or None where ``Group.get(path)`` would not give a dataset: the
    same lookup through HDF5's low-level calls (about 10 us instead of h5py's 30-60 us per lookup). Each
    component's link is checked before it is followed, so a missing one costs no HDF5 error."""
    parts = path.encode().split(b"/")
    try:
        for depth in range(1, len(parts) + 1):
            if not group.links.exists(b"/".join(parts[:depth])):
                return None
        found = h5py.h5o.open(group, b"/".join(parts))
    except (KeyError, RuntimeError, OSError, ValueError) as exc:
        raise _Unsure(path) from exc
    return found if isinstance(found, h5py.h5d.DatasetID) else None


class HDF5Rows:
    """The frame rows of an HDF5 file, opened again by path (read-only): what a decoding worker reads."""

    def __init__(self, path: Path):
        self.path = path
        self._verified: set[str] = set()  # frame arrays whose other files were checked (frames_dataset)
        self.file = open_read_only(path)

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]:
        dataset = frames_dataset(self.file, segment.array, self.path, self._verified)
        yield from read_rows(dataset, segment.start, segment.stop, max_rows, self.path)

    def read_into(self, segment: Segment, out: np.ndarray) -> bool:
        return read_rows_into(
            frames_dataset(self.file, segment.array, self.path, self._verified), segment, out, self.path
        )

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


@dataclass(frozen=True)
class HDF5Recipe:
    """Opens an HDF5 file's frames again in a decoding worker."""

    path: Path
    decodes: bool  # encoded images or compressed chunks: worth decoding in parallel

    def open(self) -> HDF5Rows:
        return HDF5Rows(self.path)


def _linked_fingerprint(path: Path, image_key: str) -> str:
    """The content fingerprint of the frames at ``image_key`` of the HDF5 file at ``path`` (a labels file's)."""
    with HDF5Source(path, image_key) as linked:
        return content_fingerprint(linked)


class HDF5Source(HDF5Embeddings):
    """An HDF5 dataset of image observations, opened read-only."""

    _group_names: frozenset = frozenset()
    _layout: Layout  # how the file lays out its episodes (``layouts.detect``)
    layout: str  # its name (``Layout.name``): recorded in provenance and printed
    linked: LinkedFile | None = None  # a labels file's record of the file it links to

    kind = SourceKind.hdf5
    seekable = True
    holds_outputs = True  # rewards and the embedding cache are written into the file itself

    def __init__(self, path: str | Path, image_key: str | None = None):
        self.path = Path(path)
        self.cache_file: Path | None = self.path
        self.cameras: list[str] = []  # every image dataset found; the frames read are ``image_key``
        self._arrays: dict[str, tuple[str, int, str | None]] = {}  # per episode group, see _group_arrays
        self._plain: dict[str, PlainRows | None] = {}  # per frame array, see PlainRows
        self._next_rows: dict[str, int] = {}  # rows of the next-observation arrays found by low-level lookups
        self._verified: set[str] = set()  # frame arrays whose other files were checked (frames_dataset)
        if not self.path.exists():
            raise SourceError(f"{self.path} does not exist; check the path")
        if self.path.is_dir():
            raise SourceError(f"{self.path} is a folder, not an HDF5 file")
        if not h5py.is_hdf5(self.path):
            raise SourceError(f"{self.path} is not an HDF5 file; vlmlabel reads .h5/.hdf5 files")
        self.file = open_read_only(self.path)
        # the descriptor HDF5 reads the file through, for reading plain arrays with os.preadv (POSIX files only)
        self._fd: int | None = (
            self.file.id.get_vfd_handle() if self.file.driver == "sec2" and hasattr(os, "preadv") else None
        )
        try:
            self.linked = LinkedFile.recorded(self.file, self.path)
            if self.linked is not None:  # a labels file: its frames are read from that file, and only from it
                self.linked.verify(self.path, _linked_fingerprint)
            self._detect(image_key)
        except (OSError, RuntimeError, KeyError) as exc:
            self.file.close()
            raise unreadable(self.path, exc, f"reading {self.path}") from None
        except SourceError:
            self.file.close()
            raise

    # -- layout detection -------------------------------------------------------------------------

    def _detect(self, image_key: str | None) -> None:
        """The file's layout (the first of ``layouts.LAYOUTS`` that recognises it), then its frames there."""
        if not self.file.keys():
            raise SourceError(f"{self.path} is empty: it holds no datasets")
        layout = detect(Survey(self.file, self.path, image_key))
        if layout is None:
            raise self._no_images(self.file, "the file")
        self._layout, self.layout = layout, layout.name
        self._group_names = frozenset(layout.groups)
        self._choose_key(layout.group, image_key, layout.where, layout.candidates)

    @property
    def _episode_groups(self) -> list[str]:
        return self._layout.groups

    def _choose_key(
        self, group: h5py.Group, image_key: str | None, where: str, candidates: list[str] | None = None
    ) -> None:
        found = candidates if candidates is not None else _image_candidates(group)
        self.cameras = found

        def find(key: str) -> str | None:
            path = find_key(group, key)
            if path is None:  # a key leading through a link to a missing file is refused as that
                refuse_missing_files(self.file, [_member(group, p) for p in key_paths(key)], self.path)
            return path

        chooser = CameraChooser("image datasets", where, f"not found in {where}")
        key = chooser.choose(found, image_key, find, lambda: self._no_images(group, where))
        fmt = frame_format_of(frames_dataset(self.file, _member(group, key), self.path))
        if isinstance(fmt, str):  # only a key named: every candidate was listed for having a frame format
            raise SourceError(f"{key} in {where} {fmt}")
        self.image_key, self.frame_format = key, fmt

    def _no_images(self, group: h5py.Group, where: str) -> SourceError:
        """Why no frames are found in ``group``: a link to a missing file, float frames, or none at all."""
        folder = self.path.absolute().parent
        for ref in all_external_links(group):
            if not ref.intended(folder).is_file():
                return SourceError(ref.missing(self.path))
        floats = _float_image_like(group)
        if floats:
            return SourceError(
                f"{floats[0]} in {where} holds float frames; vlmlabel reads uint8 images (0-255): "
                "convert them, e.g. (x * 255).astype('uint8')"
            )
        datasets: list[str] = []
        group.visit(lambda name: datasets.append(name) if isinstance(group[name], h5py.Dataset) else None)
        listed = ", ".join(datasets[:12]) + (" ..." if len(datasets) > 12 else "") if datasets else "none"
        return SourceError(f"no image dataset found in {where} (datasets: {listed}); name the frames with --image-key")

    # -- episodes ---------------------------------------------------------------------------------

    def episodes(self, align: Align) -> list[Episode]:
        """Episodes in file order, each with the frame rows that score its steps under ``align``."""
        episodes = self._layout.episodes(self, align)
        if not episodes:
            raise SourceError(f"{self.path} holds no episodes")
        return episodes

    def _group_arrays(self, name: str) -> tuple[str, int, str | None]:
        """An episode group's frame array, its rows and its next-observation array, looked up once per source
        (the run and the fingerprint ask for both alignments) through HDF5's low-level calls; where those meet
        anything odd, through h5py's own lookups, which then say what is wrong."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self._group_arrays_direct(name)
            except _Unsure:
                self._arrays[name] = self._group_arrays_h5py(name)
        return self._arrays[name]

    def _group_arrays_direct(self, name: str) -> tuple[str, int, str | None]:
        """``_group_arrays`` in a few low-level calls, noting where each plain array's rows lie (``PlainRows``)."""
        try:
            group = h5py.h5g.open(self.file.id, name.encode())
        except (KeyError, RuntimeError, OSError, ValueError) as exc:
            raise _Unsure(name) from exc
        for key in key_paths(self.image_key):
            frames = _lookup(group, key)
            if frames is not None:
                break
        else:
            raise _Unsure(name)  # h5py's lookup names what is missing
        array, fileno = f"{name}/{key}", self.file.id.fileno
        plain = self._plain[array] = plain_rows(frames, fileno)
        next_array = None
        for candidate in self._layout.next_candidates(key):  # none for Minari
            found = _lookup(group, candidate)
            if found is not None:
                next_array = f"{name}/{candidate}"
                self._plain[next_array] = plain_rows(found, fileno)
                self._next_rows[next_array] = found.shape[0]
                break
        return array, plain.shape[0] if plain else frames.shape[0], next_array

    def _group_arrays_h5py(self, name: str) -> tuple[str, int, str | None]:
        group = self.file[name]
        key = find_key(group, self.image_key)
        if key is None:
            raise SourceError(f"episode {name} has no {self.image_key}; every episode needs the same image key")
        array = f"{name}/{key}"
        return (array, self.file[array].shape[0], next_obs_path(self.file, name, self._layout.next_candidates(key)))

    # -- reading ----------------------------------------------------------------------------------

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]:
        """Rows of ``segment`` in blocks whose edges fall on chunk boundaries."""
        dataset = frames_dataset(self.file, segment.array, self.path, self._verified)
        yield from read_rows(dataset, segment.start, segment.stop, max_rows, self.path)

    def read_into(self, segment: Segment, out: np.ndarray) -> bool:
        """Rows of ``segment`` into ``out``: a plain array's with one os.preadv from where they lie in the file
        (exactly HDF5's bytes, checked to be uint8 rows of ``out``'s frame shape), others through h5py."""
        plain = self._plain_rows(segment.array) if self._fd is not None else None
        if (
            plain is not None
            and self._fd is not None
            and out.dtype == np.uint8
            and out.flags.c_contiguous
            and out.shape == (len(segment), *plain.shape[1:])
            and 0 <= segment.start <= segment.stop
            and segment.stop <= plain.shape[0]
        ):
            view, done = out.data.cast("B"), 0
            for offset, rows in plain.spans(segment.start, segment.stop):
                if not _pread_into(self._fd, view[done : done + rows * plain.row_bytes], offset):
                    raise SourceError(
                        f"reading {segment.array} rows {segment.start}-{segment.stop} of {self.path} "
                        "failed (truncated or corrupt?): the file ends before them"
                    )
                done += rows * plain.row_bytes
            return True
        return read_rows_into(
            frames_dataset(self.file, segment.array, self.path, self._verified), segment, out, self.path
        )

    def _plain_rows(self, array: str) -> PlainRows | None:
        """Where ``array``'s rows lie in the file if they are plain bytes there (noted when the episodes were
        gathered, else looked up once)."""
        if array not in self._plain:
            self._plain[array] = plain_rows(frames_dataset(self.file, array, self.path).id, self.file.id.fileno)
        return self._plain[array]

    def recipe(self) -> HDF5Recipe:
        """How a decoding worker opens the frames again; they are worth decoding in parallel when encoded or
        compressed (every frame array of a file is taken to be stored like the first)."""
        first = self._layout.first_frames(self)
        compressed = first.id.get_create_plist().get_nfilters() > 0
        return HDF5Recipe(self.path, self.frame_format.encoded or compressed)

    def storage_digest(self, arrays: list[str]) -> str:
        """A digest of every stored byte of the frame arrays (compressed chunks as stored, not decoded), read
        once per version of the file (``stored_digest``): a CRC-32 per chunk, or per block of rows where the rows
        are not chunked; plain arrays (``PlainRows``) give the same CRCs read straight from the file."""

        def compute() -> tuple[bytes, list[Path]]:
            fd = self._fd
            plain = {a: self._plain_rows(a) if fd is not None else None for a in arrays}
            swept = {a: p for a, p in plain.items() if p is not None}
            crcs = {} if fd is None else dict(zip(swept, _plain_crcs(fd, list(swept.values()), self.path), strict=True))
            datasets = {a: frames_dataset(self.file, a, self.path) for a in arrays if plain[a] is None}
            here = self.path.resolve()
            found = {Path(d.file.filename).resolve() for d in datasets.values()}
            found |= {f for d in datasets.values() for f in stored_elsewhere(d)[0]}  # mapped and raw files
            others = sorted(found - {here})
            return b"".join(crcs[a] if a in crcs else _stored_bytes(datasets[a]) for a in arrays), others

        return stored_digest.remembered(self.path, repr(arrays), compute)

    # -- per-step values -------------------------------------------------------------------------

    def step_values(self, episode: Episode, key: str) -> np.ndarray | None:
        """A per-step dataset (rewards, success, a written reward...) for one episode, or None if absent."""
        return self._layout.step_values(self, episode, key)

    def dataset_attrs(self, episode: Episode, key: str) -> dict | None:
        path = reward_path(episode.target, key)
        item = self.file.get(path)
        return dict(item.attrs) if isinstance(item, h5py.Dataset) else None

    def reward_keys(self, episode: Episode) -> list[str]:
        """Names of the rewards vlmlabel wrote for this episode (datasets carrying a 'formula' attribute)."""
        group = self.file.get(episode.target) if episode.target else self.file
        if not isinstance(group, h5py.Group):
            return []
        return sorted(k for k, v in group.items() if isinstance(v, h5py.Dataset) and "formula" in v.attrs)

    @property
    def paths(self) -> tuple[Path, ...]:
        """The file, and for a labels file the file it links to (whose frames it reads)."""
        return (self.path,) if self.linked is None else (self.path, self.linked.target(self.path))

    def close(self) -> None:
        self._fd = None  # HDF5's descriptor: once closed, its number may name another file
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> HDF5Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
