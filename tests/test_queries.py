"""vlmlabel.queries, what a VLM judge is asked: anchors, their interpolation, each query's frames, the query
numbering of the fixed batch grid; and the judge's part of a reward's formulation (RewardConfig with a
JudgeSpec): its serialisations, its record in the written reward, and what it asks of the data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import JUDGED, RewardConfig
from vlmlabel.queries import (
    DEFAULT_CONTEXT,
    DEFAULT_CONTEXT_FRAMES,
    Context,
    JudgeSpec,
    QueryPlan,
    anchor_rows,
    context_indices,
    interpolate,
)
from vlmlabel.rewards import Normalize, RewardMode, Shaping

# -- anchors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 3, 7, 10, 101])
@pytest.mark.parametrize("anchors", [2, 3, 4, 8])
def test_anchors_are_evenly_spaced_and_hold_the_first_and_last_step(steps, anchors):
    rows = anchor_rows(steps, anchors)
    assert rows.dtype == np.int64
    assert rows[0] == 0 and rows[-1] == steps - 1
    assert len(rows) == min(steps, anchors)
    assert np.all(np.diff(rows) > 0)  # ascending, each step once
    if steps > anchors:  # the spacing of linspace, rounded: gaps differ by at most one step
        gaps = np.diff(rows)
        assert gaps.max() - gaps.min() <= 1
        np.testing.assert_array_equal(rows, np.round(np.linspace(0, steps - 1, anchors)))


def test_anchors_worked_examples():
    np.testing.assert_array_equal(anchor_rows(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(anchor_rows(9, 2), [0, 8])  # N=2: the first and the last only
    np.testing.assert_array_equal(anchor_rows(5, 3), [0, 2, 4])


@pytest.mark.parametrize("steps", [1, 2, 4, 5])
def test_no_more_steps_than_anchors_queries_every_step(steps):
    np.testing.assert_array_equal(anchor_rows(steps, 5), np.arange(steps))
    np.testing.assert_array_equal(anchor_rows(steps, None), np.arange(steps))


def test_an_episode_of_one_step_is_one_anchor():
    np.testing.assert_array_equal(anchor_rows(1, 2), [0])
    np.testing.assert_array_equal(anchor_rows(1, None), [0])
    assert len(anchor_rows(0, 4)) == 0 and len(anchor_rows(0, None)) == 0


def test_all_is_every_step():
    np.testing.assert_array_equal(anchor_rows(37, None), np.arange(37))


# -- interpolation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, anchors", [(10, 4), (9, 2), (101, 8), (7, 3)])
def test_interpolation_keeps_the_anchors_and_is_linear_between_them(steps, anchors):
    rows = anchor_rows(steps, anchors)
    values = np.random.default_rng(steps).normal(size=(len(rows), 3)).astype(np.float32)
    out = interpolate(rows, values, steps)
    assert out.shape == (steps, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[rows], values)  # the anchors' own values, exactly
    for goal in range(3):  # numpy's own linear interpolation, the oracle
        np.testing.assert_allclose(out[:, goal], np.interp(np.arange(steps), rows, values[:, goal]), rtol=1e-6)
    # linear between two anchors: equal steps between consecutive rows
    for a, b in zip(rows[:-1], rows[1:], strict=True):
        slopes = np.diff(out[a : b + 1].astype(np.float64), axis=0)
        np.testing.assert_allclose(slopes, np.broadcast_to(slopes[:1], slopes.shape), atol=1e-5)


def test_interpolation_worked_example():
    out = interpolate(np.array([0, 3, 6, 9]), np.array([[0.0], [3.0], [0.0], [-3.0]], np.float32), 10)
    np.testing.assert_allclose(out[:, 0], [0, 1, 2, 3, 2, 1, 0, -1, -2, -3], atol=1e-6)


def test_every_step_an_anchor_is_the_values_themselves():
    values = np.random.default_rng(0).random((5, 2)).astype(np.float32)
    np.testing.assert_array_equal(interpolate(np.arange(5), values, 5), values)
    np.testing.assert_array_equal(interpolate(np.array([0]), values[:1], 1), values[:1])


# -- context ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 5, 40])
def test_frame_context_is_the_frame(step):
    np.testing.assert_array_equal(context_indices(Context.frame, 8, step), [step])


@pytest.mark.parametrize("step, expected", [(0, [0]), (2, [0, 1, 2]), (3, [0, 1, 2, 3]), (9, [6, 7, 8, 9])])
def test_window_is_the_k_frames_ending_at_the_step(step, expected):
    np.testing.assert_array_equal(context_indices(Context.window, 4, step), expected)


@pytest.mark.parametrize("step, expected", [(0, [0]), (2, [0, 1, 2]), (3, [0, 1, 2, 3]), (9, [0, 3, 6, 9])])
def test_prefix_is_k_frames_over_the_episode_so_far(step, expected):
    np.testing.assert_array_equal(context_indices(Context.prefix, 4, step), expected)


@pytest.mark.parametrize("context", list(Context))
@pytest.mark.parametrize("frames", [1, 2, 5, 8])
def test_every_context_ends_at_the_step_oldest_first_within_the_past(context, frames):
    for step in range(30):
        picked = context_indices(context, frames, step)
        assert picked[-1] == step  # the query ends at the scored frame
        assert np.all(np.diff(picked) > 0) and picked[0] >= 0  # oldest first, each frame once, none before o_0
        shown = 1 if context is Context.frame else min(frames, step + 1)
        assert len(picked) == shown
        if context is Context.prefix and frames > 1:  # from the episode's first frame, evenly spaced
            assert picked[0] == 0
            np.testing.assert_array_equal(picked, np.round(np.linspace(0, step, shown)))
        if context is Context.window:
            np.testing.assert_array_equal(picked, np.arange(step - shown + 1, step + 1))


def test_prefix_of_one_frame_is_the_step():
    np.testing.assert_array_equal(context_indices(Context.prefix, 1, 7), [7])


# -- the query plan -----------------------------------------------------------------------------------------


def test_queries_are_numbered_episode_by_episode_anchor_by_anchor_goal_by_goal():
    steps = [5, 0, 1, 10, 0]
    plan = QueryPlan.of(steps, 3, goals=2)
    assert plan.bounds == [0, 6, 6, 8, 14, 14]
    assert plan.total == 14
    asked = []
    for query in range(plan.total):
        episode = plan.episode_of(query)
        asked.append((episode, *plan.step_and_goal(episode, query)))
    expected = [(e, int(s), g) for e, n in enumerate(steps) for s in anchor_rows(n, 3) for g in range(2)]
    assert asked == expected
    # an empty episode asks nothing: no query is ever its own
    assert {e for e, _, _ in asked} == {0, 2, 3}


def test_episode_of_skips_empty_episodes_at_the_start_and_the_end():
    plan = QueryPlan.of([0, 0, 2, 0], None, goals=1)
    assert plan.bounds == [0, 0, 0, 2, 2]
    assert [plan.episode_of(q) for q in range(plan.total)] == [2, 2]


def test_a_plan_of_only_empty_episodes_has_no_query():
    plan = QueryPlan.of([0, 0], 4, goals=3)
    assert plan.total == 0 and plan.bounds == [0, 0, 0]


def test_values_put_each_readout_at_its_step_and_goal_then_interpolate():
    steps = [10, 3]
    plan = QueryPlan.of(steps, 4, goals=2)
    readouts = np.arange(plan.total, dtype=np.float32)  # query q reads q
    first = plan.values(0, readouts[plan.bounds[0] : plan.bounds[1]], steps[0])
    assert first.shape == (10, 2)
    for query in range(plan.bounds[0], plan.bounds[1]):
        step, goal = plan.step_and_goal(0, query)
        assert first[step, goal] == readouts[query]
    for goal in range(2):
        rows = anchor_rows(10, 4)
        anchored = readouts[plan.bounds[0] : plan.bounds[1]].reshape(len(rows), 2)[:, goal]
        np.testing.assert_allclose(first[:, goal], np.interp(np.arange(10), rows, anchored), rtol=1e-6)
    second = plan.values(1, readouts[plan.bounds[1] : plan.bounds[2]], steps[1])
    np.testing.assert_array_equal(second, readouts[plan.bounds[1] :].reshape(3, 2))  # 3 steps, 3 anchors: all


def test_every_step_queried_without_anchors():
    plan = QueryPlan.of([4, 2], None, goals=3)
    assert plan.bounds == [0, 12, 18]
    assert plan.step_and_goal(1, 16) == (1, 1)


# -- the spec -----------------------------------------------------------------------------------------------


SPECS = [
    JudgeSpec(),
    JudgeSpec(prompt="Is {goal} done?", answer=" Yes", versus=" No", context=Context.window, context_frames=3),
    JudgeSpec(answer_values="1=0,2=0.5,3=1", context=Context.frame, anchors=2),
    JudgeSpec(answer="5", context=Context.prefix, context_frames=16, anchors=12),
]


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_judge_spec_json_round_trip(spec):
    text = json.dumps(spec.to_json())
    assert JudgeSpec.from_json(json.loads(text)) == spec


def test_frame_context_records_one_frame_and_reads_back_the_default():
    spec = JudgeSpec(context=Context.frame)
    assert spec.to_json()["context_frames"] == 1 and spec.frames == 1
    back = JudgeSpec.from_json(spec.to_json())
    assert back == spec and back.context_frames == DEFAULT_CONTEXT_FRAMES


@pytest.mark.parametrize(
    "field, value",
    [
        ("anchors", "4"),
        ("anchors", 4.0),
        ("anchors", True),
        ("context_frames", None),
        ("context_frames", "8"),
        ("context_frames", False),
        ("prompt", 3),
        ("answer", [" True"]),
        ("versus", 1.0),
        ("answer_values", {"1": 0}),
    ],
)
def test_judge_spec_from_json_refuses_what_a_run_never_writes(field, value):
    values = JudgeSpec().to_json()
    values[field] = value
    with pytest.raises(TypeError, match=field):
        JudgeSpec.from_json(values)


@pytest.mark.parametrize("values", [{"context": "video"}, {"context": None}])
def test_judge_spec_from_json_refuses_an_unknown_context(values):
    with pytest.raises(ValueError):
        JudgeSpec.from_json({**JudgeSpec().to_json(), **values})


def test_judge_spec_from_json_refuses_a_missing_field():
    values = JudgeSpec().to_json()
    del values["anchors"]
    with pytest.raises(KeyError):
        JudgeSpec.from_json(values)


@pytest.mark.parametrize(
    "spec, says",
    [
        (JudgeSpec(context_frames=0), "--context-frames must be at least 1"),
        (JudgeSpec(context=Context.frame, context_frames=4), "--context frame shows one"),
        (JudgeSpec(anchors=1), "at least 2"),
        (JudgeSpec(anchors=-1), "at least 2"),
    ],
)
def test_judge_spec_validate_refuses(spec, says):
    with pytest.raises(VlmlabelError, match=says):
        spec.validate()


def test_defaults():
    spec = JudgeSpec()
    assert spec.context is DEFAULT_CONTEXT and spec.frames == DEFAULT_CONTEXT_FRAMES and spec.anchors is None
    assert spec.validate() is spec


def test_needs_order_when_a_query_reads_other_steps():
    assert not JudgeSpec(context=Context.frame).needs_order
    assert JudgeSpec(context=Context.frame, anchors=3).needs_order  # interpolation reads neighbours
    assert JudgeSpec(context=Context.window).needs_order
    assert JudgeSpec(context=Context.prefix).needs_order
    alone = RewardConfig(goals=["g"], judge=JudgeSpec(context=Context.frame))
    assert not alone.needs_order
    assert RewardConfig(goals=["g"], judge=JudgeSpec()).needs_order
    assert RewardConfig(goals=["g"], judge=JudgeSpec(context=Context.frame), normalize=Normalize.episode).needs_order
    assert not RewardConfig(goals=["g"]).needs_order  # CLIP, unchanged


def test_formula_names_the_readout():
    assert JudgeSpec().formula == "log P('True' | frames, prompt) at the next token"
    assert "P(' Yes' | frames, prompt) / (P(' Yes' | frames, prompt) + P(' No' | frames, prompt))" == (
        JudgeSpec(answer=" Yes", versus=" No").formula
    )
    assert "'1=0,2=1'" in JudgeSpec(answer_values="1=0,2=1").formula
    assert JudgeSpec().anchor_rule() == "every step"
    assert "4 anchors per episode" in JudgeSpec(anchors=4).anchor_rule()


# -- the formulation with a judge ---------------------------------------------------------------------------


def test_a_clip_configuration_has_no_judge_in_its_json():
    """The result id of a CLIP run hashes ``to_json``: a judge key (even null) would change every CLIP id."""
    for config in (
        RewardConfig(goals=["a"]),
        RewardConfig(goals=["a", "b"], mode=RewardMode.softmax, negatives=["n"], threshold=0.5),
        RewardConfig(goals=["a"], normalize=Normalize.episode, shaping=Shaping.delta, gamma=0.9),
    ):
        values = config.to_json()
        assert "judge" not in values and "goal_images" not in values
        assert RewardConfig.from_json(values) == config
    assert sorted(RewardConfig(goals=["a"]).to_json()) == sorted(
        ["goals", "mode", "templates", "baselines", "negatives", "alpha", "threshold", "shaping", "gamma", "normalize"]
    )


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_a_judged_configuration_round_trips_through_json(spec):
    config = RewardConfig(goals=["a", "b"], judge=spec, normalize=Normalize.episode_minmax).validate()
    values = json.loads(json.dumps(config.to_json()))
    assert values["judge"] == spec.to_json()
    assert RewardConfig.from_json(values) == config
    other = RewardConfig(goals=["a", "b"], judge=JudgeSpec(anchors=5), normalize=Normalize.episode_minmax)
    assert other.to_json() != values  # another query is another configuration (result id)


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
@pytest.mark.parametrize("normalize", [Normalize.none, Normalize.episode_minmax])
def test_a_judged_reward_record_reads_back(spec, normalize):
    config = RewardConfig(goals=["the cup is on the plate"], judge=spec, normalize=normalize).validate()
    attrs = config.attrs(0, logit_scale=100.0)
    assert attrs["reward"] == JUDGED and "logit_scale" not in attrs
    assert attrs["anchor_rows"] == spec.anchor_rule() and attrs["formula"].startswith(spec.formula)
    stored = {k: v for k, v in attrs.items()}  # what a format stores: text and numbers, no None
    assert all(v is not None for v in stored.values())
    back = RewardConfig.from_attrs(json.loads(json.dumps(stored)))
    assert back == config


def test_a_judged_record_with_a_damaged_query_is_refused_in_one_line():
    attrs = RewardConfig(goals=["g"], judge=JudgeSpec(anchors=4)).validate().attrs(0, 1.0)
    spec = json.loads(attrs["reward_spec"])
    for field, bad in [("anchors", "four"), ("anchors", 1), ("context", "video"), ("context_frames", 0)]:
        damaged = {**attrs, "reward_spec": json.dumps({**spec, field: bad})}
        with pytest.raises(VlmlabelError, match="reward_spec attribute is damaged") as excinfo:
            RewardConfig.from_attrs(damaged)
        assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    "config",
    [
        RewardConfig(goals=["g"], judge=JudgeSpec()),
        RewardConfig(goals=["g"], judge=JudgeSpec(context=Context.frame)),
        RewardConfig(goals=["g"], judge=JudgeSpec(anchors=3), normalize=Normalize.episode_minmax),
    ],
)
def test_a_judge_always_keeps_its_raw_readouts(config):
    assert config.keeps_raw


def test_clip_keeps_raw_only_when_post_processed():
    assert not RewardConfig(goals=["g"]).keeps_raw
    assert RewardConfig(goals=["g"], normalize=Normalize.episode_minmax).keeps_raw


@pytest.mark.parametrize(
    "clip, says",
    [
        ({"mode": RewardMode.softmax, "negatives": ["n"]}, "--reward, --negative only apply to --scorer clip"),
        ({"templates": ["a photo of {}"]}, "--goal-template only applies to --scorer clip"),
        ({"threshold": 0.5}, "--threshold only applies to --scorer clip"),
        ({"mode": RewardMode.projection}, "--reward only applies to --scorer clip"),
    ],
)
def test_a_judged_configuration_refuses_clip_options(clip, says):
    with pytest.raises(VlmlabelError, match=says):
        RewardConfig(goals=["g"], judge=JudgeSpec(), **clip).validate()
