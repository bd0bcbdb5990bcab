"""Inputs refused when opened, for every command (issue 23, item 7): text that is not UTF-8, metadata files of the
wrong shape, and outputs named for another format. relabel's cases are in REFUSED (tests/test_hostile_inputs.py);
these are the other commands', and what must still be accepted: file names that are not UTF-8 (legal on Linux,
and opened by HDF5), the other names of HDF5 files, and folders with dots in their names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests import layouts, open_inputs, table_layouts
from tests.test_hostile_inputs import GOAL, RGB, flat, tree_digest
from vlmlabel.cli import app

runner = CliRunner()
BAD = open_inputs.NOT_UTF8
LATIN1 = open_inputs.ACCENTED_LATIN1
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line_refusal(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- text that is not UTF-8, in every command ---------------------------------------------------------------

TEXT_OPTIONS = {  # command, its arguments after SOURCE (MODEL: the tiny model), the option refused
    "evaluate --reward-key": (["evaluate", "{source}", "--reward-key", BAD], "--reward-key"),
    "evaluate --against": (["evaluate", "{source}", "--against", BAD], "--against"),
    "evaluate --image-key": (["evaluate", "{source}", "--image-key", BAD], "--image-key"),
    "evaluate --model": (["evaluate", "{source}", "--model", BAD], "--model"),
    "plot --reward-key": (["plot", "{source}", "--reward-key", BAD, "--output", "{folder}/p.png"], "--reward-key"),
    "plot --episodes": (["plot", "{source}", "--episodes", "0," + BAD, "--output", "{folder}/p.png"], "--episodes"),
    "plot --image-key": (["plot", "{source}", "--image-key", BAD, "--output", "{folder}/p.png"], "--image-key"),
    "merge --reward-key": (["merge", "{source}", "--reward-key", BAD], "--reward-key"),
    "merge --split": (["merge", "{source}", "--split", BAD], "--split"),
    "embed --image-key": (["embed", "{source}", "--model", "MODEL", "--image-key", BAD], "--image-key"),
    "embed --model": (["embed", "{source}", "--model", BAD], "--model"),
    "inspect --image-key": (["inspect", "{source}", "--image-key", BAD], "--image-key"),
    "inspect --split": (["inspect", "{source}", "--split", BAD], "--split"),
    "bench --frame-size": (["bench", "--frame-size", "84x" + BAD], "--frame-size"),
    "models FILTER": (["models", BAD], "FILTER"),
}


@pytest.mark.parametrize("case", sorted(TEXT_OPTIONS))
def test_text_that_is_not_utf8_is_refused_by_every_command(case, tmp_path, tiny_model_dir):
    """One check of every text option, before anything is opened: no traceback (h5py, pyarrow and the tokenizer
    cannot encode a surrogate), no silent result, nothing written."""
    args, flag = TEXT_OPTIONS[case]
    folder = tmp_path / "data"
    folder.mkdir()
    source = layouts.build_robomimic(folder / "data.h5").path
    before = tree_digest(folder)
    args = [a.format(source=source, folder=folder).replace("MODEL", str(tiny_model_dir)) for a in args]
    result = runner.invoke(
        app, args + (["--device", "cpu"] if args[0] in ("embed", "bench") else []), terminal_width=400
    )
    _one_line_refusal(result, f"{flag} is not UTF-8", "b'")
    assert tree_digest(folder) == before


# -- metadata of the wrong shape, read by every command ---------------------------------------------------


METADATA = {
    "LeRobot meta/info.json a list": (
        lambda root: open_inputs.lerobot(root, "info.json", lambda info: [info]),
        "info.json holds a list, not a JSON object",
    ),
    "save_to_disk state.json a list": (
        lambda root: open_inputs.disk(root, "state.json", lambda state: [state]),
        "state.json holds a list, not a JSON object",
    ),
    "DatasetDict splits null": (
        lambda root: open_inputs.disk(root, "dataset_dict.json", open_inputs.set_key("splits", None)),
        "dataset_dict.json: 'splits' is null, not a list",
    ),
}
COMMANDS = {
    "inspect": ["inspect", "{source}"],
    "evaluate": ["evaluate", "{source}", "--no-blank"],
    "plot": ["plot", "{source}", "--output", "{tmp}/p.png"],
    "embed": ["embed", "{source}", "--model", "MODEL", "--device", "cpu"],
    "merge": ["merge", "{source}"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(METADATA))
def test_metadata_of_the_wrong_shape_is_refused_by_every_command(case, command, tmp_path, tiny_model_dir):
    build, words = METADATA[case]
    source = build(tmp_path / "data")
    before = tree_digest(tmp_path / "data")
    args = [a.format(source=source, tmp=tmp_path).replace("MODEL", str(tiny_model_dir)) for a in COMMANDS[command]]
    _one_line_refusal(runner.invoke(app, args, terminal_width=400), words)
    assert tree_digest(tmp_path / "data") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# -- outputs named for another format ---------------------------------------------------------------------


def test_embed_refuses_an_output_named_for_another_format(tmp_path, tiny_model_dir):
    """embed writes an HDF5 file; under a parquet name `inspect` would call it corrupt."""
    source = layouts.build_robomimic(tmp_path / "data.h5").path
    before = tree_digest(tmp_path)
    result = runner.invoke(
        app,
        [
            "embed",
            str(source),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "cache.parquet"),
        ],
        terminal_width=400,
    )
    _one_line_refusal(result, "cache.parquet is written as HDF5", "cache.h5")
    assert tree_digest(tmp_path) == before


def test_merge_refuses_an_output_named_for_another_format(tmp_path):
    source = table_layouts.build_disk_image(tmp_path).path
    result = runner.invoke(app, ["merge", str(source), "--output", str(tmp_path / "out.h5")], terminal_width=400)
    _one_line_refusal(result, "out.h5 is written as a save_to_disk dataset, a folder", "must not end in .h5")


@pytest.mark.parametrize(
    "source_name, output_name",
    [("data.h5", "labelled.hdf5"), ("data.h5", "labelled.hdf"), ("data.h5", "labelled.H5"), ("data.nc", "labelled.nc")],
)
def test_an_hdf5_output_may_have_any_hdf5_name_or_the_sources_own_suffix(
    source_name, output_name, tmp_path, tiny_model_dir, reference
):
    source = flat(tmp_path / source_name)
    output = tmp_path / output_name
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
            "--align",
            "frame",
            "-q",
            "--output",
            str(output),
        ],
        terminal_width=400,
    )
    assert result.exit_code == 0, result.output
    with h5py.File(output, "r") as f:
        np.testing.assert_allclose(f["vlm_reward"][()], reference(RGB, [GOAL])[:, 0], atol=2e-3)


def test_a_new_dataset_folder_may_have_dots_in_its_name(tmp_path, tiny_model_dir):
    """Only a file format's suffix is refused for a folder: labelled.v2 is a folder name like any other."""
    case = table_layouts.build_disk_image(tmp_path)
    output = tmp_path / "labelled.v2"
    result = runner.invoke(
        app,
        [
            "relabel",
            str(case.path),
            "--goal",
            GOAL,
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "-q",
            "--output",
            str(output),
        ],
        terminal_width=400,
    )
    assert result.exit_code == 0, result.output
    assert (output / "state.json").is_file()


