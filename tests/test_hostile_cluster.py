"""Cluster launches, as a careful but unlucky user meets them (issue 23, item 1).

- A SLURM array task never scores something other than what the job meant: a task resubmitted alone
  (``sbatch --array=1``), an irregular array or one whose variables are missing takes its shard from what
  the job's other tasks saved, or is refused in one line asking for --num-shards.
- ``--num-shards 1``, which the messages advise, is accepted: the whole dataset in one run.
- Messages name where a shard came from (SLURM_ARRAY_*, torchrun's RANK/WORLD_SIZE, the options).
- torch.distributed variables left in the environment end in one line naming them, within the rendezvous
  timeout, never in a wait of days.
- Shard parts are tied to the frames: a second reward key merges after the first, and a requeued merge
  killed before its cleanup finishes (exit 0) instead of being refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.cluster_files import make_dataset, read_rewards, relabel_args, run
from tests.storage_backends import BACKENDS, Case, tree_digest
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError
from vlmlabel.events import Events
from vlmlabel.run.distributed import rendezvous_limit
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.merge import merge_shards
from vlmlabel.run.request import RelabelRequest
from vlmlabel.run.shards import ShardSpec, SlurmArrayTask, work_dir

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
LENGTHS = (7, 11, 3, 9, 5, 8, 6)  # shard edges fall inside batches of 4
_CLEARED = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_ARRAY_JOB_ID",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _env(**values: str) -> dict[str, str | None]:
    """Exactly these SLURM / torch.distributed variables for a CliRunner run (the others unset)."""
    return {**dict.fromkeys(_CLEARED), **values}


def _array(
    task: int, count: int | None, first: int | None, last: int | None, step: int = 1, job: str = "4242"
) -> dict[str, str]:
    values = {
        "SLURM_ARRAY_TASK_ID": task,
        "SLURM_ARRAY_TASK_COUNT": count,
        "SLURM_ARRAY_TASK_MIN": first,
        "SLURM_ARRAY_TASK_MAX": last,
        "SLURM_ARRAY_TASK_STEP": step,
        "SLURM_ARRAY_JOB_ID": job,
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def _relabel(source: Path, model: Path, *extra: str, env: dict[str, str] | None = None):
    args = [
        "relabel",
        str(source),
        "--goal",
        "a red block",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--quiet",
        *extra,
    ]
    return runner.invoke(app, args, env=_env(**(env or {})), terminal_width=400)


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def _single(tmp_path: Path, model: Path, **extra) -> dict[str, np.ndarray]:
    single = make_dataset(tmp_path / "single.h5", LENGTHS)
    relabel_file(
        RelabelRequest(source=single, goals=["a red block"], model=str(model), device="cpu", batch_size=4, **extra)
    )
    return read_rewards(single, extra.get("reward_key", "vlm_reward"))


def _assert_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys() and len(got) == len(LENGTHS)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


# -- 1. a SLURM array task scores the shard the job meant, or is refused ---------------------------------------

UNSAYABLE = {  # the variables cannot say how many shards the job has
    "a task resubmitted alone (sbatch --array=1)": _array(1, 1, 1, 1),
    "an irregular list of tasks (sbatch --array=1,3,7)": _array(3, 3, 1, 7),
    "the task id alone": _array(1, None, None, None),
    "no SLURM_ARRAY_TASK_MIN": _array(1, 2, None, None),
}


@pytest.mark.parametrize("case", sorted(UNSAYABLE))
def test_an_array_task_that_cannot_say_its_shard_is_refused_without_touching_anything(case, tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    before = _digest(tmp_path)
    result = _relabel(source, tiny_model_dir, env=UNSAYABLE[case])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.output)
    assert f"SLURM_ARRAY_TASK_ID={UNSAYABLE[case]['SLURM_ARRAY_TASK_ID']}" in line  # where the setting came from
    assert "--num-shards N --shard-index I" in line and "--num-shards 1 scores the whole dataset" in line
    assert _digest(tmp_path) == before  # no reward written in place, no part, nothing beside the file
    # The advice is accepted: --num-shards 1 is the whole dataset, even inside the array.
    whole = _relabel(source, tiny_model_dir, "--num-shards", "1", env=UNSAYABLE[case])
    assert whole.exit_code == 0, whole.output
    _assert_equal(read_rewards(source), _single(tmp_path, tiny_model_dir))


@pytest.mark.parametrize("first", [0, 1])
def test_a_task_resubmitted_alone_scores_its_shard_of_the_job(first, tmp_path, tiny_model_dir):
    """`sbatch --array=FIRST-(FIRST+2)`, submitted twice (jobs 500, 600): its last task fails both times;
    `sbatch --array=FIRST+2` runs it again."""
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    for task, job in ((first, "500"), (first + 1, "600")):
        done = _relabel(source, tiny_model_dir, env=_array(task, 3, first, first + 2, job=job))
        assert done.exit_code == 0, done.output
    again = _relabel(source, tiny_model_dir, env=_array(first + 2, 1, first + 2, first + 2, job="601"))
    assert again.exit_code == 0, again.output
    assert f"taken as task {first + 2} of array job " in again.output
    assert f"(tasks {first}-{first + 2})" in again.output and "scoring shard 2 of 3" in again.output
    assert read_rewards(source) == {}  # a shard: nothing written into the file before the merge
    work = work_dir(source, "vlm_reward")
    assert sorted(p.name for p in work.iterdir()) == [f"shard-{i}-of-3.npz" for i in range(3)]
    merged = runner.invoke(app, ["merge", str(source)], env=_env(), terminal_width=400)
    assert merged.exit_code == 0, merged.output
    _assert_equal(read_rewards(source), _single(tmp_path, tiny_model_dir))


def test_a_task_alone_refuses_a_task_id_outside_the_saved_array(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    assert _relabel(source, tiny_model_dir, env=_array(1, 2, 1, 2)).exit_code == 0
    before = _digest(tmp_path)
    result = _relabel(source, tiny_model_dir, env=_array(0, 1, 0, 0))  # 0 is no task of --array=1-2
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "SLURM_ARRAY_TASK_ID=0 is no task of array job 4242 (tasks 1-2)" in line
    assert "--num-shards 2 --shard-index I (no part yet for shard(s) 1)" in line
    assert _digest(tmp_path) == before


def test_a_task_alone_with_parts_of_explicit_shards_is_told_their_count(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    relabel_file(
        RelabelRequest(
            source=source,
            goals=["a red block"],
            model=str(tiny_model_dir),
            device="cpu",
            batch_size=4,
            shard=ShardSpec(0, 3),
        )
    )
    before = _digest(tmp_path)
    result = _relabel(source, tiny_model_dir, env=_array(2, 1, 2, 2))
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "holds shards of 3 (shard-0-of-3.npz)" in line
    assert "--num-shards 3 --shard-index I (no part yet for shard(s) 1, 2)" in line
    assert _digest(tmp_path) == before


def test_a_stale_shard_lock_tells_the_shard_count(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    lock = work_dir(source, "vlm_reward") / "shard-1-of-4.lock"
    lock.parent.mkdir()
    lock.write_text(
        json.dumps({"pid": 4_000_000, "host": socket.gethostname(), "started": "then", "command": "vlmlabel relabel"})
    )
    before = _digest(tmp_path)
    result = _relabel(source, tiny_model_dir, env=_array(1, 1, 1, 1))
    assert result.exit_code == 2
    assert "holds shards of 4 (shard-1-of-4.lock)" in _one_error_line(result.output)
    assert _digest(tmp_path) == before


def test_part_of_an_array_resubmitted_as_a_smaller_array_is_refused(tmp_path, tiny_model_dir):
    """`sbatch --array=0-3` left parts of 4; `sbatch --array=2-3` looks like a whole array of 2."""
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    for task in (0, 1):
        assert _relabel(source, tiny_model_dir, env=_array(task, 4, 0, 3)).exit_code == 0
    before = _digest(tmp_path)
    result = _relabel(source, tiny_model_dir, env=_array(3, 2, 2, 3))
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "SLURM_ARRAY_TASK_COUNT=2" in line and "makes 2 shards" in line and "holds shards of 4" in line
    assert "--num-shards 4 --shard-index I" in line
    assert _digest(tmp_path) == before


def test_slurm_array_task_numbering_from_the_variables():
    assert SlurmArrayTask.from_env({}) is None
    whole = SlurmArrayTask.from_env(_array(5, 4, 2, 8, step=2, job=""))
    assert whole is not None and whole.numbering is not None and whole.numbering.index_of(5) is None
    assert whole.numbering.index_of(6) == 2
    with pytest.raises(VlmlabelError, match="SLURM_ARRAY_TASK_ID='x' is not an integer"):
        SlurmArrayTask.from_env({"SLURM_ARRAY_TASK_ID": "x"})


# -- 2. --num-shards 1 is what the messages say ---------------------------------------------------------------


def test_num_shards_1_alone_scores_the_whole_dataset(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    result = _relabel(source, tiny_model_dir, "--num-shards", "1")
    assert result.exit_code == 0, result.output
    _assert_equal(read_rewards(source), _single(tmp_path, tiny_model_dir))
    assert not work_dir(source, "vlm_reward").exists()
    other = make_dataset(tmp_path / "other.h5", LENGTHS)
    refused = _relabel(other, tiny_model_dir, "--num-shards", "3")
    assert refused.exit_code == 2 and "--num-shards 3 needs --shard-index I" in _one_error_line(refused.output)


# -- 3. messages name where a setting came from ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(rank: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }


def test_torchrun_inside_a_slurm_array_names_both_and_never_blames_options(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    before = _digest(tmp_path)
    result = _relabel(source, tiny_model_dir, env={**_torchrun(0), **_array(1, 2, 0, 1)})
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "SLURM_ARRAY_TASK_ID=1" in line and "torchrun rank 0 of 2 (RANK=0, WORLD_SIZE=2" in line
    assert "--num-shards/--shard-index" not in line and "pass --num-shards 1" in line
    options = _relabel(source, tiny_model_dir, "--num-shards", "2", "--shard-index", "1", env=_torchrun(0))
    assert options.exit_code == 2
    assert "--num-shards 2 --shard-index 1 cannot be combined with torchrun" in _one_error_line(options.output)
    assert _digest(tmp_path) == before


def test_num_shards_1_lets_torchrun_split_the_whole_dataset_inside_an_array(tmp_path, tiny_model_dir):
    """Accepted: the run goes on to meet the other rank (there is none here: refused after 1 s)."""
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    result = _relabel(
        source,
        tiny_model_dir,
        "--num-shards",
        "1",
        env={**_torchrun(1), **_array(1, 2, 0, 1), "VLMLABEL_RENDEZVOUS_TIMEOUT": "1"},
    )
    assert result.exit_code == 2
    assert "could not meet the other ranks within 1 s" in result.output.splitlines()[-1]


# -- 4. stray torch.distributed variables: minutes, notes, one line --------------------------------------------


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("rank", [0, 1])
def test_stray_distributed_variables_end_in_one_line_naming_them(rank, tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    before = _digest(tmp_path)
    variables = _torchrun(rank)
    start = time.monotonic()
    done = run(relabel_args(source, tiny_model_dir), timeout=120, VLMLABEL_RENDEZVOUS_TIMEOUT="4", **variables)
    assert time.monotonic() - start < 120
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr and "frame #" not in done.stderr, done.stderr
    assert "within 4 s" in errors[0]
    for name, value in variables.items():
        assert f"{name}={value}" in errors[0]
    assert "waiting for the other torch.distributed ranks" in done.stderr  # never a silent wait
    assert _digest(tmp_path) == before


def test_rendezvous_timeout_from_the_environment():
    assert rendezvous_limit({}).total_seconds() == 600
    assert rendezvous_limit({"VLMLABEL_RENDEZVOUS_TIMEOUT": "2.5"}).total_seconds() == 2.5
    for bad in ("0", "-3", "soon", "inf"):
        with pytest.raises(VlmlabelError, match="VLMLABEL_RENDEZVOUS_TIMEOUT"):
            rendezvous_limit({"VLMLABEL_RENDEZVOUS_TIMEOUT": bad})


# -- 5. parts tied to the frames, not to the files' stamps ------------------------------------------------------


def _shards(source: Path, model: Path, key: str, indices=(0, 1), **extra) -> list[str]:
    notes: list[str] = []
    for index in indices:
        relabel_file(
            RelabelRequest(
                source=source,
                goals=["a red block"],
                model=str(model),
                device="cpu",
                batch_size=4,
                reward_key=key,
                shard=ShardSpec(index, 2),
                **extra,
            ),
            events=Events(on_note=notes.append),
        )
    return notes


def test_a_second_reward_key_merges_after_the_first(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    _shards(source, tiny_model_dir, "first")
    _shards(source, tiny_model_dir, "second", indices=(0,))
    merge_shards(source, "first")  # written into the file: its size and times change, its frames do not
    notes = _shards(source, tiny_model_dir, "second", indices=(0, 1))
    assert any("shard-0-of-2.npz is already done" in n for n in notes), notes  # not computed again
    result = runner.invoke(app, ["merge", str(source), "--reward-key", "second"], env=_env(), terminal_width=400)
    assert result.exit_code == 0, result.output
    expected = _single(tmp_path, tiny_model_dir)
    _assert_equal(read_rewards(source, "first"), expected)
    _assert_equal(read_rewards(source, "second"), expected)


def test_parts_of_other_frames_are_still_refused(tmp_path, tiny_model_dir):
    source = make_dataset(tmp_path / "data.h5", LENGTHS)
    _shards(source, tiny_model_dir, "vlm_reward")
    with h5py.File(source, "r+") as f:
        f["data/demo_3/obs/agentview_image"][2] = 0
    before = _digest(tmp_path)
    result = runner.invoke(app, ["merge", str(source)], env=_env(), terminal_width=400)
    assert result.exit_code == 2
    assert "computed from other frames" in _one_error_line(result.output)
    assert _digest(tmp_path) == before


@pytest.fixture(params=sorted(BACKENDS))
def case(request, tmp_path) -> Case:
    root = tmp_path / request.param
    root.mkdir()
    return BACKENDS[request.param](root)


def test_a_requeued_merge_killed_before_its_cleanup_finishes(case, tiny_model_dir):
    """The merge wrote the rewards and was killed before it removed the parts; SLURM runs it again."""
    dest = case.output("merged")
    for index in range(2):
        relabel_file(
            RelabelRequest(
                source=case.source,
                goals=["a red block"],
                model=str(tiny_model_dir),
                image_key=case.image_key,
                device="cpu",
                batch_size=4,
                output=dest,
                shard=ShardSpec(index, 2),
            )
        )
    work = work_dir(dest, "vlm_reward")
    kept = work.parent / "kept-parts"
    shutil.copytree(work, kept)
    args = ["merge", str(case.source), "--output", str(dest), "--image-key", case.image_key]
    first = runner.invoke(app, args, env=_env(), terminal_width=400)
    assert first.exit_code == 0, first.output
    shutil.copytree(kept, work)  # what the kill between the write and the cleanup left
    written = tree_digest(dest)
    again = runner.invoke(app, args, env=_env(), terminal_width=400)
    assert again.exit_code == 0, again.output
    assert "already merged" in again.output
    assert not work.exists()
    assert tree_digest(dest) == written
