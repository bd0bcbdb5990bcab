"""The VLM scorer: a generative vision-language model judges each queried step (``vlmlabel.judge``, the one module
that imports transformers), shown the frames its ``--context`` picks, and its answer's probability is the raw
score; ``--anchors`` queries some steps and interpolates the rest (``vlmlabel.queries``).

The fixed batch grid runs over queries, numbered in file order (``queries.QueryPlan``), so resume and shards put
every query in the batch it has in one uninterrupted run. Frames are read once, in order, through the same data
path as CLIP's (``--workers`` included), and each episode's are kept while its queries last. On an accelerator a
thread builds the next batch's queries and runs the processor on them while the model answers the current one;
batches keep their composition, so the readouts are the same as one batch after another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlmlabel import cache
from vlmlabel.engine import compute_rows, finite_rows
from vlmlabel.errors import SourceError, VlmlabelError
from vlmlabel.events import QUIET, Events
from vlmlabel.formulation import RewardConfig
from vlmlabel.queries import JudgeSpec, QueryPlan, context_indices
from vlmlabel.reader.buffers import RAW_AXES, Batch, as_nchw
from vlmlabel.reader.decode_workers import resolve_workers
from vlmlabel.reader.readahead import decode_jpegs, prefetch
from vlmlabel.run import score
from vlmlabel.run.checkpoint import Checkpoint
from vlmlabel.run.plan import Card, OpenRun
from vlmlabel.run.request import RelabelRequest
from vlmlabel.run.resumable import trim
from vlmlabel.run.setup import Machine
from vlmlabel.sources.base import DatasetSource, Episode

if TYPE_CHECKING:
    from vlmlabel.judge import Judge, JudgeCard, Query

READ_BATCH = 64  # frames read per batch while filling an episode's frames
PREPARER = "vlmlabel-judge-inputs"  # the thread that reads frames and runs the processor ahead of the model
OVERLAP_ON_CPU = False  # the CPU path takes turns (``QueryRows.overlap``); tests set it to run the thread's path
NO_EMBEDDINGS = "the vlm scorer reads no image embeddings, so there is no embedding cache to use"


def _judge_module() -> Any:
    """``vlmlabel.judge``, imported when a run judges: transformers is an optional extra (``vlmlabel[vlm]``) and
    takes seconds to import, which no CLIP run should pay."""
    from vlmlabel import judge

    return judge


@dataclass(frozen=True)
class VlmCard:
    """The judge's model as named before it loads, at the precision it will run in."""

    judge: JudgeCard
    precision: str

    def describe(self) -> dict[str, Any]:
        return _flat({"scorer": VlmScorer.name, **self.judge.describe(), "precision": self.precision})


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    """Attribute values every format stores: nested values as JSON text."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v for k, v in values.items()}


@dataclass
class JudgeModel:
    """A loaded judge as a run reports and records it (``run.request.ScoringModel``)."""

    judge: Judge
    card: VlmCard

    @property
    def name(self) -> str:
        return self.card.judge.name

    @property
    def pretrained(self) -> str:
        return f"({self.card.judge.family})"

    @property
    def precision(self) -> str:
        return self.card.precision

    @property
    def device(self) -> torch.device:
        return self.judge.device

    @property
    def logit_scale(self) -> float:
        return 1.0  # a judge reads probabilities: no CLIP logit scale enters its rewards

    @property
    def logit_bias(self) -> float | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {**self.card.describe(), **_flat(self.judge.describe())}


def rgb_frames(batch: Batch) -> torch.Tensor:
    """A batch's frames as (N, H, W, 3) uint8 RGB on the CPU, owned (the batch's buffer is given back)."""
    if batch.form in RAW_AXES:
        assert isinstance(batch.frames, torch.Tensor)
        nchw = as_nchw(batch.frames, batch.form)
    else:
        assert isinstance(batch.frames, list)  # "jpeg" and "decoded" batches hold one tensor per frame
        decoded = decode_jpegs(batch.frames, torch.device("cpu")) if batch.form == "jpeg" else batch.frames
        if len({tuple(f.shape) for f in decoded}) > 1:
            raise SourceError(
                "frames of one episode differ in size; the vlm scorer reads an episode's frames as one "
                "video: resize them to one size first"
            )
        nchw = torch.stack(decoded)
    frames = nchw.expand(-1, 3, -1, -1) if nchw.shape[1] == 1 else nchw
    owned = frames.permute(0, 2, 3, 1).contiguous().cpu()
    batch.release()
    return owned


class EpisodeFrames:
    """Episodes' frames, read once in file order (``blocks``), each kept whole, as (steps, H, W, 3) uint8, until a
    later episode is asked for: queries come in episode order."""

    def __init__(self, blocks: Iterator[np.ndarray], steps: list[int], first: int):
        self.blocks, self.steps, self.next = blocks, steps, first
        self.kept: dict[int, np.ndarray] = {}
        self.rest: np.ndarray | None = None

    def get(self, episode: int) -> np.ndarray:
        for done in [e for e in self.kept if e < episode]:
            del self.kept[done]
        while episode not in self.kept:
            self.kept[self.next] = self._read(self.steps[self.next])
            self.next += 1
        return self.kept[episode]

    def _read(self, count: int) -> np.ndarray:
        parts, have = [np.empty((0, 0, 0, 3), np.uint8)], 0  # an episode of no steps asks no query
        while have < count:
            if self.rest is None or not len(self.rest):
                self.rest = next(self.blocks, None)
                if self.rest is None:
                    raise SourceError("the episodes hold fewer frames than their steps; the file is inconsistent")
            take = self.rest[: count - have]
            parts.append(take)
            have, self.rest = have + len(take), self.rest[len(take) :]
        return np.concatenate(parts[1:]) if len(parts) > 1 else parts[0]


@dataclass
class QueryRows:
    """One camera's queries [first, stop) as grid rows: each batch's queries, built from the episodes' frames,
    answered by the judge in one forward."""

    source: DatasetSource
    episodes: list[Episode]
    plan: QueryPlan
    judge: Judge
    spec: JudgeSpec
    goals: list[str]
    workers: int
    fps: float | None

    def __call__(self, first: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        prepared = self._inputs(first, stop, batch_size)
        if self.overlap:  # the next batch's frames read and its processor inputs made while the model runs
            prepared = prefetch(prepared, 1, _keep, PREPARER)
        try:
            begin = first
            for inputs in prepared:
                readouts = self.judge.readouts_of(inputs)
                yield finite_rows(readouts[:, None], begin)
                begin += len(readouts)
        finally:
            prepared.close()

    @property
    def overlap(self) -> bool:
        """Whether a thread prepares the next batch while the model answers this one: on an accelerator, whose
        forward leaves the CPU free. On the CPU the processor and the forward take the same cores: overlapping them
        measured 4-6 % slower on a busy 2-core machine (docs/benchmarks.md, VLM scorer)."""
        return self.judge.device.type != "cpu" or OVERLAP_ON_CPU

    def _inputs(self, first: int, stop: int, batch_size: int) -> Generator[Any, None, None]:
        with contextlib.closing(self.batches(first, stop, batch_size)) as batches:
            for queries in batches:
                yield self.judge.inputs(queries)

    def batches(self, first: int, stop: int, batch_size: int) -> Generator[list[Query], None, None]:
        """Queries [first, stop) in batches of ``batch_size`` (the last may be shorter), built from the episodes'
        frames, each read once."""
        if first >= stop:
            return
        lo, hi = self.plan.episode_of(first), self.plan.episode_of(stop - 1) + 1
        with contextlib.closing(self._read(lo, hi)) as blocks:
            frames = EpisodeFrames(blocks, [e.steps for e in self.episodes], lo)
            for begin in range(first, stop, batch_size):
                yield [self._query(q, frames) for q in range(begin, min(stop, begin + batch_size))]

    def _read(self, lo: int, hi: int) -> Generator[np.ndarray, None, None]:
        """Episodes [lo, hi)'s frames in file order, as RGB blocks, through the run's data path."""
        steps = [e.steps for e in self.episodes]
        start = sum(steps[:lo])
        episodes = trim(self.episodes, start, start + sum(steps[lo:hi]))
        return compute_rows(self.source, episodes, READ_BATCH, torch.device("cpu"), rgb_frames, QUIET, self.workers)

    def default_batch_size(self) -> int:
        """The judge's batch size for the widest query: the first episode's last (widest context, longest goal),
        the same in every shard and every resumed run."""
        plan = self.plan
        if not plan.total:
            return 1
        first = next(i for i in range(len(self.episodes)) if plan.bounds[i + 1] > plan.bounds[i])
        longest = max(range(plan.goals), key=lambda g: len(self.goals[g]))
        with contextlib.closing(self._read(first, first + 1)) as blocks:
            frames = EpisodeFrames(blocks, [e.steps for e in self.episodes], first)
            query = self._query(plan.bounds[first + 1] - plan.goals + longest, frames)
        return int(self.judge.default_batch_size(query))

    def _query(self, query: int, frames: EpisodeFrames) -> Any:
        episode = self.plan.episode_of(query)
        step, goal = self.plan.step_and_goal(episode, query)
        picked = context_indices(self.spec.context, self.spec.frames, step)
        return _judge_module().Query(frames.get(episode)[picked], self.goals[goal], _rate(self.fps, picked))


def _keep(inputs: Any) -> None:
    """Processor inputs made but never run hold nothing to give back."""


def frame_rate(source: DatasetSource) -> float | None:
    """The dataset's frames per second, where it records them (LeRobot datasets do; others: None)."""
    return getattr(source, "fps", None) or None


