"""Read frames and episode boundaries from HDF5 files in the D4RL, robomimic, Minari and per-episode layouts.

The file is opened read-only and read in chunk-aligned blocks, so memory stays bounded by
one block whatever the file's length and compressed chunks are decompressed once.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlmlabel.errors import MULTI_CAMERA, SeveralCameras, SourceError
from vlmlabel.sources import stored_digest
from vlmlabel.sources.base import (
    EMBEDDING_GROUP,
    Align,
    Episode,
    FrameBlock,
    FrameFormat,
    Segment,
    SourceKind,
    content_fingerprint,
    reward_path,
    step_segments,
)

CHUNK_CACHE_BYTES = 64 * 1024 * 1024
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG"
_FLAT_OBS_GROUPS = ("observations", "observation", "obs")
_NEXT_OBS = {"observations": "next_observations", "observation": "next_observation", "obs": "next_obs"}
_EPISODE_END_KEYS = ("terminals", "timeouts")
_STEP_TYPE_LAST = 2  # dm_env StepType.LAST


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


def _stored_bytes(dataset: h5py.Dataset) -> bytes:
    """A CRC-32 of each stored chunk as it lies in the file (compressed chunks are not decompressed), or of
    blocks of rows where the rows are not in chunks of their own bytes (contiguous data, variable-length
    images whose bytes live outside the chunks)."""
    crcs: list[int] = []
    if dataset.chunks is not None and not _is_encoded_bytes(dataset):
        dataset.id.chunk_iter(lambda c: crcs.append(zlib.crc32(dataset.id.read_direct_chunk(c.chunk_offset)[1])))
    else:
        for block in read_rows(dataset, 0, dataset.shape[0], _DIGEST_ROWS, dataset.file.filename):
            crcs.append(zlib.crc32(b"".join(r.tobytes() for r in block) if block.dtype == object else block.tobytes()))
    return np.asarray(crcs, dtype=np.uint32).tobytes()


_DIGEST_ROWS = 256  # rows per CRC-32 of arrays hashed row by row (not chunk by chunk)
_SWEEP_BYTES = 8 << 20  # the digest reads plain arrays in sweeps of at most this many bytes...
_SWEEP_GAP = 64 << 10  # ...that also read the gaps (HDF5's own metadata) between arrays up to this size


@dataclass(frozen=True, slots=True)
class PlainRows:
    """A uint8 array HDF5 keeps as plain bytes in the source file itself (unfiltered, not virtual, no external raw
    files, every row's storage allocated): contiguous, or in chunks of whole rows. Its rows lie row after row in
    runs of ``run`` rows (one run, or one per chunk), so os.pread returns exactly what HDF5 would, without h5py's
    ~100 us of calls per read."""

    shape: tuple[int, ...]
    offsets: tuple[int, ...]  # where run k (rows k * run onwards) begins in the file
    run: int
    chunked: bool

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:])

    def spans(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """(file offset, rows) of the pieces holding rows [start, stop): one per run they cross."""
        while start < stop:
            k = start // self.run
            rows = min(stop, (k + 1) * self.run) - start
            yield self.offsets[k] + (start - k * self.run) * self.row_bytes, rows
            start += rows

    def stored(self) -> list[tuple[int, int, int]]:
        """(offset, bytes, bytes per CRC) of what the digest hashes, as ``_stored_bytes`` does: the rows of a
        contiguous array in blocks of ``_DIGEST_ROWS`` rows, or each chunk whole, as stored (its unused rows past
        the last one included)."""
        if self.chunked:
            return [(offset, self.run * self.row_bytes, self.run * self.row_bytes) for offset in self.offsets]
        return [(self.offsets[0], self.shape[0] * self.row_bytes, _DIGEST_ROWS * self.row_bytes)]


def plain_rows(dsid: h5py.h5d.DatasetID, fileno: object) -> PlainRows | None:
    """Where ``dsid``'s rows lie in the file ``fileno`` (the source's own), or None where HDF5 must read them:
    compact or virtual layout, filters, external raw files, another file (an external link), chunks that are not
    whole rows, not unsigned 8-bit, no rows, or storage not allocated (rows that read as fill values)."""
    if dsid.fileno != fileno:
        return None
    plist = dsid.get_create_plist()
    layout = plist.get_layout()
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED) or plist.get_nfilters() or plist.get_external_count():
        return None
    dtype = dsid.get_type()
    if not (dtype == h5py.h5t.STD_U8LE or dtype == h5py.h5t.STD_U8BE):  # HDF5's own uint8, read with no conversion
        return None
    shape = tuple(dsid.shape)
    if not shape or shape[0] == 0:
        return None
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dsid.get_offset()
        if offset is None or dsid.get_storage_size() < math.prod(shape):
            return None
        return PlainRows(shape, (offset,), shape[0], chunked=False)
    run = plist.get_chunk()[0]
    if tuple(plist.get_chunk()[1:]) != shape[1:]:
        return None
    size = run * math.prod(shape[1:])
    offsets: list[int] = []

    def note(chunk: h5py.h5d.StoreInfo) -> None:  # each chunk in row order, whole, unfiltered; else -1
        in_order = chunk.chunk_offset[0] == len(offsets) * run and chunk.size == size and chunk.filter_mask == 0
        offsets.append(chunk.byte_offset if in_order and chunk.byte_offset is not None else -1)

    dsid.chunk_iter(note)
    if len(offsets) != -(-shape[0] // run) or -1 in offsets:
        return None
    return PlainRows(shape, tuple(offsets), run, chunked=True)


def _pread_into(fd: int, buffer: memoryview, offset: int) -> bool:
    """Fill ``buffer`` with the file's bytes from ``offset``; False when the file ends first (truncated)."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            return False
        done += got
    return True


