"""Hugging Face datasets (save_to_disk, parquet) and LeRobot folders through the one relabel pipeline.

One storage suite, parametrised over every table backend: the same frames must give the same rewards
as the HDF5 path, the output must reload with its own ecosystem's loader (images still images), and
the source must be untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import datasets
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests import table_layouts
from tests.cluster_files import interrupt_after
from tests.table_layouts import TableCase
from vlmlabel.cli import app
from vlmlabel.events import Events
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest
from vlmlabel.sources import Align

datasets.disable_progress_bars()

GOALS = ["a red cube on the table", "an empty table"]
CASES = {
    **table_layouts.BUILDERS,
    "lerobot_image": lambda root: table_layouts.build_lerobot(root, video=False),
    "lerobot_video": lambda root: table_layouts.build_lerobot(root, video=True),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path) -> TableCase:
    return CASES[request.param](tmp_path)


def tree_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under ``path`` (or of the file / glob matches)."""
    if "*" in str(path):
        files = sorted(path.parent.glob(path.name))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def hdf5_rewards(
    tmp: Path, frames: np.ndarray, episode_index: np.ndarray | None, model: Path, align: Align, goals=GOALS
) -> np.ndarray:
    """Rewards of the same frames through the HDF5 path (flat layout, episodes from terminals)."""
    path = tmp / "reference.h5"
    terminals = np.zeros(len(frames), bool)
    if episode_index is not None:
        terminals[np.flatnonzero(np.diff(episode_index))] = True
    with h5py.File(path, "w") as handle:
        handle.create_dataset("observations", data=frames)
        handle.create_dataset("terminals", data=terminals)
    relabel_file(RelabelRequest(source=path, goals=goals, model=str(model), align=align, device="cpu", batch_size=4))
    with h5py.File(path, "r") as handle:
        names = ["vlm_reward"] if len(goals) == 1 else [f"vlm_reward_{i}" for i in range(len(goals))]
        return np.stack([handle[n][:] for n in names], axis=1)


def request_for(case: TableCase, model: Path, **kwargs) -> RelabelRequest:
    options = {
        "goals": GOALS,
        "model": str(model),
        "device": "cpu",
        "batch_size": 5,
        "split": (case.extra or {}).get("split", "train"),
        "image_key": case.image_key,
    }
    options.update(kwargs)
    return RelabelRequest(source=case.path, **options)


