"""Are the values `vlmlabel relabel` writes bit-identical between two revisions? Run both and compare.

The sample data (``sample_data/reach.h5``, the first few episodes, scored by ``sample_data/reach-clip``)
is converted once into every storage backend: robomimic, flat D4RL (gzip) and Minari HDF5, a
``save_to_disk`` folder, a parquet folder, LeRobot v3.0 with image columns and with video, and two
two-camera datasets. Each revision's own tree then runs ``python -m vlmlabel relabel`` (``PYTHONPATH``
set to that tree, CPU, fp32, one thread) on a fresh copy of those inputs under every case of ``RUNS``:
in place, ``--output`` copy, ``--link`` labels file; ``--align next`` and ``frame``; the four reward
formulations, prompt ensembles, several goals, normalisation, shaping, thresholds, camera reductions.
Every column written under the reward key (``NAME``, ``NAME_K``, ``NAME_raw``, ``NAME_cam_*``) is read back
and recorded as its dtype, shape and the sha256 of its bytes, concatenated in episode order; a run that
fails records its last line of stderr instead.

    python tools/identical.py --before 49afcb8 --after HEAD     # exit 1 listing every differing column
    python tools/identical.py --tree . --json now.json          # digests of one tree (or --rev REV)
    python tools/identical.py --compare before.json now.json

A revision is exported with ``git archive`` into a temporary folder (no worktree is registered); a path to
a folder is used as it is (``--after .`` checks the working tree, uncommitted edits included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the test builders live in the package `tests`
    sys.path.insert(0, str(ROOT))

from tests import table_layouts  # noqa: E402

SAMPLE = ROOT / "sample_data" / "reach.h5"
MODEL = ROOT / "sample_data" / "reach-clip"
EPISODES = 6
KEY = "vlm_reward"
GOAL = "the red ball is on the green square"
OTHER = "the blue ball is on the green square"
TOP, WRIST = "observation.images.top", "observation.images.wrist"


@dataclass(frozen=True)
class Run:
    """One relabel: its input (a name in ``build_inputs``), where it writes, and its options."""

    source: str
    dest: str  # inplace | output | link
    args: tuple[str, ...]
    workers: int = 0


PLAIN = ("--goal", GOAL)
SOFTMAX = ("--goal", GOAL, "--reward", "softmax", "--negative", OTHER, "--negative", "a yellow triangle")
RUNS: dict[str, Run] = {
    "robomimic-inplace-cosine-next": Run("robomimic", "inplace", PLAIN),
    "robomimic-inplace-cosine-frame": Run("robomimic", "inplace", (*PLAIN, "--align", "frame")),
    "robomimic-inplace-projection-normalize-episode": Run(
        "robomimic",
        "inplace",
        (*PLAIN, "--reward", "projection", "--baseline", "a ball", "--alpha", "0.5", "--normalize", "episode"),
    ),
    "robomimic-inplace-softmax-threshold": Run("robomimic", "inplace", (*SOFTMAX, "--threshold", "0.5")),
    "robomimic-inplace-contrastive-shaping": Run(
        "robomimic",
        "inplace",
        ("--goal", GOAL, "--reward", "contrastive", "--negative", OTHER, "--shaping", "delta", "--gamma", "0.9"),
    ),
    "robomimic-inplace-two-goals-templates-dataset": Run(
        "robomimic",
        "inplace",
        (
            *PLAIN,
            "--goal",
            OTHER,
            "--goal-template",
            "a photo of {}",
            "--goal-template",
            "{}",
            "--normalize",
            "dataset",
        ),
    ),
    "robomimic-inplace-minmax-frame": Run(
        "robomimic", "inplace", (*PLAIN, "--normalize", "minmax", "--align", "frame")
    ),
    "robomimic-output-shaping": Run("robomimic", "output", (*PLAIN, "--shaping", "delta")),
    "robomimic-link-normalize-episode-frame": Run(
        "robomimic", "link", (*PLAIN, "--normalize", "episode", "--align", "frame")
    ),
    "flat-gzip-inplace-next-shaping": Run("flat", "inplace", (*PLAIN, "--shaping", "delta", "--gamma", "0.95")),
    "flat-gzip-output-frame-workers1": Run("flat", "output", (*PLAIN, "--align", "frame"), workers=1),
    "minari-inplace-next": Run("minari", "inplace", PLAIN),
    "minari-output-frame-normalize-episode": Run(
        "minari", "output", (*PLAIN, "--align", "frame", "--normalize", "episode")
    ),
    "save_to_disk-next": Run("disk", "output", PLAIN),
    "save_to_disk-frame-softmax-threshold": Run("disk", "output", (*SOFTMAX, "--threshold", "0.4", "--align", "frame")),
    "parquet-next-normalize-episode-shaping": Run(
        "parquet", "output", (*PLAIN, "--normalize", "episode", "--shaping", "delta")
    ),
    "parquet-frame-two-goals-workers1": Run("parquet", "output", (*PLAIN, "--goal", OTHER, "--align", "frame"), 1),
    "lerobot_image-next": Run("lerobot_image", "output", (*PLAIN, "--image-key", TOP)),
    "lerobot_image-link-frame-projection": Run(
        "lerobot_image",
        "link",
        (*PLAIN, "--image-key", TOP, "--align", "frame", "--reward", "projection", "--baseline", "a ball"),
    ),
    "lerobot_video-next-minmax": Run("lerobot_video", "output", (*PLAIN, "--image-key", TOP, "--normalize", "minmax")),
    "lerobot_video-two-cameras-min-frame": Run(
        "lerobot_video",
        "output",
        (*PLAIN, "--image-key", TOP, "--image-key", WRIST, "--camera-reduce", "min", "--align", "frame"),
    ),
    "robomimic-two-cameras-mean-normalize-episode": Run(
        "robomimic_cams",
        "inplace",
        (
            *PLAIN,
            "--image-key",
            "obs/agentview_image",
            "--image-key",
            "obs/eye_in_hand_image",
            "--normalize",
            "episode",
        ),
    ),
    "robomimic-two-cameras-max-frame-output": Run(
        "robomimic_cams",
        "output",
        (
            *PLAIN,
            "--image-key",
            "obs/agentview_image",
            "--image-key",
            "obs/eye_in_hand_image",
            "--camera-reduce",
            "max",
            "--align",
            "frame",
        ),
    ),
}


# -- inputs: the sample data in every backend ------------------------------------------------------


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


@dataclass
class Episodes:
    """The first episodes of the sample file: frames before (obs) and after (nxt) each step."""

    obs: list[np.ndarray]
    nxt: list[np.ndarray]

    @property
    def lengths(self) -> list[int]:
        return [len(o) for o in self.obs]


def _wrist(frames: np.ndarray) -> np.ndarray:
    """A second camera that sees the same scene differently: mirrored, colours rotated."""
    return np.ascontiguousarray(frames[:, :, ::-1, ::-1])


def read_sample(path: Path, episodes: int) -> Episodes:
    with h5py.File(path, "r") as f:
        names = sorted(f["data"], key=_natural)[:episodes]
        obs = [f[f"data/{n}/obs/agentview_image"][()] for n in names]
        nxt = [f[f"data/{n}/next_obs/agentview_image"][()] for n in names]
    return Episodes(obs, nxt)


def _robomimic(path: Path, ep: Episodes, cameras: bool) -> None:
    with h5py.File(path, "w") as f:
        for k, (obs, nxt) in enumerate(zip(ep.obs, ep.nxt, strict=True)):
            demo = f.create_group(f"data/demo_{k}")
            demo.create_dataset("obs/agentview_image", data=obs)
            demo.create_dataset("next_obs/agentview_image", data=nxt)
            if cameras:
                demo.create_dataset("obs/eye_in_hand_image", data=_wrist(obs), chunks=(8, 84, 84, 3), compression="lzf")
                demo.create_dataset("next_obs/eye_in_hand_image", data=_wrist(nxt))
            demo.create_dataset("actions", data=np.zeros((len(obs), 2), np.float32))
            demo.create_dataset("rewards", data=np.zeros(len(obs), np.float32))
            demo.attrs["num_samples"] = len(obs)


def _flat(path: Path, ep: Episodes) -> None:
    ends = np.cumsum(ep.lengths) - 1
    n = int(ends[-1]) + 1
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[ends[:-1]] = True
    timeouts[ends[-1]] = True
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=np.concatenate(ep.obs), chunks=(16, 84, 84, 3), compression="gzip")
        f.create_dataset("next_observations", data=np.concatenate(ep.nxt))
        f.create_dataset("terminals", data=terminals)
        f.create_dataset("timeouts", data=timeouts)
        f.create_dataset("rewards", data=np.zeros(n, np.float32))


def _minari(path: Path, ep: Episodes) -> None:
    with h5py.File(path, "w") as f:
        for k, (obs, nxt) in enumerate(zip(ep.obs, ep.nxt, strict=True)):
            group = f.create_group(f"episode_{k}")
            group.create_dataset("observations", data=np.concatenate([obs, nxt[-1:]]))
            group.create_dataset("actions", data=np.zeros((len(obs), 2), np.float32))
            group.create_dataset("rewards", data=np.zeros(len(obs), np.float32))
            group.create_dataset("terminations", data=np.zeros(len(obs), bool))
            group.create_dataset("truncations", data=np.zeros(len(obs), bool))
            group.attrs["total_steps"] = len(obs)


def _tables(root: Path, ep: Episodes, name: str) -> Path:
    table = table_layouts.image_dataset(np.concatenate(ep.obs), ep.lengths)
    path = root / name
    if name == "disk":
        table.save_to_disk(str(path), num_shards=2)
        return path
    (path / "data").mkdir(parents=True)
    half = len(table) // 2
    table.select(range(half)).to_parquet(str(path / "data" / "train-00000-of-00002.parquet"))
    table.select(range(half, len(table))).to_parquet(str(path / "data" / "train-00001-of-00002.parquet"))
    return path


def _lerobot(root: Path, ep: Episodes, video: bool) -> Path:
    frames = np.concatenate(ep.obs)
    files = (len(ep.lengths) // 2, len(ep.lengths) - len(ep.lengths) // 2)
    cams = {TOP: frames, WRIST: _wrist(frames)}
    return table_layouts.build_lerobot(root, video=video, lengths=tuple(ep.lengths), files=files, frames=cams).path


def _hdf5(write: Callable[[Path, Episodes], None], name: str) -> Callable[[Path, Episodes], Path]:
    def build(root: Path, ep: Episodes) -> Path:
        write(root / name, ep)
        return root / name

    return build


BUILDERS: dict[str, Callable[[Path, Episodes], Path]] = {
    "robomimic": _hdf5(lambda path, ep: _robomimic(path, ep, cameras=False), "robomimic.h5"),
    "robomimic_cams": _hdf5(lambda path, ep: _robomimic(path, ep, cameras=True), "robomimic_cams.h5"),
    "flat": _hdf5(_flat, "flat.h5"),
    "minari": _hdf5(_minari, "minari.h5"),
    "disk": lambda root, ep: _tables(root, ep, "disk"),
    "parquet": lambda root, ep: _tables(root, ep, "parquet"),
    "lerobot_image": lambda root, ep: _lerobot(root, ep, video=False),
    "lerobot_video": lambda root, ep: _lerobot(root, ep, video=True),
}


def build_inputs(root: Path, ep: Episodes, names: set[str]) -> dict[str, Path]:
    """The input datasets ``names`` (keys of ``BUILDERS``, as ``Run.source`` names them) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    return {name: BUILDERS[name](root, ep) for name in sorted(names)}


