"""Bad input: exit code 2, one clear line, no traceback, and the source byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests import layouts
from vlmlabel.cli import app
from vlmlabel.destinations import hdf5 as hdf5_writer
from vlmlabel.run.lifecycle import RelabelRequest, relabel_file

runner = CliRunner()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def make_float_frames(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=np.random.rand(6, 16, 16, 3).astype(np.float32))
        f.create_dataset("terminals", data=np.zeros(6, bool))
    return path


def make_empty_episode(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("data/demo_0/obs/agentview_image", data=layouts.make_frames(3, 16, 16, 0))
        f.create_dataset("data/demo_1/obs/agentview_image", shape=(0, 16, 16, 3), dtype=np.uint8)
    return path


def make_empty_file(path: Path) -> Path:
    h5py.File(path, "w").close()
    return path


def make_no_images(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=np.zeros((5, 7), np.float32))
        f.create_dataset("actions", data=np.zeros((5, 2), np.float32))
    return path


def make_truncated(path: Path) -> Path:
    layouts.build_robomimic(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def make_text(path: Path) -> Path:
    path.write_text("not an hdf5 file\n")
    return path


def robomimic(path: Path) -> Path:
    return layouts.build_robomimic(path).path


def labelled_robomimic(path: Path) -> Path:
    layouts.build_robomimic(path)
    with h5py.File(path, "a") as f:
        f.create_dataset("data/demo_1/vlm_reward", data=np.zeros(7, np.float32))
    return path


def two_cameras(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        for cam in ("agentview_image", "robot0_eye_in_hand_image"):
            f.create_dataset(f"data/demo_0/obs/{cam}", data=layouts.make_frames(3, 16, 16, 0))
    return path


MODEL = "{model}"
CASES = {
    # name: (file builder, extra args, words the message must contain)
    "missing file": (None, [], ["does not exist"]),
    "not hdf5": (make_text, [], ["not an HDF5 file"]),
    "truncated": (make_truncated, [], ["truncated or corrupt"]),
    "no image dataset": (make_no_images, [], ["no image dataset", "observations", "--image-key"]),
    "image key not found": (robomimic, ["--image-key", "wrist"], ["--image-key 'wrist' not found",
                                                                   "obs/agentview_image"]),
    "ambiguous cameras": (two_cameras, [], ["several image datasets", "--image-key"]),
    "float frames": (make_float_frames, [], ["float", "uint8"]),
    "wrong rank": (make_no_images, ["--image-key", "actions"], ["rank 2"]),
    "empty episode": (make_empty_episode, [], ["data/demo_1", "empty"]),
    "empty file": (make_empty_file, [], ["empty"]),
    "empty goal": (robomimic, ["--goal", " "], ["--goal is empty"]),
    "reward key present": (labelled_robomimic, [], ["data/demo_1/vlm_reward", "--overwrite"]),
    "unknown model": (robomimic, ["--model", "ViT-B-33"], ["unknown model", "ViT-B-32"]),
    "unknown tag": (robomimic, ["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b80k"],
                    ["unknown pretrained tag", "laion2b_s34b_b79k"]),
    "weights not cached offline": (robomimic, ["--model", "ViT-B-32"], ["not in the local", "HF_HUB_OFFLINE",
                                                                        "--pretrained FILE"]),
    "missing checkpoint file": (robomimic, ["--model", "ViT-B-32", "--pretrained", "/nope/w.safetensors"],
                                ["does not exist"]),
    "model folder without config": (robomimic, ["--model", "local-dir:/tmp"], ["open_clip_config.json"]),
    "unknown device": (robomimic, ["--device", "tpu"], ["unknown device 'tpu'"]),
    "cuda absent": (robomimic, ["--device", "cuda:0"], ["no CUDA GPU", "--device cpu"]),
    "fp16 on cpu": (robomimic, ["--device", "cpu", "--precision", "fp16"], ["fp16 is not supported on cpu"]),
    "output is the source": (robomimic, ["--output", "{source}"], ["is SOURCE itself"]),
    "output is a folder": (robomimic, ["--output", "{folder}", "--overwrite"], ["is a folder"]),
    "output folder missing": (robomimic, ["--output", "{folder}/nope/out.h5"], ["does not exist; create it first"]),
    "checkpoint file is not weights": (robomimic, ["--model", "ViT-B-32", "--pretrained", "{source}"],
                                       ["could not load model 'ViT-B-32'"]),
    "bad batch size": (robomimic, ["--batch-size", "0"], ["--batch-size"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line(case, tmp_path, tiny_model_dir):
    builder, extra, words = CASES[case]
    source = tmp_path / "data.h5"
    if builder is not None:
        builder(source)
    before = digest(source)
    siblings_before = sorted(p.name for p in tmp_path.iterdir())
    args = ["relabel", str(source)]
    if "--goal" not in extra:
        args += ["--goal", "the cup is on the plate"]
    if "--model" not in extra:
        args += ["--model", str(tiny_model_dir)]
    extra = [a.format(source=source, folder=tmp_path) for a in extra]
    result = runner.invoke(app, args + extra, terminal_width=400)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert digest(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings_before


def test_failure_during_write_leaves_source_intact(tmp_path, tiny_model_dir, monkeypatch):
    lf = layouts.build_robomimic(tmp_path / "r.h5")
    before = digest(lf.path)
    calls = []

    def failing_put(handle, dataset, overwrite):
        calls.append(dataset.path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return original(handle, dataset, overwrite)

    original = hdf5_writer._put
    monkeypatch.setattr(hdf5_writer, "_put", failing_put)
    result = runner.invoke(app, ["relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "x", "-q"])
    assert result.exit_code == 2
    assert "No space left" in result.output
    assert digest(lf.path) == before
    # Only the saved progress stays beside it (so a rerun after freeing space resumes): no temp copy, no lock.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "r.h5.vlmlabel-vlm_reward"]
    assert sorted(p.name for p in (tmp_path / "r.h5.vlmlabel-vlm_reward").iterdir()) == ["progress"]
    with h5py.File(lf.path, "r") as f:
        assert "vlm_reward" not in f["data/demo_0"]
    monkeypatch.undo()  # space freed: the rerun takes every score from the saved progress
    again = relabel_file(RelabelRequest(source=lf.path, goals=["x"], model=str(tiny_model_dir)))
    assert again.result.resumed == sum(lf.steps)


def test_unreachable_hub_fails_within_seconds(tmp_path):
    """Not offline-flagged, not cached, Hub unreachable: a clear error in seconds, not minutes of retries."""
    source = layouts.build_robomimic(tmp_path / "r.h5").path
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "NO_PROXY": "*"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vlmlabel", "relabel", str(source), "--goal", "x"],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "unreachable" in proc.stderr and "--pretrained FILE" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 30


def test_console_entry_point_runs_and_reports_errors(tmp_path, tiny_model_dir):
    """The installed `vlmlabel` script, as users call it."""
    source = layouts.build_robomimic(tmp_path / "r.h5").path
    ok = subprocess.run(["vlmlabel", "relabel", str(source), "--model", str(tiny_model_dir), "--goal", "a cup"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "rewards written to" in ok.stdout
    bad = subprocess.run(["vlmlabel", "relabel", str(tmp_path / "nope.h5"), "--goal", "a cup"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_read_only_source_gets_a_labelled_copy_and_is_never_replaced(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "r.h5")
    lf.path.chmod(0o444)
    before = digest(lf.path)
    out = tmp_path / "copy.h5"
    result = runner.invoke(app, ["relabel", str(lf.path), "--model", str(tiny_model_dir), "--goal", "x", "-q",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert f["data/demo_0/vlm_reward"].shape == (lf.steps[0],)
    assert out.stat().st_mode & stat.S_IWUSR  # the copy is the user's to write (it was opened r+ as such)
    assert digest(lf.path) == before


def test_evaluate_and_plot_of_an_unlabelled_table_say_relabel_first(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    datasets.Dataset.from_dict({"image": list(layouts.make_frames(3, 16, 16, 0))}).save_to_disk(str(folder))
    for args in (["evaluate", str(folder)], ["plot", str(folder), "--out", str(tmp_path / "p.png")]):
        result = runner.invoke(app, args, terminal_width=400)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and "run `vlmlabel relabel` first" in result.output
        assert len(result.output.strip().splitlines()) == 1