def reload_output(case: TableCase, dest: Path) -> tuple[datasets.Dataset, pa.Schema]:
    """The written dataset through its own ecosystem's loader, plus the schema of its first written file."""
    if case.kind == "disk":
        loaded = datasets.load_from_disk(str(dest))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[case.extra["split"]]
        first = loaded.cache_files[0]["filename"]
        return loaded, pa.ipc.open_stream(pa.memory_map(first)).schema
    if case.kind == "parquet":
        files = [str(dest)] if dest.is_file() else sorted(str(p) for p in dest.rglob("*.parquet"))
    else:
        files = sorted(str(p) for p in (dest / "data").rglob("*.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=files, split="train")
    return loaded, pq.read_schema(files[0])


def test_storage_suite(case: TableCase, tiny_model_dir, tmp_path):
    """Default output: same rewards as HDF5, reloads with its own loader, images stay images, provenance kept."""
    before = tree_digest(case.path)
    summary = relabel_file(request_for(case, tiny_model_dir, align=Align.frame))
    dest = summary.written_to
    assert dest.parent == (case.path.parent if "*" not in str(case.path) else case.path.parent.parent)
    assert dest.name.split(".")[0].endswith("-vlmlabel")
    assert tree_digest(case.path) == before, "the source changed"
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")], "staging left behind"

    loaded, schema = reload_output(case, dest)
    assert loaded.num_rows == len(case.frames)
    assert summary.reward_names == ["vlm_reward_0", "vlm_reward_1"]
    got = np.stack([np.asarray(loaded[n], dtype=np.float32) for n in summary.reward_names], axis=1)
    expected = hdf5_rewards(tmp_path, case.frames, case.episode_index, tiny_model_dir, Align.frame)
    np.testing.assert_allclose(got, expected, atol=2e-6)

    for name in summary.reward_names:
        assert loaded.features[name] == datasets.Value("float32")
    if case.image_feature:
        assert isinstance(loaded.features[case.image_key], datasets.Image)
        np.testing.assert_array_equal(np.asarray(loaded[0][case.image_key].convert("RGB")), case.frames[0])
    assert set(loaded.column_names) == set(schema.names)
    for goal, name in zip(GOALS, summary.reward_names):
        field_meta = json.loads(schema.field(name).metadata[b"vlmlabel"])
        schema_meta = json.loads(schema.metadata[b"vlmlabel"])["columns"][name]
        for meta in (field_meta, schema_meta):
            assert meta["goal"] == goal and meta["model"] == str(tiny_model_dir)
            assert meta["precision"] == "fp32" and meta["formula"].startswith("cos(")
            assert "pretrained" in meta and meta["image_key"] == case.image_key


@pytest.mark.parametrize("name", ["disk_image", "parquet_float_chw", "lerobot_video"])
def test_align_next_matches_hdf5(name, tiny_model_dir, tmp_path):
    case = CASES[name](tmp_path)
    dest = tmp_path / ("next.parquet" if case.path.is_file() else "next")
    summary = relabel_file(request_for(case, tiny_model_dir, goals=GOALS[:1], output=dest, align=Align.next))
    assert summary.written_to == dest
    loaded, _ = reload_output(case, dest)
    expected = hdf5_rewards(tmp_path, case.frames, case.episode_index, tiny_model_dir, Align.next, GOALS[:1])
    np.testing.assert_allclose(np.asarray(loaded["vlm_reward"], dtype=np.float32), expected[:, 0], atol=2e-6)


def test_parquet_files_mirror_the_source(tmp_path, tiny_model_dir):
    case = table_layouts.build_parquet_folder(tmp_path)
    dest = relabel_file(request_for(case, tiny_model_dir)).written_to
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    for name in ("train-00000-of-00002.parquet", "train-00001-of-00002.parquet"):
        source_meta = pq.read_schema(case.path / "data" / name).metadata[b"huggingface"]
        written = json.loads(pq.read_schema(dest / "data" / name).metadata[b"huggingface"])
        features = json.loads(source_meta)["info"]["features"]
        assert written["info"]["features"] == {
            **features,
            "vlm_reward_0": {"dtype": "float32", "_type": "Value"},
            "vlm_reward_1": {"dtype": "float32", "_type": "Value"},
        }
    assert not list(tmp_path.glob(".*.tmp")), "the staging folder was left behind"


def test_dataset_dict_other_splits_carried_over(tmp_path, tiny_model_dir):
    case = table_layouts.build_dict_split(tmp_path)
    dest = relabel_file(request_for(case, tiny_model_dir)).written_to
    loaded = datasets.load_from_disk(str(dest))
    assert set(loaded) == {"train", "test"}
    assert "vlm_reward_0" in loaded["test"].column_names and "vlm_reward_0" not in loaded["train"].column_names
    assert loaded["train"].num_rows == 3


def test_unsorted_rows_frame_alignment_scores_each_row(tmp_path, tiny_model_dir):
    frames = table_layouts.make_frames(8, 24, 32, seed=9)
    episode = np.array([1, 0, 1, 0, 2, 2, 0, 1])
    ds = datasets.Dataset.from_dict(
        {"image": list(frames), "episode_index": episode.tolist(), "frame_index": [0, 0, 1, 1, 0, 1, 2, 2]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "episode_index": datasets.Value("int64"),
                "frame_index": datasets.Value("int64"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "shuffled"))
    case = TableCase(tmp_path / "shuffled", "disk", frames, None, "image", True)
    dest = relabel_file(request_for(case, tiny_model_dir, goals=GOALS[:1], align=Align.frame)).written_to
    got = np.asarray(datasets.load_from_disk(str(dest))["vlm_reward"], dtype=np.float32)
    expected = hdf5_rewards(tmp_path, frames, None, tiny_model_dir, Align.frame, GOALS[:1])[:, 0]
    np.testing.assert_allclose(got, expected, atol=2e-6)
    result = CliRunner().invoke(
        app,
        [
            "relabel",
            str(tmp_path / "shuffled"),
            "--goal",
            "x",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--align",
            "next",
            "--output",
            str(tmp_path / "next"),
        ],
    )
    assert result.exit_code == 2 and "not consecutive" in result.output
    assert not (tmp_path / "next").exists()
    # next is the default: without --align the same refusal, naming --align frame as the way to score these rows
    result = CliRunner().invoke(
        app,
        [
            "relabel",
            str(tmp_path / "shuffled"),
            "--goal",
            "x",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "default"),
        ],
        terminal_width=300,
    )
    assert result.exit_code == 2 and "not consecutive" in result.output and "--align frame" in result.output
    assert not (tmp_path / "default").exists()


def test_existing_output_and_columns(tmp_path, tiny_model_dir):
    case = table_layouts.build_disk_array(tmp_path)
    dest = relabel_file(request_for(case, tiny_model_dir, goals=GOALS[:1])).written_to
    again = ["relabel", str(case.path), "--goal", "x", "--model", str(tiny_model_dir), "--device", "cpu"]
    result = CliRunner().invoke(app, again)
    assert result.exit_code == 2 and "already exists" in result.output
    # Relabel the output itself: its reward column exists; --overwrite replaces it (and the old output).
    again_out = [
        "relabel",
        str(dest),
        "--goal",
        "y",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "twice"),
    ]
    result = CliRunner().invoke(app, again_out)
    assert result.exit_code == 2 and "vlm_reward already exist" in result.output
    result = CliRunner().invoke(app, again_out + ["--overwrite"])
    assert result.exit_code == 0, result.output
    twice = datasets.load_from_disk(str(tmp_path / "twice"))
    assert twice.column_names.count("vlm_reward") == 1
    meta = json.loads(twice.data.schema.field("vlm_reward").metadata[b"vlmlabel"])
    assert meta["goal"] == "y"
    result = CliRunner().invoke(app, again + ["--output", str(case.path / "inside")])
    assert result.exit_code == 2 and "overlaps the source" in result.output


def _error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _save(tmp: Path, name: str, columns: dict, features=None) -> Path:
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp / name))
    return tmp / name


