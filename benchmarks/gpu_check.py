"""The benchmark half of benchmarks/gpu_check.sh: `vlmlabel bench` runs, then one JSON file and one table.

For each model (ViT-B-32 and ViT-L-14 in bf16 with random weights; a tiny local model on the CPU with
``--dry-run``), ``vlmlabel bench`` runs on a synthetic raw uint8 HDF5 file, a synthetic JPEG HDF5 file and a
LeRobot v3.0 folder with H.264 video (built here with PyAV); each run reports model-only, end-to-end and the
naive PIL script. Then ``vlmlabel bench --scorer vlm`` runs a random-weight judge of Qwen3-VL-2B's full size
(``benchmarks/full_size_vlm.py``) in bf16 (a tiny qwen2_vl judge on the CPU with ``--dry-run``): end to end,
the model alone and the naive one-query ``generate`` loop, against the targets (end to end >= 0.85x the model
alone, >= 5x naive). Every command is recorded exactly as run. The test results come from the junit XML file
pytest wrote (``--junit``).

    python benchmarks/gpu_check.py --out DIR [--junit FILE] [--pytest-command TEXT] [--command TEXT] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Plan:
    """What one check runs: models, frame counts and sizes (the GPU plan, or the dry run's tiny one)."""

    models: tuple[str, ...]
    frames: dict[str, int]  # per model
    batch_size: int
    frame_size: int
    repeats: int
    precision: str
    device: str


LEROBOT_CAMERA = "observation.images.top"
GPU_PLAN = Plan(
    models=("ViT-B-32", "ViT-L-14"),
    frames={"ViT-B-32": 4096, "ViT-L-14": 2048},
    batch_size=256,
    frame_size=224,
    repeats=3,
    precision="bf16",
    device="cuda",
)


@dataclass(frozen=True)
class VlmPlan:
    """The VLM judge's bench: the judge (a folder built here, or --tiny FAMILY) and its workload."""

    frames: int
    episode_steps: int
    frame_size: int
    repeats: int
    precision: str
    device: str
    tiny: str | None = None  # the dry run's tiny judge; None: the full-size one


VLM_GPU_PLAN = VlmPlan(frames=512, episode_steps=64, frame_size=224, repeats=2, precision="bf16", device="cuda")
VLM_DRY_PLAN = VlmPlan(
    frames=12, episode_steps=6, frame_size=32, repeats=1, precision="auto", device="cpu", tiny="qwen2_vl"
)
VLM_TARGETS = {"ratio_vs_model_only": 0.85, "ratio_vs_naive": 5.0}


@dataclass
class BenchRun:
    model: str
    source: str  # raw HDF5 | JPEG HDF5 | LeRobot video
    command: str
    seconds: float
    result: dict[str, Any] | None = None
    error: str = ""


@dataclass
class Report:
    when: str
    command: str  # the check itself, as it was started
    dry_run: bool
    environment: dict[str, Any]
    tests: dict[str, Any]
    benches: list[BenchRun] = field(default_factory=list)
    vlm_benches: list[BenchRun] = field(default_factory=list)


def environment() -> dict[str, Any]:
    """Card, driver and the versions that decide the numbers."""
    import open_clip
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "open_clip": open_clip.__version__,
        "cpu_count": len(__import__("os").sched_getaffinity(0)),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def test_summary(junit: Path | None, command: str) -> dict[str, Any]:
    if junit is None or not junit.is_file():
        return {"command": command, "ran": False}
    suites = ET.parse(junit).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    assert suite is not None, f"{junit} holds no testsuite"
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "command": command,
        "ran": True,
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": failed,
        "seconds": float(suite.get("time", 0)),
    }


