"""What a hostile review of the run lifecycle found, each kept as a test: paths spelled two ways, edited
frames, names too long for the file system, outputs that are not datasets, requeued merges, cameras."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, Value
from typer.testing import CliRunner

from tests import layouts, table_layouts
from tests.cluster_files import interrupt_after
from tests.layouts import make_frames
from vlmlabel.cli import app
from vlmlabel.events import Events
from vlmlabel.run.embed import EmbedRequest, embed_file
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.merge import merge_shards
from vlmlabel.run.request import FinishedSummary, RelabelRequest
from vlmlabel.run.shards import ShardSpec, work_dir

GOAL = "a red cube on the table"
LENGTHS = (4, 6, 3)
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def _parquet(path: Path, seed: int = 7) -> Path:
    frames = make_frames(sum(LENGTHS), 24, 32, seed=seed)
    episode = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
    Dataset.from_dict(
        {"image": list(frames), "episode_index": episode.tolist()},
        features=Features({"image": Image(), "episode_index": Value("int64")}),
    ).to_parquet(str(path))
    return path


def _request(source: Path | str, model: Path, **extra) -> RelabelRequest:
    return RelabelRequest(source=source, goals=[GOAL], model=str(model), device="cpu", batch_size=2, **extra)


def _rewards(path: Path) -> np.ndarray:
    return pq.read_table(path).column("vlm_reward").to_numpy()


def test_shards_and_merge_with_the_source_spelled_two_ways(tmp_path, tiny_model_dir, monkeypatch):
    source = _parquet(tmp_path / "one.parquet")
    single = relabel_file(_request(source, tiny_model_dir, output=tmp_path / "single.parquet"))
    monkeypatch.chdir(tmp_path)
    relabel_file(_request("one.parquet", tiny_model_dir, output=tmp_path / "o.parquet", shard=ShardSpec(0, 2)))
    relabel_file(_request(source, tiny_model_dir, output=tmp_path / "o.parquet", shard=ShardSpec(1, 2)))
    monkeypatch.chdir(tmp_path.parent)
    merged = merge_shards(Path(tmp_path.name) / "one.parquet", output=tmp_path / "o.parquet")
    np.testing.assert_array_equal(_rewards(merged.written_to), _rewards(single.written_to))


def test_resume_with_the_source_spelled_another_way(tmp_path, tiny_model_dir, monkeypatch):
    source = _parquet(tmp_path / "one.parquet")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        relabel_file(
            _request("one.parquet", tiny_model_dir, checkpoint_every=2), events=Events(on_progress=interrupt_after(6))
        )
    notes: list[str] = []
    summary = relabel_file(_request(source, tiny_model_dir, checkpoint_every=2), events=Events(on_note=notes.append))
    assert summary.result.resumed >= 4 and any("resuming" in n for n in notes), notes


def _edit_frames(path: Path) -> None:
    """Frames 2-8 made white, the file otherwise the same (what fixing a camera by hand does)."""
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    white = layouts.encode(np.full((24, 32, 3), 255, np.uint8), "PNG")
    for row in range(2, 9):
        images[row] = {"bytes": white, "path": None}
    index = table.schema.get_field_index("image")
    pq.write_table(
        table.set_column(index, table.schema.field("image"), pa.array(images, type=table.schema.field("image").type)),
        path,
    )


def test_an_edited_table_invalidates_its_cache_and_its_finished_rewards(tmp_path, tiny_model_dir):
    source = _parquet(tmp_path / "one.parquet")
    relabel_file(_request(source, tiny_model_dir))
    embed_file(EmbedRequest(source=source, model=str(tiny_model_dir), device="cpu"))
    _edit_frames(source)
    again = runner.invoke(
        app,
        ["relabel", str(source), "--goal", GOAL, "--model", str(tiny_model_dir), "--device", "cpu", "--quiet"],
        terminal_width=300,
    )
    assert again.exit_code == 2 and "--overwrite" in again.output  # not "already written": the frames changed
    fresh = relabel_file(_request(source, tiny_model_dir, output=tmp_path / "fresh.parquet"))
    assert not fresh.used_cache and "other frames" in fresh.cache_note
    truth = relabel_file(_request(source, tiny_model_dir, output=tmp_path / "truth.parquet", use_cache=False))
    np.testing.assert_array_equal(_rewards(fresh.written_to), _rewards(truth.written_to))


def test_a_name_too_long_for_the_file_system_is_refused_before_the_model_loads(tmp_path):
    # The output name fits (238 bytes), the progress folder and lock too; the staging copy beside it does not.
    source = _parquet(tmp_path / f"{'s' * 221}.parquet")
    result = runner.invoke(
        app,
        ["relabel", str(source), "--goal", GOAL, "--reward-key", "r", "--model", str(tmp_path / "no-model")],
        terminal_width=400,
    )
    assert result.exit_code == 2 and "file name limit" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "hdf5"])
def test_overwrite_never_replaces_an_output_that_is_not_a_dataset(kind, tmp_path, tiny_model_dir):
    if kind == "hdf5":
        source = layouts.build_robomimic(tmp_path / "data.h5").path
    elif kind == "parquet":
        source = _parquet(tmp_path / "one.parquet")
    else:
        source = table_layouts.build_disk_image(tmp_path).path
    notes = tmp_path / {"hdf5": "notes.h5", "parquet": "notes.parquet"}.get(kind, "notes.txt")  # named for the format
    notes.write_text("my notes")
    result = runner.invoke(
        app,
        [
            "relabel",
            str(source),
            "--goal",
            GOAL,
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--output",
            str(notes),
            "--overwrite",
        ],
        terminal_width=300,
    )
    assert result.exit_code == 2 and "choose a new --output" in result.output, result.output
    assert notes.read_text() == "my notes"


def test_a_requeued_merge_after_a_finished_one_exits_0(tmp_path, tiny_model_dir):
    source = _parquet(tmp_path / "one.parquet")
    for index in range(2):
        relabel_file(_request(source, tiny_model_dir, shard=ShardSpec(index, 2)))
    first = runner.invoke(app, ["merge", str(source)], terminal_width=300)
    assert first.exit_code == 0, first.output
    written = hashlib.sha256((tmp_path / "one-vlmlabel.parquet").read_bytes()).hexdigest()
    again = runner.invoke(app, ["merge", str(source)], terminal_width=300)
    assert again.exit_code == 0 and "already merged" in again.output, again.output
    assert hashlib.sha256((tmp_path / "one-vlmlabel.parquet").read_bytes()).hexdigest() == written


def test_merge_evaluate_and_plot_of_a_two_camera_dataset_need_no_image_key(tmp_path, tiny_model_dir):
    case = table_layouts.build_lerobot(tmp_path, video=False)
    wrist = case.extra["cameras"][1]
    for index in range(2):
        relabel_file(_request(case.path, tiny_model_dir, image_key=wrist, shard=ShardSpec(index, 2)))
    merged = runner.invoke(app, ["merge", str(case.path)], terminal_width=300)
    assert merged.exit_code == 0, merged.output
    dest = tmp_path / "lerobot_image-vlmlabel"
    report = runner.invoke(app, ["evaluate", str(dest), "--against", "frame_index", "--no-blank", "--json"])
    assert report.exit_code == 0, report.output
    drawn = runner.invoke(app, ["plot", str(dest), "--output", str(tmp_path / "p.png")])
    assert drawn.exit_code == 0, drawn.output


def test_a_symlinked_dataset_folder_gets_its_output_beside_the_link(tmp_path, tiny_model_dir):
    (tmp_path / "store").mkdir()
    real = table_layouts.build_disk_image(tmp_path / "store")
    (tmp_path / "work").mkdir()
    link = tmp_path / "work" / "ds"
    link.symlink_to(real.path, target_is_directory=True)
    summary = relabel_file(_request(link, tiny_model_dir))
    assert summary.written_to == tmp_path / "work" / "ds-vlmlabel" and summary.written_to.is_dir()
    assert not (tmp_path / "store" / "disk_image-vlmlabel").exists()


def test_hdf5_output_in_place_rerun_is_finished_and_work_dir_is_gone(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    relabel_file(_request(lf.path, tiny_model_dir))
    with h5py.File(lf.path, "r") as f:
        first = f["data/demo_0/vlm_reward"][()]
    again = relabel_file(_request(lf.path, tiny_model_dir))
    assert isinstance(again, FinishedSummary)
    with h5py.File(lf.path, "r") as f:
        np.testing.assert_array_equal(f["data/demo_0/vlm_reward"][()], first)
    assert not work_dir(lf.path, "vlm_reward").exists()


@pytest.mark.parametrize("garbled", ["[]", "42", '{"pid": "abc", "host": "HOST"}', '{"pid": -1, "host": "HOST"}'])
def test_a_garbled_lock_file_is_taken_over_not_a_traceback(garbled, tmp_path, tiny_model_dir):
    import os
    import socket
    import time

    from vlmlabel.run.shards import dest_lock

    lf = layouts.build_robomimic(tmp_path / "data.h5")
    out = tmp_path / "out.h5"
    lock = dest_lock(out)
    lock.write_text(garbled.replace("HOST", socket.gethostname()))
    old = time.time() - 3600  # written long ago: not a lock being written right now
    os.utime(lock, (old, old))
    result = runner.invoke(
        app,
        [
            "relabel",
            str(lf.path),
            "--goal",
            GOAL,
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--output",
            str(out),
            "--quiet",
        ],
        terminal_width=300,
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and not lock.exists() and out.exists()


@pytest.mark.parametrize("case", ["baseline equals goal", "batch size too large for memory"])
def test_failures_at_the_start_of_scoring_are_one_line_and_leave_nothing(case, tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    before = hashlib.sha256(lf.path.read_bytes()).hexdigest()
    extra = (
        ["--reward", "projection", "--baseline", GOAL]
        if case == "baseline equals goal"
        else ["--batch-size", "100000000000"]
    )
    result = runner.invoke(
        app,
        ["relabel", str(lf.path), "--goal", GOAL, "--model", str(tiny_model_dir), "--device", "cpu", *extra],
        terminal_width=300,
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert hashlib.sha256(lf.path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


@pytest.mark.parametrize("link", [False, True])
def test_outputs_share_no_storage_with_the_source_unless_linked(link, tmp_path, tiny_model_dir):
    case = table_layouts.build_lerobot(tmp_path, video=True)
    summary = relabel_file(_request(case.path, tiny_model_dir, image_key=case.image_key, link=link))
    videos = sorted((case.path / "videos").rglob("*.mp4"))
    copies = [summary.written_to / v.relative_to(case.path) for v in videos]
    assert videos and all(c.read_bytes() == v.read_bytes() for c, v in zip(copies, videos, strict=True))
    shared = [c.stat().st_ino == v.stat().st_ino for c, v in zip(copies, videos, strict=True)]
    assert all(shared) if link else not any(shared)
    before = videos[0].read_bytes()
    with open(copies[0], "r+b") as handle:  # what an in-place editor does to the output
        handle.write(b"\0" * 16)
    assert (videos[0].read_bytes() == before) is (not link)


@pytest.mark.parametrize("damage", ["nan reward", "damaged reward_spec"])
def test_evaluate_refuses_damaged_rewards_in_one_line(damage, tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    relabel_file(_request(lf.path, tiny_model_dir))
    with h5py.File(lf.path, "r+") as f:
        if damage == "nan reward":
            f["data/demo_1/vlm_reward"][2] = np.nan
        else:
            f["data/demo_0/vlm_reward"].attrs["reward_spec"] = "{not json"
    result = runner.invoke(app, ["evaluate", str(lf.path), "--against", "rewards"], terminal_width=300)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert ("NaN" in lines[0]) if damage == "nan reward" else ("reward_spec" in lines[0])


@pytest.mark.parametrize("option", [["--normalize", "episode"], ["--shaping", "delta"]])
def test_per_episode_post_processing_refuses_scattered_episodes(option, tmp_path, tiny_model_dir):
    frames = make_frames(6, 24, 32, seed=3)
    Dataset.from_dict(
        {"image": list(frames), "episode_index": [1, 0, 1, 0, 0, 1]},
        features=Features({"image": Image(), "episode_index": Value("int64")}),
    ).save_to_disk(str(tmp_path / "shuffled"))
    result = runner.invoke(
        app,
        [
            "relabel",
            str(tmp_path / "shuffled"),
            "--goal",
            GOAL,
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--align",
            "frame",
            *option,
        ],
        terminal_width=300,
    )
    assert result.exit_code == 2 and "not consecutive" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shuffled"]


@pytest.mark.subprocess
@pytest.mark.parametrize("hdf5_locking", ["FALSE", "TRUE"])
def test_a_file_another_program_is_writing_is_reported_busy_and_left_alone(hdf5_locking, tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys
    import time

    lf = layouts.build_robomimic(tmp_path / "data.h5")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import h5py, sys, time\nf = h5py.File(sys.argv[1], 'r+')\nprint('open', flush=True)\ntime.sleep(60)",
            str(lf.path),
        ],
        env={**os.environ, "HDF5_USE_FILE_LOCKING": hdf5_locking},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        before = hashlib.sha256(lf.path.read_bytes()).hexdigest()
        time.sleep(0.1)
        result = runner.invoke(
            app,
            ["relabel", str(lf.path), "--goal", GOAL, "--model", str(tiny_model_dir), "--device", "cpu"],
            terminal_width=300,
        )
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "corrupt" not in line and "h5clear" not in line
        assert ("open for writing by another program" in line) or ("locked by another program" in line), line
        assert hashlib.sha256(lf.path.read_bytes()).hexdigest() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]
    finally:
        writer.kill()
        writer.wait()


def test_embed_overwrite_never_replaces_a_file_that_is_not_hdf5(tmp_path, tiny_model_dir):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    notes = tmp_path / "notes.h5"
    notes.write_text("my notes")
    result = runner.invoke(
        app,
        [
            "embed",
            str(lf.path),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--output",
            str(notes),
            "--overwrite",
        ],
        terminal_width=300,
    )
    assert result.exit_code == 2 and "not an HDF5 file" in result.output, result.output
    assert notes.read_text() == "my notes"
