"""The HDF5 frames digest: every stored byte counts, it is read once per file version, and vlmlabel's own
writes (rewards, caches) keep it without a new read while anyone else's edit forces one."""

from __future__ import annotations

import os

import h5py
import pytest

from tests import layouts
from vlmlabel.run.lifecycle import RelabelRequest, relabel_file
from vlmlabel.sources import open_source, stored_digest
from vlmlabel.sources.base import content_fingerprint
from vlmlabel.sources.hdf5 import source as hdf5_source


@pytest.fixture()
def reads(monkeypatch):
    """How many times the stored bytes of a frame array were read (through h5py, or straight from the file)."""
    count = [0]
    original, plain = hdf5_source._stored_bytes, hdf5_source._plain_crcs

    def counted(dataset):
        count[0] += 1
        return original(dataset)

    def counted_plain(fd, arrays, where):
        count[0] += len(arrays)
        return plain(fd, arrays, where)

    monkeypatch.setattr(hdf5_source, "_stored_bytes", counted)
    monkeypatch.setattr(hdf5_source, "_plain_crcs", counted_plain)
    return count


def _fingerprint(path):
    with open_source(str(path)) as source:
        return content_fingerprint(source)


def test_read_once_per_version_and_kept_through_vlmlabels_own_write(tmp_path, tiny_model_dir, reads):
    truth = layouts.build_robomimic(tmp_path / "r.h5")
    first = _fingerprint(truth.path)
    assert reads[0] == len(truth.steps)  # one read of each episode's frames
    assert _fingerprint(truth.path) == first and reads[0] == len(truth.steps)
    relabel_file(RelabelRequest(source=truth.path, goals=["x"], model=str(tiny_model_dir), device="cpu"))
    reads[0] = 0
    assert _fingerprint(truth.path) == first and reads[0] == 0  # rewards added, frames untouched: no new read


def test_plain_frame_arrays_are_read_once_per_version_too(tmp_path, reads):
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as f:
        for k in range(3):
            f[f"data/demo_{k}/obs/agentview_image"] = layouts.make_frames(4, 8, 8, seed=k)  # contiguous
    first = _fingerprint(path)
    assert reads[0] == 3 and _fingerprint(path) == first and reads[0] == 3
    with h5py.File(path, "r+") as f:
        f["data/demo_1/obs/agentview_image"][2, 0, 0, 0] ^= 1
    assert _fingerprint(path) != first and reads[0] == 6


def test_an_edit_with_the_modification_time_set_back_is_still_seen(tmp_path, reads):
    truth = layouts.build_robomimic(tmp_path / "r.h5")
    first = _fingerprint(truth.path)
    stat = truth.path.stat()
    with h5py.File(truth.path, "r+") as f:
        f["data/demo_2/obs/agentview_image"][1] = 0  # one frame, in the middle of an episode, lzf-compressed
    os.utime(truth.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `touch -d` or `cp -p` would leave it
    reads[0] = 0
    assert _fingerprint(truth.path) != first and reads[0] == len(truth.steps)


@pytest.mark.parametrize("storage", [dict(), dict(chunks=(3, 8, 8, 3)), dict(chunks=(3, 8, 8, 3), compression="gzip")])
def test_any_changed_frame_changes_the_digest(tmp_path, storage):
    frames = layouts.make_frames(12, 8, 8, seed=2)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=frames, **storage)
    before = _fingerprint(path)
    with h5py.File(path, "r+") as f:
        f["observations"][7, 3, 4, 1] ^= 1  # one bit of one pixel
    assert _fingerprint(path) != before


def test_an_unwritable_memo_folder_only_costs_a_new_read(tmp_path, monkeypatch, reads):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(stored_digest.CACHE_ENV, str(blocker / "sub"))
    truth = layouts.build_flat_d4rl(tmp_path / "f.h5")
    assert _fingerprint(truth.path) == _fingerprint(truth.path) and reads[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "not-a-folder"]


def _virtual(path, source: str, name: str, shape) -> None:
    layout = h5py.VirtualLayout(shape, "u1")
    layout[:] = h5py.VirtualSource(source, name, shape)
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("observations", layout)


def _overwrite(path, name: str) -> None:
    with h5py.File(path, "r+") as f:
        f[name][0, 0, 0, 0] ^= 1


def test_frames_in_an_external_raw_file_count_in_the_digest(tmp_path, monkeypatch):
    """The frames' bytes live in a raw file beside the HDF5 file, which never changes when they do."""
    monkeypatch.chdir(tmp_path)
    frames = layouts.make_frames(6, 8, 8, seed=4)
    (tmp_path / "frames.raw").write_bytes(frames.tobytes())
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", frames.shape, "u1", external=[("frames.raw", 0, h5py.h5f.UNLIMITED)])
    before = _fingerprint(path)
    (tmp_path / "frames.raw").write_bytes((255 - frames).tobytes())
    assert _fingerprint(path) != before


def test_a_virtual_dataset_of_a_virtual_dataset_counts_every_file(tmp_path):
    shape = (6, 8, 8, 3)
    with h5py.File(tmp_path / "src.h5", "w") as f:
        f["rows"] = layouts.make_frames(*shape[:3], seed=5)
    _virtual(tmp_path / "mid.h5", "src.h5", "/rows", shape)
    _virtual(tmp_path / "top.h5", "mid.h5", "/observations", shape)
    before = _fingerprint(tmp_path / "top.h5")
    _overwrite(tmp_path / "src.h5", "rows")
    assert _fingerprint(tmp_path / "top.h5") != before
    (tmp_path / "src.h5").unlink()  # two levels down, a missing file would read as zeros
    with pytest.raises(hdf5_source.SourceError, match="mid.h5: /observations reads src.h5, which is not found"):
        _fingerprint(tmp_path / "top.h5")


def test_a_linked_virtual_dataset_finds_its_files_from_its_own_folder(tmp_path, monkeypatch):
    """top.h5 links to sub/vds.h5, whose virtual dataset maps src.h5: HDF5 reads sub/src.h5, and so must the
    digest, even with another src.h5 beside top.h5."""
    monkeypatch.chdir("/")
    shape = (6, 8, 8, 3)
    (tmp_path / "sub").mkdir()
    for folder, seed in ((tmp_path / "sub", 6), (tmp_path, 7)):
        with h5py.File(folder / "src.h5", "w") as f:
            f["rows"] = layouts.make_frames(*shape[:3], seed=seed)
    _virtual(tmp_path / "sub" / "vds.h5", "src.h5", "/rows", shape)
    with h5py.File(tmp_path / "top.h5", "w") as f:
        f["observations"] = h5py.ExternalLink("sub/vds.h5", "/observations")
    before = _fingerprint(tmp_path / "top.h5")
    _overwrite(tmp_path / "src.h5", "rows")  # not the file read
    assert _fingerprint(tmp_path / "top.h5") == before
    _overwrite(tmp_path / "sub" / "src.h5", "rows")
    assert _fingerprint(tmp_path / "top.h5") != before
