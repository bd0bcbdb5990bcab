"""Peak host memory of `vlmlabel relabel` on N and FACTOR*N frames: it must not grow with the file.

Each relabel runs in its own subprocess (the real CLI); its peak RSS comes from os.wait4.
Without --model, a small random ViT with a 224 px input is saved to a temporary folder, so the
data path (reading, 224 px preprocessing, buffers), not the weights, dominates what is measured.

    python benchmarks/memory_scaling.py --frames 2000 --factor 10
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmlabel.bench import parse_frame_size, write_synthetic  # noqa: E402
from vlmlabel.model import create_untrained, save_local_dir  # noqa: E402

TARGET_RATIO = 1.2
SMALL_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 32, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SMALL_VIT_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def relabel_peak_rss_mb(data: Path, model: str, pretrained: str | None, batch_size: int | None) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `vlmlabel relabel` subprocess."""
    command = [
        sys.executable,
        "-m",
        "vlmlabel",
        "relabel",
        str(data),
        "--goal",
        "a red cube",
        "--model",
        model,
        "--device",
        "cpu",
        "--quiet",
        "--overwrite",
    ]
    command += ["--pretrained", pretrained] if pretrained else []
    command += ["--batch-size", str(batch_size)] if batch_size else []
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"relabel failed with exit code {process.returncode}: {' '.join(command)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000, help="N, frames in the small file")
    parser.add_argument("--factor", type=int, default=10, help="the large file holds FACTOR * N frames")
    parser.add_argument("--frame-size", default="84x84", help="HEIGHTxWIDTH")
    parser.add_argument("--encoding", choices=("raw", "jpeg"), default="raw")
    parser.add_argument("--model", help="model as for `vlmlabel relabel` (default: a small random 224 px ViT)")
    parser.add_argument("--pretrained")
    parser.add_argument("--batch-size", type=int)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vlmlabel-memory-") as folder:
        model = args.model
        if model is None:
            torch.manual_seed(0)
            model = str(
                save_local_dir(create_untrained(SMALL_VIT), SMALL_VIT, SMALL_VIT_PREPROCESS, Path(folder) / "small-vit")
            )
        rows = []
        for frames in (args.frames, args.frames * args.factor):
            data = write_synthetic(
                Path(folder) / f"{frames}.h5", frames, parse_frame_size(args.frame_size), args.encoding
            )
            size_mb = data.stat().st_size / 2**20
            peak, seconds = relabel_peak_rss_mb(data, model, args.pretrained, args.batch_size)
            rows.append((frames, size_mb, peak, seconds))
            print(f"{frames:>9,} frames  file {size_mb:8,.0f} MiB  peak RSS {peak:8,.1f} MiB  ({seconds:.1f} s)")
            data.unlink()
    ratio = rows[1][2] / rows[0][2]
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(
        f"peak RSS ratio {args.factor}x frames / 1x frames: {ratio:.3f} (target <= {TARGET_RATIO}: {verdict}); "
        f"growth {rows[1][2] - rows[0][2]:+.1f} MiB"
    )


if __name__ == "__main__":
    main()