def _pread(fd: int, start: int, stop: int, where: object) -> memoryview:
    """The file's bytes [start, stop), refused where the file ends first."""
    data = memoryview(bytearray(stop - start))
    if not _pread_into(fd, data, start):
        raise SourceError(f"reading the frames at bytes {start}-{stop} of {where} failed (truncated or corrupt?)")
    return data


def _block_crcs(data: memoryview, block: int) -> list[int]:
    return [zlib.crc32(data[b : b + block]) for b in range(0, len(data), block)]


def _piece_crcs(fd: int, offset: int, size: int, block: int, where: object) -> list[int]:
    """CRC-32s of one stored piece of any size, block by block, read a sweep at a time."""
    per_read = max(1, _SWEEP_BYTES // block) * block  # whole blocks, or one block larger than a sweep
    crcs: list[int] = []
    for start in range(offset, offset + size, per_read):
        stop = min(start + per_read, offset + size)
        if stop - start <= _SWEEP_BYTES:
            crcs += _block_crcs(_pread(fd, start, stop, where), block)
            continue
        crc = 0
        for piece in range(start, stop, _SWEEP_BYTES):
            crc = zlib.crc32(_pread(fd, piece, min(piece + _SWEEP_BYTES, stop), where), crc)
        crcs.append(crc)
    return crcs


def _plain_crcs(fd: int, arrays: list[PlainRows], where: object) -> list[bytes]:
    """What ``_stored_bytes`` gives for each plain array, read straight from the file: every stored piece in file
    order, in sweeps of up to 8 MiB that also cover the small gaps (HDF5's metadata) between pieces, so a few
    large sequential reads instead of h5py calls per array."""
    pieces = [
        (offset, size, block, a, p)
        for a, plain in enumerate(arrays)
        for p, (offset, size, block) in enumerate(plain.stored())
    ]
    crcs: dict[tuple[int, int], list[int]] = {}

    def sweep(group: list[tuple[int, int, int, int, int]]) -> None:
        if len(group) == 1:  # maybe larger than a sweep
            offset, size, block, a, p = group[0]
            crcs[a, p] = _piece_crcs(fd, offset, size, block, where)
            return
        start = group[0][0]
        data = _pread(fd, start, max(offset + size for offset, size, *_ in group), where)
        for offset, size, block, a, p in group:
            crcs[a, p] = _block_crcs(data[offset - start : offset - start + size], block)

    group: list[tuple[int, int, int, int, int]] = []
    reach = 0  # where the group's bytes end
    for piece in sorted(pieces):
        offset, size = piece[:2]
        if group and (offset - reach > _SWEEP_GAP or offset + size - group[0][0] > _SWEEP_BYTES):
            sweep(group)
            group = []
        group.append(piece)
        reach = max(reach, offset + size) if len(group) > 1 else offset + size
    if group:
        sweep(group)
    counts = [0] * len(arrays)
    for _, _, _, a, _ in pieces:
        counts[a] += 1
    return [
        np.asarray([c for p in range(counts[a]) for c in crcs[a, p]], dtype=np.uint32).tobytes()
        for a in range(len(arrays))
    ]


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


def _member(group: h5py.Group, name: str) -> str:
    return f"{group.name.rstrip('/')}/{name}"


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _is_encoded_bytes(dset: h5py.Dataset) -> bool:
    """Variable-length uint8 (as Minari >= 0.5.3 writes images) or opaque byte blobs."""
    base = h5py.check_vlen_dtype(dset.dtype)
    return (base is not None and np.dtype(base) == np.uint8) or dset.dtype.kind == "V"


def frame_format_of(dset: h5py.Dataset) -> FrameFormat | str:
    """The frame format of an image array, or a sentence saying why it is not one."""
    shape, dtype = dset.shape, dset.dtype
    if len(shape) == 1 and _is_encoded_bytes(dset):
        return FrameFormat("encoded", (), str(dtype))
    if len(shape) == 2 and dtype == np.uint8 and shape[0] > 0:
        head = bytes(dset[0, :4].tobytes())
        if head.startswith(_JPEG_MAGIC) or head.startswith(_PNG_MAGIC):
            return FrameFormat("encoded", (), str(dtype))
    if len(shape) not in (3, 4):
        return f"has rank {len(shape)} (shape {shape}); frames must be (N, H, W, C), (N, C, H, W) or (N, H, W)"
    if dtype.kind == "f":
        return (
            f"holds {dtype} values; frames must be uint8 images (0-255): convert them, e.g. (x * 255).astype('uint8')"
        )
    if dtype != np.uint8:
        return f"holds {dtype} values; frames must be uint8 images"
    if len(shape) == 3:
        return FrameFormat("HW", tuple(shape[1:]), "uint8")
    if shape[-1] in (1, 3):
        return FrameFormat("HWC", tuple(shape[1:]), "uint8")
    if shape[1] in (1, 3):
        return FrameFormat("CHW", tuple(shape[1:]), "uint8")
    return f"has shape {shape}: frames need 1 or 3 channels, first or last"


def _image_candidates(
    group: h5py.Group, prefix: str = "", depth: int = 2, only: tuple[str, ...] | None = None
) -> list[str]:
    """Datasets under ``group`` that look like frames (uint8 image arrays or encoded images); ``only``: the
    subgroups of ``group`` looked into (None: all; the others' members are never opened)."""
    found = []
    for name in _names(group):
        path = f"{prefix}{name}"
        if name.startswith("next_") or name == EMBEDDING_GROUP:
            continue  # next observations are read for --align next, never scored as the frames
        if only is not None and name not in only and _is_group(group, name):
            continue
        item = group.get(name)
        if isinstance(item, h5py.Dataset):
            if isinstance(frame_format_of(item), FrameFormat):
                found.append(path)
        elif isinstance(item, h5py.Group) and depth > 0:
            found.extend(_image_candidates(item, f"{path}/", depth - 1))
    return found


def _names(group: h5py.Group) -> list[str]:
    """The names in ``group``; one that is not UTF-8 (h5py gives it as bytes) is refused: episodes, frames and
    rewards are named by text paths."""
    names = list(group)
    odd = next((n for n in names if not isinstance(n, str)), None)
    if odd is not None:
        raise SourceError(
            f"{group.name} in {group.file.filename} holds a name that is not UTF-8 ({odd!r}); rename it "
            "(h5py: group.move(old, new)) so vlmlabel can name what it reads and writes"
        )
    return names


def _is_group(parent: h5py.Group, name: str, strict: bool = False) -> bool:
    """Whether ``parent[name]`` is a group, from the object's header alone (about 9 us; opening it through h5py
    costs twice that). Where the header cannot be read (a broken link), h5py's own answer: ``get`` (no group),
    or with ``strict`` the error of ``parent[name]``."""
    try:
        return bool(h5py.h5o.get_info(parent.id, name.encode()).type == h5py.h5o.TYPE_GROUP)
    except (KeyError, RuntimeError, OSError, ValueError):
        return isinstance(parent[name] if strict else parent.get(name), h5py.Group)


def _float_image_like(group: h5py.Group, prefix: str = "", depth: int = 3) -> list[str]:
    """The first float array shaped like frames under ``group`` (deep enough for data/demo_0/obs/x), if any."""
    for name, item in group.items():
        if (
            isinstance(item, h5py.Dataset)
            and item.ndim == 4
            and item.dtype.kind == "f"
            and (item.shape[-1] in (1, 3) or item.shape[1] in (1, 3))
        ):
            return [f"{prefix}{name}"]
        if isinstance(item, h5py.Group) and depth > 0:
            found = _float_image_like(item, f"{prefix}{name}/", depth - 1)
            if found:
                return found
    return []


def read_rows(dataset: h5py.Dataset, start: int, stop: int, max_rows: int, where: object) -> Iterator[np.ndarray]:
    """Rows [start, stop) of ``dataset`` in blocks whose edges fall on chunk boundaries (each chunk read once)."""
    chunk = dataset.chunks[0] if dataset.chunks else 1
    step = max(chunk, (max_rows // chunk) * chunk)
    while start < stop:
        end = min(stop, (start // step + 1) * step)
        try:
            block = dataset[start:end]
        except (OSError, RuntimeError) as exc:
            raise unreadable(where, exc, f"reading {dataset.name} rows {start}-{end} of {where}") from None
        yield block
        start = end


def read_rows_into(dataset: h5py.Dataset, segment: Segment, out: np.ndarray, where: object) -> bool:
    """Rows of ``segment`` straight into ``out``: HDF5 writes into the caller's buffer, with no intermediate
    array (about 1.7x faster than slicing at 224 px). False, reading nothing, when the rows are not of
    ``out``'s dtype and frame shape: the caller then reads them the ordinary way and says what is wrong."""
    if dataset.dtype != out.dtype or dataset.shape[1:] != out.shape[1:] or len(segment) != len(out):
        return False
    try:
        dataset.read_direct(out, source_sel=np.s_[segment.start : segment.stop])
    except (OSError, RuntimeError) as exc:
        raise unreadable(where, exc, f"reading {dataset.name} rows {segment.start}-{segment.stop} of {where}") from None
    return True


_LOCK_ERRNO = re.compile(r"unable to lock file, errno = (\d+)")
_NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)  # the file system has no locks: nothing holds one


def unreadable(path: object, exc: BaseException, doing: str) -> SourceError:
    """What an HDF5 error met ``doing`` something with the file at ``path`` means, in one line.

    A file another process is writing is busy, not damaged: it holds HDF5's lock on the file (a lock error
    whose errno says the lock is taken), or the file's superblock marks it open for writing (as an SWMR
    writer, or any libver='latest' writer, leaves it until it closes the file; a writer that died leaves it
    too). A lock error saying the file system has no locks is that. Anything else: truncated or corrupt."""
    text = str(exc)
    code = _LOCK_ERRNO.search(text)
    number = int(code.group(1)) if code else getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code and number in _NO_LOCKS:
        return SourceError(
            f"{path}: this file system does not support the file locks HDF5 takes ({text}); set "
            "HDF5_USE_FILE_LOCKING=FALSE (or BEST_EFFORT) and run again"
        )
    if code or number in (errno.EAGAIN, errno.EWOULDBLOCK):
        return SourceError(
            f"{path} is locked by another program that has it open for writing (HDF5 file "
            "locking); wait for it to finish. The file is not damaged"
        )
    if "already open for write" in text:
        return SourceError(
            f"{path} is open for writing by another program: HDF5 marks it as being written (an "
            "SWMR writer does so while it runs); wait for it to finish. The file is not damaged; if "
            f"no program writes it any more (one that died leaves the mark), clear the mark with "
            f"`h5clear -s {path}`"
        )
    return SourceError(f"{doing} failed (truncated or corrupt?): {text}")


def open_read_only(path: Path) -> h5py.File:
    """The file opened for reading, with a chunk cache large enough that each compressed chunk is
    decompressed once although consecutive batches cut through it; one that cannot be is refused in one line
    that says why (``unreadable``: busy, or damaged)."""
    try:
        return h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=100_003)
    except OSError as exc:
        raise unreadable(path, exc, f"opening {path} as HDF5") from None


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


LINKED_ATTR = "vlmlabel_linked_file"  # on a labels file's root: ``LinkedFile`` as JSON


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

    def verify(self, labels: Path) -> None:
        """Refuse, naming the file, a linked file that is missing where ``labels`` names it, that HDF5 would not
        read from there, or whose frames are not those it was made from."""
        target = self._ref().refuse_unless_intended(labels)
        if target.resolve() == labels.resolve():
            raise SourceError(f"{labels}: the labels file names itself as the file it links to; make it again")
        for key, fingerprint in self.frames.items():
            try:
                with HDF5Source(target, key) as linked:
                    same = content_fingerprint(linked) == fingerprint
            except SourceError as exc:
                raise SourceError(f"{labels} is a labels file reading {os.path.normpath(target)}: {exc}") from None
            if not same:
                raise SourceError(
                    f"{labels} is a labels file made from {self.filename}, but "
                    f"{os.path.normpath(target)} now holds "
                    f"other frames ({key}): it is not the file that was linked. Put that file back "
                    "(the two files move together), or relabel the file to make a new labels file"
                )


class HDF5Source:
    """An HDF5 dataset of image observations, opened read-only."""

    _group_names: frozenset = frozenset()
    linked: LinkedFile | None = None  # a labels file's record of the file it links to

    kind = SourceKind.hdf5
    seekable = True
    holds_outputs = True  # rewards and the embedding cache are written into the file itself
    cache_scope = ""

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
                self.linked.verify(self.path)
            self._detect(image_key)
        except (OSError, RuntimeError, KeyError) as exc:
            self.file.close()
            raise unreadable(self.path, exc, f"reading {self.path}") from None
        except SourceError:
            self.file.close()
            raise

    # -- layout detection -------------------------------------------------------------------------

    def _detect(self, image_key: str | None) -> None:
        root = self.file
        if not root.keys():
            raise SourceError(f"{self.path} is empty: it holds no datasets")
        minari = sorted(
            (k for k in _names(root) if re.fullmatch(r"episode_\d+", k) and _is_group(root, k, strict=True)),
            key=_natural_key,
        )
        if minari:
            self.layout, self._episode_groups = "minari", minari
            self._group_names = frozenset(minari)
            self._choose_key(root[minari[0]], image_key, where=minari[0])
            return
        flat = _image_candidates(root, depth=1, only=_FLAT_OBS_GROUPS)  # frames at the root or in observations/
        parent = root["data"] if isinstance(root.get("data"), h5py.Group) else root
        prefix = "data/" if parent is not root else ""
        groups = sorted(
            (
                k
                for k in _names(parent)
                if k != EMBEDDING_GROUP
                and _is_group(parent, k)
                and (prefix or (k not in _FLAT_OBS_GROUPS and k not in _NEXT_OBS.values()))
            ),
            key=_natural_key,
        )
        first = parent[groups[0]] if groups else None
        episodic = first is not None and bool(
            _image_candidates(first) or (image_key and self._find_key(first, image_key))
        )
        flat_key_ok = image_key is None or isinstance(root.get(image_key), h5py.Dataset)
        if flat and (flat_key_ok or not episodic):
            self.layout, self._episode_groups = "flat", []
            self._group_names = frozenset()
            self._choose_key(root, image_key, where="the file root", candidates=flat)
        elif episodic:
            self._episode_groups = [f"{prefix}{g}" for g in groups]
            self._group_names = frozenset(self._episode_groups)
            self.layout = "robomimic" if prefix and all(g.startswith("demo_") for g in groups) else "episodes"
            self._choose_key(first, image_key, where=self._episode_groups[0])
        elif image_key is not None:
            if first is not None:  # the key may name frames behind a link to a missing file
                self._refuse_missing_files(first, self._key_paths(image_key))
            self._choose_key(root, image_key, where="the file", candidates=[])
        else:
            self._no_images(root, "the file")

    def _choose_key(
        self, group: h5py.Group, image_key: str | None, where: str, candidates: list[str] | None = None
    ) -> None:
        found = candidates if candidates is not None else _image_candidates(group)
        self.cameras = found
        if image_key is not None:
            key = self._find_key(group, image_key)
            if key is None:
                self._refuse_missing_files(group, self._key_paths(image_key))
                listed = ", ".join(found) if found else "none"
                raise SourceError(f"--image-key {image_key!r} not found in {where}; image datasets there: {listed}")
            fmt = frame_format_of(frames_dataset(self.file, _member(group, key), self.path))
            if isinstance(fmt, str):
                raise SourceError(f"{key} in {where} {fmt}")
            self.image_key, self.frame_format = key, fmt
            return
        if not found:
            self._no_images(group, where)
        if len(found) > 1:
            raise SeveralCameras(f"several image datasets in {where}: {', '.join(found)}; {MULTI_CAMERA}", found)
        self.image_key = found[0]
        fmt = frame_format_of(frames_dataset(self.file, _member(group, found[0]), self.path))
        assert isinstance(fmt, FrameFormat)  # every candidate was listed for having a frame format
        self.frame_format = fmt

    def _refuse_missing_files(self, group: h5py.Group, names: list[str]) -> None:
        """A name that leads through an external link to a missing file is reported as that, not as absent."""
        folder = self.path.absolute().parent
        for name in names:
            for ref in links_on_path(self.file, _member(group, name)):
                if not ref.intended(folder).is_file():
                    raise SourceError(ref.missing(self.path))

    @staticmethod
    def _key_paths(key: str) -> list[str]:
        """Where ``--image-key KEY`` may be, inside a group."""
        return [key, f"obs/{key}", f"observations/{key}"]

    def _find_key(self, group: h5py.Group, key: str) -> str | None:
        for candidate in self._key_paths(key):
            if isinstance(group.get(candidate), h5py.Dataset):
                return candidate
        return None

    def _no_images(self, group: h5py.Group, where: str):
        folder = self.path.absolute().parent
        for ref in all_external_links(group):
            if not ref.intended(folder).is_file():
                raise SourceError(ref.missing(self.path))
        floats = _float_image_like(group)
        if floats:
            raise SourceError(
                f"{floats[0]} in {where} holds float frames; vlmlabel reads uint8 images (0-255): "
                "convert them, e.g. (x * 255).astype('uint8')"
            )
        datasets: list[str] = []
        group.visit(lambda name: datasets.append(name) if isinstance(group[name], h5py.Dataset) else None)
        listed = ", ".join(datasets[:12]) + (" ..." if len(datasets) > 12 else "") if datasets else "none"
        raise SourceError(f"no image dataset found in {where} (datasets: {listed}); name the frames with --image-key")

    # -- episodes ---------------------------------------------------------------------------------

    def episodes(self, align: Align) -> list[Episode]:
        """Episodes in file order, each with the frame rows that score its steps under ``align``."""
        if self.layout == "flat":
            episodes = self._flat_episodes(align)
        else:
            episodes = [self._group_episode(name, align) for name in self._episode_groups]
        if not episodes:
            raise SourceError(f"{self.path} holds no episodes")
        return episodes

    def _group_episode(self, name: str, align: Align) -> Episode:
        array, rows, next_array = self._group_arrays(name)
        if self.layout == "minari":
            # Minari stores T+1 observations and T+1 infos (the reset's, then one per step): the reward lands
            # in infos with one score per observation, whatever the alignment; step t reads row t+1 (next)
            # or row t (frame).
            if rows <= 1:
                raise SourceError(f"episode {name} has {rows} observation(s) and no steps; remove it or fix the file")
            return Episode(name, rows, (Segment(array, 0, rows),), f"{name}/infos", per_observation=True)
        if rows == 0:
            raise SourceError(f"episode {name} is empty ({array} has 0 frames); remove it or fix the file")
        if align is Align.next and next_array is not None:
            next_rows = self._next_rows.get(next_array)
            self._check_next(
                next_array, self.file[next_array].shape[0] if next_rows is None else next_rows, array, rows
            )
        return Episode(name, rows, step_segments(array, 0, rows, align, next_array), name)

    def _check_next(self, next_array: str, next_rows: int, array: str, rows: int) -> None:
        """``--align next`` scores an episode's last step by the stored next observation of its row: the arrays
        must line up row for row."""
        if next_rows != rows:
            raise SourceError(
                f"{next_array} has {next_rows} rows but {array} has {rows} in {self.path}: the next "
                "observations do not line up with the frames; fix the file, or score each step by "
                "its own frame with --align frame"
            )

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
        for key in self._key_paths(self.image_key):
            frames = _lookup(group, key)
            if frames is not None:
                break
        else:
            raise _Unsure(name)  # h5py's lookup names what is missing
        array, fileno = f"{name}/{key}", self.file.id.fileno
        plain = self._plain[array] = plain_rows(frames, fileno)
        next_array = None
        if self.layout != "minari":
            for candidate in self._next_candidates(key):
                found = _lookup(group, candidate)
                if found is not None:
                    next_array = f"{name}/{candidate}"
                    self._plain[next_array] = plain_rows(found, fileno)
                    self._next_rows[next_array] = found.shape[0]
                    break
        return array, plain.shape[0] if plain else frames.shape[0], next_array

    def _group_arrays_h5py(self, name: str) -> tuple[str, int, str | None]:
        group = self.file[name]
        key = self._find_key(group, self.image_key)
        if key is None:
            raise SourceError(f"episode {name} has no {self.image_key}; every episode needs the same image key")
        array = f"{name}/{key}"
        return (array, self.file[array].shape[0], None if self.layout == "minari" else self._next_obs_path(name, key))

    def _flat_episodes(self, align: Align) -> list[Episode]:
        frames = self.file[self.image_key]
        total = frames.shape[0]
        if total == 0:
            raise SourceError(f"{self.image_key} in {self.path} has 0 frames")
        ends = self._flat_episode_ends(total)
        next_array = self._next_obs_path("", self.image_key)
        if align is Align.next and next_array is not None:
            self._check_next(next_array, self.file[next_array].shape[0], self.image_key, total)
        episodes, start = [], 0
        for index, end in enumerate(ends):
            segments = step_segments(self.image_key, start, end, align, next_array)
            episodes.append(Episode(f"episode {index} (rows {start}-{end - 1})", end - start, segments, ""))
            start = end
        return episodes

    def _flat_episode_ends(self, total: int) -> list[int]:
        """Row index after each episode's last step, from terminals/timeouts or step_type."""
        done = np.zeros(total, dtype=bool)
        markers = [k for k in _EPISODE_END_KEYS if isinstance(self.file.get(k), h5py.Dataset)]
        for key in markers:
            flags = self._dataset(key)
            if flags.shape[0] != total:
                raise SourceError(
                    f"{key} has {flags.shape[0]} rows but {self.image_key} has {total}; the file is inconsistent"
                )
            done |= np.asarray(flags[:]).reshape(total, -1)[:, 0].astype(bool)
        if not markers and isinstance(self.file.get("step_type"), h5py.Dataset):
            step_type = self._dataset("step_type")
            if step_type.shape[0] != total:
                raise SourceError(f"step_type has {step_type.shape[0]} rows but {self.image_key} has {total}")
            done = np.asarray(step_type[:]).reshape(total) == _STEP_TYPE_LAST
        ends = (np.flatnonzero(done) + 1).tolist()
        if not ends or ends[-1] != total:
            ends.append(total)
        return ends

    @staticmethod
    def _next_candidates(key: str) -> list[str]:
        """Where the next observation of frames at ``key`` may be, inside the same group."""
        head, _, tail = key.partition("/")
        candidates = [f"{_NEXT_OBS[head]}/{tail}" if tail else _NEXT_OBS[head]] if head in _NEXT_OBS else []
        return list(dict.fromkeys(candidates + [f"next_{key}"]))

    def _next_obs_path(self, group: str, key: str) -> str | None:
        for candidate in self._next_candidates(key):
            path = f"{group}/{candidate}" if group else candidate
            if isinstance(self.file.get(path), h5py.Dataset):
                return path
        return None

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
        if self.layout == "flat":
            first = self.file[self.image_key]
        else:
            group = self.file[self._episode_groups[0]]
            first = group[self._find_key(group, self.image_key) or self.image_key]
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

    # -- embedding cache and per-step values -------------------------------------------------------

    def array_rows(self, array: str) -> int:
        return self.file[array].shape[0]

    @property
    def cache_groups(self) -> frozenset[str]:
        """The episode groups: each keeps the cache of its frame arrays inside it (``vlmlabel.cache.layout``)."""
        return self._group_names

    def step_values(self, episode: Episode, key: str) -> np.ndarray | None:
        """A per-step dataset (rewards, success, a written reward...) for one episode, or None if absent."""
        if self.layout == "flat":
            item = self.file.get(key)
            if not isinstance(item, h5py.Dataset):
                return None
            rows, frames = (item.shape or (0,))[0], self.file[episode.frames[0].array].shape[0]
            if rows != frames:  # a slice of it would pass for one value per step
                raise SourceError(
                    f"{key} has {rows} rows but the frames {episode.frames[0].array} have {frames}: "
                    "not one value per step of this file"
                )
            start = episode.frames[0].start
            return np.asarray(self._dataset(key)[start : start + episode.steps])
        group = episode.name
        for path in (f"{group}/{key}", f"{episode.target}/{key}", f"{group}/infos/{key}"):
            if isinstance(self.file.get(path), h5py.Dataset):
                return np.asarray(self._dataset(path)[:])
        return None

    def _dataset(self, path: str) -> h5py.Dataset:
        """The dataset at ``path``, refused if a link made HDF5 read it from another file than the one named."""
        dataset = self.file[path]
        refuse_misread(self.file, path, dataset, self.path)
        return dataset

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
