"""HDF5 files for the hostile cases of labels files, busy files and whole results (issue 23, round two).

A labels file here is what ``relabel SOURCE --output FILE --link`` writes, without rewards: made by the writer
itself (``write_linked``), so no model is needed to build one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

from tests import layouts
from vlmlabel.destinations.hdf5 import write_linked
from vlmlabel.sources.base import content_fingerprint
from vlmlabel.sources.hdf5 import HDF5Source


def another(path: Path) -> Path:
    """A robomimic file laid out as ``layouts.build_robomimic``'s, every frame another: another dataset."""
    layouts.build_robomimic(path)
    with h5py.File(path, "r+") as f:
        for k in range(len(layouts.LENGTHS)):
            frames = f[f"data/demo_{k}/obs/agentview_image"]
            frames[...] = 255 - frames[...]
    return path


def labels(source: Path, dest: Path) -> Path:
    """``dest``: the labels file of ``source`` (its datasets through external links, its frames recorded)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with HDF5Source(source) as opened:
        frames = {opened.image_key: content_fingerprint(opened)}
    return write_linked(source, dest, [], frames)


def labels_source_moved(path: Path) -> Path:
    """labels/data.h5 made from src/data.h5 (beside ``path``), which was moved to moved/; another dataset lies at
    elsewhere/src/data.h5, where the link's name leads from the working folder elsewhere/run."""
    folder = path.parent
    made = labels(layouts.build_robomimic(fresh(folder / "src" / "data.h5")).path, folder / "labels" / "data.h5")
    shutil.move(folder / "src", folder / "moved")
    another(fresh(folder / "elsewhere" / "src" / "data.h5"))
    (folder / "elsewhere" / "run").mkdir()
    return made


def labels_source_replaced(path: Path) -> Path:
    """labels/data.h5 made from src/data.h5, then another dataset put in src/data.h5's place."""
    folder = path.parent
    made = labels(layouts.build_robomimic(fresh(folder / "src" / "data.h5")).path, folder / "labels" / "data.h5")
    (folder / "src" / "data.h5").unlink()
    another(folder / "src" / "data.h5")
    return made


def link_found_in_working_folder(path: Path, virtual: bool) -> Path:
    """``path`` reads its frames from frames.h5 beside it (an external link, or a virtual dataset), which is gone;
    a frames.h5 with other frames lies in run/, the working folder."""
    frames = layouts.make_frames(sum(layouts.LENGTHS), 16, 20, seed=3)
    run = path.parent / "run"
    run.mkdir()
    with h5py.File(run / "frames.h5", "w") as f:
        f["images"] = 255 - frames
    with h5py.File(path, "w") as f:
        if virtual:
            layout = h5py.VirtualLayout(frames.shape, np.uint8)
            layout[:] = h5py.VirtualSource("frames.h5", "/images", frames.shape)
            f.create_virtual_dataset("observations", layout)
        else:
            f["observations"] = h5py.ExternalLink("frames.h5", "/images")
        f["terminals"] = np.isin(np.arange(len(frames)), np.cumsum(layouts.LENGTHS) - 1)
    return path


def earlier_result(path: Path, names: list[str], key: str = "vlm_reward") -> Path:
    """robomimic with columns that a run under ``--reward-key key`` wrote (as this version records them)."""
    layouts.build_robomimic(path)
    with h5py.File(path, "r+") as f:
        for k, length in enumerate(layouts.LENGTHS):
            for name in names:
                f[f"data/demo_{k}/{name}"] = np.zeros(length, np.float32)
                f[f"data/demo_{k}/{name}"].attrs.update(
                    {"vlmlabel_version": "0.1.0", "formula": "x.g", "reward_key": key}
                )
    return path


def swmr_ready(path: Path) -> Path:
    """robomimic in HDF5's latest format, which an SWMR writer can open."""
    plain = layouts.build_robomimic(path.with_name("plain.h5")).path
    with h5py.File(plain, "r") as src, h5py.File(path, "w", libver="latest") as dst:
        for name in src:
            src.copy(name, dst)
    plain.unlink()
    return path


def fresh(path: Path) -> Path:
    """``path``, its folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
