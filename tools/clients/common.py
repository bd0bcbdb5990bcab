"""Shared helpers for the client checks: run vlmlabel and the open_clip oracle in the project's interpreter,
record PASS/FAIL lines and write a JSON report.

Standard library + numpy only, because the checks run in other virtual environments (Minari/d3rlpy in a
Python 3.11 venv, LeRobot in a Python 3.12 venv) while vlmlabel itself always runs in the project's
interpreter, as a user would run it.

Environment variables (all optional):
  VLMLABEL_PYTHON  interpreter that has vlmlabel's dependencies (default /root/.pyenv/versions/3.11.7/bin/python)
  VLMLABEL_SRC     source tree put first on PYTHONPATH for that interpreter (default: this repository),
                   e.g. a `git archive` snapshot of an older commit to compare behaviours
  CLIENTS_WORK     scratch folder (default: a fresh temporary folder per check)
  CLIENTS_KEEP     1 = keep the scratch folder
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MAIN_PYTHON = os.environ.get("VLMLABEL_PYTHON", "/root/.pyenv/versions/3.11.7/bin/python")
VLMLABEL_SRC = Path(os.environ.get("VLMLABEL_SRC", str(REPO))).resolve()
GOAL = "the pole is upright"


def _main_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(VLMLABEL_SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    # The client venv's own variables must not leak into the project's interpreter.
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONHOME", None)
    return env


def vlmlabel_source_info() -> dict:
    """Which vlmlabel the checks run: the source folder, its git commit and whether it has local edits."""
    info = {"src": str(VLMLABEL_SRC), "python": MAIN_PYTHON}
    try:
        out = subprocess.run(
            ["git", "-C", str(VLMLABEL_SRC), "log", "-1", "--format=%h %s"], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0:
            info["commit"] = out.stdout.strip()[:160]
            dirty = subprocess.run(
                ["git", "-C", str(VLMLABEL_SRC), "status", "--porcelain", "--", "vlmlabel"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.split("\n")
            info["uncommitted_vlmlabel_files"] = [line[3:] for line in dirty if line.strip()]
        else:
            marker = VLMLABEL_SRC / "SNAPSHOT_COMMIT"
            info["commit"] = marker.read_text().strip() if marker.exists() else "(not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "(unknown)"
    return info


def run(
    cmd: list[str], env: dict | None = None, check: bool = True, cwd: str | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    print("$ " + " ".join(_quote(c) for c in cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if proc.stdout.strip():
        print(_indent(proc.stdout))
    if proc.stderr.strip():
        print(_indent(proc.stderr))
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed with exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


def vlmlabel(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`vlmlabel ARGS` exactly as a user runs it, in the project's interpreter (CPU, quiet)."""
    # cwd = the source tree: `python -m` puts the working folder first on sys.path, so it must be VLMLABEL_SRC.
    return run([MAIN_PYTHON, "-m", "vlmlabel", *args], env=_main_env(), check=check, cwd=str(VLMLABEL_SRC))


def vlmlabel_version() -> str:
    out = run(
        [MAIN_PYTHON, "-c", "import vlmlabel; print(getattr(vlmlabel, '__version__', '?'), vlmlabel.__file__)"],
        env=_main_env(),
        cwd=str(VLMLABEL_SRC),
    )
    version, path = out.stdout.split()
    if not Path(path).resolve().is_relative_to(VLMLABEL_SRC):
        raise RuntimeError(f"vlmlabel imported from {path}, not from VLMLABEL_SRC={VLMLABEL_SRC}")
    return f"{version} ({path})"


def make_tiny_model(folder: Path) -> Path:
    """A random tiny open_clip model in local-dir layout (same recipe as tests/conftest.build_model_dir)."""
    if not (folder / "open_clip_config.json").exists():
        run([MAIN_PYTHON, str(HERE / "oracle.py"), "make-model", str(folder)], env=_main_env())
    return folder


def oracle_scores(model_dir: Path, frames: np.ndarray, goal: str, work: Path) -> np.ndarray:
    """Cosine scores of uint8 frames (N, H, W, 3) by open_clip's own pipeline (PIL preprocess, fp32)."""
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "oracle_in.npy", work / "oracle_out.npy"
    np.save(src, np.ascontiguousarray(frames, dtype=np.uint8))
    run([MAIN_PYTHON, str(HERE / "oracle.py"), "score", str(model_dir), goal, str(src), str(dst)], env=_main_env())
    return np.load(dst)


