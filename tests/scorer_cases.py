"""Every scorer the storage suite runs its lifecycle cases with: one entry per ``vlmlabel.scorers.registry.SCORERS``
name, each knowing how to build its tiny model folder, the options a run with it takes (as a request and as
command-line options: the two name the same result) and its oracle, what its written rewards must equal.

A new scorer gets every lifecycle case of ``tests/test_storage_suite.py`` by being added to ``SCORER_CASES``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.storage_backends import Case
from vlmlabel.formulation import RewardConfig
from vlmlabel.queries import Context, JudgeSpec, context_indices

# the VLM judge's query in the suite: K = 3 frames spread over the episode so far (step 0 shows one frame, as an
# image; later steps two or three, as a video) and 4 anchors per episode, the rows between interpolated
VLM_JUDGE = JudgeSpec(context=Context.prefix, context_frames=3, anchors=4)
VLM_FAMILY = "qwen2_vl"
JUDGE_TOLERANCE = 1e-5  # fp32 readouts against transformers' own generate, one query at a time


@dataclass(frozen=True)
class Scoring:
    """A scorer case with its model folder built, for one test."""

    case: ScorerCase
    model: Path
    fixtures: pytest.FixtureRequest

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def batch(self) -> int:
        return self.case.batch

    def formulation(self, goals: list[str], **fields: Any) -> RewardConfig | None:
        """The run's formulation (None: the plain default, as a request without one)."""
        if self.case.judge is None and not fields:
            return None
        return RewardConfig(goals=list(goals), judge=self.case.judge, **fields).validate()

    def request_fields(self, goals: list[str]) -> dict[str, Any]:
        """What a ``RelabelRequest`` of this scorer sets beyond the suite's own fields."""
        fields: dict[str, Any] = {"model": str(self.model), "batch_size": self.batch}
        if self.case.judge is not None:
            fields.update(scorer=self.name, formulation=self.formulation(goals))
        return fields

    @property
    def options(self) -> list[str]:
        """The command-line options naming this scorer and its query (none for CLIP, the default)."""
        return list(self.case.options)

    @property
    def other_options(self) -> list[str]:
        """Options that make another result from the same model and goals (it needs --overwrite to replace)."""
        return list(self.case.other_options)

    def check_reference(self, data: Case, dest: Path, goals: list[str], raw: Callable[[str], np.ndarray]) -> None:
        """The rewards written at ``dest`` (align frame) equal this scorer's oracle; ``raw(name)`` reads a column."""
        self.case.reference(self, data, dest, goals, raw)


@dataclass(frozen=True)
class ScorerCase:
    name: str  # the registry's name (--scorer)
    model: Callable[[pytest.FixtureRequest], Path]  # builds its tiny model folder from the session's fixtures
    batch: int  # --batch-size: frames (CLIP) or queries (VLM); small, so the grid has several batches
    reference: Callable[[Scoring, Case, Path, list[str], Callable[[str], np.ndarray]], None]
    judge: JudgeSpec | None = None
    options: tuple[str, ...] = ()
    other_options: tuple[str, ...] = ()
    # backends on which its subprocess cases (kill -9, torchrun) run: None for all
    subprocess_backends: frozenset[str] | None = field(default=None)

    def bind(self, fixtures: pytest.FixtureRequest) -> Scoring:
        return Scoring(self, self.model(fixtures), fixtures)


# -- CLIP: open_clip's own pipeline ------------------------------------------------------------------------------


def _clip_reference(
    scoring: Scoring, data: Case, dest: Path, goals: list[str], raw: Callable[[str], np.ndarray]
) -> None:
    got = np.stack([data.read(dest, f"vlm_reward_{g}") for g in range(len(goals))], axis=1)
    # Device preprocessing equals PIL's within uint8 rounding: a tiny random model's cosine moves very little.
    np.testing.assert_allclose(got, scoring.fixtures.getfixturevalue("reference")(data.frames, goals), atol=2e-3)


# -- VLM: transformers' own generate, one query at a time --------------------------------------------------------