def build_lerobot(root: Path, frames: int, size: int) -> Path:
    """A LeRobot v3.0 folder whose camera is H.264 yuv420p video, episodes of 500 frames in one file."""
    from benchmarks.datapath import video_encoder
    from tests import table_layouts
    from tests.layouts import make_frames

    lengths = tuple([500] * (frames // 500) + ([frames % 500] if frames % 500 else []))
    case = table_layouts.build_lerobot(root, video=True, lengths=lengths, files=(len(lengths),))
    pixels = make_frames(frames, size, size, seed=0)
    info_path = case.path / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    for camera in case.extra["cameras"] if case.extra else ():
        video_encoder("libx264")(
            case.path / "videos" / camera / "chunk-000" / "file-000.mp4", pixels, table_layouts.FPS
        )
        info["features"][camera]["shape"] = [size, size, 3]  # the videos' size, which the reader checks
    info_path.write_text(json.dumps(info, indent=2))
    return case.path


def tiny_model(root: Path) -> Path:
    from tests.conftest import build_model_dir

    return build_model_dir(root / "tiny-clip", seed=0)


def run_bench(model: str, label: str, args: list[str], plan: Plan, out: Path) -> BenchRun:
    pretrained = [] if Path(model).is_dir() else ["--pretrained", "random"]
    command = [
        sys.executable,
        "-m",
        "vlmlabel",
        "bench",
        *args,
        "--model",
        model,
        *pretrained,
        "--precision",
        plan.precision,
        "--device",
        plan.device,
        "--batch-size",
        str(plan.batch_size),
        "--repeats",
        str(plan.repeats),
        "--json",
    ]
    shown = shlex.join(["vlmlabel", *command[3:]])
    print(f"gpu_check: {shown}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    (out / f"bench-{Path(model).name}-{label.split()[0].lower()}-{label.split()[-1].lower()}.log").write_text(
        done.stderr
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return BenchRun(model, label, shown, seconds, None, lines[-1] if lines else f"exit {done.returncode}")
    return BenchRun(model, label, shown, seconds, json.loads(done.stdout))


def run_vlm_bench(plan: VlmPlan, data: Path, out: Path) -> BenchRun:
    """``vlmlabel bench --scorer vlm`` on the full-size random judge (built here first), or the dry run's tiny one."""
    label = f"synthetic raw {plan.frame_size}x{plan.frame_size}"
    if plan.tiny:
        judge, name = ["--tiny", plan.tiny], f"tiny {plan.tiny}"
    else:
        from benchmarks.full_size_vlm import build_full_size_vlm

        start = time.perf_counter()
        print("gpu_check: building a random-weight Qwen3-VL-2B judge", flush=True)
        try:
            folder = build_full_size_vlm(data / "qwen3-vl-2b-random", device=plan.device, dtype=plan.precision)
        except Exception as exc:  # reported in the table; the CLIP results still stand
            return BenchRun("qwen3-vl-2b-random", label, "benchmarks/full_size_vlm.py", 0.0, None, repr(exc)[:300])
        print(f"gpu_check: built in {time.perf_counter() - start:.0f} s", flush=True)
        judge, name = ["--model", str(folder)], "qwen3-vl-2b-random"
    args = [
        "--scorer",
        "vlm",
        *judge,
        "--frames",
        str(plan.frames),
        "--episode-steps",
        str(plan.episode_steps),
        "--frame-size",
        f"{plan.frame_size}x{plan.frame_size}",
        "--precision",
        plan.precision,
        "--device",
        plan.device,
        "--repeats",
        str(plan.repeats),
        "--json",
    ]
    command = [sys.executable, "-m", "vlmlabel", "bench", *args]
    shown = shlex.join(["vlmlabel", "bench", *args])
    print(f"gpu_check: {shown}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    (out / "bench-vlm.log").write_text(done.stderr)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return BenchRun(name, label, shown, seconds, None, lines[-1] if lines else f"exit {done.returncode}")
    return BenchRun(name, label, shown, seconds, json.loads(done.stdout))


def vlm_markdown(runs: list[BenchRun]) -> list[str]:
    targets = ", ".join(f"{key} >= {value}" for key, value in VLM_TARGETS.items())
    lines = [
        "",
        f"VLM judge (`bench --scorer vlm`; targets: {targets}):",
        "",
        "| judge | source | precision | tokens/query | queries/episode | batch | end-to-end q/s | model-only q/s | "
        "naive q/s | e2e/model | e2e/naive | targets met |",
        "|" + "---|" * 12,
    ]
    for run in runs:
        r = run.result
        if r is None:
            lines.append(f"| {run.model} | {run.source} | | FAILED: {run.error} | | | | | | | | |")
            continue
        met = all(r[key] >= value for key, value in VLM_TARGETS.items())
        lines.append(
            f"| {run.model} | {run.source} | {r['precision']} | {r['tokens_per_query']['mean']:.0f} | "
            f"{r['queries_per_episode']['mean']:.0f} | {r['batch_size']} | {r['end_to_end_qps']:,.1f} | "
            f"{r['model_only_qps']:,.1f} | {r['naive_qps']:,.1f} | {r['ratio_vs_model_only']:.2f} | "
            f"{r['ratio_vs_naive']:.2f} | {'yes' if met else 'NO'} |"
        )
    return lines + ["", "Commands:", ""] + [f"    {run.command}" for run in runs]


def markdown(report: Report) -> str:
    env, tests = report.environment, report.tests
    lines = [
        f"# vlmlabel GPU check, {report.when}" + (" (DRY RUN on the CPU: no GPU figure)" if report.dry_run else ""),
        "",
        f"- card: {env.get('gpu')}; nvidia-smi: {env.get('nvidia_smi')}",
        f"- torch {env['torch']} (CUDA {env['torch_cuda']}), open_clip {env['open_clip']}, "
        f"Python {env['python']}, {env['cpu_count']} CPUs",
        f"- command: `{report.command}`",
        "",
    ]
    if tests.get("ran"):
        lines += [
            f"Tests: `{tests['command']}`: {tests['passed']} passed, {tests['failures']} failed, "
            f"{tests['errors']} errors, {tests['skipped']} skipped in {tests['seconds']:.0f} s",
            "",
        ]
        lines += [f"- FAILED {name}" for name in tests["failed"]] + ([""] if tests["failed"] else [])
    else:
        lines += [f"Tests: not run (`{tests['command']}`)", ""]
    lines += [
        "| model | source | batch | model-only f/s | end-to-end f/s | naive f/s | e2e/model | e2e/naive | "
        "TFLOP/s | of peak | max abs diff vs naive |",
        "|" + "---|" * 11,
    ]
    for run in report.benches:
        r = run.result
        if r is None:
            lines.append(f"| {Path(run.model).name} | {run.source} | | FAILED: {run.error} | | | | | | | |")
            continue
        peak = f"{r['peak_fraction']:.0%}" if r["peak_fraction"] is not None else "n/a"
        lines.append(
            f"| {Path(run.model).name} | {run.source} | {r['batch_size']} | {r['model_only_fps']:,.0f} | "
            f"{r['end_to_end_fps']:,.0f} | {r['naive_fps']:,.0f} | {r['ratio_vs_model_only']:.2f} | "
            f"{r['ratio_vs_naive']:.2f} | {r['tflops']:.1f} | {peak} | "
            f"{r['max_abs_reward_diff_vs_naive']:.1e} |"
        )
    lines += ["", "Commands:", ""] + [f"    {run.command}" for run in report.benches]
    lines += vlm_markdown(report.vlm_benches)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--junit", type=Path)
    parser.add_argument("--pytest-command", default="")
    parser.add_argument("--command", default="", help="the gpu_check.sh command line, for the record")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, tiny data, on the CPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    data.mkdir(exist_ok=True)
    plan = GPU_PLAN
    if args.dry_run:
        model = str(tiny_model(data))
        plan = Plan(
            models=(model,), frames={model: 24}, batch_size=8, frame_size=32, repeats=1, precision="bf16", device="cpu"
        )
    report = Report(
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        args.command,
        args.dry_run,
        environment(),
        test_summary(args.junit, args.pytest_command),
    )
    lerobot = build_lerobot(data, max(plan.frames.values()), plan.frame_size)
    size = f"{plan.frame_size}x{plan.frame_size}"
    for model in plan.models:
        frames = str(plan.frames[model])
        video = [str(lerobot), "--image-key", LEROBOT_CAMERA, "--frames", frames]
        benches = [
            ("raw HDF5", ["--frames", frames, "--frame-size", size, "--encoding", "raw"]),
            ("JPEG HDF5", ["--frames", frames, "--frame-size", size, "--encoding", "jpeg"]),
            ("LeRobot video", video),
        ]
        if not args.dry_run and model == plan.models[0]:  # NVDEC needs the GPU; the issue's target is ViT-B-32's
            benches.append(("LeRobot video, NVDEC", [*video, "--video-decoder", "nvdec"]))
        for label, bench_args in benches:
            report.benches.append(run_bench(model, label, bench_args, plan, args.out))
    report.vlm_benches.append(run_vlm_bench(VLM_DRY_PLAN if args.dry_run else VLM_GPU_PLAN, data, args.out))
    (args.out / "gpu_check.json").write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    if any(run.result is None for run in report.benches + report.vlm_benches):
        sys.exit(1)


if __name__ == "__main__":
    main()