def make_tiny_vlm(folder: Path) -> Path:
    """A random tiny Qwen2-VL judge (``tools/synthetic/tiny_vlm.build_tiny_vlm("qwen2_vl", folder)``)."""
    if not (folder / "config.json").exists():
        run([MAIN_PYTHON, str(HERE / "oracle.py"), "make-vlm", str(folder)], env=_main_env())
    return folder


# The VLM runs of the checks: one frame per query (so the oracle is one image and a prompt), the raw readout kept
# as NAME_raw and the reward its min-max per episode (so the two columns differ).
VLM_ARGS = ("--scorer", "vlm", "--context", "frame", "--normalize", "episode-minmax")
VLM_PROVENANCE = ("scorer", "prompt", "readout", "answer", "context", "context_frames", "anchor_rows")


def vlm_oracle(model_dir: Path, frames: np.ndarray, goal: str, prompt: str, answer: str, work: Path) -> np.ndarray:
    """log P(answer) of each uint8 frame (N, H, W, 3) shown alone, by transformers' generate (oracle.py)."""
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "vlm_oracle_in.npy", work / "vlm_oracle_out.npy"
    np.save(src, np.ascontiguousarray(frames, dtype=np.uint8))
    cmd = [MAIN_PYTHON, str(HERE / "oracle.py"), "vlm-score", str(model_dir), goal, prompt, answer, str(src), str(dst)]
    run(cmd, env=_main_env())
    return np.load(dst)


def model_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of a model folder, computed here (provenance's model_files_sha256 should name them)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir()) if p.is_file()}


CONSTANT_SPREAD = 1e-4  # README's rule: an episode whose spread is at most 1e-4 * max(1, max |v|) is constant


def minmax_per_episode(values: np.ndarray, episodes: list[np.ndarray]) -> np.ndarray:
    """(v - min) / (max - min) within each episode's rows, in float64; 0 for a constant episode (README: spread
    within ``CONSTANT_SPREAD`` of its largest magnitude, or of 1, is rounding noise)."""
    out = np.zeros(len(values), np.float64)
    for rows in episodes:
        v = values[rows].astype(np.float64)
        span = v.max() - v.min()
        if span > CONSTANT_SPREAD * max(1.0, float(np.abs(v).max())):
            out[rows] = (v - v.min()) / span
    return out


def _quote(text: str) -> str:
    return (
        text if text and all(c.isalnum() or c in "-_./=:,+@" for c in text) else "'" + text.replace("'", "'\\''") + "'"
    )


def _indent(text: str) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) > 60:
        lines = lines[:25] + [f"... ({len(lines) - 50} lines) ..."] + lines[-25:]
    return "\n".join("    | " + line for line in lines)


class Report:
    """PASS/FAIL/INFO lines, printed as they come and saved as JSON at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.results: list[dict] = []
        self.info: dict = {"python": sys.version.split()[0], "vlmlabel": vlmlabel_source_info()}
        keep = os.environ.get("CLIENTS_WORK")
        if keep:
            self.work = Path(keep) / name
            if self.work.exists():
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True)
        else:
            self.work = Path(tempfile.mkdtemp(prefix=f"vlmlabel-{name}-"))
        print(f"== {name}: scratch folder {self.work}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        status = "PASS" if ok else "FAIL"
        self.results.append({"check": name, "status": status, "detail": detail})
        print(f"[{status}] {name}" + (f" -- {detail}" if detail else ""), flush=True)
        return ok

    def note(self, name: str, detail: str) -> None:
        self.results.append({"check": name, "status": "INFO", "detail": detail})
        print(f"[INFO] {name} -- {detail}", flush=True)

    def guarded(self, name: str, fn, *args, **kwargs):
        """Run one step; an exception is a FAIL with its last line, and the check goes on."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none hides the others
            tb = traceback.format_exc()
            print(tb, flush=True)
            last = f"{type(exc).__name__}: {exc}".strip().splitlines()
            self.check(name, False, " | ".join(last[:6])[:1500])
            return None

    def finish(self) -> int:
        failed = [r for r in self.results if r["status"] == "FAIL"]
        passed = [r for r in self.results if r["status"] == "PASS"]
        out = Path(os.environ.get("CLIENTS_RESULTS", str(HERE / "results")))
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "client": self.name,
            "info": self.info,
            "passed": len(passed),
            "failed": len(failed),
            "results": self.results,
        }
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"== {self.name}: {len(passed)} passed, {len(failed)} failed; report {path}", flush=True)
        for r in failed:
            print(f"   FAIL {r['check']}: {r['detail']}", flush=True)
        if not os.environ.get("CLIENTS_KEEP") and not os.environ.get("CLIENTS_WORK"):
            shutil.rmtree(self.work, ignore_errors=True)
        return 1 if failed else 0
