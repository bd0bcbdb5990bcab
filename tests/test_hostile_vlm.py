"""The VLM scorer's run lifecycle, as an unlucky user meets it: frames stored in the other shapes the source
layer accepts, episodes too short for the anchors and the context, a second run aimed at the same output, the
alignment of each query, and reruns that change the query.

The judge's inputs are checked where they enter it: ``Judge.readouts`` is replaced by a recorder that keeps every
query it is given and answers each with a number of its own, so what the judge sees is compared with the frames
stored in the file."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests import layouts
from tests.layouts import make_frames
from tests.test_hostile_inputs import LENGTHS, assert_refused, flat, tree_digest
from vlmlabel import labelled
from vlmlabel.cli import app
from vlmlabel.queries import JudgeSpec
from vlmlabel.sources import Align, open_any_camera

pytest.importorskip("transformers")
judge = pytest.importorskip("vlmlabel.judge")

runner = CliRunner()
GOAL = "the red ball is on the green square"
pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """Stands in for ``Judge.readouts`` (and ``readouts_of``): keeps each query's frames and goal, answers query i
    with i / 100."""

    def __init__(self):
        self.queries: list = []

    def __call__(self, _judge, queries):
        first = len(self.queries)
        self.queries += [(q.frames.copy(), q.goal) for q in queries]
        return np.arange(first, first + len(queries), dtype=np.float32) / 100


@pytest.fixture()
def recorder(monkeypatch) -> Recorder:
    recording = Recorder()
    # a run prepares each batch (``inputs``) and then answers it (``readouts_of``): the batch stays its queries
    monkeypatch.setattr(judge.Judge, "inputs", lambda self, queries: list(queries))
    monkeypatch.setattr(judge.Judge, "readouts_of", lambda self, queries: recording(self, queries))
    monkeypatch.setattr(judge.Judge, "readouts", lambda self, queries: recording(self, queries))
    return recording


def relabel(source: Path, model: Path, *options: str):
    args = ["relabel", str(source), "--goal", GOAL, "--scorer", "vlm", "--model", str(model), "--device", "cpu"]
    # --batch-size: the default is measured on the processor's output, which the recorder stands in for
    return runner.invoke(app, [*args, "--workers", "0", "--batch-size", "4", "-q", *options], terminal_width=400)


# -- frames in the other shapes the source layer accepts -------------------------------------------------------

RGB = make_frames(sum(LENGTHS), 16, 20, seed=3)
STORED = {
    "grayscale (N, H, W)": (RGB[..., 0], np.repeat(RGB[..., :1], 3, axis=-1)),
    "one channel (N, H, W, 1)": (RGB[..., :1], np.repeat(RGB[..., :1], 3, axis=-1)),
    "channels first (N, 3, H, W)": (np.ascontiguousarray(RGB.transpose(0, 3, 1, 2)), RGB),
    "RGB (N, H, W, 3)": (RGB, RGB),
}


@pytest.mark.parametrize("stored", sorted(STORED))
def test_the_judge_sees_rgb_frames_exactly(stored, tmp_path, tiny_vlm, recorder):
    frames, rgb = STORED[stored]
    source = flat(tmp_path / "data.h5", frames)
    result = relabel(source, tiny_vlm("qwen2_vl"), "--align", "frame", "--context", "frame", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert len(recorder.queries) == len(rgb)  # one query per step, in file order
    for step, (shown, goal) in enumerate(recorder.queries):
        assert goal == GOAL
        assert shown.dtype == np.uint8 and shown.shape == (1, 16, 20, 3)
        np.testing.assert_array_equal(shown[0], rgb[step])
    with h5py.File(source) as f:  # the judge's answers, as written
        np.testing.assert_array_equal(f["vlm_reward_raw"][()], np.arange(len(rgb), dtype=np.float32) / 100)


def test_a_window_shows_the_episodes_own_frames_oldest_first(tmp_path, tiny_vlm, recorder):
    frames, rgb = STORED["grayscale (N, H, W)"]
    source = flat(tmp_path / "data.h5", frames)
    result = relabel(source, tiny_vlm("qwen2_vl"), "--align", "frame", "--context", "window", "--context-frames", "3")
    assert result.exit_code == 0, result.output
    starts = np.cumsum([0, *LENGTHS])
    shown = iter(recorder.queries)
    for episode, length in enumerate(LENGTHS):
        own = rgb[starts[episode] : starts[episode] + length]
        for step in range(length):
            frames_shown, _ = next(shown)
            np.testing.assert_array_equal(frames_shown, own[max(0, step - 2) : step + 1])  # never another episode's


# -- short episodes ------------------------------------------------------------------------------------------


def test_an_episode_of_one_step_with_four_anchors_and_a_prefix(tmp_path, tiny_vlm):
    lengths = (1, 5)
    source = layouts_flat(tmp_path / "data.h5", lengths)
    result = relabel(source, tiny_vlm("qwen2_vl"), "--anchors", "4", "--context", "prefix", "--align", "frame")
    assert result.exit_code == 0, result.output
    with h5py.File(source) as f:
        raw, reward = f["vlm_reward_raw"][()], f["vlm_reward"][()]
        assert "anchors" in f["vlm_reward"].attrs["anchor_rows"]
    assert raw.shape == reward.shape == (sum(lengths),) and np.isfinite(raw).all()


def layouts_flat(path: Path, lengths: tuple[int, ...]) -> Path:
    frames = make_frames(sum(lengths), 16, 20, seed=4)
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=frames)
        f.create_dataset("terminals", data=np.isin(np.arange(len(frames)), np.cumsum(lengths) - 1))
    return path


def test_one_step_episodes_ask_the_judge_one_query_of_one_frame(tmp_path, tiny_vlm, recorder):
    source = layouts_flat(tmp_path / "data.h5", (1, 1, 3))
    result = relabel(source, tiny_vlm("qwen2_vl"), "--anchors", "4", "--context", "prefix", "--align", "frame")
    assert result.exit_code == 0, result.output
    assert [len(frames) for frames, _ in recorder.queries] == [1, 1, 1, 2, 3]


# -- two runs, one output ------------------------------------------------------------------------------------


def test_a_second_run_on_a_held_output_is_refused_and_leaves_both_alone(tmp_path, tiny_vlm):
    from vlmlabel.run.locking import RunLock
    from vlmlabel.run.shards import dest_lock

    folder = tmp_path / "data"
    folder.mkdir()
    source = layouts.build_robomimic(folder / "data.h5").path
    out = folder / "out.h5"
    with RunLock(dest_lock(out), "relabel"):  # a first run, alive, writing out.h5
        before = tree_digest(folder)
        result = relabel(source, tiny_vlm("qwen2_vl"), "--output", str(out))
        assert_refused(result, ["out.h5", f"PID {os.getpid()}"], folder, before)
    assert not out.exists()


# -- alignment -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("align", ["next", "frame"])
def test_each_query_ends_at_the_frame_its_alignment_scores(align, tmp_path, tiny_vlm, recorder):
    """Under --align next step t's query ends at o_{t+1} (robomimic: obs[t + 1], and next_obs[-1] for the episode's
    last step: ``layouts``' truth), and shows the scored frames before it; under frame it ends at obs[t]."""
    built = layouts.build_robomimic(tmp_path / "data.h5")
    result = relabel(built.path, tiny_vlm("qwen2_vl"), "--align", align, "--context", "window", "--context-frames", "2")
    assert result.exit_code == 0, result.output
    scored = built.next_steps if align == "next" else built.frame_steps
    shown = iter(recorder.queries)
    for frames in scored:
        for step in range(len(frames)):
            query, _ = next(shown)
            np.testing.assert_array_equal(query[-1], frames[step])  # the last frame shown is the scored one
            np.testing.assert_array_equal(query, frames[max(0, step - 1) : step + 1])
    assert next(shown, None) is None


