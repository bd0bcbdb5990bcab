"""Rewards into an HDF5 file (D4RL, robomimic, Minari, per-episode groups), never half-written.

The rewards go into a copy made beside the destination (``atomic.staged``); the copy is flushed
and renamed over the destination in one step. Until that rename the destination is the untouched
original, so a crash, kill or full disk at any moment loses nothing.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vlmlabel.destinations import writethrough
from vlmlabel.destinations.base import Present, RewardColumn, check_folder, check_space, refuse_replacing
from vlmlabel.errors import OutputError
from vlmlabel.files import atomic, journal
from vlmlabel.files.holders import open_by_others, open_for_writing
from vlmlabel.files.interrupt import pause_at
from vlmlabel.files.provenance import LINKED_ATTR, RESULT_ATTR, VERSION_ATTR
from vlmlabel.files.stamp import Stamp
from vlmlabel.sources import stored_digest
from vlmlabel.sources.base import HDF5_SUFFIXES, Episode, content_fingerprint, reward_path
from vlmlabel.sources.hdf5 import (
    HDF5Source,
    LinkedFile,
    all_external_links,
    open_read_only,
    virtual_sources,
)


@dataclass
class H5Dataset:
    """One dataset to write: its path in the file, its values and the attributes that say how it was made."""

    path: str
    values: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    chunk_rows: int | None = None  # rows per chunk for large 2-D arrays (embeddings); None: HDF5's choice


@dataclass
class RowStream:
    """Several 2-D datasets filled in order from one stream of row blocks (embeddings as they are computed).

    ``datasets`` give path, attrs, dtype and chunking; their ``values`` are ignored and ``rows`` says how many
    rows each takes. The width is the width of the first block.
    """

    datasets: list[H5Dataset]
    rows: list[int]
    blocks: Iterator[np.ndarray]
    width: int = 0  # set once the first block arrives


def refuse_if_busy(path: Path) -> None:
    """Replacing a file another program is writing would lose what it writes after the copy was made."""
    writers = open_for_writing(path)
    if writers:
        raise OutputError(
            f"{path} is open for writing by another program ({writers[0]}); vlmlabel would "
            "replace the file under it: wait for it to finish, or use --output"
        )


def hdf5_suffixes(like: Path) -> tuple[str, ...]:
    """How an HDF5 file vlmlabel writes may be named: .h5, .hdf5, .hdf, or as ``like`` (the HDF5 file it copies,
    which may be named otherwise)."""
    return tuple(dict.fromkeys((*HDF5_SUFFIXES, like.suffix.lower())))


def check_output_file(output: Path | None, overwrite: bool) -> None:
    """An ``--output`` HDF5 file may be written: not a folder, not there without --overwrite, never a file of
    another kind (that is not vlmlabel's to replace)."""
    if output is None:
        return
    if output.is_dir():
        raise OutputError(f"--output {output} is a folder; name the HDF5 file to write")
    if output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists; choose another --output or pass --overwrite")
    if output.is_file() and not h5py.is_hdf5(output):
        raise OutputError(
            f"output {output} exists and is not an HDF5 file; vlmlabel only replaces HDF5 files "
            "(--overwrite): choose a new --output"
        )


def refuse_external(handle: h5py.File, path: Path, dest: Path, locations: list[str], frame_arrays: list[str]) -> None:
    """What vlmlabel adds must land in the file it copies, each episode's in a place of its own, and a copy
    elsewhere must find what the file reads from other files.

    Every location's group path is walked before any scoring (``_Groups.place``): one behind an external link
    would be written into the other file, outside the crash-safe copy; one through a dataset or a dangling link
    would fail after the scoring; two episodes reaching one group (hard or soft links) would write over each
    other. An output in another folder is refused when an external link of the file, or a virtual dataset among
    ``frame_arrays``, names a file that would be found elsewhere, or not at all, from there. ``handle``: the file
    at ``path``, open for reading.
    """
    groups = _Groups(handle)
    places: dict[tuple[int, str], str] = {}
    for target in dict.fromkeys(location.rpartition("/")[0] for location in locations):
        first = places.setdefault(groups.place(target), target)
        if first != target:
            raise OutputError(
                f"{target} and {first} are one group of {path} (one is a link to the other): "
                "their rewards would be written over each other; remove the duplicate episode link"
            )
    here, there = path.absolute().parent, dest.absolute().parent
    if here.resolve() == there.resolve():
        return
    held = [handle[array] for array in frame_arrays]  # a virtual dataset names files from its own file's folder
    refs = all_external_links(handle) + [
        r
        for dataset in held
        if Path(dataset.file.filename).resolve() == path.resolve()
        for r in virtual_sources(dataset)
    ]
    for ref in refs:
        if ref.resolve(here, working_folder=False) != ref.resolve(there, working_folder=False):
            raise OutputError(
                f"{ref.where} of {path} reads {ref.filename} from beside it; a copy in "
                f"{there} would not find that file: write the output in {here}, relabel in place, "
                "or make the link's file name absolute"
            )


def write_file(
    base: Path | None,
    dest: Path,
    datasets: list[H5Dataset],
    overwrite: bool,
    stamp: Stamp | None = None,
    remove: list[str] | None = None,
    stream: RowStream | None = None,
    keep_mode: bool = True,
) -> Path:
    """``base`` (a new file without one) with ``datasets`` (and ``stream``) added and ``remove`` deleted, put at
    ``dest`` all or nothing. ``keep_mode``: the result keeps ``base``'s permissions (an in-place write).

    ``dest`` being ``base`` itself, the change is made where the file lies through a rollback journal when that
    is safe (``write_in_place``); otherwise, and always for another ``dest``, in a copy renamed into place."""

    def edit(handle: h5py.File, between: Callable[[], None]) -> None:
        for path in remove or []:
            if path in handle:
                del handle[path]
        _put_all(handle, datasets, overwrite)
        between()
        if stream is not None:
            _fill(handle, stream, overwrite, between)

    in_place = base is not None and dest.exists() and base.resolve() == dest.resolve()
    if in_place:
        refuse_if_busy(dest)  # again, just before writing: it may have been opened since the checks
    version = stored_digest.version_of(base) if base is not None else None
    small = stream is None and sum(d.values.nbytes for d in datasets) <= IN_PLACE_BYTES
    if not (in_place and small and write_in_place(dest, edit, stamp)):
        _write_copy(base, dest, edit, stamp, keep_mode)
    stored_digest.carry(version, dest)  # the frames are the base's: what is known of them holds
    return dest


IN_PLACE_BYTES = 256 * 2**20  # what an in-place write may add: its changes are held in memory until applied


def write_in_place(path: Path, edit: Callable[[h5py.File, Callable[[], None]], None], stamp: Stamp | None) -> bool:
    """``edit`` the HDF5 file at ``path`` where it lies, all or nothing (``journal``); False, with nothing
    changed, when another process has the file open or locked (the caller then writes a copy)."""
    journal.recover(path)  # a dead run's journal must never outlive this write: undone first
    atomic.clean_dead_leftovers(atomic.real_target(path))  # and copies of dead runs that wrote the other way
    overlay = journal.Overlay(atomic.real_target(path))
    try:
        with h5py.File(overlay, "r+") as handle:
            edit(handle, overlay.reraise)
    except BaseException:
        overlay.reraise()  # what went wrong inside h5py's driver, if that is where it went wrong
        raise
    finally:
        overlay.close()
    overlay.reraise()
    if stamp is not None:
        stamp.verify(path)
    pause_at("write")
    try:
        journal.apply(path, overlay)
    except journal.Busy:
        return False
    return True


def _write_copy(
    base: Path | None,
    dest: Path,
    edit: Callable[[h5py.File, Callable[[], None]], None],
    stamp: Stamp | None,
    keep_mode: bool,
) -> None:
    """``edit`` a copy of ``base`` (a new file without one) and rename it over ``dest``; HDF5 writes it through
    ``writethrough`` (a full disk is one line, never a crash)."""
    with atomic.staged(dest) as tmp:
        mode = stat.S_IMODE(base.stat().st_mode) if base is not None else 0o644
        if base is not None:
            shutil.copyfile(base, tmp)
            os.chmod(tmp, mode | stat.S_IWUSR)  # a read-only source still gives a copy we can write into
        with writethrough.open_h5(tmp, "r+" if base is not None else "w") as (handle, between):
            edit(handle, between)
        if keep_mode:
            os.chmod(tmp, mode)
        if stamp is not None:
            stamp.verify(base)
        pause_at("write")


def write_linked(
    base: Path,
    dest: Path,
    datasets: list[H5Dataset],
    frames: dict[str, str],
    stamp: Stamp | None = None,
    remove: list[str] | None = None,
) -> Path:
    """A new file at ``dest`` (atomically) holding ``datasets``, every other dataset of ``base`` (but ``remove``)
    reached through an external link, and its groups and attributes mirrored: one file shows everything, at a cost
    that grows with the number of objects, not bytes. The link names ``base`` relative to ``dest``'s folder, so
    the two may move together; the root records that name and ``frames`` (the content fingerprint of ``base``'s
    frames per image key, ``LinkedFile``), which every reader verifies."""
    target = atomic.real_target(dest)
    name = os.path.relpath(base.resolve(), target.parent)
    skipped = {d.path.strip("/") for d in datasets} | {path.strip("/") for path in remove or []}
    with atomic.staged(dest) as tmp:
        with open_read_only(base) as source, writethrough.open_h5(tmp, "w") as (out, between):
            _mirror(source, out, name, skipped)
            between()
            out.attrs[LINKED_ATTR] = LinkedFile(name, frames).to_attr()  # base's own record (a labels file) names
            for dataset in datasets:  # what base links to, not base
                _put(out, dataset, overwrite=False)
        if stamp is not None:
            stamp.verify(base)
    return dest


def _mirror(group: h5py.Group, out: h5py.Group, file_name: str, skip: set[str]) -> None:
    """``group``'s attributes and members into ``out``: groups again, datasets as external links into
    ``file_name``, soft and external links as they are; ``skip`` names paths replaced by the new datasets."""
    out.attrs.update(group.attrs)
    for name in group:
        path = f"{group.name.strip('/')}/{name}".strip("/")
        if path in skip:
            continue
        link = group.get(name, getlink=True)
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            out[name] = link
        elif isinstance(group.get(name), h5py.Group):
            _mirror(group[name], out.create_group(name), file_name, skip)
        else:
            out[name] = h5py.ExternalLink(file_name, f"/{path}")


def _replace(handle: h5py.File, path: str, overwrite: bool) -> None:
    if path in handle:
        if not overwrite:
            raise OutputError(f"{path} already exists; pass --overwrite to replace it")
        try:
            del handle[path]
        except (KeyError, RuntimeError, OSError) as exc:
            raise OutputError(f"{path} cannot be replaced in this file ({exc}); choose another --reward-key") from None


def _put(handle: h5py.File, dataset: H5Dataset, overwrite: bool) -> None:
    _replace(handle, dataset.path, overwrite)
    values = np.asarray(dataset.values, dtype=dataset.dtype)
    chunks = None
    if dataset.chunk_rows is not None and values.ndim == 2 and len(values):
        chunks = (min(dataset.chunk_rows, len(values)), values.shape[1])
    written = handle.create_dataset(dataset.path, data=values, chunks=chunks)
    for key, value in dataset.attrs.items():
        written.attrs[key] = value


def _put_all(handle: h5py.File, datasets: list[H5Dataset], overwrite: bool) -> None:
    """Create every dataset; one with the attributes, dtype and shape of an earlier one is an HDF5 copy of it
    (attributes copied inside the library) refilled with its own values.

    Writing an attribute through h5py costs ~40 us and a reward carries ~20, in each of up to 100k episode
    groups: the copy keeps the write linear and cheap in episodes (~0.2 ms each instead of ~1.2 ms)."""
    first: dict[tuple[int, str, tuple[int, ...], int | None], bytes] = {}
    link_props = h5py.h5p.create(h5py.h5p.LINK_CREATE)
    link_props.set_create_intermediate_group(True)  # Minari's infos/ may not exist yet
    groups = _Groups(handle)
    for dataset in datasets:
        values = np.ascontiguousarray(dataset.values, dtype=dataset.dtype)
        # Attribute dicts are compared by identity: each column's dict is shared by all its datasets.
        key = (id(dataset.attrs), values.dtype.str, values.shape, dataset.chunk_rows)
        if key not in first or not values.size:
            _put(handle, dataset, overwrite)
            first.setdefault(key, dataset.path.encode())
            continue
        slot = groups.free_slot(dataset.path)
        if slot is None:  # the name is taken, or a group on its path is not one: h5py's checks say what is wrong
            _replace(handle, dataset.path, overwrite)
            slot = handle.id, dataset.path.encode()
        h5py.h5o.copy(handle.id, first[key], *slot, lcpl=link_props)
        h5py.h5d.open(*slot).write(h5py.h5s.ALL, h5py.h5s.ALL, values)


class _Groups:
    """The groups new datasets go into, each opened once for the existence check, the copy and the write, and
    the groups above them kept open while paths pass through them (looking each whole path up three times
    through a group of 100k episodes cost a third of the write). A missing group is created, as HDF5 creates
    intermediate groups."""

    def __init__(self, handle: h5py.File):
        self._file = Path(handle.filename)
        root = h5py.h5g.open(handle.id, b"/")
        self._open: dict[str, h5py.h5g.GroupID] = {"": root}  # on the last path
        info = h5py.h5o.get_info(root)
        self._fileno = info.fileno  # this file's: a soft link may lead into another one, through an external link
        self._where: dict[str, int] = {"": info.addr}  # their addresses, for ``place``

    def _along(self, parent: str) -> None:
        """Keep open only the groups on the way to ``parent``: 100k episode groups held open would hold memory
        for nothing."""
        self._open = {p: g for p, g in self._open.items() if not p or parent == p or parent.startswith(p + "/")}

    def place(self, target: str) -> tuple[int, str]:
        """Where datasets for group ``target`` will land: the address of the deepest group of its path there now
        and the part of the path still to be created. Refuses a path into another file (an external link, or a
        soft link to one), through a dangling link or through something that is not a group. Nothing is created."""
        parts = target.strip("/").split("/") if target.strip("/") else []
        self._along(target.strip("/"))
        done = ""
        for depth, name in enumerate(parts):
            path = f"{done}/{name}" if done else name
            if path not in self._open:
                group, link = self._open[done], name.encode()
                if not group.links.exists(link):  # not there: the write creates it
                    return self._where[done], "/".join(parts[depth:])
                kind = group.links.get_info(link).type
                if kind == h5py.h5l.TYPE_EXTERNAL:
                    other = group.links.get_val(link)[0].decode(errors="replace")
                    how = "is" if path == target.strip("/") else f"lies behind /{path},"
                    raise OutputError(
                        f"{target} {how} an external link into {other}: vlmlabel would write into that "
                        "other file outside its crash-safe copy; relabel that file itself, or use "
                        "another --reward-key"
                    )
                try:
                    info = h5py.h5o.get_info(group, link)
                except (KeyError, RuntimeError, ValueError):
                    raise OutputError(
                        f"/{path} in {self._file} is a link to nothing; the rewards of {target} cannot "
                        "be written under it: fix or remove the link"
                    ) from None
                if info.fileno != self._fileno:
                    raise OutputError(
                        f"{target} leads through /{path}, a link into another file: vlmlabel would "
                        "write into that other file outside its crash-safe copy; relabel that file "
                        "itself, or use another --reward-key"
                    )
                if info.type != h5py.h5o.TYPE_GROUP:
                    raise OutputError(
                        f"/{path} in {self._file} is not a group; the rewards of {target} cannot be "
                        "written under it: rename it, or use another --reward-key"
                    )
                self._where[path] = info.addr
                if depth + 1 < len(parts):
                    self._open[path] = h5py.h5g.open(group, link)
            done = path
        self._where = {p: a for p, a in self._where.items() if not p or p in self._open or p == done}
        return self._where[done], ""

    def free_slot(self, path: str) -> tuple[h5py.h5g.GroupID, bytes] | None:
        """The group that is to hold ``path`` and the new link's name; None when the name is taken or a group on
        the way cannot be opened (a dataset, a dangling link)."""
        parent, _, name = path.strip("/").rpartition("/")
        self._along(parent)
        group = self._group(parent)
        try:
            if group is None or group.links.exists(name.encode()):
                return None
        except (KeyError, ValueError, RuntimeError):  # a name HDF5 does not take as a link's ("", ...)
            return None
        return group, name.encode()

    def _group(self, path: str) -> h5py.h5g.GroupID | None:
        if path in self._open:
            return self._open[path]
        above, _, name = path.rpartition("/")
        parent = self._group(above)
        if parent is None:
            return None
        link = name.encode()
        try:
            group = h5py.h5g.open(parent, link) if parent.links.exists(link) else h5py.h5g.create(parent, link)
        except (KeyError, ValueError, RuntimeError):  # not a group, a dangling link, a name HDF5 refuses
            return None
        self._open[path] = group
        return group


def _fill(handle: h5py.File, stream: RowStream, overwrite: bool, between: Callable[[], None]) -> None:
    """Create the stream's datasets once the row width is known, then write them a whole chunk at a time,
    calling ``between`` after each write."""
    blocks = iter(stream.blocks)
    first = next(blocks, None)
    if first is None:
        raise OutputError("nothing to write: the stream of rows is empty")
    stream.width = first.shape[1]
    targets = []
    for dataset, rows in zip(stream.datasets, stream.rows, strict=True):
        _replace(handle, dataset.path, overwrite)
        chunks = (min(dataset.chunk_rows, rows), first.shape[1]) if dataset.chunk_rows and rows else None
        created = handle.create_dataset(dataset.path, shape=(rows, first.shape[1]), dtype=dataset.dtype, chunks=chunks)
        created.attrs.update(dataset.attrs)
        targets.append(created)
    if not _fill_rows(targets, _chain(first, blocks), between):
        raise OutputError(
            f"the frames read did not match the {sum(stream.rows)} rows planned; the source changed while it was read"
        )


def _write_rows(dataset: h5py.Dataset) -> int:
    """Rows per write for ``dataset``: its chunk height, so no chunk is read back and rewritten."""
    return dataset.chunks[0] if dataset.chunks else max(1, len(dataset))


def _fill_rows(
    targets: list[h5py.Dataset], blocks: Iterator[np.ndarray], between: Callable[[], None] = lambda: None
) -> bool:
    """Fill ``targets`` in order from ``blocks``, buffering rows until a whole chunk (or the rest) can be written.

    True when the rows fill the targets exactly.
    """
    index, filled, pending_rows = 0, 0, 0
    pending: list[np.ndarray] = []
    for block in blocks:
        pending.append(block)
        pending_rows += len(block)
        while index < len(targets):
            target = targets[index]
            want = min(_write_rows(target), len(target) - filled)
            if pending_rows < want:
                break
            rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
            if want:
                target[filled : filled + want] = rows[:want]
                between()
            pending, pending_rows = ([rows[want:]] if len(rows) > want else []), len(rows) - want
            filled += want
            if filled == len(target):
                index, filled = index + 1, 0
        if index == len(targets) and pending_rows:
            break
    return index == len(targets) and not pending_rows


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _attrs(item: h5py.HLObject) -> dict[str, Any]:
    return dict(item.attrs) if isinstance(item, h5py.Dataset) else {}


def _item_or_link(handle: h5py.File, path: str, objects_only: bool) -> h5py.HLObject | h5py.SoftLink | None:
    """What is at ``path``: the object, else (unless ``objects_only``) a link to nothing, which is the user's as
    much as a dataset is (``get`` alone does not see it, and the write would replace it). One link lookup when
    nothing is there, the common case (half the time of ``get``)."""
    try:
        if not handle.id.links.exists(path.encode()):
            return None
    except (KeyError, RuntimeError, ValueError):  # a group on the way is missing: nothing there
        return None
    found = handle.get(path)
    return handle.get(path, getlink=True) if found is None and not objects_only else found


def _present(path: Path, locations: dict[str, list[str]], everywhere: bool) -> dict[str, Present]:
    """Per name, what is found at its locations in the file at ``path``.

    ``everywhere`` (what is already written): only when every location holds it, made by the same run (one
    attribute read per location, all of them for the first). Otherwise (what a write would replace): a
    location vlmlabel did not write if there is one, so it is never replaced unseen, else the first.
    Groups count as {}."""
    found: dict[str, Present] = {}
    if not path.is_file() or not h5py.is_hdf5(path):
        return found
    with open_read_only(path) as handle:
        for name, paths in locations.items():
            present = [(p, i) for p in paths if (i := _item_or_link(handle, p, everywhere)) is not None]
            if not present or everywhere and len(present) < len(paths):
                continue
            if everywhere:
                made = [i.attrs.get(RESULT_ATTR) if isinstance(i, h5py.Dataset) else None for _, i in present]
                if any(m != made[0] for m in made[1:]):
                    continue
                where, item = present[0]
            else:
                where, item = next(
                    ((p, i) for p, i in present if not (isinstance(i, h5py.Dataset) and VERSION_ATTR in i.attrs)),
                    present[0],
                )
            found[name] = Present(where, _attrs(item))
    return found


class HDF5Destination:
    """The source file itself (in place) or an ``--output`` copy; rewards land beside each episode's data."""

    def __init__(self, source: HDF5Source, output: Path | None, episodes: list[Episode], link: bool = False):
        # ``link`` with ``output``: a labels file linking to the source's data instead of a full copy.
        self.linked = link and output is not None
        self.source = source
        self.source_path = source.path
        self.output = output
        self.path = source.path if output is None else output
        self.episodes = episodes
        self.targets = sorted({e.target for e in episodes})
        self.stamp = Stamp.of(source.paths)  # a labels file's: the file it links to too
        # What a labels file records of its source's frames (read once per version of the file: remembered).
        self.linked_frames = {source.image_key: content_fingerprint(source)} if self.linked else {}

    @staticmethod
    def default_output(source: HDF5Source) -> Path:
        return source.path.absolute()

    @staticmethod
    def output_suffixes(source: HDF5Source) -> tuple[str, ...]:
        return hdf5_suffixes(source.path)

    def _locations(self, name: str) -> list[str]:
        return [reward_path(t, name) for t in self.targets]

    def check(self, names: list[str], overwrite: bool) -> None:
        source, output = self.source_path, self.output
        if output is not None and output.exists() and output.resolve() == source.resolve():
            raise OutputError(
                f"--output {output} is SOURCE itself; drop --output to add the rewards to SOURCE, or name a new file"
            )
        check_output_file(output, overwrite)
        folder = atomic.real_target(self.path).parent
        check_folder(folder)
        if output is None and not os.access(source, os.W_OK):
            raise OutputError(f"{source} is read-only; use --output to write a labelled copy elsewhere")
        if output is None:
            refuse_if_busy(source)
        refuse_replacing(names, self.replaced(names), source, overwrite)
        refuse_external(
            self.source.file,
            self.source_path,
            self.path,
            [loc for n in names for loc in self._locations(n)],
            sorted({s.array for s in self.episodes[0].frames}),
        )
        if self.output is None and not open_by_others(source):
            # Written in place: the rewards, a journal of the metadata pages changed, and their new copies.
            steps = sum(e.steps for e in self.episodes) + len(self.episodes)
            check_space(folder, 8 * steps * len(names) + 8192 * len(self.targets), "the rewards")
        elif not self.linked:
            check_space(folder, source.stat().st_size, "the write (a full copy of the source)")

    def replaced(self, names: list[str]) -> dict[str, Present]:
        return _present(self.source_path, {n: self._locations(n) for n in names}, everywhere=False)

    def written(self, names: list[str]) -> dict[str, Present]:
        return _present(self.path, {n: self._locations(n) for n in names}, everywhere=True)

    def carried(self) -> dict[str, dict[str, Any]]:
        """The datasets beside the first episode's data, with their attributes: vlmlabel writes every episode's
        columns together, so the first episode's say what every episode holds."""
        group = self.source.file.get(self.targets[0]) if self.targets[0] else self.source.file
        if not isinstance(group, h5py.Group):
            return {}
        found = {}
        for name in group:
            try:
                item = group.get(name)
            except (KeyError, OSError, RuntimeError):  # a link HDF5 cannot follow: no column of vlmlabel's
                continue
            if isinstance(item, h5py.Dataset):
                found[name] = dict(item.attrs)
        return found

    def write(self, columns: list[RewardColumn], overwrite: bool, dropped: list[str]) -> Path:
        datasets = [
            H5Dataset(reward_path(target, column.name), values, column.attrs)
            for column in columns
            for target, values in self._by_target(column)
        ]
        remove = [reward_path(target, name) for name in dropped for target in self.targets]
        if self.linked:
            return write_linked(self.source_path, self.path, datasets, self.linked_frames, self.stamp, remove)
        return write_file(
            self.source_path, self.path, datasets, overwrite, self.stamp, remove=remove, keep_mode=self.output is None
        )

    def _by_target(self, column: RewardColumn) -> list[tuple[str, np.ndarray]]:
        """One reward's values per target (the episodes written under it, in episode order), in one pass over the
        episodes: a pass per target would make the write quadratic in episodes."""
        parts: dict[str, list[np.ndarray]] = {target: [] for target in self.targets}
        for episode, values in zip(self.episodes, column.values, strict=True):
            parts[episode.target].append(values)
        return [(target, np.concatenate(parts[target])) for target in self.targets]