# -- reading back every written column -------------------------------------------------------------


def _record(parts: list[np.ndarray]) -> dict:
    joined = np.concatenate(parts) if parts else np.zeros(0)
    return {
        "dtype": str(joined.dtype),
        "shape": list(joined.shape),
        "sha256": hashlib.sha256(np.ascontiguousarray(joined).tobytes()).hexdigest(),
    }


def _hdf5_columns(path: Path, key: str) -> dict[str, dict]:
    found: dict[str, list[tuple[str, np.ndarray]]] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: object) -> None:
            base = name.rsplit("/", 1)[-1]
            if isinstance(obj, h5py.Dataset) and base.startswith(key):
                found.setdefault(base, []).append((name, obj[()]))

        f.visititems(visit)
    return {
        col: _record([a for _, a in sorted(parts, key=lambda p: _natural(p[0]))])
        for col, parts in sorted(found.items())
    }


def _table_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    data = path / "data" if (path / "meta" / "info.json").is_file() else path
    files = [p for p in data.rglob("*") if p.suffix in (".arrow", ".parquet")]
    return sorted(files, key=lambda p: _natural(str(p.relative_to(path))))


def _read_table(path: Path) -> pa.Table:
    if path.suffix == ".arrow":
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    return pq.read_table(path)


def _table_columns(path: Path, key: str) -> dict[str, dict]:
    found: dict[str, list[np.ndarray]] = {}
    for file in _table_files(path):
        table = _read_table(file)
        for name in table.column_names:
            if name.startswith(key):
                found.setdefault(name, []).append(table.column(name).to_numpy())
    return {col: _record(parts) for col, parts in sorted(found.items())}


