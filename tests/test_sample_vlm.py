"""The shipped sample VLM judge (sample_data/reach-vlm) and the trainer that makes it.

The shipped folder is an ordinary offline Hugging Face model, read here through vlmlabel's own judge with its
default query (chat template, default prompt, frames as one video or one image, log P("True") next).
The trainer must feed the model exactly what the judge feeds it, or the shipped model answers another question.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tools.synthetic import reach, scenes, train_vlm
from tools.synthetic.train_vlm import prefix_indices
from vlmlabel import judge

pytestmark = pytest.mark.slow

SAMPLE_VLM = Path(__file__).resolve().parents[1] / "sample_data" / "reach-vlm"
# The model is not shipped yet (CPU training on the shared machine did not learn in the time: see
# sample_data/README.md); these tests check it once it is, and the trainer's tests below run regardless.
shipped = pytest.mark.skipif(
    not SAMPLE_VLM.is_dir(),
    reason="sample_data/reach-vlm is not built: python -m tools.synthetic.train_vlm --out sample_data/reach-vlm",
)
SWAPPED = "the green ball is on the red square"
# Hand-made layouts: (background grey, distractors, square centre, ball centre when on, ball centre when far).
LAYOUTS = [
    (120, [("blue", "triangle", 20.0, 20.0)], (55.0, 50.0), (56.0, 49.0), (15.0, 70.0)),
    (90, [("yellow", "ball", 70.0, 15.0), ("blue", "square", 15.0, 45.0)], (30.0, 65.0), (29.0, 66.0), (70.0, 60.0)),
    (170, [("red", "triangle", 62.0, 68.0)], (25.0, 22.0), (26.0, 23.0), (68.0, 30.0)),
]


@pytest.fixture(scope="module")
def sample_judge():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield train_vlm.load_default_judge(SAMPLE_VLM)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = train_vlm.build_untrained(tmp_path_factory.mktemp("untrained-vlm"), seed=0)
    yield train_vlm.load_default_judge(folder)
    torch.set_num_threads(threads)


def _frame(grey: int, distractors: list, square: tuple[float, float], ball: tuple[float, float]) -> np.ndarray:
    objects = [scenes.SceneObject(c, s, x, y, 7.0) for c, s, x, y in distractors]
    objects.append(scenes.SceneObject("green", "square", *square, reach.TARGET[2]))
    objects.append(scenes.SceneObject("red", "ball", *ball, reach.AGENT[2]))
    return scenes.render(scenes.Scene(objects=tuple(objects), background=(grey, grey, grey)))


def _approach(grey: int, distractors: list, square: tuple, start: tuple, end: tuple, steps: int = 20) -> np.ndarray:
    """The judge's default context (8 frames spaced over the episode) of a ball moving from start to end."""
    path = np.linspace(start, end, steps)
    frames = np.stack([_frame(grey, distractors, square, (float(x), float(y))) for x, y in path])
    return frames[prefix_indices(steps - 1)]


