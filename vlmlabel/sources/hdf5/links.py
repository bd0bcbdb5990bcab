"""Data an HDF5 file reads from other files: external links, virtual datasets and external raw files, and a
labels file's record of the file it links to. Each is read only where the file naming it says it is."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py

from vlmlabel.errors import SourceError
from vlmlabel.files.provenance import LINKED_ATTR


@dataclass(frozen=True)
class ExternalRef:
    """Data a file reads from another file: an external link, or a source file of a virtual dataset.

    vlmlabel reads such a file only where the file naming it says it is (``intended``): the name itself when
    absolute, else relative to the naming file's own folder. HDF5 also looks under a prefix variable's folders
    first and, when the file is not there, for a file of that name in the working folder: another dataset's
    frames, read without a word. ``refuse_unless_intended`` refuses both before anything is read."""

    where: str  # the link or the virtual dataset, inside the file
    filename: str  # the other file, as the file names it
    prefix_variable: str  # HDF5_EXT_PREFIX (links) or HDF5_VDS_PREFIX (virtual datasets)

    def resolve(self, folder: Path, working_folder: bool = True) -> Path | None:
        """The file HDF5 opens for a file that lies in ``folder``: the name itself when absolute, else (and when
        that is missing) the name under the prefix variable's folders, ``folder``, then the working folder
        (``working_folder``: where this process runs; a file meant to be opened from anywhere cannot count
        on it)."""
        return next(iter(self.found(folder, working_folder)), None)

    def found(self, folder: Path, working_folder: bool = True) -> list[Path]:
        """Every place, in ``resolve``'s order, where a file of that name lies."""
        name = Path(self.filename)
        tail = Path(name.name) if name.is_absolute() else name
        prefixes = [Path(p) for p in os.environ.get(self.prefix_variable, "").split(os.pathsep) if p]
        candidates = ([name] if name.is_absolute() else []) + [p / tail for p in prefixes] + [folder / tail]
        candidates += [Path.cwd() / tail] if working_folder else []
        return list(dict.fromkeys(c.resolve() for c in candidates if c.is_file()))

    def intended(self, folder: Path) -> Path:
        """Where the file naming this one, lying in ``folder``, says it is."""
        name = Path(self.filename)
        return name if name.is_absolute() else folder / name

    def refuse_unless_intended(self, file: Path) -> Path:
        """The file HDF5 will read for ``file`` (the file naming it), refused unless it is the one ``file`` names
        (``intended``): missing there, or another one found first under the prefix variable's folders."""
        folder = file.absolute().parent
        intended = self.intended(folder)
        if not intended.is_file():
            raise SourceError(self.missing(file))
        opened = self.resolve(folder)
        if opened != intended.resolve():
            raise SourceError(
                f"{file}: {self.where} reads {os.path.normpath(intended)}, but "
                f"${self.prefix_variable} makes HDF5 read "
                f"{opened} instead; unset {self.prefix_variable} (vlmlabel reads a linked file only "
                "where the file linking to it says it is)"
            )
        return intended

    def missing(self, file: Path) -> str:
        return (
            f"{file}: {self.where} reads {self.filename}, which is not found at "
            f"{os.path.normpath(self.intended(file.absolute().parent))}; put that file back (a file and the files "
            "it links to move together) or fix the link: vlmlabel never reads a file of that name found elsewhere"
        )


def all_external_links(group: h5py.Group) -> list[ExternalRef]:
    """Every external link under ``group``: a walk of the link tables that opens no object (about 10 us a link)."""
    found: list[bytes] = []

    def note(name: bytes, info: h5py.h5l.LinkInfo) -> None:
        if info.type == h5py.h5l.TYPE_EXTERNAL:
            found.append(name)

    group.id.links.visit(note, info=True)
    prefix = group.name.rstrip("/")
    return [
        ExternalRef(f"{prefix}/{name.decode()}", group.id.links.get_val(name)[0].decode(), "HDF5_EXT_PREFIX")
        for name in found
    ]