def _rate(fps: float | None, picked: np.ndarray) -> float | None:
    """The frame rate of the frames a query shows: the dataset's over their mean spacing (None: not known)."""
    if fps is None or len(picked) < 2:
        return fps
    return fps * (len(picked) - 1) / float(picked[-1] - picked[0])


@dataclass
class LoadedJudge:
    judge: Judge
    card: VlmCard
    spec: JudgeSpec
    batch_size: int | None  # None: the judge's default for this dataset's queries

    @property
    def model(self) -> JudgeModel:
        return JudgeModel(self.judge, self.card)

    def score(self, run: OpenRun, checkpoints: list[Checkpoint], events: Events) -> score.Scored:
        steps = [e.steps for e in run.episodes]
        goals = run.config.goals
        plan = QueryPlan.of(steps, self.spec.anchors, len(goals))
        workers = resolve_workers(run.request.workers)
        fps = frame_rate(run.source)

        def rows_of(source: DatasetSource, episodes: list[Episode]) -> QueryRows:
            return QueryRows(source, episodes, plan, self.judge, self.spec, goals, workers, fps)

        batch_size = self.batch_size or rows_of(run.source, run.episodes).default_batch_size()
        return score.score_grid(
            run,
            plan.bounds,
            rows_of,
            lambda i, block: plan.values(i, block, steps[i]),
            batch_size,
            checkpoints,
            events,
        )