@functools.cache
def _transformers_model(folder: Path) -> tuple[Any, Any]:
    """The model and processor as transformers loads them (fp32), apart from vlmlabel's judge."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


def generate_logprob(folder: Path, frames: np.ndarray, prompt: str, answer: str, fps: float) -> float:
    """log P(answer) at the first token ``generate`` gives for one query: the frames (a video when there are
    several: qwen2_vl takes video; an image when one) and the prompt, through the model's chat template."""
    model, processor = _transformers_model(folder)
    video = len(frames) > 1
    shown = [{"type": "video"}] if video else [{"type": "image"}]
    messages = [{"role": "user", "content": [*shown, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if video:
        metadata = {"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames)))}
        inputs = processor(
            text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
        )
    else:
        inputs = processor(text=[text], images=list(frames), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    (token,) = processor.tokenizer.encode(answer, add_special_tokens=False)
    return float(torch.log_softmax(out.logits[0][0].double(), dim=-1)[token])


def anchors_of(steps: int, anchors: int | None) -> np.ndarray:
    """The queried steps of an episode, as the issue defines them: every step, or ``anchors`` evenly spaced with
    the first and the last."""
    if anchors is None or steps <= anchors:
        return np.arange(steps)
    return np.round(np.linspace(0, steps - 1, anchors)).astype(int)


def _vlm_reference(
    scoring: Scoring, data: Case, dest: Path, goals: list[str], raw: Callable[[str], np.ndarray]
) -> None:
    """The written reward (no post-processing) is the raw readout, which ``check_judged`` checks."""
    assert scoring.case.judge is not None
    for g in range(len(goals)):
        np.testing.assert_array_equal(data.read(dest, f"vlm_reward_{g}"), raw(f"vlm_reward_{g}_raw"))
    check_judged(scoring.model, scoring.case.judge, data, goals, lambda g: raw(f"vlm_reward_{g}_raw"))


def check_judged(
    model: Path, spec: JudgeSpec, data: Case, goals: list[str], written: Callable[[int], np.ndarray]
) -> None:
    """At every anchor, ``written(goal)`` (align frame, every step in episode order) equals log P("True") from
    ``generate`` on that query alone (the frames ``context_indices`` picks: a video when several, an image when
    one); the rows between anchors are np.interp of the anchors."""
    from vlmlabel import judge

    prompt = judge.default_prompt(judge.parse_readout(None, None, None))
    starts = np.concatenate([[0], np.cumsum(data.steps)])
    for g, goal in enumerate(goals):
        column = written(g)
        for e, steps in enumerate(data.steps):
            values = column[starts[e] : starts[e + 1]].astype(np.float64)
            rows = anchors_of(steps, spec.anchors)
            frames = data.frames[starts[e] : starts[e + 1]]
            want = []
            for step in rows:
                picked = context_indices(spec.context, spec.context_frames, int(step))
                # the frames' own rate: the dataset's over their spacing (a dataset without one: the default)
                fps = data.fps * (len(picked) - 1) / max(1, picked[-1] - picked[0]) if data.fps else judge.DEFAULT_FPS
                want.append(generate_logprob(model, frames[picked], prompt.replace("{goal}", goal), "True", fps))
            np.testing.assert_allclose(values[rows], want, rtol=0, atol=JUDGE_TOLERANCE)
            np.testing.assert_allclose(values, np.interp(np.arange(steps), rows, values[rows]), rtol=0, atol=1e-6)


def _tiny_vlm(fixtures: pytest.FixtureRequest) -> Path:
    return fixtures.getfixturevalue("tiny_vlm")(VLM_FAMILY)


SCORER_CASES: dict[str, ScorerCase] = {
    "clip": ScorerCase(
        "clip",
        lambda fixtures: fixtures.getfixturevalue("tiny_model_dir"),
        batch=4,
        reference=_clip_reference,
        other_options=("--reward", "contrastive", "--negative", "a dog"),
    ),
    "vlm": ScorerCase(
        "vlm",
        _tiny_vlm,
        batch=3,
        reference=_vlm_reference,
        judge=VLM_JUDGE,
        options=("--scorer", "vlm", "--context", "prefix", "--context-frames", "3", "--anchors", "4"),
        other_options=("--answer", "False"),
        # each subprocess imports transformers (seconds on a shared CPU): an HDF5 file and LeRobot video suffice
        subprocess_backends=frozenset({"flat_d4rl", "lerobot_video"}),
    ),
}
