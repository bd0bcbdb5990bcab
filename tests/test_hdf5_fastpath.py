"""HDF5 reading without h5py's per-call cost: plain arrays read and hashed straight from the file, episode groups
gathered with low-level calls. Each shortcut must give exactly what h5py gives, and step aside for anything else."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import layouts
from vlmlabel.errors import SourceError
from vlmlabel.sources.base import Align, Segment
from vlmlabel.sources.hdf5 import HDF5Source, PlainRows, plain_rows
from vlmlabel.sources.hdf5 import layouts as hdf5_layouts
from vlmlabel.sources.hdf5 import raw as hdf5_raw
from vlmlabel.sources.hdf5 import source as hdf5_source

FRAMES = layouts.make_frames(300, 8, 8, seed=5)

# storage -> whether its rows are plain bytes in the file (read with os.preadv)
STORAGES = {
    "contiguous": (dict(), True),
    "chunked": (dict(chunks=(4, 8, 8, 3)), True),
    "chunks of part rows": (dict(chunks=(4, 4, 8, 3)), False),
    "chunks not all written": (dict(chunks=(4, 8, 8, 3), holes=True), False),
    "gzip": (dict(chunks=(4, 8, 8, 3), compression="gzip"), False),
    "compact": (dict(compact=True), False),
    "external raw file": (dict(external=True), False),
    "fill value only": (dict(unwritten=True), False),
    "virtual": (dict(virtual=True), False),
    "external link": (dict(linked=True), False),
}


def _frames_at(path: Path, name: str, frames: np.ndarray, storage: dict) -> None:
    """``frames`` at ``name`` in the file ``path`` (opened for appending), stored as ``storage`` says."""
    folder = path.parent
    with h5py.File(path, "a") as f:
        if storage.get("compact"):
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.COMPACT)
            space = h5py.h5s.create_simple(frames.shape)
            h5py.h5d.create(f.id, name.encode(), h5py.h5t.STD_U8LE, space, dcpl=dcpl, lcpl=f._lcpl).write(
                h5py.h5s.ALL, h5py.h5s.ALL, frames
            )
        elif storage.get("external"):
            raw = folder / f"{name.replace('/', '_')}.raw"
            raw.write_bytes(frames.tobytes())
            f.create_dataset(name, frames.shape, np.uint8, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
        elif storage.get("holes"):
            dataset = f.create_dataset(name, frames.shape, np.uint8, fillvalue=7, chunks=storage["chunks"])
            dataset[:4] = frames[:4]  # the later chunks stay unwritten
        elif storage.get("unwritten"):
            f.create_dataset(name, frames.shape, np.uint8, fillvalue=7)
        elif storage.get("virtual") or storage.get("linked"):
            other = folder / f"{name.replace('/', '_')}-rows.h5"
            with h5py.File(other, "w") as g:
                g.create_dataset("rows", data=frames)
            if storage.get("linked"):
                f[name] = h5py.ExternalLink(other.name, "/rows")
            else:
                layout = h5py.VirtualLayout(frames.shape, np.uint8)
                layout[:] = h5py.VirtualSource(other.name, "/rows", frames.shape)
                f.create_virtual_dataset(name, layout)
        else:
            f.create_dataset(name, data=frames, **storage)


def _robomimic(path: Path, lengths: list[int], storage: dict, userblock: int = 0) -> Path:
    with h5py.File(path, "w", userblock_size=userblock or None):
        pass
    start = 0
    for k, length in enumerate(lengths):
        _frames_at(path, f"data/demo_{k}/obs/agentview_image", FRAMES[start : start + length], storage)
        start += length
    return path


@pytest.mark.parametrize("kind", sorted(STORAGES))
def test_plain_rows_only_for_contiguous_uint8_bytes_in_the_file_itself(tmp_path, kind):
    storage, plain = STORAGES[kind]
    path = _robomimic(tmp_path / "d.h5", [10, 12], storage)
    with h5py.File(path, "r") as f:
        found = plain_rows(f["data/demo_1/obs/agentview_image"].id, f.id.fileno)
    assert (found is not None) == plain
    if plain:
        assert found is not None and found.shape == (12, 8, 8, 3)
        with open(path, "rb") as raw:
            read = b""
            for offset, rows in found.spans(0, 12):
                raw.seek(offset)
                read += raw.read(rows * 8 * 8 * 3)
        assert read == FRAMES[10:22].tobytes()


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.float32])
def test_plain_rows_refuses_other_element_types(tmp_path, dtype):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=FRAMES[:4].astype(dtype))
    with h5py.File(path, "r") as f:
        assert plain_rows(f["x"].id, f.id.fileno) is None


def test_plain_rows_refuses_a_byte_hdf5_converts_when_reading(tmp_path):
    """A 1-byte unsigned integer with 4 significant bits: HDF5 masks it when reading, so its bytes are not its
    values."""
    narrow = h5py.h5t.STD_U8LE.copy()
    narrow.set_precision(4)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        h5py.h5d.create(f.id, b"x", narrow, h5py.h5s.create_simple((4, 8, 8, 3))).write(
            h5py.h5s.ALL, h5py.h5s.ALL, np.full((4, 8, 8, 3), 0xFF, np.uint8)
        )
    with h5py.File(path, "r") as f:
        assert plain_rows(f["x"].id, f.id.fileno) is None
        assert f["x"][0, 0, 0, 0] == 0x0F  # what a raw read would have got wrong


@pytest.mark.parametrize("kind", sorted(STORAGES))
@pytest.mark.parametrize("userblock", [0, 1024])
def test_rows_read_are_exactly_h5pys(tmp_path, kind, userblock, monkeypatch):
    storage, plain = STORAGES[kind]
    path = _robomimic(tmp_path / "d.h5", [10, 12, 9], storage, userblock)
    through_h5py = []
    original = hdf5_source.read_rows_into
    monkeypatch.setattr(hdf5_source, "read_rows_into", lambda *a: through_h5py.append(1) or original(*a))
    with HDF5Source(path) as source, h5py.File(path, "r") as f:
        for episode in source.episodes(Align.next):
            for segment in episode.frames:
                out = np.full((len(segment), 8, 8, 3), 99, np.uint8)
                assert source.read_into(segment, out)
                assert np.array_equal(out, f[segment.array][segment.start : segment.stop])
    assert (not through_h5py) == plain


class _Claims:
    """A dataset id whose storage has an address, whatever its layout says (HDF5 gives none for the others)."""

    fileno = 1
    shape = (4, 8, 8, 3)

    def __init__(self, layout: int):
        self.layout = layout

    def get_create_plist(self):
        return self

    def get_layout(self):
        return self.layout

    def get_nfilters(self):
        return 0

    def get_external_count(self):
        return 0

    def get_type(self):
        return h5py.h5t.STD_U8LE

    def get_offset(self):
        return 2048

    def get_storage_size(self):
        return 4 * 8 * 8 * 3


def test_only_a_contiguous_layout_is_read_from_its_address():
    assert plain_rows(_Claims(h5py.h5d.CONTIGUOUS), 1) == PlainRows((4, 8, 8, 3), (2048,), 4, chunked=False)
    assert plain_rows(_Claims(h5py.h5d.COMPACT), 1) is None
    assert plain_rows(_Claims(h5py.h5d.VIRTUAL), 1) is None


def test_a_file_cut_short_under_a_plain_array_is_refused(tmp_path):
    path = _robomimic(tmp_path / "d.h5", [10, 12], {})
    with HDF5Source(path) as source:
        array = source.episodes(Align.frame)[1].frames[0].array
        plain = source._plain_rows(array)
        assert plain is not None
        os.truncate(path, plain.offsets[0] + 5 * plain.row_bytes)  # rows 5.. are gone
        out = np.empty((3, 8, 8, 3), np.uint8)
        assert source.read_into(Segment(array, 0, 3), out)  # still there
        with pytest.raises(SourceError, match="truncated or corrupt"):
            source.read_into(Segment(array, 4, 7), np.empty((3, 8, 8, 3), np.uint8))


def test_rows_that_do_not_fit_the_buffer_or_the_array_are_left_to_h5py(tmp_path, monkeypatch):
    path = _robomimic(tmp_path / "d.h5", [10], {})
    asked = []
    monkeypatch.setattr(hdf5_source, "read_rows_into", lambda dataset, segment, out, where: asked.append(segment))
    with HDF5Source(path) as source:
        array = source.episodes(Align.frame)[0].frames[0].array
        source.read_into(Segment(array, 0, 3), np.empty((3, 3, 8, 8), np.uint8))  # a CHW buffer
        source.read_into(Segment(array, 0, 3), np.empty((3, 8, 8, 3), np.float32))
        source.read_into(Segment(array, 0, 3), np.empty((4, 8, 8, 3), np.uint8))
        source.read_into(Segment(array, 0, 4), np.empty((8, 8, 8, 3), np.uint8)[::2])  # not contiguous
        source.read_into(Segment(array, 8, 11), np.empty((3, 8, 8, 3), np.uint8))  # past the last row
        assert len(asked) == 5
        assert source.read_into(Segment(array, 7, 10), np.empty((3, 8, 8, 3), np.uint8)) and len(asked) == 5


def _digest(path: Path, plain: bool, monkeypatch) -> str:
    monkeypatch.setenv("VLMLABEL_CACHE_DIR", str(path.parent / f"memo-{plain}-{os.urandom(4).hex()}"))
    with HDF5Source(path) as source:
        if not plain:
            source._fd = None  # every array through h5py
        arrays = sorted({s.array for e in source.episodes(Align.frame) for s in e.frames})
        return source.storage_digest(arrays)


@pytest.mark.parametrize("sweep, gap", [(8 << 20, 64 << 10), (1000, 10), (5000, 1 << 20), (20_000, 0)])
@pytest.mark.parametrize("chunks", [None, (7, 8, 8, 3), (300, 8, 8, 3)])
def test_the_plain_digest_is_the_one_h5py_reads_give(tmp_path, monkeypatch, sweep, gap, chunks):
    """Byte for byte the digest of earlier versions: arrays of a block and more (256 rows) or of many chunks,
    sweeps holding many arrays, one array over several sweeps, blocks or chunks larger than a sweep."""
    monkeypatch.setattr(hdf5_raw, "_SWEEP_BYTES", sweep)
    monkeypatch.setattr(hdf5_raw, "_SWEEP_GAP", gap)
    many = layouts.make_frames(700, 8, 8, seed=6)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        for k, (start, stop) in enumerate([(0, 3), (3, 259), (259, 260), (260, 700)]):
            f.create_dataset(
                f"data/demo_{k}/obs/agentview_image",
                data=many[start:stop],
                chunks=chunks and (min(chunks[0], stop - start), *chunks[1:]),
            )
            f.create_dataset(f"data/demo_{k}/padding", data=np.zeros(50 * k, np.uint8))  # gaps of many sizes
    with HDF5Source(path) as source:  # the fast path was taken
        assert all(isinstance(source._plain_rows(f"data/demo_{k}/obs/agentview_image"), PlainRows) for k in range(4))
    assert _digest(path, True, monkeypatch) == _digest(path, False, monkeypatch)


@pytest.mark.parametrize("storage", [{}, dict(chunks=(3, 8, 8, 3))])
def test_one_bit_in_any_episode_changes_the_plain_digest(tmp_path, monkeypatch, storage):
    path = _robomimic(tmp_path / "d.h5", [10] * 20, storage)
    seen = {_digest(path, True, monkeypatch)}
    for k in (0, 7, 19):
        with h5py.File(path, "r+") as f:
            f[f"data/demo_{k}/obs/agentview_image"][9, 7, 7, 2] ^= 1 << k % 8
        seen.add(_digest(path, True, monkeypatch))
    assert len(seen) == 4


def _groups(path: Path) -> None:
    """Episode groups whose frames and next observations lie wherever the lookup may find them."""
    with h5py.File(path, "w") as f:
        f["data/demo_0/agentview_image"] = FRAMES[:5]
        f["data/demo_0/next_agentview_image"] = FRAMES[5:10]
        f["data/demo_1/agentview_image"] = FRAMES[:4]  # the first place looked, before obs/
        f["data/demo_1/obs/agentview_image"] = FRAMES[:6]
        f["data/demo_2/observations/agentview_image"] = FRAMES[:3]
        f["data/demo_3/obs"] = np.zeros(3)  # a dataset where a group is looked through
        f["data/demo_3/observations/agentview_image"] = FRAMES[:7]
        f["data/demo_4/agentview_image"] = h5py.SoftLink("/nowhere")  # a dangling link, then the frames
        f["data/demo_4/obs/agentview_image"] = h5py.SoftLink("/data/demo_2/observations/agentview_image")
        f["data/demo_5/obs/agentview_image"] = FRAMES[:8]
        f["data/demo_5/next_obs"] = h5py.SoftLink("/data/demo_0")  # holds agentview_image
        f["data/demo_6/agentview_image"] = np.zeros((2, 2))  # not frames, but a dataset: found first
        f["data/demo_7"] = h5py.SoftLink("/data/demo_2")


def test_gathering_groups_finds_what_h5pys_lookups_find(tmp_path, monkeypatch):
    path = tmp_path / "g.h5"
    _groups(path)
    unsure = []
    direct = HDF5Source._group_arrays_direct

    def noted(self, name):
        try:
            return direct(self, name)
        except hdf5_source._Unsure:
            unsure.append(name)
            raise

    monkeypatch.setattr(HDF5Source, "_group_arrays_direct", noted)
    with HDF5Source(path, image_key="agentview_image") as source:
        names = source._episode_groups
        assert names == [f"data/demo_{k}" for k in range(8)]
        found = {name: source._group_arrays(name) for name in names}
        assert found == {name: source._group_arrays_h5py(name) for name in names}
    assert found["data/demo_0"] == ("data/demo_0/agentview_image", 5, "data/demo_0/next_agentview_image")
    assert found["data/demo_1"] == ("data/demo_1/agentview_image", 4, None)
    assert found["data/demo_4"] == ("data/demo_4/obs/agentview_image", 3, None)
    assert found["data/demo_5"] == ("data/demo_5/obs/agentview_image", 8, "data/demo_5/next_obs/agentview_image")
    assert sorted(unsure) == ["data/demo_3", "data/demo_4"]  # h5py answered for the odd ones


def test_root_candidates_skip_episode_groups_but_find_flat_frames(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f["pixels"] = FRAMES[:4]
        f["obs/camera"] = FRAMES[:4]
        f["observations/top"] = FRAMES[:4]
        f["next_observations/top"] = FRAMES[:4]
        f["data/frames"] = FRAMES[:4]
        f["data/demo_0/agentview_image"] = FRAMES[:4]
        f["state"] = np.zeros(4)
        f["broken"] = h5py.SoftLink("/nowhere")
    with h5py.File(path, "r") as f:
        whole = hdf5_layouts._image_candidates(f, depth=1)
        assert sorted(whole) == ["data/frames", "obs/camera", "observations/top", "pixels"]
        expected = [c for c in whole if "/" not in c or c.split("/")[0] in hdf5_layouts._FLAT_OBS_GROUPS]
        assert hdf5_layouts._image_candidates(f, depth=1, only=hdf5_layouts._FLAT_OBS_GROUPS) == expected


def test_a_closed_source_reads_nothing_through_a_stale_descriptor(tmp_path):
    path = _robomimic(tmp_path / "d.h5", [10], {})
    source = HDF5Source(path)
    segment = source.episodes(Align.frame)[0].frames[0]
    source.close()
    with open(path, "rb"), pytest.raises(SourceError, match="cannot be opened"):  # may take the closed file's number
        source.read_into(segment, np.empty((10, 8, 8, 3), np.uint8))


def test_plain_rows_are_noted_when_episodes_are_gathered(tmp_path):
    path = _robomimic(tmp_path / "d.h5", [10, 12], {})
    with HDF5Source(path) as source:
        source.episodes(Align.next)
        assert all(isinstance(p, PlainRows) for p in source._plain.values()) and len(source._plain) == 2
