"""What a VLM judge is asked, step by step: the query spec, the anchors and the frames each query shows.

Pure arithmetic over step numbers; no model, no frames. The invariants:

- *Anchors.* An episode of T steps is queried at ``anchor_rows(T, N)``: every step (N None), or N steps evenly
  spaced, always the first and the last. The rows between anchors are linearly interpolated
  (``interpolate``), so a reward is known for every step.
- *Queries.* Queries are numbered in file order: episode by episode, anchor by anchor, goal by goal. The fixed
  batch grid runs over these numbers (``QueryPlan``), so a resumed run and every shard put each query in the
  batch it has in one uninterrupted run.
- *Context.* Step t's query shows the frames ``context_indices`` picks among the episode's scored frames up to
  t (under ``--align next`` step t's frame is o_{t+1}, so the query ends at o_{t+1}), oldest first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmlabel.errors import VlmlabelError

GOAL_FIELD = "{goal}"
DEFAULT_ANSWER = "True"  # read after the chat template's generation prompt, so with no leading space


class Context(str, enum.Enum):
    """What one query shows: the scored frame, the K frames ending at it, or K frames over the episode so far."""

    frame = "frame"
    window = "window"
    prefix = "prefix"


DEFAULT_CONTEXT = Context.prefix
DEFAULT_CONTEXT_FRAMES = 8


@dataclass(frozen=True)
class JudgeSpec:
    """How a generative VLM judges a step: the prompt (``{goal}`` filled in; None: the readout's default), the
    readout (``answer``, ``versus``, ``answer_values``, as given; read by ``vlmlabel.judge``), the context and the
    anchors (None: every step)."""

    prompt: str | None = None
    answer: str | None = None
    versus: str | None = None
    answer_values: str | None = None
    context: Context = DEFAULT_CONTEXT
    context_frames: int = DEFAULT_CONTEXT_FRAMES
    anchors: int | None = None

    def validate(self) -> JudgeSpec:
        if self.context_frames < 1:
            raise VlmlabelError(f"--context-frames must be at least 1, not {self.context_frames}")
        if self.context is Context.frame and self.context_frames != DEFAULT_CONTEXT_FRAMES:
            raise VlmlabelError("--context-frames applies to --context window or prefix; --context frame shows one")
        if self.anchors is not None and self.anchors < 2:
            raise VlmlabelError(
                f"--anchors must be 'all' or at least 2 (the first and the last step), not {self.anchors}"
            )
        return self

    @property
    def frames(self) -> int:
        """The most frames one query shows."""
        return 1 if self.context is Context.frame else self.context_frames

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "versus": self.versus,
            "answer_values": self.answer_values,
            "context": self.context.value,
            "context_frames": self.frames,
            "anchors": self.anchors,
        }

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> JudgeSpec:
        """The inverse of ``to_json`` (KeyError, ValueError or TypeError for what a run never writes)."""
        anchors = values["anchors"]
        if anchors is not None and (isinstance(anchors, bool) or not isinstance(anchors, int)):
            raise TypeError(f"anchors is {anchors!r}, not a whole number")
        frames = values["context_frames"]
        if isinstance(frames, bool) or not isinstance(frames, int):
            raise TypeError(f"context_frames is {frames!r}, not a whole number")
        texts = {k: values[k] for k in ("prompt", "answer", "versus", "answer_values")}
        for name, text in texts.items():
            if text is not None and not isinstance(text, str):
                raise TypeError(f"{name} is {text!r}, not a text")
        context = Context(values["context"])
        frames = frames if context is not Context.frame else DEFAULT_CONTEXT_FRAMES
        return cls(**texts, context=context, context_frames=frames, anchors=anchors)

    @property
    def needs_order(self) -> bool:
        """Whether a query reads other steps of its episode (context, interpolation): episodes in frame order."""
        return self.anchors is not None or self.context is not Context.frame

    @property
    def formula(self) -> str:
        """What the raw readout is, in symbols (frames: the query's context; prompt: with the goal filled in)."""
        given = "frames, prompt"
        if self.answer_values is not None:
            return f"sum_i v_i P(a_i | {given}) / sum_i P(a_i | {given}) over a_i=v_i in {self.answer_values!r}"
        answer = self.answer if self.answer is not None else DEFAULT_ANSWER
        if self.versus is not None:
            return f"P({answer!r} | {given}) / (P({answer!r} | {given}) + P({self.versus!r} | {given}))"
        return f"log P({answer!r} | {given}) at the next token"

    def anchor_rule(self) -> str:
        """Which rows were queried, in words (the provenance of the interpolated ones)."""
        if self.anchors is None:
            return "every step"
        return (
            f"{self.anchors} anchors per episode at round(linspace(0, steps - 1, {self.anchors})) "
            "(every step when steps <= anchors), linear interpolation between them"
        )


def anchor_rows(steps: int, anchors: int | None) -> np.ndarray:
    """The steps of an episode of ``steps`` that are queried: all, or ``anchors`` evenly spaced (first and last
    included; every step when there are no more steps than anchors)."""
    if anchors is None or steps <= anchors:
        return np.arange(steps, dtype=np.int64)
    return np.round(np.linspace(0, steps - 1, anchors)).astype(np.int64)


def interpolate(rows: np.ndarray, values: np.ndarray, steps: int) -> np.ndarray:
    """(steps, goals) float32 from the (len(rows), goals) values at ``rows``: the anchors' own values at the
    anchors, linear in between (``rows`` ascending, first 0, last steps - 1)."""
    if len(rows) == steps:
        return values.astype(np.float32, copy=False)
    at = np.arange(steps, dtype=np.float64)
    columns = [np.interp(at, rows, values[:, g].astype(np.float64)) for g in range(values.shape[1])]
    return np.stack(columns, axis=1).astype(np.float32)


def context_indices(context: Context, frames: int, step: int) -> np.ndarray:
    """The episode's frames (by position among its scored frames) that step ``step``'s query shows, oldest first:
    the frame itself; the ``frames`` ending at it; or ``frames`` spaced evenly from the episode's first to it (all
    of them when there are fewer)."""
    if context is Context.frame or frames == 1:  # one frame: the scored one (linspace(0, t, 1) would be o_0)
        return np.array([step], dtype=np.int64)
    if context is Context.window:
        return np.arange(max(0, step - frames + 1), step + 1, dtype=np.int64)
    if step + 1 <= frames:
        return np.arange(step + 1, dtype=np.int64)
    return np.round(np.linspace(0, step, frames)).astype(np.int64)


@dataclass(frozen=True)
class QueryPlan:
    """Every query of a run, numbered in file order: per episode, its anchors times the goals.

    ``bounds[i]`` is the number of episode i's first query; episode i's query ``q`` asks goal ``q % goals`` at
    step ``rows[i][q // goals]``."""

    rows: list[np.ndarray]
    goals: int
    bounds: list[int]

    @classmethod
    def of(cls, steps: list[int], anchors: int | None, goals: int) -> QueryPlan:
        rows = [anchor_rows(s, anchors) for s in steps]
        counts = [len(r) * goals for r in rows]
        return cls(rows, goals, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist())

    @property
    def total(self) -> int:
        return self.bounds[-1]

    def episode_of(self, query: int) -> int:
        """The episode that asks ``query`` (the last whose first query is at or before it, among non-empty ones)."""
        return int(np.searchsorted(self.bounds, query, side="right")) - 1

    def step_and_goal(self, episode: int, query: int) -> tuple[int, int]:
        anchor, goal = divmod(query - self.bounds[episode], self.goals)
        return int(self.rows[episode][anchor]), goal

    def values(self, episode: int, readouts: np.ndarray, steps: int) -> np.ndarray:
        """Episode ``episode``'s (steps, goals) values from its readouts (in query order), interpolated."""
        return interpolate(self.rows[episode], readouts.reshape(len(self.rows[episode]), self.goals), steps)
