"""What writing the rewards costs against the size of an HDF5 file: a plain copy of the file (the yardstick);
the in-place write (the changed bytes applied through a rollback journal: what vlmlabel does); the same write
as a copy plus the rewards renamed over the file (what it does when another process holds the file open, and
did always before the journal); and the ``--output FILE --link`` labels file (the rewards plus external links
to everything else).

    python benchmarks/write_cost.py --gib 1 4 --folder /tmp/write-cost

Each size: one flat D4RL-style file (uint8 224x224x3 frames, 1,000 episodes), timings interleaved over
``--repeats`` rounds, medians printed. The page cache is not dropped (no root needed): the copy is timed
from cache, which flatters it. The file is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import h5py
import numpy as np

from vlmlabel.destinations import hdf5 as hdf5_destination
from vlmlabel.destinations.hdf5 import H5Dataset, write_file, write_linked

FRAME = (224, 224, 3)


def build(path: Path, gib: float) -> int:
    """A flat file of about ``gib`` GiB of frames; returns the number of frames."""
    frames = int(gib * 2**30 / np.prod(FRAME))
    block = np.random.default_rng(0).integers(0, 255, (256, *FRAME), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        data = f.create_dataset("observations", (frames, *FRAME), np.uint8, chunks=(16, *FRAME))
        for start in range(0, frames, len(block)):
            stop = min(frames, start + len(block))
            data[start:stop] = block[: stop - start]
        f["actions"] = np.zeros((frames, 7), np.float32)
        f["terminals"] = np.arange(frames) % max(1, frames // 1000) == 0
    return frames


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def write_as_copy(source: Path, rewards: list[H5Dataset]) -> None:
    """The in-place write made through a copy renamed over the file (its fallback)."""
    journaled = hdf5_destination.write_in_place
    hdf5_destination.write_in_place = lambda *args, **kwargs: False
    try:
        write_file(source, source, rewards, overwrite=True)
    finally:
        hdf5_destination.write_in_place = journaled


def measure(folder: Path, gib: float, repeats: int) -> dict[str, float]:
    source = folder / "data.h5"
    frames = build(source, gib)
    rewards = [H5Dataset("vlm_reward", np.zeros(frames, np.float32), {"goal": "g"})]
    times: dict[str, list[float]] = {"copy": [], "in_place": [], "in_place_copy": [], "labels_file": []}
    for _ in range(repeats):
        times["copy"].append(timed(lambda: shutil.copyfile(source, folder / "copy.h5")))
        (folder / "copy.h5").unlink()
        times["in_place"].append(timed(lambda: write_file(source, source, rewards, overwrite=True)))
        times["in_place_copy"].append(timed(lambda: write_as_copy(source, rewards)))
        times["labels_file"].append(timed(lambda: write_linked(source, folder / "labels.h5", rewards)))
        (folder / "labels.h5").unlink()
    size = source.stat().st_size
    source.unlink()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"gib": size / 2**30, "frames": frames, **{f"{k}_s": v for k, v in medians.items()},
            "in_place_vs_copy": medians["in_place"] / medians["copy"],
            "in_place_copy_vs_copy": medians["in_place_copy"] / medians["copy"],
            "labels_file_vs_copy": medians["labels_file"] / medians["copy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/vlmlabel-write-cost"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    rows = [measure(args.folder, gib, args.repeats) for gib in args.gib]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| file | frames | copy (s) | in place, journal (s) | in place, as a copy (s) | labels file (s) "
          "| journal / copy | as a copy / copy | labels / copy |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['gib']:.2f} GiB | {r['frames']:,} | {r['copy_s']:.2f} | {r['in_place_s']:.4f} | "
              f"{r['in_place_copy_s']:.2f} | {r['labels_file_s']:.4f} | {r['in_place_vs_copy']:.4f} | "
              f"{r['in_place_copy_vs_copy']:.2f} | {r['labels_file_vs_copy']:.4f} |")


if __name__ == "__main__":
    main()
