"""Start-up of a relabel served by the embedding cache: text tower only (now) against the whole model (before).

Builds a random-weight ViT-B-32 (or --model ARCH) saved as a local folder, a small flat HDF5 file and its
embedding cache, then runs `vlmlabel relabel` from the cache in fresh processes, alternating the two loads
(`--whole` forces the whole model, as before), and prints each process's wall and CPU seconds and the
rewards' agreement. Usage: PYTHONPATH=. python benchmarks/cache_startup.py [--model ViT-B-32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _child(whole: bool, source: str, model: str, output: str) -> None:
    """One relabel from the cache in this process; ``whole`` loads the image tower too (the old behaviour).
    Prints the seconds spent loading the model."""
    sys.path.insert(0, str(ROOT))
    from vlmlabel.run import lifecycle
    from vlmlabel.run.lifecycle import relabel_file
    from vlmlabel.run.request import RelabelRequest, RelabelSummary

    load, seconds = lifecycle.load_model, []

    def timed_load(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        loaded = load(*args, **{**kwargs, "image_tower": True} if whole else kwargs)
        seconds.append(time.perf_counter() - start)
        return loaded

    lifecycle.load_model = timed_load
    summary = relabel_file(
        RelabelRequest(
            source=source,
            goals=["a red cube on a plate"],
            model=model,
            device="cpu",
            output=Path(output),
            overwrite=True,
        )
    )
    assert isinstance(summary, RelabelSummary), summary
    assert summary.used_cache, summary.cache_note
    assert summary.model.has_image_tower == whole
    print(sum(seconds))


def _run(source: Path, model: Path, output: Path, whole: bool) -> tuple[float, float, float]:
    """Wall and CPU seconds of one relabel process, and the seconds it spent loading the model."""
    output.unlink(missing_ok=True)  # else the rerun finds its rewards already written and does nothing
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(source), str(model), str(output)] + (["--whole"] if whole else []),
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.whole, *args.child)
        return
    sys.path.insert(0, str(ROOT))
    import open_clip
    import torch

    from vlmlabel.model import create_untrained, save_local_dir
    from vlmlabel.run.embed import EmbedRequest, embed_file

    with tempfile.TemporaryDirectory(prefix="vlmlabel-startup-") as folder:
        root = Path(folder)
        torch.manual_seed(0)
        cfg = open_clip.get_model_config(args.model)
        preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
        model = save_local_dir(create_untrained(cfg), cfg, preprocess, root / "model")
        source = root / "data.h5"
        with h5py.File(source, "w") as handle:
            handle["observations"] = np.random.default_rng(0).integers(0, 255, (16, 84, 84, 3), dtype=np.uint8)
            handle["terminals"] = np.arange(16) % 8 == 7
        embed_file(EmbedRequest(source=source, model=str(model), device="cpu"))
        times: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
        for _ in range(args.repeats):
            for whole in (True, False):
                times[whole].append(_run(source, model, root / f"out-{whole}.h5", whole))
        for whole, label in ((True, "whole model (before)"), (False, "text tower only (now)")):
            walls, cpus, loads = ([run[i] for run in times[whole]] for i in range(3))
            print(
                f"{label:22s} process wall s {', '.join(f'{w:.2f}' for w in walls)} (median "
                f"{statistics.median(walls):.2f}), CPU s median {statistics.median(cpus):.2f}; model load s "
                f"{', '.join(f'{s:.2f}' for s in loads)} (median {statistics.median(loads):.2f})"
            )
        with h5py.File(root / "out-True.h5") as a, h5py.File(root / "out-False.h5") as b:
            print("rewards identical:", np.array_equal(a["vlm_reward"][()], b["vlm_reward"][()]))


if __name__ == "__main__":
    main()