def column_digests(dest: Path, key: str = KEY) -> dict[str, dict]:
    """dtype, shape and sha256 of every column named ``key*`` written at ``dest``, in episode order."""
    if dest.is_file() and h5py.is_hdf5(dest):
        return _hdf5_columns(dest, key)
    return _table_columns(dest, key)


# -- running one tree ------------------------------------------------------------------------------


def _destination(run: Run, source: Path, work: Path) -> tuple[Path, list[str]]:
    """Where ``run`` writes, and the options that say so."""
    if run.dest == "inplace":
        return source, []
    suffix = ".h5" if source.suffix == ".h5" else ""
    out = work / f"out{suffix}"
    return out, ["--output", str(out), *(["--link"] if run.dest == "link" else [])]


def relabel_once(tree: Path, run: Run, inputs: dict[str, Path], work: Path, model: Path = MODEL) -> dict:
    """Relabel a fresh copy of ``run``'s input with the vlmlabel of ``tree``; the digests of what it wrote."""
    work.mkdir(parents=True)
    original = inputs[run.source]
    source = work / original.name
    if original.is_dir():
        shutil.copytree(original, source)
    else:
        shutil.copy2(original, source)
    dest, where = _destination(run, source, work)
    command = [sys.executable, "-m", "vlmlabel", "relabel", str(source), "--model", str(model)]
    command += ["--device", "cpu", "--precision", "fp32", "--workers", str(run.workers), "--quiet", *where, *run.args]
    threads = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **threads}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False)
    shown = [str(a).replace(str(work), "RUN").replace(str(model), "MODEL") for a in command[3:]]
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        return {"args": shown, "exit": done.returncode, "error": lines[-1]}
    return {"args": shown, "exit": 0, "columns": column_digests(dest)}