@pytest.mark.parametrize("problem", ["missing_column", "int16", "float_range", "nan", "empty", "no_images", "ragged"])
def test_bad_input_exits_2_with_one_line(problem, tmp_path, tiny_model_dir):
    frames = table_layouts.make_frames(4, 24, 32, seed=3)
    image_key = None
    if problem == "missing_column":
        path, image_key, expect = _save(tmp_path, "d", {"image": list(frames)}), "camera", "not a column"
    elif problem == "int16":
        path, expect = _save(tmp_path, "d", {"obs": list(frames.astype(np.int16))}), "int16"
    elif problem in ("float_range", "nan"):
        values = frames.astype(np.float32)  # 0-255 floats: the classic mistake
        if problem == "nan":
            values = values / 255.0
            values[2, 0, 0, 0] = np.nan
        path, expect = _save(tmp_path, "d", {"obs": list(values)}), "outside [0, 1]"
    elif problem == "empty":
        features = datasets.Features({"image": datasets.Image()})
        path, expect = _save(tmp_path, "d", {"image": []}, features), "no rows"
    elif problem == "ragged":
        other = table_layouts.make_frames(2, 20, 32, seed=4)
        path, expect = _save(tmp_path, "d", {"obs": list(frames) + list(other)}), "different shapes"
    else:
        path, expect = _save(tmp_path, "d", {"state": [[0.0, 1.0]] * 4}), "no image column"
    before = tree_digest(path)
    args = ["relabel", str(path), "--goal", "x", "--model", str(tiny_model_dir), "--device", "cpu"]
    line = _error(args + (["--image-key", image_key] if image_key else []))
    assert expect in line
    assert tree_digest(path) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "staging left behind"
    assert not (tmp_path / "d-vlmlabel").exists()


def test_missing_split_and_unknown_folder(tmp_path, tiny_model_dir):
    case = table_layouts.build_dict_split(tmp_path)
    line = _error(["relabel", str(case.path), "--goal", "x", "--model", str(tiny_model_dir), "--split", "val"])
    assert "not 'val'" in line
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    assert "not a dataset" in _error(["inspect", str(tmp_path / "junk")])