# -- file names that are not UTF-8 --------------------------------------------------------------------------


def test_hdf5_files_named_in_latin1_are_labelled(tmp_path, tiny_model_dir, reference):
    """Linux file names are bytes: an HDF5 source and an --output that are not UTF-8 are read and written (h5py
    opens them), and the rewards are the reference."""
    source = flat(tmp_path / f"{LATIN1}.h5")
    output = tmp_path / f"{LATIN1}-labelled.h5"
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
            "--align",
            "frame",
            "-q",
            "--output",
            str(output),
        ],
        terminal_width=400,
    )
    assert result.exit_code == 0, result.output
    with h5py.File(output, "r") as f:
        np.testing.assert_allclose(f["vlm_reward"][()], reference(RGB, [GOAL])[:, 0], atol=2e-3)
    assert sorted(os.fsencode(p.name) for p in tmp_path.iterdir()) == [b"donn\xe9es-labelled.h5", b"donn\xe9es.h5"]


@pytest.mark.subprocess
def test_a_file_name_that_is_not_utf8_is_printed_without_a_traceback(tmp_path, tiny_model_dir):
    """The summary names the file; a strict UTF-8 stdout (a UTF-8 locale) cannot encode it as Python holds it, which
    ended in a traceback after the rewards were written."""
    source = flat(tmp_path / f"{LATIN1}.h5")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONIOENCODING": "utf-8:strict",
        "COLUMNS": "1000",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmlabel",
            "relabel",
            os.fsencode(source),
            "--goal",
            GOAL,
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr
    assert b"donn\\udce9es.h5" in b"".join(done.stdout.split())  # the summary (a table: wrapped) names the file
    with h5py.File(source, "r") as f:
        assert f["vlm_reward"].shape == (len(RGB),)


# -- vlmlabel's own state files -----------------------------------------------------------------------------


@pytest.mark.parametrize("identity", [[], "the run"])
def test_damaged_saved_progress_is_discarded_and_the_run_starts_over(identity, tmp_path, tiny_model_dir, reference):
    """Progress whose state.json has the wrong shape is vlmlabel's own and only worth a fresh start, never a
    traceback."""
    source = flat(tmp_path / "data.h5")
    progress = tmp_path / "data.h5.vlmlabel-vlm_reward" / "progress"
    progress.mkdir(parents=True)
    state = {"done": 3, "start": 0, "stop": 9, "batch_size": 4, "identity": identity, "numerics": {}}
    (progress / "state.json").write_text(json.dumps(state))
    (progress / "rewards.f32").write_bytes(np.zeros(3, "<f4").tobytes())
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
            "--align",
            "frame",
            "-q",
        ],
        terminal_width=400,
    )
    assert result.exit_code == 0, result.output
    assert "is unreadable; starting over" in result.output
    with h5py.File(source, "r") as f:
        np.testing.assert_allclose(f["vlm_reward"][()], reference(RGB, [GOAL])[:, 0], atol=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]
