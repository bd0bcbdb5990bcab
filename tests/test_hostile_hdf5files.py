"""Labels files, busy files and whole results (issue 23, round two: items 3, 5 and 8).

- A labels file (``relabel SOURCE --output FILE --link``) reads its frames from the file it was made from, where
  it names it, or not at all: every command refuses, in one line naming the file, a source that moved away
  (HDF5 would find a file of that name from the working folder), was replaced by another dataset, or is
  shadowed by $HDF5_EXT_PREFIX; so does any HDF5 file whose external link or virtual dataset would read another
  file than the one it names.
- A file another process is writing (an SWMR writer, a writer holding HDF5's lock) is named busy by every
  command, never "truncated or corrupt"; the mark a dead writer leaves is named with the way to clear it.
- ``--overwrite`` replaces a whole result: its per-camera columns, its per-goal columns and the columns of an
  earlier version's result go with it, in a labels file and through merge too; a user's own column never does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests import labels_files, layouts, test_cameras
from tests.storage_backends import tree_digest
from vlmlabel.cli import app
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.merge import merge_shards
from vlmlabel.run.request import RelabelRequest
from vlmlabel.run.shards import ShardSpec

GOAL = "a red cube on the table"
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def refused(args: list[str], *words: str) -> str:
    """Run the CLI: exit 2 and one line holding ``words``, no traceback."""
    result = runner.invoke(app, args, terminal_width=400)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# Every command that opens a dataset, on the file at PATH (MODEL: the tiny model, OUT: a folder of their own).
COMMANDS: dict[str, Callable[[str, str, Path], list[str]]] = {
    "relabel": lambda path, model, out: [
        "relabel",
        path,
        "--goal",
        GOAL,
        "--model",
        model,
        "--device",
        "cpu",
        "--reward-key",
        "again",
    ],
    "embed": lambda path, model, out: ["embed", path, "--model", model, "--device", "cpu"],
    "evaluate": lambda path, model, out: ["evaluate", path, "--no-blank"],
    "plot": lambda path, model, out: ["plot", path, "--output", str(out / "rewards.png")],
    "inspect": lambda path, model, out: ["inspect", path],
    "merge": lambda path, model, out: ["merge", path],
}


# -- labels files -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir) -> Path:
    """data/d.h5 and labels/l.h5, made by `relabel --output labels/l.h5 --link`."""
    root = tmp_path_factory.mktemp("pair")
    layouts.build_robomimic(labels_files.fresh(root / "data" / "d.h5"))
    (root / "labels").mkdir()
    result = runner.invoke(
        app,
        [
            "relabel",
            str(root / "data" / "d.h5"),
            "--goal",
            GOAL,
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "-q",
            "--output",
            str(root / "labels" / "l.h5"),
            "--link",
        ],
    )
    assert result.exit_code == 0, result.output
    return root


def _moved_another_in_the_working_folder(pair: Path, monkeypatch) -> None:
    shutil.move(pair / "data", pair.parent / "moved")
    labels_files.another(labels_files.fresh(pair.parent / "elsewhere" / "data" / "d.h5"))
    (pair.parent / "elsewhere" / "run").mkdir()
    monkeypatch.chdir(pair.parent / "elsewhere" / "run")  # ../data/d.h5 from here: the other dataset


def _replaced_by_another_dataset(pair: Path, monkeypatch) -> None:
    (pair / "data" / "d.h5").unlink()
    labels_files.another(pair / "data" / "d.h5")


def _shadowed_by_the_prefix_variable(pair: Path, monkeypatch) -> None:
    labels_files.another(labels_files.fresh(pair.parent / "shadow" / "data" / "d.h5"))
    (pair.parent / "shadow" / "prefix").mkdir()
    monkeypatch.setenv("HDF5_EXT_PREFIX", str(pair.parent / "shadow" / "prefix"))  # prefix/../data/d.h5


BROKEN = {
    "source moved, another where the working folder leads": (
        _moved_another_in_the_working_folder,
        ["d.h5", "not found at", "never reads"],
    ),
    "source replaced by another dataset": (_replaced_by_another_dataset, ["d.h5", "holds other frames"]),
    "source shadowed by $HDF5_EXT_PREFIX": (_shadowed_by_the_prefix_variable, ["HDF5_EXT_PREFIX", "unset"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_labels_file_never_reads_another_datasets_frames(
    broken, command, made, tmp_path, tiny_model_dir, monkeypatch
):
    pair = tmp_path / "pair"
    shutil.copytree(made, pair)
    BROKEN[broken][0](pair, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    before = tree_digest(tmp_path)
    refused(COMMANDS[command](str(pair / "labels" / "l.h5"), str(tiny_model_dir), out), *BROKEN[broken][1])
    assert tree_digest(tmp_path) == before  # the labels file untouched, nothing written anywhere


def test_a_labels_file_names_its_own_record_of_the_source(made, tmp_path, tiny_model_dir):
    """The pair as made reads fine; the record names the source relative to the labels file, and a damaged
    record is refused, not ignored."""
    pair = tmp_path / "pair"
    shutil.copytree(made, pair)
    labels = pair / "labels" / "l.h5"
    report = runner.invoke(app, ["evaluate", str(labels), "--no-blank", "--json"])
    assert report.exit_code == 0, report.output
    with h5py.File(labels, "r+") as f:
        assert '"../data/d.h5"' in f.attrs["vlmlabel_linked_file"]
        f.attrs["vlmlabel_linked_file"] = "{not json"
    refused(["inspect", str(labels)], "vlmlabel_linked_file", "damaged")


@pytest.mark.parametrize("virtual", [False, True], ids=["external link", "virtual dataset"])
def test_a_link_shadowed_by_the_prefix_variable_is_refused(virtual, tmp_path, tiny_model_dir, monkeypatch):
    """HDF5 looks under $HDF5_EXT_PREFIX ($HDF5_VDS_PREFIX) before the file's own folder: the file named beside
    SOURCE would silently give way to another one."""
    folder = tmp_path / "data"
    folder.mkdir()
    source = labels_files.link_found_in_working_folder(folder / "data.h5", virtual)
    shutil.move(folder / "run" / "frames.h5", folder / "frames.h5")  # the file the link names, beside SOURCE
    with h5py.File(folder / "run" / "frames.h5", "w") as f:  # another one of that name under the prefix
        f["images"] = np.zeros((16, 16, 20, 3), np.uint8)
    variable = "HDF5_VDS_PREFIX" if virtual else "HDF5_EXT_PREFIX"
    monkeypatch.setenv(variable, str(folder / "run"))
    before = tree_digest(folder)
    refused(
        ["relabel", str(source), "--goal", GOAL, "--model", str(tiny_model_dir), "--device", "cpu"],
        variable,
        "run/frames.h5",
    )
    assert tree_digest(folder) == before
    monkeypatch.delenv(variable)
    result = runner.invoke(
        app, ["relabel", str(source), "--goal", GOAL, "--model", str(tiny_model_dir), "--device", "cpu", "-q"]
    )
    assert result.exit_code == 0, result.output


# -- busy files -------------------------------------------------------------------------------------------------

_WRITERS = {
    "an SWMR writer": (
        "f = h5py.File(sys.argv[1], 'a', libver='latest'); f.swmr_mode = True",
        ["open for writing by another program", "not damaged"],
    ),
    "an SWMR writer that died": (
        "f = h5py.File(sys.argv[1], 'a', libver='latest'); f.swmr_mode = True; os.kill(os.getpid(), signal.SIGKILL)",
        ["h5clear -s", "not damaged"],
    ),
    "a writer holding HDF5's lock": ("f = h5py.File(sys.argv[1], 'a')", ["locked by another program"]),
}


@pytest.fixture(params=sorted(_WRITERS))
def held(request, tmp_path) -> Iterator[tuple[Path, list[str]]]:
    """data/d.h5 as a writer of each kind holds it (or left it), and the words its refusal must hold."""
    code, words = _WRITERS[request.param]
    path = labels_files.swmr_ready(labels_files.fresh(tmp_path / "data" / "d.h5"))
    script = f"import h5py, os, signal, sys, time\n{code}\nprint('open', flush=True)\ntime.sleep(120)"
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HDF5_USE_FILE_LOCKING": "TRUE"},
    )
    try:
        assert writer.stdout is not None
        if "died" in request.param:
            writer.wait(timeout=60)
            assert writer.returncode == -signal.SIGKILL
        else:
            assert writer.stdout.readline().strip() == "open"
        yield path, words
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.subprocess
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_file_being_written_is_named_busy_by_every_command(held, command, tmp_path, tiny_model_dir):
    path, words = held
    out = tmp_path / "out"
    out.mkdir()
    before = tree_digest(tmp_path / "data")
    line = refused(COMMANDS[command](str(path), str(tiny_model_dir), out), str(path), *words)
    assert "corrupt" not in line
    assert tree_digest(tmp_path / "data") == before and not any(out.iterdir())


# -- --overwrite replaces a whole result ------------------------------------------------------------------------


def _columns(path: Path, group: str = "data/demo_0") -> list[str]:
    with h5py.File(path, "r") as f:
        return sorted(name for name in f[group] if isinstance(f[group].get(name), h5py.Dataset))


def _relabel(source: Path, model: Path, *extra: str) -> None:
    result = runner.invoke(
        app, ["relabel", str(source), "--model", str(model), "--device", "cpu", "-q", *extra], terminal_width=300
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("backend", ["robomimic", "save_to_disk"])
def test_two_cameras_then_one_leaves_no_camera_column(backend, tmp_path, tiny_model_dir):
    two = test_cameras.BACKENDS[backend](tmp_path)
    first = relabel_file(
        RelabelRequest(
            source=two.source,
            goals=[GOAL],
            model=str(tiny_model_dir),
            device="cpu",
            image_key=list(two.keys),
            output=two.output,
        )
    )
    cameras = [f"vlm_reward_cam_{test_cameras._short(k)}" for k in two.keys]
    assert all(len(two.read(first.written_to, name)) for name in cameras)
    second = relabel_file(
        RelabelRequest(
            source=first.written_to,
            goals=[GOAL],
            model=str(tiny_model_dir),
            device="cpu",
            image_key=two.keys[0],
            overwrite=True,
        )
    )
    assert len(two.read(second.written_to, "vlm_reward"))
    for name in cameras:
        with pytest.raises((KeyError, ValueError)):
            two.read(second.written_to, name)


def test_a_key_naming_a_column_of_another_result_replaces_that_result_whole(tmp_path, tiny_model_dir):
    """`--reward-key vlm_reward_0 --overwrite` replaces vlm_reward_0 of the two-goal result under vlm_reward: its
    vlm_reward_1 goes too, else the file would hold half of it."""
    source = layouts.build_robomimic(tmp_path / "d.h5").path
    _relabel(source, tiny_model_dir, "--goal", GOAL, "--goal", "an empty table")
    assert _columns(source)[-2:] == ["vlm_reward_0", "vlm_reward_1"]
    _relabel(source, tiny_model_dir, "--goal", GOAL, "--reward-key", "vlm_reward_0", "--overwrite")
    assert "vlm_reward_1" not in _columns(source) and "vlm_reward_0" in _columns(source)
    with h5py.File(source, "r") as f:
        assert f["data/demo_2/vlm_reward_0"].attrs["reward_key"] == "vlm_reward_0"


def test_an_earlier_versions_raw_column_goes_with_its_reward(tmp_path, tiny_model_dir):
    """A result written before columns recorded their --reward-key: NAME_raw names NAME in ``raw_of``."""
    source = layouts.build_robomimic(tmp_path / "d.h5").path
    _relabel(source, tiny_model_dir, "--goal", GOAL, "--normalize", "episode")
    with h5py.File(source, "r+") as f:
        for k in range(len(layouts.LENGTHS)):
            for name in ("vlm_reward", "vlm_reward_raw"):
                del f[f"data/demo_{k}/{name}"].attrs["reward_key"]
    _relabel(source, tiny_model_dir, "--goal", "an empty table", "--overwrite")
    assert "vlm_reward_raw" not in _columns(source) and "vlm_reward" in _columns(source)


def test_the_users_own_column_is_never_part_of_a_result(tmp_path, tiny_model_dir):
    """A column vlmlabel did not write, even one named NAME_raw that says it is the raw of NAME, is left alone by
    --overwrite, and a run that would write over it is refused."""
    source = layouts.build_robomimic(tmp_path / "d.h5").path
    _relabel(source, tiny_model_dir, "--goal", GOAL)
    with h5py.File(source, "r+") as f:
        for k, length in enumerate(layouts.LENGTHS):
            f[f"data/demo_{k}/vlm_reward_raw"] = np.arange(length, dtype=np.float32)
            f[f"data/demo_{k}/vlm_reward_raw"].attrs["raw_of"] = "vlm_reward"
    _relabel(source, tiny_model_dir, "--goal", "an empty table", "--overwrite")
    with h5py.File(source, "r") as f:
        np.testing.assert_array_equal(f["data/demo_1/vlm_reward_raw"][()], np.arange(layouts.LENGTHS[1]))
    refused(
        [
            "relabel",
            str(source),
            "--goal",
            GOAL,
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--normalize",
            "episode",
            "--overwrite",
        ],
        "vlm_reward_raw",
        "not written by vlmlabel",
    )


def test_a_labels_file_over_a_labelled_source_links_no_column_of_the_replaced_result(tmp_path, tiny_model_dir):
    source = layouts.build_robomimic(tmp_path / "d.h5").path
    _relabel(source, tiny_model_dir, "--goal", GOAL, "--normalize", "episode")
    labels = tmp_path / "labels.h5"
    _relabel(source, tiny_model_dir, "--goal", GOAL, "--output", str(labels), "--link", "--overwrite")
    assert "vlm_reward" in _columns(labels) and "vlm_reward_raw" not in _columns(labels)
    assert "vlm_reward_raw" in _columns(source)  # the source is only read


def test_merge_replaces_a_whole_result(tmp_path, tiny_model_dir):
    source = layouts.build_robomimic(tmp_path / "d.h5").path
    _relabel(source, tiny_model_dir, "--goal", GOAL, "--goal", "an empty table", "--normalize", "episode")
    for index in range(2):
        relabel_file(
            RelabelRequest(
                source=source,
                goals=[GOAL],
                model=str(tiny_model_dir),
                device="cpu",
                shard=ShardSpec(index, 2),
                overwrite=True,
            )
        )
    merge_shards(source, overwrite=True)
    assert [n for n in _columns(source) if n.startswith("vlm_reward")] == ["vlm_reward"]