def virtual_sources(dataset: h5py.Dataset) -> list[ExternalRef]:
    """The other files a virtual dataset maps (a missing one would read as fill values: silent zeros)."""
    if not dataset.is_virtual:
        return []
    names = sorted({m.file_name for m in dataset.virtual_sources() if m.file_name != "."})
    return [ExternalRef(dataset.name, name, "HDF5_VDS_PREFIX") for name in names]


def stored_elsewhere(dataset: h5py.Dataset) -> tuple[list[Path], list[str]]:
    """The other files ``dataset``'s values are read from, and why any that is missing would make it read wrong.

    The source files of a virtual dataset, followed through virtual datasets that map virtual datasets (a missing
    one, at any depth, reads as fill values: silent zeros), and external raw files (a missing one fails the read).
    A raw file's name is looked for where HDF5 may look (``ExternalRef.found``: its prefix variable, the folder of
    the file that names it, the working folder) and counted wherever a file of that name lies: the fingerprint
    must change when any of them does. A mapped file counts only where the file naming it says it is
    (``ExternalRef.refuse_unless_intended``); missing there, or shadowed by one under $HDF5_VDS_PREFIX, it is
    reported: HDF5 would read another file's rows."""
    files: dict[Path, None] = {}
    missing: list[str] = []
    seen: set[tuple[Path, str]] = set()

    def walk(held: h5py.Dataset) -> None:
        plist = held.id.get_create_plist()
        externals, virtual = plist.get_external_count(), plist.get_layout() == h5py.h5d.VIRTUAL
        if not (externals or virtual):  # the common case: two calls, no path resolved
            return
        holder = Path(held.file.filename).absolute()
        key = (holder.resolve(), held.name)
        if key in seen:
            return
        seen.add(key)
        for index in range(externals):
            raw = ExternalRef(
                held.name, plist.get_external(index)[0].decode(errors="surrogateescape"), "HDF5_EXTFILE_PREFIX"
            )
            files.update(dict.fromkeys(raw.found(holder.parent)))
        if not virtual:
            return
        for file_name, dset_name in sorted({(m.file_name, m.dset_name) for m in held.virtual_sources()}):
            if file_name == ".":
                within = held.file.get(dset_name)
                if isinstance(within, h5py.Dataset):
                    walk(within)
                continue
            try:  # only where the naming file says: HDF5 would take another file of that name found elsewhere
                place = ExternalRef(held.name, file_name, "HDF5_VDS_PREFIX").refuse_unless_intended(holder).resolve()
            except SourceError as exc:
                missing.append(str(exc))
                continue
            files[place] = None
            try:
                with h5py.File(place, "r") as other:
                    mapped = other.get(dset_name)
                    if isinstance(mapped, h5py.Dataset):
                        walk(mapped)
            except OSError:  # not an HDF5 file: HDF5 fails the read itself
                continue

    walk(dataset)
    return list(files), missing