def test_inspect_table_sources(case: TableCase):
    args = ["inspect", str(case.path), "--image-key", case.image_key]
    if case.extra and "split" in case.extra:
        args += ["--split", case.extra["split"]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert case.image_key in result.output
    episodes = 1 if case.episode_index is None else len(np.unique(case.episode_index))
    assert f"episodes │ {episodes}" in result.output.replace("  ", " ") or f"{episodes}" in result.output


def test_cli_subprocess_end_to_end(tmp_path, tiny_model_dir):
    """The installed entry point on a parquet file: rewards land in <stem>-vlmlabel.parquet."""
    import subprocess
    import sys

    case = table_layouts.build_parquet_float_chw(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmlabel",
            "relabel",
            str(case.path),
            "--goal",
            "a cube",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--align",
            "frame",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    assert run.returncode == 0, run.stderr
    out = tmp_path / "float_chw-vlmlabel.parquet"
    table = pq.read_table(out)
    assert table.column_names[-1] == "vlm_reward" and table.num_rows == len(case.frames)
    expected = hdf5_rewards(tmp_path, case.frames, case.episode_index, tiny_model_dir, Align.frame, ["a cube"])
    np.testing.assert_allclose(table.column("vlm_reward").to_numpy(), expected[:, 0], atol=2e-6)


HUB_ID = "lab/robot-pushes"


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path) -> TableCase:
    """The Hub id resolves to local parquet files through datasets' own parquet builder: no network."""
    case = table_layouts.build_parquet_folder(tmp_path)
    real = datasets.load_dataset
    calls = []

    def load_dataset(repo_id, split="train", revision=None, streaming=False, **kwargs):
        assert repo_id == HUB_ID and "trust_remote_code" not in kwargs
        calls.append((revision, streaming, kwargs.get("columns")))
        return real(
            "parquet",
            data_files=str(case.path / "data" / "*.parquet"),
            split=split,
            streaming=streaming,
            cache_dir=str(tmp_path / "hf-cache"),
            **kwargs,
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    case.extra = {"calls": calls}
    return case


def test_hub_id_writes_a_save_to_disk_dataset(fake_hub, tiny_model_dir, tmp_path):
    summary = relabel_file(
        RelabelRequest(
            source=Path(HUB_ID),
            goals=GOALS[:1],
            model=str(tiny_model_dir),
            device="cpu",
            revision="v1.0",
            align=Align.frame,
        )
    )
    assert summary.written_to == tmp_path / "work" / "robot-pushes-vlmlabel"
    loaded = datasets.load_from_disk(str(summary.written_to))
    assert isinstance(loaded.features["image"], datasets.Image)
    expected = hdf5_rewards(tmp_path, fake_hub.frames, fake_hub.episode_index, tiny_model_dir, Align.frame, GOALS[:1])
    np.testing.assert_allclose(np.asarray(loaded["vlm_reward"], dtype=np.float32), expected[:, 0], atol=2e-6)
    assert fake_hub.extra["calls"][0][:2] == ("v1.0", False)


def test_streaming_writes_a_joinable_sidecar(fake_hub, tiny_model_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "relabel",
            HUB_ID,
            "--streaming",
            "--goal",
            GOALS[0],
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--align",
            "next",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert all(streaming for _, streaming, _ in fake_hub.extra["calls"])
    assert ["episode_index", "frame_index"] in [c[2] for c in fake_hub.extra["calls"]], "index pass not projected"
    sidecar = tmp_path / "work" / "robot-pushes-vlmlabel.parquet"
    table = pq.read_table(sidecar)
    assert table.column_names == ["episode_index", "frame_index", "index", "vlm_reward"]
    assert json.loads(table.schema.field("vlm_reward").metadata[b"vlmlabel"])["goal"] == GOALS[0]
    # The README's join, verbatim: rewards back onto the dataset's rows.
    import pandas as pd

    rows = datasets.load_dataset(HUB_ID, split="train").to_pandas()
    rewards = pd.read_parquet(sidecar)
    joined = rows.merge(rewards, on=["episode_index", "frame_index", "index"], how="left")
    expected = hdf5_rewards(tmp_path, fake_hub.frames, fake_hub.episode_index, tiny_model_dir, Align.next, GOALS[:1])
    np.testing.assert_allclose(joined["vlm_reward"].to_numpy(), expected[:, 0], atol=2e-6)


@pytest.mark.parametrize("streaming", [False, True])
def test_unknown_hub_id_offline_is_one_line(streaming, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _error(
        ["relabel", "nobody-here/no-such-dataset", "--goal", "x", "--model", str(tiny_model_dir)]
        + (["--streaming"] if streaming else [])
    )
    assert "nobody-here/no-such-dataset" in line
    assert ("streaming the Hub dataset" if streaming else "is not a local path") in line
    assert list(tmp_path.iterdir()) == []


def test_push_to_hub_uploads_the_written_folder(monkeypatch, tmp_path, tiny_model_dir):
    """Offline: the upload call is recorded, not sent; a failing upload keeps the local output."""
    import huggingface_hub

    case = table_layouts.build_lerobot(tmp_path, video=False)
    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: uploads.append(repo_id))
    monkeypatch.setattr(
        huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append((kw["repo_id"], kw["folder_path"]))
    )
    summary = relabel_file(request_for(case, tiny_model_dir, goals=GOALS[:1], push_to_hub="me/labelled"))
    assert uploads == ["me/labelled", ("me/labelled", str(summary.written_to))]

    def refuse(self, **kw):
        raise huggingface_hub.errors.HfHubHTTPError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    line = _error(
        [
            "relabel",
            str(case.path),
            "--goal",
            "x",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--image-key",
            "top",
            "--output",
            str(tmp_path / "second"),
            "--push-to-hub",
            "me/labelled",
        ]
    )
    assert "pushing to the Hub repo me/labelled failed" in line and (tmp_path / "second" / "meta").is_dir()


def test_overwrite_never_replaces_a_folder_that_is_not_a_dataset(tmp_path, tiny_model_dir):
    case = table_layouts.build_disk_array(tmp_path)
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("months of work")
    line = _error(
        [
            "relabel",
            str(case.path),
            "--goal",
            "x",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--output",
            str(precious),
            "--overwrite",
        ]
    )
    assert "holds no dataset" in line
    assert (precious / "chapter1.tex").read_text() == "months of work"


def test_parquet_files_of_different_schemas_are_refused(tmp_path, tiny_model_dir):
    frames = table_layouts.make_frames(4, 24, 32, seed=8)
    (tmp_path / "mixed").mkdir()
    datasets.Dataset.from_dict({"obs": list(frames[:2])}).to_parquet(str(tmp_path / "mixed" / "a.parquet"))
    datasets.Dataset.from_dict({"obs": list(frames[2:]), "extra": [1, 2]}).to_parquet(
        str(tmp_path / "mixed" / "b.parquet")
    )
    line = _error(["relabel", str(tmp_path / "mixed"), "--goal", "x", "--model", str(tiny_model_dir)])
    assert "other columns or types" in line and "b.parquet" in line


def test_source_changed_during_scoring_writes_nothing(tmp_path, tiny_model_dir):
    case = table_layouts.build_parquet_float_chw(tmp_path)

    def touch(_: int) -> None:  # another process rewrites the file while frames are scored
        stat = case.path.stat()
        os.utime(case.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    from vlmlabel.errors import OutputError

    with pytest.raises(OutputError, match="changed while rewards were computed"):
        relabel_file(request_for(case, tiny_model_dir, goals=GOALS[:1]), events=Events(on_progress=touch))
    assert [p.name for p in tmp_path.iterdir()] == ["float_chw.parquet"], "output or staging left behind"


def test_streaming_run_interrupted_resumes_to_the_same_rewards(fake_hub, tiny_model_dir, tmp_path):
    """A stream cannot seek, but its saved progress still serves: the rerun skips what was scored."""

    def request():
        return RelabelRequest(
            source=Path(HUB_ID),
            goals=GOALS,
            model=str(tiny_model_dir),
            device="cpu",
            streaming=True,
            batch_size=2,
            checkpoint_every=2,
        )

    whole = relabel_file(request())
    expected = pq.read_table(whole.written_to)
    whole.written_to.unlink()
    with pytest.raises(KeyboardInterrupt):
        relabel_file(request(), events=Events(on_progress=interrupt_after(8)))
    assert not whole.written_to.exists()
    notes = []
    resumed = relabel_file(request(), events=Events(on_note=notes.append))
    assert resumed.result.resumed >= 6 and any("resuming" in n for n in notes)
    got = pq.read_table(resumed.written_to)
    for name in ("vlm_reward_0", "vlm_reward_1"):
        np.testing.assert_array_equal(got.column(name).to_numpy(), expected.column(name).to_numpy())
