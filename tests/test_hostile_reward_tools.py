"""A hostile pass over issue 22's reward tools (goal images, ``progress``), as an unlucky user meets them.

Each test names what it found: a goal frame named by a LeRobot user's episode number, a ``progress`` output that
is a dangling symbolic link, an output that is a folder, a full disk, an EXIF-rotated goal JPEG.
"""

from __future__ import annotations

import hashlib
import resource
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests import layouts
from tests.cluster_files import ROOT, env
from tests.goal_image_files import open_clip_image_cosines, opened
from tests.hostile_fresh_builders import parquet_episodes
from tests.layouts import make_frames
from tests.test_evaluate_voc import labelled as labelled_file
from vlmlabel.cli import app
from vlmlabel.evaluate import EvaluateRequest, evaluate_file

runner = CliRunner()
GOAL = "the cup is on the plate"

pytestmark = pytest.mark.usefixtures("one_thread")


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's content hash, a link's target, or "folder"."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            found[name] = f"-> {path.readlink()}"
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# -- goal images ------------------------------------------------------------------------------------------


def test_goal_frame_names_a_tables_episode_by_its_episode_index(tmp_path, tiny_model_dir):
    """Found: a table's episodes were only found by position, so on a LeRobot subset (episode_index 3, 5, 7)
    ``--goal-frame 5:-1`` was refused and ``1:-1`` silently took episode 5. Now 5 is episode_index 5."""
    source = parquet_episodes(tmp_path / "t.parquet", [3, 3, 3, 5, 5, 7, 7, 7])
    out = tmp_path / "out.parquet"
    args = ["relabel", str(source), "--goal-frame", "5:-1", "--model", str(tiny_model_dir), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--align", "frame", "--output", str(out), "-q"], terminal_width=300)
    assert result.exit_code == 0, result.output
    frames = make_frames(8, 16, 20, seed=4)  # parquet_episodes' frames, row by row
    got = pq.read_table(out)["vlm_reward"].to_numpy()
    want = open_clip_image_cosines(tiny_model_dir, frames, [frames[4]])[:, 0]  # episode 5's last row
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert got[4] == pytest.approx(1.0, abs=1e-5)
    again = tmp_path / "again.parquet"  # the episode as the summary names it
    named = runner.invoke(app, [*args[:3], "episode 5:-1", *args[4:], "--align", "frame", "--output", str(again)])
    assert named.exit_code == 0, named.output
    np.testing.assert_array_equal(pq.read_table(again)["vlm_reward"].to_numpy(), got)


def test_goal_frame_by_number_finds_demo_10_among_twelve(tmp_path, tiny_model_dir):
    """robomimic's demo_K by its number K, whatever the reading order of the groups."""
    path = tmp_path / "r.h5"
    frames = {k: make_frames(2, 16, 16, seed=k) for k in range(12)}
    with h5py.File(path, "w") as f:
        for k, shown in frames.items():
            f.create_dataset(f"data/demo_{k}/obs/agentview_image", data=shown)
            f.create_dataset(f"data/demo_{k}/actions", data=np.zeros((2, 2), np.float32))
    args = ["relabel", str(path), "--goal-frame", "10:0", "--model", str(tiny_model_dir), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--align", "frame", "-q"], terminal_width=300)
    assert result.exit_code == 0, result.output
    with h5py.File(path) as f:
        assert f["data/demo_10/vlm_reward"][0] == pytest.approx(1.0, abs=1e-5)
        assert f["data/demo_10/vlm_reward"].attrs["goal_frame"] == "10:0"


def test_a_goal_images_formula_names_the_image_not_a_text(tmp_path, tiny_model_dir):
    """Found: a goal image's column recorded the text formula 'cos(CLIP_image(o), CLIP_text(goal))'."""
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    args = ["relabel", str(lf.path), "--goal", GOAL, "--goal-frame", "demo_1:-1", "--normalize", "episode"]
    result = runner.invoke(app, [*args, "--model", str(tiny_model_dir), "--device", "cpu", "-q"], terminal_width=300)
    assert result.exit_code == 0, result.output
    with h5py.File(lf.path) as f:
        text, image = (dict(f[lf.reward_paths[0].replace("vlm_reward", f"vlm_reward_{i}")].attrs) for i in (0, 1))
    assert text["formula"] == "cos(CLIP_image(o), CLIP_text(goal)) -> normalize(episode)"
    assert image["formula"] == "cos(CLIP_image(o), CLIP_image(goal image)) -> normalize(episode)"


def test_an_exif_rotated_goal_jpeg_is_scored_as_open_clip_opens_it(tmp_path, tiny_model_dir):
    """An EXIF orientation tag (a phone photo): open_clip's PIL pipeline ignores it (no exif_transpose), and so
    does vlmlabel: the cosines equal open_clip's own, not those of the rotated picture."""
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    goal = tmp_path / "goal.jpg"
    Image.fromarray(make_frames(1, 30, 40, seed=4)[0]).save(goal, exif=exif.tobytes(), quality=95)
    args = ["relabel", str(lf.path), "--goal-image", str(goal), "--model", str(tiny_model_dir), "--device", "cpu"]
    result = runner.invoke(app, [*args, "-q"], terminal_width=300)
    assert result.exit_code == 0, result.output
    with h5py.File(lf.path) as f:
        for path, frames in zip(lf.reward_paths, lf.next_steps, strict=True):
            want = open_clip_image_cosines(tiny_model_dir, frames, [opened(goal)])[:, 0]
            np.testing.assert_allclose(f[path][()], want, atol=5e-4)


# -- progress -------------------------------------------------------------------------------------------------


@pytest.fixture()
def labelled(tmp_path, tiny_model_dir) -> Path:
    (tmp_path / "data").mkdir()
    lf = layouts.build_robomimic(tmp_path / "data" / "data.h5")
    args = ["relabel", str(lf.path), "--goal", GOAL, "--model", str(tiny_model_dir), "--device", "cpu", "-q"]
    result = runner.invoke(app, args, terminal_width=300)
    assert result.exit_code == 0, result.output
    return lf.path


def progress(source: Path, output: Path, *extra: str):
    return runner.invoke(app, ["progress", str(source), "--output", str(output), *extra], terminal_width=400)


def test_progress_to_a_dangling_link_says_which_folder_is_missing(labelled, tmp_path):
    """Found: a link into a missing folder passed the output check and failed in pyarrow, naming its temporary
    file ("Failed to open local file '.../.x.parquet.vlmlabel-HOST-PID.tmp'")."""
    link = tmp_path / "p.parquet"
    link.symlink_to(tmp_path / "nowhere" / "x.parquet")
    before = tree(tmp_path)
    line = one_line(progress(labelled, link))
    assert f"folder {tmp_path / 'nowhere'} does not exist; create it first" in line, line
    assert tree(tmp_path) == before


def test_progress_to_a_folder_names_the_file_to_write(labelled, tmp_path):
    """Found: "name the a progress parquet file to write"."""
    (tmp_path / "p.parquet").mkdir()
    before = tree(tmp_path)
    line = one_line(progress(labelled, tmp_path / "p.parquet", "--overwrite"))
    assert "is a folder; name the progress parquet file to write" in line, line
    assert tree(tmp_path) == before


def test_progress_through_a_link_writes_where_it_points(labelled, tmp_path):
    """A link to another file: that file is replaced (with --overwrite), the link stays a link."""
    (tmp_path / "real.parquet").write_bytes(b"old")
    (tmp_path / "p.parquet").symlink_to(tmp_path / "real.parquet")
    result = progress(labelled, tmp_path / "p.parquet", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.parquet").is_symlink()
    assert pq.read_table(tmp_path / "real.parquet").num_rows == 16


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.subprocess
def test_progress_on_a_full_disk_keeps_the_old_file_and_leaves_nothing(labelled, tmp_path):
    """A file system that takes no more than 3000 bytes (RLIMIT_FSIZE: EFBIG, as ENOSPC for a writer): exit 2,
    one line, the existing output byte-identical, no temporary file beside it, the dataset untouched."""
    old = tmp_path / "p.parquet"
    old.write_bytes(b"keep me")
    before = tree(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "vlmlabel", "progress", str(labelled), "--output", str(old), "--overwrite"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_file_size_limit(3000),
    )
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and len(said) == 1 and said[0].startswith("error: "), done.stdout + done.stderr
    assert "File too large" in said[0]
    assert tree(tmp_path) == before


def test_progress_of_one_step_episodes_is_zero(tmp_path, tiny_model_dir):
    """An episode of one step has a constant reward: progress 0 (episode-minmax), said in the summary."""
    path = tmp_path / "one.h5"
    with h5py.File(path, "w") as f:
        for k in range(3):
            f.create_dataset(f"data/demo_{k}/obs/agentview_image", data=make_frames(1, 16, 16, seed=k))
            f.create_dataset(f"data/demo_{k}/actions", data=np.zeros((1, 2), np.float32))
    args = ["relabel", str(path), "--goal", GOAL, "--model", str(tiny_model_dir), "--device", "cpu"]
    assert runner.invoke(app, [*args, "--align", "frame", "-q"]).exit_code == 0
    result = progress(path, tmp_path / "p.parquet")
    assert result.exit_code == 0, result.output
    assert "3 with a constant reward" in " ".join(result.output.split())
    table = pq.read_table(tmp_path / "p.parquet")
    np.testing.assert_array_equal(table["progress_sparse"].to_numpy(), np.zeros(3, np.float32))
    np.testing.assert_array_equal(table["index"].to_numpy(), [0, 1, 2])


def test_progress_refuses_a_nan_reward_and_writes_nothing(labelled, tmp_path):
    with h5py.File(labelled, "a") as f:
        values = f["data/demo_1/vlm_reward"][()]
        values[1] = np.nan
        f["data/demo_1/vlm_reward"][...] = values
    before = tree(tmp_path)
    line = one_line(progress(labelled, tmp_path / "p.parquet"))
    assert "1 NaN or infinite value(s) in data/demo_1" in line, line
    assert tree(tmp_path) == before


# -- evaluate ---------------------------------------------------------------------------------------------------


def test_evaluate_takes_no_success_from_a_success_key_that_is_not_zero_or_one(tmp_path):
    """Found: a ``success`` key of probabilities (0.2, 0.9) was read as flags ``>= 1``: every episode 'failed',
    and AUROC was reported undefined as if none had succeeded. Such a key flags nothing now, said in a note."""
    rewards = [np.array([0.1, 0.2, 0.3]), np.array([0.3, 0.2, 0.1, 0.0])]
    path = labelled_file(tmp_path / "p.h5", rewards, success=[np.full(3, 0.9), np.full(4, 0.2)])
    found = evaluate_file(EvaluateRequest(source=path, reward_key="vlm_reward", blank=False))
    assert found.successful_episodes is None and found.success_auroc_final is None
    assert any("no success flag (a 0/1 success key" in note for note in found.notes), found.notes
    assert found.voc_mean == pytest.approx(0.0)  # VOC still reported: +1 and -1
    flags = labelled_file(tmp_path / "f.h5", rewards, success=[np.array([0, 0, 1.0]), np.zeros(4)])
    assert evaluate_file(EvaluateRequest(source=flags, reward_key="vlm_reward", blank=False)).successful_episodes == 1