def links_on_path(handle: h5py.File, path: str) -> list[ExternalRef]:
    """The external link that ``path`` passes through, if any (the first one: past it lies another file)."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        link = handle.get(prefix, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            return [ExternalRef(f"/{prefix}", link.filename, "HDF5_EXT_PREFIX")]
        if link is None:
            break
    return []


def refuse_misread(handle: h5py.File, path: str, dataset: h5py.Dataset, file: Path) -> None:
    """``dataset``, found at ``path`` of ``handle`` (the file at ``file``), is refused when an external link on the
    way made HDF5 read it from a file other than the one the link names from ``file``'s folder (a file of that
    name in the working folder, or under $HDF5_EXT_PREFIX). One call for a dataset of the file itself."""
    if dataset.id.fileno == handle.id.fileno:
        return
    for ref in links_on_path(handle, path):
        ref.refuse_unless_intended(file)


def frames_dataset(handle: h5py.File, array: str, file: Path, verified: set[str] | None = None) -> h5py.Dataset:
    """The frame array ``array``; one whose rows live in a missing file, or that HDF5 would read from a file other
    than the one named (``refuse_misread``), is refused by name (a virtual dataset would otherwise read as
    zeros). ``verified``: the caller's arrays already checked, skipped (a virtual dataset's files are opened to
    check it: not at every read)."""
    folder = file.absolute().parent
    try:
        dataset = handle[array]
    except KeyError as exc:
        gone = [r for r in links_on_path(handle, array) if not r.intended(folder).is_file()]
        if gone:
            raise SourceError(gone[0].missing(file)) from None
        raise SourceError(f"{array} cannot be opened in {file} (truncated or corrupt?): {exc}") from None
    if verified is not None and array in verified:
        return dataset
    refuse_misread(handle, array, dataset, file)
    missing = stored_elsewhere(dataset)[1]
    if missing:
        raise SourceError(missing[0])
    if verified is not None:
        verified.add(array)
    return dataset


def checked_dataset(handle: h5py.File, path: str, file: Path) -> h5py.Dataset:
    """The dataset at ``path``, refused if a link made HDF5 read it from another file than the one named."""
    dataset = handle[path]
    refuse_misread(handle, path, dataset, file)
    return dataset


def refuse_missing_files(handle: h5py.File, paths: list[str], file: Path) -> None:
    """A path that leads through an external link to a missing file is reported as that, not as absent."""
    folder = file.absolute().parent
    for path in paths:
        for ref in links_on_path(handle, path):
            if not ref.intended(folder).is_file():
                raise SourceError(ref.missing(file))


@dataclass(frozen=True)
class LinkedFile:
    """What a labels file (``relabel --output FILE --link``) reads everything but its rewards from: the file its
    external links name (relative to the labels file's folder, so the two move together), and the content
    fingerprint of that file's frames (``content_fingerprint``, keyed by image key: the frames the run scored, its
    first camera's) when it was linked.

    Recorded on the labels file's root by the writer (``destinations.hdf5.write_linked``) and verified whenever
    the labels file is opened (``HDF5Source``: every command): the file must be where the labels file names it,
    be the file HDF5 reads, and hold the same frames. Otherwise HDF5 would read another dataset's frames: a file
    of that name in the working folder, or one put in its place."""

    filename: str
    frames: dict[str, str]  # image key -> content fingerprint of its frames

    def to_attr(self) -> str:
        return json.dumps({"file": self.filename, "frames": self.frames}, sort_keys=True)

    @classmethod
    def recorded(cls, handle: h5py.File, path: Path) -> LinkedFile | None:
        """The record on ``handle``'s root, None for a file that is no labels file; a damaged one is refused."""
        raw = handle.attrs.get(LINKED_ATTR)
        if raw is None:
            return None
        try:
            found = json.loads(raw)
            record = cls(found["file"], dict(found["frames"]))
        except (TypeError, ValueError, KeyError):
            record = None
        if (
            record is None
            or not isinstance(record.filename, str)
            or not all(isinstance(v, str) for v in [*record.frames, *record.frames.values()])
        ):
            raise SourceError(
                f"{path}: the {LINKED_ATTR} attribute, which names the file a labels file links to, "
                "is damaged; make the labels file again (relabel SOURCE --output FILE --link)"
            )
        return record

    def _ref(self) -> ExternalRef:
        return ExternalRef("the labels file", self.filename, "HDF5_EXT_PREFIX")

    def target(self, labels: Path) -> Path:
        return self._ref().intended(labels.absolute().parent)

    def verify(self, labels: Path, fingerprint_of: Callable[[Path, str], str]) -> None:
        """Refuse, naming the file, a linked file that is missing where ``labels`` names it, that HDF5 would not
        read from there, or whose frames are not those it was made from (``fingerprint_of``: the content
        fingerprint of the frames at an image key of the HDF5 file at a path, opened as a source)."""
        target = self._ref().refuse_unless_intended(labels)
        if target.resolve() == labels.resolve():
            raise SourceError(f"{labels}: the labels file names itself as the file it links to; make it again")
        for key, fingerprint in self.frames.items():
            try:
                same = fingerprint_of(target, key) == fingerprint
            except SourceError as exc:
                raise SourceError(f"{labels} is a labels file reading {os.path.normpath(target)}: {exc}") from None
            if not same:
                raise SourceError(
                    f"{labels} is a labels file made from {self.filename}, but "
                    f"{os.path.normpath(target)} now holds "
                    f"other frames ({key}): it is not the file that was linked. Put that file back "
                    "(the two files move together), or relabel the file to make a new labels file"
                )