def digest_tree(
    tree: Path,
    work: Path,
    runs: dict[str, Run] = RUNS,
    episodes: int = EPISODES,
    model: Path = MODEL,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """Run every case of ``runs`` with the vlmlabel of ``tree``; {run name: its digests}."""
    needed = {run.source for run in runs.values()}
    inputs = build_inputs(work / "inputs", read_sample(SAMPLE, episodes), needed)
    results = {}
    for name, run in runs.items():
        progress(name)
        results[name] = relabel_once(tree, run, inputs, work / "runs" / name, model)
    return {"tree": str(tree), "episodes": episodes, "runs": results}


def compare(before: dict, after: dict) -> list[str]:
    """Every run and column whose record differs between two digest files (empty: bit-identical)."""
    differences = []
    for name in sorted(set(before["runs"]) | set(after["runs"])):
        a, b = before["runs"].get(name), after["runs"].get(name)
        if a is None or b is None:
            differences.append(f"{name}: only in {'after' if a is None else 'before'}")
            continue
        if a.get("error") != b.get("error") or a["exit"] != b["exit"]:
            differences.append(f"{name}: exit {a['exit']} {a.get('error', '')!r} -> {b['exit']} {b.get('error', '')!r}")
        cols_a, cols_b = a.get("columns", {}), b.get("columns", {})
        for col in sorted(set(cols_a) | set(cols_b)):
            if cols_a.get(col) != cols_b.get(col):
                differences.append(f"{name}: {col}: {cols_a.get(col)} -> {cols_b.get(col)}")
    return differences


# -- command line ----------------------------------------------------------------------------------


def _export(revision: str, into: Path) -> tuple[Path, str]:
    """A folder holding ``revision``'s tree and the commit it resolved to: the folder itself (and "working
    tree") when ``revision`` names one."""
    if Path(revision).is_dir():
        return Path(revision).resolve(), "working tree"
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into, commit


def _digest_revision(revision: str, scratch: Path, episodes: int) -> dict:
    tree, commit = _export(revision, scratch / "tree")
    print(f"{revision}: {commit}", flush=True)
    result = digest_tree(
        tree, scratch / "work", episodes=episodes, progress=lambda n: print(f"  {revision}: {n}", flush=True)
    )
    result["revision"] = f"{revision} ({commit[:12]})" if commit != "working tree" else f"{revision} (working tree)"
    failed = [n for n, r in result["runs"].items() if r["exit"] != 0]
    if failed:
        print(f"  {revision}: runs that exited non-zero: {', '.join(failed)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--rev", help="digest this revision (or source folder) into --json")
    what.add_argument("--tree", help="digest this source folder into --json")
    what.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two digest files")
    what.add_argument("--before", help="revision or folder; with --after: digest both and compare")
    parser.add_argument("--after", help="revision or folder compared with --before")
    parser.add_argument("--json", type=Path, help="where --rev/--tree write (--before/--after: a folder for both)")
    parser.add_argument("--episodes", type=int, default=EPISODES, help="episodes of the sample file used")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        return _report(before, after)
    with tempfile.TemporaryDirectory(prefix="vlmlabel-identical-") as scratch:
        if args.before is None:
            if args.json is None:
                parser.error("--rev/--tree need --json")
            result = _digest_revision(args.rev or args.tree, Path(scratch) / "one", args.episodes)
            args.json.write_text(json.dumps(result, indent=1, sort_keys=True))
            return 0
        if args.after is None:
            parser.error("--before needs --after")
        sides = [
            _digest_revision(rev, Path(scratch) / side, args.episodes)
            for side, rev in (("before", args.before), ("after", args.after))
        ]
        if args.json is not None:
            args.json.mkdir(parents=True, exist_ok=True)
            for side, result in zip(("before", "after"), sides, strict=True):
                (args.json / f"{side}.json").write_text(json.dumps(result, indent=1, sort_keys=True))
        return _report(*sides)


def _report(before: dict, after: dict) -> int:
    differences = compare(before, after)
    runs = len(after["runs"])
    columns = sum(len(r.get("columns", {})) for r in after["runs"].values())
    for line in differences:
        print(f"DIFFERS {line}")
    if differences:
        print(f"{len(differences)} difference(s) between {before.get('revision')} and {after.get('revision')}")
        return 1
    print(f"bit-identical: {runs} runs, {columns} columns, {before.get('revision')} == {after.get('revision')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
