"""What writing the rewards costs against the size of an HDF5 file: a plain copy of the file (the yardstick);
the in-place write (the changed bytes applied through a rollback journal: what vlmlabel does); the same write
as a copy plus the rewards renamed over the file (what it does when another process holds the file open, and
did always before the journal); and the ``--output FILE --link`` labels file (the rewards plus external links
to everything else).

    python benchmarks/write_cost.py --gib 1 4 --folder /tmp/write-cost

Each size: one flat D4RL-style file (uint8 224x224x3 frames, 1,000 episodes), timings interleaved over
``--repeats`` rounds, medians printed. The page cache is not dropped (no root needed): the copy is timed
from cache, which flatters it. The file is removed at the end.

    python benchmarks/write_cost.py --episodes 100000

instead writes the rewards of that many tiny robomimic episodes (10 steps of 8x8 frames) in place, once
through the journal and once as a copy, each in its own process: wall and CPU seconds and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
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
        times["labels_file"].append(timed(lambda: write_linked(source, folder / "labels.h5", rewards, {})))
        (folder / "labels.h5").unlink()
    size = source.stat().st_size
    source.unlink()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "gib": size / 2**30,
        "frames": frames,
        **{f"{k}_s": v for k, v in medians.items()},
        "in_place_vs_copy": medians["in_place"] / medians["copy"],
        "in_place_copy_vs_copy": medians["in_place_copy"] / medians["copy"],
        "labels_file_vs_copy": medians["labels_file"] / medians["copy"],
    }


def write_episodes(path: Path, episodes: int, way: str) -> dict[str, float]:
    """One in-place write of ``episodes`` robomimic rewards into ``path``, through the journal or as a copy."""
    attrs = {"goal": "g", "formula": "cos", "vlmlabel_version": "bench"}  # one dict per column, as a run writes
    rewards = [H5Dataset(f"data/demo_{i}/vlm_reward", np.zeros(10, np.float32), attrs) for i in range(episodes)]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if way == "journal":
        write_file(path, path, rewards, overwrite=False)
    else:
        write_as_copy(path, rewards)
    after = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    peak_kb = next(
        int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")
    )
    return {
        "wall_s": time.perf_counter() - start,
        "cpu_s": after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime,
        "peak_rss_mb": peak_kb / 1024,
    }


def measure_episodes(folder: Path, episodes: int) -> dict[str, dict[str, float]]:
    """Both ways of writing in place, each on its own copy of the file and in its own process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from episodes import build_robomimic

    source = folder / "episodes.h5"
    build_robomimic(source, episodes, 10, 8)
    found = {}
    for way in ("journal", "copy"):
        target = folder / f"episodes-{way}.h5"
        shutil.copyfile(source, target)
        run = subprocess.run(
            [sys.executable, __file__, "--one-write", str(target), str(episodes), way],
            check=True,
            capture_output=True,
            text=True,
        )
        found[way] = {**json.loads(run.stdout), "file_mb": target.stat().st_size / 2**20}
        target.unlink()
    source.unlink()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/vlmlabel-write-cost"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--episodes", type=int, help="time an in-place write of this many tiny episodes instead")
    parser.add_argument("--one-write", nargs=3, help=argparse.SUPPRESS)  # PATH EPISODES WAY, in a child process
    args = parser.parse_args()
    if args.one_write:
        path, episodes, way = args.one_write
        print(json.dumps(write_episodes(Path(path), int(episodes), way)))
        return
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.episodes:
        found = measure_episodes(args.folder, args.episodes)
        print(f"| way ({args.episodes:,} episodes) | wall s | CPU s | peak RSS MB | file MB |")
        print("|---|---:|---:|---:|---:|")
        for way, r in found.items():
            print(f"| {way} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['file_mb']:.0f} |")
        return
    rows = [measure(args.folder, gib, args.repeats) for gib in args.gib]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        "| file | frames | copy (s) | in place, journal (s) | in place, as a copy (s) | labels file (s) "
        "| journal / copy | as a copy / copy | labels / copy |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['gib']:.2f} GiB | {r['frames']:,} | {r['copy_s']:.2f} | {r['in_place_s']:.4f} | "
            f"{r['in_place_copy_s']:.2f} | {r['labels_file_s']:.4f} | {r['in_place_vs_copy']:.4f} | "
            f"{r['in_place_copy_vs_copy']:.2f} | {r['labels_file_vs_copy']:.4f} |"
        )


if __name__ == "__main__":
    main()
