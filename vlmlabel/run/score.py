"""The *score* step: raw scores from the embedding cache, or on the fixed batch grid with saved progress
(``score_grid``: rows are frames for CLIP, a judge's queries for the VLM scorer), over the whole dataset or one
shard of whole episodes, whose part then waits for ``merge``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmlabel import cache, goal_images
from vlmlabel.engine import FrameScorer
from vlmlabel.events import Events
from vlmlabel.formulation import ScoreFn, build_score_fn, check_prompt_lengths
from vlmlabel.model import ClipModel, ModelCard, load_model
from vlmlabel.reader.decode_workers import resolve_workers
from vlmlabel.reader.readahead import prepare_workers
from vlmlabel.run import commit
from vlmlabel.run.checkpoint import Checkpoint, frame_differences
from vlmlabel.run.plan import OpenRun
from vlmlabel.run.request import ScoringModel, ShardSummary
from vlmlabel.run.resumable import Rows, SpanSettings, frame_rows, grid_span, score_span
from vlmlabel.run.setup import Machine
from vlmlabel.run.shards import PartMeta, plan, shard_result, write_result
from vlmlabel.run.shards import part_meta as read_part_meta
from vlmlabel.sources.base import DatasetSource, Episode


def load_scorer(
    run: OpenRun, card: ModelCard, machine: Machine, events: Events, image_tower: bool
) -> tuple[ClipModel, ScoreFn]:
    """The model, loaded once (``image_tower=False``: what encodes texts only), and the run's score function."""
    request = run.request
    model = load_model(
        request.model, request.pretrained, machine.device, machine.precision, image_tower=image_tower, card=card
    )
    if request.compile:
        model.compile_image_tower()
    for note in check_prompt_lengths(run.config, model):
        events.note(note)
    goals = goal_images.encoder(run.config, run.source, run.episodes, model)
    return model, build_score_fn(run.config, model.encode_texts, model.logit_scale, model.logit_bias, goals)


@dataclass
class Scored:
    """Raw scores of episodes [lo, hi), one (steps, cameras x goals) array each, camera by camera."""

    lo: int
    hi: int
    raw: list[np.ndarray]
    seconds: float
    resumed: int
    batch_size: int
    used_cache: bool


def _side_by_side(per_camera: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per episode, the cameras' (steps, goals) scores as one (steps, cameras x goals) array."""
    return [np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0] for parts in zip(*per_camera, strict=True)]


def score_from_cache(
    run: OpenRun, matches: list[cache.CacheMatch], score_fn: ScoreFn, model: ClipModel, events: Events
) -> Scored:
    events.start(sum(e.steps for e in run.episodes) * len(run.sources))
    results = [
        cache.score_cached(source, match, episodes, score_fn, model.device, events)
        for source, match, episodes in zip(run.sources, matches, run.camera_episodes, strict=True)
    ]
    raw = _side_by_side([r.rewards for r in results])
    return Scored(0, len(run.episodes), raw, sum(r.seconds for r in results), 0, 0, True)


def start_workers(run: OpenRun) -> None:
    """Before the model loads: the decoding workers' server, when workers will read the frames."""
    prepare_workers(run.source, resolve_workers(run.request.workers))


def shard_range(run: OpenRun) -> tuple[int, int]:
    """The episodes [lo, hi) this run scores: its shard's, or all."""
    steps = [e.steps for e in run.episodes]
    return plan(steps, run.shard.count)[run.shard.index] if run.shard else (0, len(run.episodes))


# (source, episodes) of one camera -> the rows of its grid
RowsOf = Callable[[DatasetSource, list[Episode]], Rows]
# (episode index, its block of grid rows) -> its (steps, goals) scores
ValuesOf = Callable[[int, np.ndarray], np.ndarray]