class VlmScorer:
    name = "vlm"
    embeddings = False

    def default_model(self, model: str | None) -> str:
        if not model:
            raise VlmlabelError(
                "--scorer vlm needs --model: a local folder or a Hub id of a transformers image-text-to-text "
                "model (read from the local cache), e.g. --model sample_data/reach-vlm"
            )
        return model

    def checked(self, request: RelabelRequest) -> RelabelRequest:
        if request.use_cache:
            raise VlmlabelError(f"--cache: {NO_EMBEDDINGS}; leave it out (or pass --no-cache)")
        if request.compile:
            raise VlmlabelError("--compile applies to CLIP's image tower; the vlm scorer runs transformers' model")
        if request.pretrained:
            raise VlmlabelError("--pretrained applies to --scorer clip; give the judge's folder or Hub id as --model")
        given = request.formulation or RewardConfig(goals=list(request.goals))
        spec, judge = given.judge or JudgeSpec(), _judge_module()
        # judged before validating, so that CLIP's options are refused as such (not as an incomplete --reward)
        config = dataclasses.replace(given, judge=spec).validate()
        judge.parse_readout(spec.answer, spec.versus, spec.answer_values)
        if spec.prompt is not None:
            judge.check_prompt(spec.prompt)
        return dataclasses.replace(request, formulation=config)

    @staticmethod
    def spec(request: RelabelRequest) -> JudgeSpec:
        judge = request.reward_config().judge
        assert judge is not None  # set by ``checked``
        return judge

    def card(self, request: RelabelRequest, machine: Machine) -> VlmCard:
        return VlmCard(_judge_module().describe_judge(request.model), machine.precision)

    def caches(self, run: OpenRun, card: Card) -> list[cache.CacheMatch] | cache.CacheMiss:
        return cache.CacheMiss(NO_EMBEDDINGS)

    def width(self, run: OpenRun) -> int:
        return 1  # one readout per query

    def load(self, run: OpenRun, card: Card, machine: Machine, events: Events) -> LoadedJudge:
        assert isinstance(card, VlmCard)  # this scorer's own card
        spec = self.spec(run.request)
        judge = load_judge(spec, card.judge, machine.device, machine.precision)
        return LoadedJudge(judge, card, spec, run.request.batch_size)


def load_judge(spec: JudgeSpec, card: JudgeCard, device: torch.device, precision: str) -> Judge:
    """The judge ``spec`` asks for (its readout, and its prompt or the readout's default), loaded on ``device``."""
    judge_module = _judge_module()
    readout = judge_module.parse_readout(spec.answer, spec.versus, spec.answer_values)
    prompt = spec.prompt if spec.prompt is not None else judge_module.default_prompt(readout)
    return judge_module.load_judge(card, readout, prompt, device, precision)