# -- reruns --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changed", [["--prompt", "Is this done: {goal}?"], ["--anchors", "2"], ["--context", "frame"], ["--answer", "Yes"]]
)
def test_a_rerun_asking_another_query_is_another_result(changed, tmp_path, tiny_vlm):
    built = layouts.build_robomimic(tmp_path / "data.h5")
    out = tmp_path / "out.h5"
    model = tiny_vlm("qwen2_vl")
    first = relabel(built.path, model, "--output", str(out), "--anchors", "3")
    assert first.exit_code == 0, first.output
    same = relabel(built.path, model, "--output", str(out), "--anchors", "3")
    assert same.exit_code == 0 and "already written" in same.output, same.output
    with h5py.File(out) as f:
        kept = dict(f["data/demo_0/vlm_reward"].attrs)
    with open_any_camera(str(out), None, "train") as written:  # the reward tools read the judged record back
        reward = labelled.read_reward(written, written.episodes(Align.frame), "vlm_reward")
    assert reward.config.judge == JudgeSpec(anchors=3) and reward.raw is not None
    options = ["--output", str(out), "--anchors", "3", *changed]
    other = relabel(built.path, model, *options)
    assert other.exit_code == 2 and "already written" not in other.output, other.output
    assert "--overwrite" in other.output  # the reward exists: replacing it is asked for, not assumed
    again = relabel(built.path, model, *options, "--overwrite")
    assert again.exit_code == 0 and "already written" not in again.output, again.output
    with h5py.File(out) as f:
        assert dict(f["data/demo_0/vlm_reward"].attrs) != kept
