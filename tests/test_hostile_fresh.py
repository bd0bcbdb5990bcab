"""The fresh hostile pass of issue 23 (round two): cases on classes the issue did not list, beyond the relabel
tables of test_hostile_inputs.py (its "# round two: a fresh hostile pass" entries).

Each case either gives the reference rewards, or exits 2 with one line and leaves the data as it was.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests import table_layouts
from tests.conftest import build_model_dir
from tests.hostile_fresh_builders import flat, two_cameras
from tests.layouts import make_frames
from tests.test_hostile_inputs import tree_digest
from vlmlabel import RewardModel
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError

runner = CliRunner()
GOAL = "the cup is on the plate"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], terminal_width=400)
    return result.exit_code, result.output


def words(output: str) -> str:
    """The output as one line (notes are wrapped at the console's width)."""
    return " ".join(output.split())


def relabel(source: Path, model: Path, *args: object) -> tuple[int, str]:
    return run("relabel", source, "--goal", GOAL, "--model", model, "--device", "cpu", "-q", *args)


def one_line_error(code: int, output: str, *expected: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for word in expected:
        assert word in lines[0], lines[0]


def read_reward(path: Path, name: str = "vlm_reward") -> np.ndarray:
    with h5py.File(path) as f:
        if name in f:
            return f[name][()]
        return np.concatenate([f[f"data/demo_{i}/{name}"][()] for i in range(len(f["data"]))])


# -- the embedding cache ------------------------------------------------------------------------------------


def test_cache_ignored_after_a_frame_edited_with_its_time_set_back(tmp_path, tiny_model_dir, reference):
    frames = make_frames(9, 16, 20, seed=3)
    source = flat(tmp_path / "data.h5", frames)
    assert run("embed", source, "--model", tiny_model_dir, "--device", "cpu")[0] == 0
    stat = source.stat()
    with h5py.File(source, "r+") as f:
        f["observations"][4] = 255 - f["observations"][4]
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    frames[4] = 255 - frames[4]
    code, output = run(
        "relabel", source, "--goal", GOAL, "--model", tiny_model_dir, "--device", "cpu", "--align", "frame"
    )
    assert code == 0 and "made from other frames" in words(output), output
    np.testing.assert_allclose(read_reward(source), reference(frames, [GOAL])[:, 0], atol=2e-3)


@pytest.mark.parametrize("change", ["another model", "other weights in the same folder"])
def test_cache_of_another_model_is_not_used(change, tmp_path, tiny_model_dir):
    frames = make_frames(9, 16, 20, seed=3)
    source = flat(tmp_path / "data.h5", frames)
    first = build_model_dir(tmp_path / "first", seed=0)
    other = build_model_dir(tmp_path / "other", seed=1)
    assert run("embed", source, "--model", first, "--device", "cpu")[0] == 0
    if change == "other weights in the same folder":
        (first / "open_clip_model.safetensors").write_bytes((other / "open_clip_model.safetensors").read_bytes())
        other = first
    code, output = run("relabel", source, "--goal", GOAL, "--model", other, "--device", "cpu", "--align", "frame")
    assert code == 0 and "ignored" in words(output) and "using cached" not in words(output), output
    expected = RewardModel(model=str(other), goals=[GOAL], device="cpu")(frames)
    np.testing.assert_allclose(read_reward(source), expected, atol=1e-4)


def test_cache_of_one_camera_serves_neither_the_other_nor_both(tmp_path, tiny_model_dir, reference):
    source = two_cameras(tmp_path / "data.h5")
    with h5py.File(source) as f:
        a = np.concatenate([f[f"data/demo_{i}/obs/agentview_image"][()] for i in range(2)])
        b = np.concatenate([f[f"data/demo_{i}/obs/wrist_image"][()] for i in range(2)])
    embedded = run("embed", source, "--model", tiny_model_dir, "--device", "cpu", "--image-key", "obs/agentview_image")
    assert embedded[0] == 0
    code, _ = relabel(
        source,
        tiny_model_dir,
        "--image-key",
        "obs/agentview_image",
        "--image-key",
        "obs/wrist_image",
        "--align",
        "frame",
    )
    assert code == 0
    both = (reference(a, [GOAL])[:, 0] + reference(b, [GOAL])[:, 0]) / 2
    np.testing.assert_allclose(read_reward(source), both, atol=2e-3)
    code, _ = relabel(
        source, tiny_model_dir, "--image-key", "obs/wrist_image", "--align", "frame", "--reward-key", "wrist"
    )
    assert code == 0
    np.testing.assert_allclose(read_reward(source, "wrist"), reference(b, [GOAL])[:, 0], atol=2e-3)


@pytest.mark.parametrize("damage", ["truncated", "not HDF5"])
def test_damaged_table_cache_is_ignored(damage, tmp_path, tiny_model_dir, reference):
    case = table_layouts.build_parquet_folder(tmp_path)
    cache = tmp_path / "pq_folder.vlmlabel-cache.h5"
    if damage == "truncated":
        assert run("embed", case.path, "--model", tiny_model_dir, "--device", "cpu", "--workers", "0")[0] == 0
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    else:
        cache.write_text("hello")
    code, output = relabel(case.path, tiny_model_dir, "--align", "frame", "--workers", "0")
    assert code == 0, output
    got = np.concatenate(
        [
            pq.read_table(p)["vlm_reward"].to_numpy()
            for p in sorted((tmp_path / "pq_folder-vlmlabel").rglob("*.parquet"))
        ]
    )
    np.testing.assert_allclose(got, reference(case.frames, [GOAL])[:, 0], atol=2e-3)


def test_embed_where_the_cache_name_is_a_folder(tmp_path, tiny_model_dir):
    case = table_layouts.build_parquet_folder(tmp_path)
    (tmp_path / "pq_folder.vlmlabel-cache.h5").mkdir()
    before = tree_digest(tmp_path)
    code, output = run("embed", case.path, "--model", tiny_model_dir, "--device", "cpu", "--workers", "0")
    one_line_error(code, output, "pq_folder.vlmlabel-cache.h5")
    assert tree_digest(tmp_path) == before


# -- several cameras, alignment ---------------------------------------------------------------------------


def test_cameras_of_two_frame_sizes(tmp_path, tiny_model_dir, reference):
    source = two_cameras(tmp_path / "data.h5", size_b=(24, 40))
    with h5py.File(source) as f:
        a = np.concatenate([f[f"data/demo_{i}/obs/agentview_image"][()] for i in range(2)])
        b = np.concatenate([f[f"data/demo_{i}/obs/wrist_image"][()] for i in range(2)])
    code, _ = relabel(
        source,
        tiny_model_dir,
        "--image-key",
        "obs/agentview_image",
        "--image-key",
        "obs/wrist_image",
        "--align",
        "frame",
        "--output",
        tmp_path / "out.h5",
    )
    assert code == 0
    np.testing.assert_allclose(
        read_reward(tmp_path / "out.h5"), (reference(a, [GOAL])[:, 0] + reference(b, [GOAL])[:, 0]) / 2, atol=2e-3
    )
    np.testing.assert_allclose(
        read_reward(tmp_path / "out.h5", "vlm_reward_cam_wrist_image"), reference(b, [GOAL])[:, 0], atol=2e-3
    )


def test_episodes_of_one_step_under_align_next(tmp_path, tiny_model_dir, reference):
    frames = make_frames(4, 16, 16, 5)
    source = flat(tmp_path / "data.h5", frames, lengths=(1, 1, 2))
    assert relabel(source, tiny_model_dir, "--align", "next", "--output", tmp_path / "out.h5")[0] == 0
    np.testing.assert_allclose(read_reward(tmp_path / "out.h5"), reference(frames, [GOAL])[[0, 1, 3, 3], 0], atol=2e-3)


def test_lerobot_episode_index_with_a_gap(tmp_path, tiny_model_dir, reference):
    import pyarrow as pa

    case = table_layouts.build_lerobot(tmp_path, video=True)
    files = list((case.path / "data").rglob("*.parquet")) + list((case.path / "meta" / "episodes").rglob("*.parquet"))
    for path in files:
        table = pq.read_table(path)
        episodes = table["episode_index"].to_numpy()
        column = table.schema.get_field_index("episode_index")
        pq.write_table(table.set_column(column, "episode_index", pa.array(np.where(episodes == 2, 5, episodes))), path)
    code, output = relabel(
        case.path,
        tiny_model_dir,
        "--image-key",
        "observation.images.top",
        "--align",
        "frame",
        "--output",
        tmp_path / "out",
    )
    assert code == 0, output
    parts = sorted((tmp_path / "out" / "data").rglob("*.parquet"))
    got = np.concatenate([pq.read_table(p)["vlm_reward"].to_numpy() for p in parts])
    index = np.concatenate([pq.read_table(p)["index"].to_numpy() for p in parts])
    np.testing.assert_allclose(got, reference(case.frames[index], [GOAL])[:, 0], atol=2e-3)


# -- outputs ------------------------------------------------------------------------------------------------


def test_output_a_hard_link_to_source_replaces_the_link_only(tmp_path, tiny_model_dir):
    source = flat(tmp_path / "data.h5", make_frames(9, 16, 16, 1))
    os.link(source, tmp_path / "hard.h5")
    before = source.read_bytes()
    assert relabel(source, tiny_model_dir, "--output", tmp_path / "hard.h5", "--overwrite")[0] == 0
    assert source.read_bytes() == before and source.stat().st_nlink == 1
    assert len(read_reward(tmp_path / "hard.h5")) == 9


def test_lerobot_link_output_edited_leaves_the_source(tmp_path, tiny_model_dir):
    case = table_layouts.build_lerobot(tmp_path, video=True)
    before = tree_digest(case.path)
    code, _ = relabel(
        case.path, tiny_model_dir, "--image-key", "observation.images.top", "--link", "--output", tmp_path / "out"
    )
    assert code == 0
    for edited in ("meta/info.json", "meta/stats.json"):
        with open(tmp_path / "out" / edited, "a") as handle:  # LeRobot's tools rewrite metadata in place
            handle.write(" ")
    for data in (tmp_path / "out" / "data").rglob("*.parquet"):
        assert data.stat().st_nlink == 1  # rewritten with the rewards: never a link into the source
    assert tree_digest(case.path) == before


def _read_only_mount(tmp_path: Path) -> Path:
    """A read-only view of tmp_path/src (a bind mount): root ignores file modes, not a read-only mount."""
    source, view = tmp_path / "src", tmp_path / "view"
    source.mkdir()
    view.mkdir()
    if subprocess.run(["mount", "--bind", source, view], capture_output=True).returncode != 0:
        pytest.skip("needs bind mounts (root)")
    subprocess.run(["mount", "-o", "remount,bind,ro", view], check=True)
    return view


def test_read_only_file_system(tmp_path, tiny_model_dir):
    view = _read_only_mount(tmp_path)
    source = tmp_path / "src"
    try:
        flat(source / "data.h5", make_frames(9, 16, 16, 1))
        table_layouts.build_parquet_folder(source)
        before = tree_digest(source)
        for args in (
            ["relabel", view / "data.h5", "--goal", GOAL],
            ["embed", view / "data.h5"],
            ["relabel", view / "pq_folder", "--goal", GOAL],
            ["embed", view / "pq_folder"],
        ):
            code, output = run(*args, "--model", tiny_model_dir, "--device", "cpu", "--workers", "0")
            one_line_error(code, output, "cannot write in", "--output")
        assert relabel(view / "data.h5", tiny_model_dir, "--output", tmp_path / "out.h5")[0] == 0
        assert tree_digest(source) == before
    finally:
        subprocess.run(["umount", view])


# -- a full disk while an HDF5 file is written -------------------------------------------------------------


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _vlmlabel(args: list[object], limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmlabel", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        preexec_fn=_limit_file_size(limit) if limit else None,
    )


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("write", ["embed into HDF5", "embed of a table", "--output copy", "--link labels file"])
def test_full_disk_while_hdf5_writes_is_one_line_and_a_rerun_finishes(write, tmp_path, tiny_model_dir):
    """HDF5 2.0 crashed (SIGSEGV, exit -11, its error over many lines) when one of its own writes failed."""
    frames = make_frames(60, 64, 64, seed=2)
    source = flat(tmp_path / "data.h5", frames, lengths=(60,), chunks=(4, 64, 64, 3), compression="gzip")
    model = ["--model", tiny_model_dir, "--device", "cpu", "--workers", "0"]
    if write == "embed of a table":
        source = table_layouts.build_parquet_folder(tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    args: list[object] = {
        "embed into HDF5": ["embed", source, *model],
        "embed of a table": ["embed", source.path if hasattr(source, "path") else source, *model],
        "--output copy": ["relabel", source, "--goal", GOAL, *model, "--output", tmp_path / "out.h5"],
        "--link labels file": ["relabel", source, "--goal", GOAL, *model, "--output", tmp_path / "out.h5", "--link"],
    }[write]
    limit = {
        "embed into HDF5": size + 512,
        "embed of a table": 3000,
        "--output copy": size + 64,
        "--link labels file": 1500,
    }[write]
    before = tree_digest(tmp_path)
    failed = _vlmlabel(args, limit)
    one_line_error(failed.returncode, failed.stderr, "[Errno 27]", "make room")
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if ".vlmlabel-vlm_reward" not in k} == before  # saved progress only
    finished = _vlmlabel(args)
    assert finished.returncode == 0, finished.stderr
    assert not [k for k in tree_digest(tmp_path) if ".vlmlabel-vlm_reward" in k or ".tmp" in k]


# -- resume after changing options, two runs at once ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("change", ["batch size and workers", "alignment", "goal"])
def test_resume_after_changing_options(change, tmp_path, tiny_model_dir, reference):
    frames = make_frames(600, 16, 20, seed=13)
    source = flat(tmp_path / "data.h5", frames, lengths=(200, 300, 100), chunks=(8, 16, 20, 3), compression="gzip")
    base = ["relabel", source, "--model", tiny_model_dir, "--device", "cpu", "--checkpoint-every", "16"]
    first = [*base, "--goal", GOAL, "--batch-size", "8", "--align", "frame", "--workers", "0"]
    second = {
        "batch size and workers": [*base, "--goal", GOAL, "--batch-size", "32", "--align", "frame", "--workers", "2"],
        "alignment": [*base, "--goal", GOAL, "--batch-size", "8", "--align", "next"],
        "goal": [*base, "--goal", "a red ball", "--batch-size", "8", "--align", "frame"],
    }[change]
    started = subprocess.Popen(
        [sys.executable, "-m", "vlmlabel", *map(str, first)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    progress = tmp_path / "data.h5.vlmlabel-vlm_reward" / "progress"
    deadline = time.monotonic() + 120
    while not progress.exists() and started.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    started.send_signal(signal.SIGINT)
    started.communicate(timeout=120)
    assert started.returncode == 130
    finished = _vlmlabel(second)
    assert finished.returncode == 0, finished.stderr
    goal = "a red ball" if change == "goal" else GOAL
    expected = reference(frames, [goal])[:, 0]
    if change == "alignment":
        ends = np.cumsum([200, 300, 100])
        expected = expected[[min(i + 1, int(ends[np.searchsorted(ends, i, "right")]) - 1) for i in range(600)]]
    np.testing.assert_allclose(read_reward(source), expected, atol=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_runs_on_one_file_at_once(tmp_path, tiny_model_dir, reference):
    frames = make_frames(3000, 16, 20, seed=13)  # long enough for the second run to start while the first runs
    source = flat(tmp_path / "data.h5", frames, lengths=(1500, 1500))
    args = [
        "relabel",
        source,
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--goal",
        GOAL,
        "--align",
        "frame",
        "--batch-size",
        "8",
        "-q",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "vlmlabel", *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = tmp_path / "data.h5.vlmlabel.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    second = _vlmlabel(args)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    said = words(second.stdout + second.stderr)
    assert (second.returncode == 0 and "already written" in said) or (second.returncode == 2 and "PID" in said), said
    np.testing.assert_allclose(read_reward(source), reference(frames, [GOAL])[:, 0], atol=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


# -- the Python API -----------------------------------------------------------------------------------------


def test_api_one_string_is_one_prompt(tiny_model_dir):
    """negatives="a red ball" was scored as ten one-character negatives: a silent wrong reward."""
    frames = make_frames(3, 16, 20, seed=3)
    options = {"model": str(tiny_model_dir), "goals": GOAL, "device": "cpu", "reward": "contrastive"}
    one = RewardModel(**options, negatives="a red ball")
    assert one.config.negatives == ["a red ball"]
    np.testing.assert_array_equal(one(frames), RewardModel(**options, negatives=["a red ball"])(frames))
    templated = RewardModel(model=str(tiny_model_dir), goals=GOAL, device="cpu", templates="a photo of {}")
    assert templated.config.templates == ["a photo of {}"]


@pytest.mark.parametrize(
    "options, words",
    [
        ({"goals": [3]}, "goals must be strings"),
        ({"goals": [GOAL], "baselines": [None], "reward": "projection"}, "baselines must be strings"),
        ({"goals": [GOAL], "batch_size": 2.5}, "batch_size must be a whole number"),
        ({"goals": [GOAL], "batch_size": True}, "batch_size must be a whole number"),
    ],
)
def test_api_refuses_what_is_not_text_or_a_count(options, words, tiny_model_dir):
    with pytest.raises(VlmlabelError, match=words):
        RewardModel(model=str(tiny_model_dir), device="cpu", **options)


def test_api_frames_of_odd_memory_layouts(tiny_model_dir, reference):
    frames = make_frames(4, 16, 20, seed=3)
    rm = RewardModel(model=str(tiny_model_dir), goals=[GOAL], device="cpu")
    expected = reference(frames, [GOAL])[:, 0]
    read_only = np.frombuffer(frames.tobytes(), np.uint8).reshape(frames.shape)
    for given in (frames.astype(">u1"), read_only):
        np.testing.assert_allclose(rm(given), expected, atol=2e-3)
    strided = frames[:, ::-1, ::2]
    np.testing.assert_allclose(rm(strided), reference(np.ascontiguousarray(strided), [GOAL])[:, 0], atol=2e-3)
    assert rm(frames[:0]).shape == (0,)


# -- the other commands ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["bench", "--frames", "0"], ["--frames"]),
        (["bench", "--frame-size", "0x0"], ["--frame-size"]),
        (["bench", "--batch-size", ","], ["--batch-size"]),
        (["inspect", "{folder}/nope.h5"], ["does not exist"]),
        (["inspect", "{folder}/empty.h5"], ["0 frames"]),
        (
            [
                "plot",
                "{folder}/data.h5",
                "--reward-key",
                "vlm_reward",
                "--episodes",
                "-1",
                "--output",
                "{folder}/p.png",
            ],
            ["--episodes -1"],
        ),
        (["plot", "{folder}/data.h5", "--reward-key", "vlm_reward", "--output", "{folder}/p.txt"], [".png"]),
        (["evaluate", "{folder}/data.h5", "--reward-key", "vlm_reward", "--against", "nope"], ["--against nope"]),
    ],
)
def test_other_commands_refuse_odd_input_in_one_line(args, words, tmp_path, tiny_model_dir):
    source = flat(tmp_path / "data.h5", make_frames(9, 16, 16, 1))
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("observations", shape=(0, 16, 16, 3), dtype=np.uint8)
    assert relabel(source, tiny_model_dir)[0] == 0
    before = tree_digest(tmp_path)
    extra = ["--model", tiny_model_dir, "--pretrained", "random"] if args[0] == "bench" else []
    code, output = run(*[a.format(folder=tmp_path) for a in args], *extra)
    one_line_error(code, output, *words)
    assert tree_digest(tmp_path) == before


def test_hub_id_offline_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for streaming in ([], ["--streaming"]):
        code, output = run("relabel", "someorg/somedata", "--goal", GOAL, *streaming)
        one_line_error(code, output, "someorg/somedata", "OfflineModeIsEnabled")
    assert list(tmp_path.iterdir()) == []


def test_info_json_of_a_linked_lerobot_output_is_its_own(tmp_path, tiny_model_dir):
    case = table_layouts.build_lerobot(tmp_path, video=False)
    assert (
        relabel(
            case.path, tiny_model_dir, "--image-key", "observation.images.top", "--link", "--output", tmp_path / "out"
        )[0]
        == 0
    )
    info = json.loads((tmp_path / "out" / "meta" / "info.json").read_text())
    assert (
        "vlm_reward" in info["features"]
        and "vlm_reward" not in json.loads((case.path / "meta" / "info.json").read_text())["features"]
    )