def score_grid(
    run: OpenRun,
    bounds: list[int],
    rows_of: RowsOf,
    values_of: ValuesOf,
    batch_size: int,
    checkpoints: list[Checkpoint],
    events: Events,
) -> Scored:
    """Rows of the whole dataset, or of one shard, on the fixed batch grid (episode i's rows are
    [bounds[i], bounds[i + 1])), saving progress as it goes; camera after camera."""
    lo, hi = shard_range(run)
    count = len(run.sources)
    per_camera, seconds, resumed = [], 0.0, 0
    for index, (source, episodes, checkpoint) in enumerate(
        zip(run.sources, run.camera_episodes, checkpoints, strict=True)
    ):
        settings = SpanSettings(
            lambda size: grid_span(bounds[lo], bounds[hi], size, bounds[-1]),
            batch_size,
            run.request.restart,
            run.request.checkpoint_every,
        )
        # the bar counts every camera's rows: the first camera's start tells the total
        started = events.started_by((lambda total: events.start(total * count)) if index == 0 else None)
        span = score_span(rows_of(source, episodes), checkpoint, settings, started)
        blocks = [span.scores[bounds[i] - span.start : bounds[i + 1] - span.start] for i in range(lo, hi)]
        per_camera.append([values_of(i, block) for i, block in zip(range(lo, hi), blocks, strict=True)])
        seconds, resumed, batch_size = seconds + span.seconds, resumed + span.resumed, span.batch_size
    return Scored(lo, hi, _side_by_side(per_camera), seconds, resumed, batch_size, False)


def score_frames(
    run: OpenRun, scorer: FrameScorer, batch_size: int, checkpoints: list[Checkpoint], events: Events
) -> Scored:
    """Frames of the whole dataset, or of one shard, on the fixed batch grid of frames."""
    steps = [e.steps for e in run.episodes]
    bounds = np.concatenate([[0], np.cumsum(steps, dtype=np.int64)]).tolist()
    workers = resolve_workers(run.request.workers)
    return score_grid(
        run,
        bounds,
        lambda source, episodes: frame_rows(source, scorer, episodes, workers),
        lambda _, block: block,
        batch_size,
        checkpoints,
        events,
    )


# -- a shard's part -----------------------------------------------------------------------------------


def save_part(run: OpenRun, scored: Scored, meta: PartMeta) -> None:
    """A shard's end: its raw scores and how they were made, for ``merge``."""
    assert run.shard is not None
    episodes = run.episodes[scored.lo : scored.hi]
    width = len(run.config.goals) * len(run.sources)
    part = np.concatenate(scored.raw) if scored.raw else np.empty((0, width), np.float32)
    write_result(shard_result(run.work, run.shard), part, [e.name for e in episodes], [e.steps for e in episodes], meta)


def provenance(run: OpenRun, model: ScoringModel, scored: Scored, result: str) -> dict[str, Any]:
    """What every column of this run (or its part) records besides its formula."""
    request, episode = run.request, run.episodes[0]
    return commit.provenance(
        request.align, run.source.image_key, scored.used_cache, model.describe(), episode.per_observation, result
    )


def part_meta(
    run: OpenRun, model: ScoringModel, scored: Scored, identity: dict[str, Any], numerics: dict[str, str], result: str
) -> PartMeta:
    """How a shard's part was made: what ``merge`` checks and commits with."""
    assert run.shard is not None
    return PartMeta(
        identity,
        numerics,
        scored.batch_size,
        run.config.to_json(),
        model.logit_scale,
        provenance(run, model, scored, result),
        run.request.align.value,
        list(run.cameras.keys),
        run.cameras.reduce.value,
        result,
        run.shard.numbering,
        model.logit_bias,
    )


def shard_summary(run: OpenRun, seconds: float, already_done: bool) -> ShardSummary:
    assert run.shard is not None
    steps = [e.steps for e in run.episodes]
    lo, hi = plan(steps, run.shard.count)[run.shard.index]
    return ShardSummary(run.shard, shard_result(run.work, run.shard), hi - lo, sum(steps[lo:hi]), seconds, already_done)


def part_done(run: OpenRun, identity: dict[str, Any], numerics: dict[str, str], events: Events) -> bool:
    """Whether this shard's part is already there from the same options and frames (a requeued array task; the
    source's files may have received other rewards since)."""
    assert run.shard is not None
    path = shard_result(run.work, run.shard)
    if not path.exists():
        return False
    meta = read_part_meta(path)
    if meta is not None and not frame_differences(meta.identity, identity) and meta.numerics == numerics:
        events.note(f"{path.name} is already done with the same options; nothing to compute")
        return True
    events.note(f"{path} was made with other options; computing it again")
    return False