@shipped
def test_folder_is_a_small_plain_hugging_face_model():
    files = {p.name: p.stat().st_size for p in SAMPLE_VLM.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(files)
    assert not any(name.endswith(".py") for name in files)  # nothing that would need trust_remote_code
    assert sum(files.values()) < 10 * 2**20


@shipped
def test_loads_offline_through_the_judge_as_a_qwen2_vl_video_model(sample_judge):
    assert sample_judge.card.family == "qwen2_vl" and sample_judge.card.takes_video
    assert sample_judge.model.dtype == torch.float32
    assert sample_judge.prompt == train_vlm.PROMPT  # the model was trained on the judge's default prompt


@shipped
@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_on_scores_above_far_and_the_goal_must_be_read(sample_judge, video):
    on, far = [], []
    for grey, distractors, square, ball_on, ball_far in LAYOUTS:
        if video:
            on.append(_approach(grey, distractors, square, ball_far, ball_on))
            far.append(_approach(grey, distractors, square, ball_on, ball_far))
        else:
            on.append(_frame(grey, distractors, square, ball_on)[None])
            far.append(_frame(grey, distractors, square, ball_far)[None])
    n = len(LAYOUTS)
    goals = [reach.GOAL] * (2 * n) + [SWAPPED] * n
    scores = sample_judge.readouts([judge.Query(c, g) for c, g in zip(on + far + on, goals, strict=True)])
    goal_on, goal_far, swapped_on = scores[:n], scores[n : 2 * n], scores[2 * n :]
    assert (goal_on > goal_far).all(), (goal_on, goal_far)
    assert (swapped_on < goal_on).all(), (swapped_on, goal_on)
    # log P of the default answer; the model splits the True mass evenly over "True" and " True"
    assert (np.exp(goal_on) > 0.25).all() and (np.exp(swapped_on) < 0.05).all()


@shipped
def test_the_ratio_readout_is_a_probability_of_success(sample_judge):
    ratio = train_vlm.load_default_judge(SAMPLE_VLM, answer="True", versus="False")
    grey, distractors, square, ball_on, ball_far = LAYOUTS[0]
    frames = [_frame(grey, distractors, square, ball)[None] for ball in (ball_on, ball_far)]
    on, far = ratio.readouts([judge.Query(f, reach.GOAL) for f in frames])
    assert on > 0.7 and far < 0.3


def test_the_trainer_feeds_the_model_what_the_judge_feeds_it(untrained):
    rng = np.random.default_rng(3)
    examples = [train_vlm.sample_example(rng) for _ in range(6)]
    assert sorted({len(e.frames) > 1 for e in examples}) == [False, True]  # images and videos in one batch
    clips = [e.frames for e in examples for _ in e.goals]
    goals = [g for e in examples for g in e.goals]
    mine = train_vlm.encode(untrained.processor, clips, goals)
    theirs = untrained.inputs([judge.Query(c, g) for c, g in zip(clips, goals, strict=True)])
    assert set(mine) == set(theirs)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    # The training forward encodes each clip once for all its goals: the same log-probabilities.
    ids = train_vlm.answer_ids(untrained.processor)
    with torch.no_grad():
        shared = train_vlm.shared_clip_logprobs(untrained.model, untrained.processor, examples)
        plain = train_vlm.next_token_logprobs(untrained.model, mine)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    expected = untrained.readouts([judge.Query(c, g) for c, g in zip(clips, goals, strict=True)])
    assert untrained.answer_ids[0] in ids[True]  # the judge's default answer is one the model is taught
    np.testing.assert_allclose(shared[:, untrained.answer_ids[0]].numpy(), expected, atol=1e-5)


def test_targets_follow_the_geometry():
    assert train_vlm.on_probability(0.0) > 0.9 > train_vlm.on_probability(10.0) > train_vlm.on_probability(40.0)
    assert train_vlm.on_probability(80.0) > train_vlm.ABSENT
    rng = np.random.default_rng(1)
    for _ in range(20):
        example = train_vlm.sample_example(rng)
        assert len(example.goals) == len(example.targets) == train_vlm.GOALS_PER_CLIP
        assert example.targets[-1] == train_vlm.ABSENT and example.goals[-1] not in example.goals[:-1]
        assert 1 <= len(example.frames) <= train_vlm.CONTEXT_FRAMES


def test_reach_plans_render_the_shipped_episodes():
    """make_episode renders plan_episode's path: the shipped reach.h5's first episode is still what it makes."""
    rng = np.random.default_rng(0)  # write_dataset's seed and order of draws
    episode = reach.make_episode(rng, bool(rng.random() < 0.65))
    with h5py.File(SAMPLE_VLM.parent / "reach.h5", "r") as f:
        assert np.array_equal(f["data/demo_0/obs/agentview_image"][()], episode.frames[:-1])
        assert np.array_equal(f["data/demo_0/actions"][()], episode.actions)
    plan = reach.plan_episode(np.random.default_rng(5), True, ("blue", "triangle", 6.0), ("yellow", "ball", 8.0))
    assert [o.name for o in plan.scene.objects[-2:]] == ["yellow ball", "blue triangle"]
