"""One run lifecycle for every format: open -> plan -> score -> commit.

- *open* (``run.plan.open_run``): the sources (one per camera), the destination (from the registry), the
  output names and the checks that refuse early.
- *plan* (``run.plan.plan_run``), before any model loads: name the result from the model's card and choose
  one plan: ``AlreadyWritten`` (an identical run wrote these rewards: stop here), ``FromCache`` (the
  embedding cache serves every camera) or ``FromFrames`` (the whole dataset, or one shard). The last two
  pass the destination's checks and take the lock, in that one place.
- *score* (``run.score``, through the run's scorer: ``vlmlabel.scorers``): the model loads once, whole for frames
  (CLIP or a VLM judge), CLIP's text tower only for the cache; frames, or a judge's queries, go on the fixed
  batch grid with saved progress.
- *commit* (``run.commit.CommitPlan``): post-processing, provenance and the destination's one atomic write.
  A shard run instead saves its part; ``merge`` gathers the parts and ends with the same commit plan.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from vlmlabel.engine import RelabelResult
from vlmlabel.errors import VlmlabelError, WorkerLost
from vlmlabel.events import QUIET, Events
from vlmlabel.files.interrupt import deferred, stoppable
from vlmlabel.model import ModelCard
from vlmlabel.run import score
from vlmlabel.run.checkpoint import Checkpoint, run_numerics
from vlmlabel.run.commit import push
from vlmlabel.run.plan import (
    AlreadyWritten,
    FromCache,
    FromFrames,
    OpenRun,
    checkpoint_folders,
    clear_finished,
    open_run,
    plan_run,
)
from vlmlabel.run.request import FinishedSummary, RelabelRequest, RelabelSummary, ScoringModel, Summary
from vlmlabel.run.setup import Machine, model_loads
from vlmlabel.scorers.base import Scorer
from vlmlabel.scorers.registry import scorer_for


@stoppable()
def relabel_file(request: RelabelRequest, events: Events = QUIET) -> Summary:
    """Score every step (or one shard's) and write the rewards (or save the shard's part).

    The source is only read. Progress is saved beside the destination so a killed run resumes, and a
    lock keeps a second run off it. A run whose identical rewards are already written does nothing.
    SIGINT and SIGTERM stop it in any phase (``files.interrupt``), leaving only the progress saved.
    """
    scorer = scorer_for(request.scorer)
    request = scorer.checked(request)
    machine = Machine.of(request.device, request.precision, request.batch_size, request.video_decoder)
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(open_run(request, events, machine.nvdec))
        plan = plan_run(run, scorer, machine, stack, events)
        model_loads()
        match plan:
            case AlreadyWritten():
                return _finished(run, plan, stack, events)
            case FromCache():
                return _from_cache(run, plan, machine, events)
            case FromFrames():
                return _from_frames(run, plan, scorer, machine, events)


def _finished(run: OpenRun, plan: AlreadyWritten, stack: contextlib.ExitStack, events: Events) -> FinishedSummary:
    events.note(
        f"{', '.join(run.names)} already written to {run.commit.destination.path} by an identical run "
        "(same frames, goals, model and formulation); nothing to do"
    )
    clear_finished(run, plan.result.identity, stack, events)
    return FinishedSummary(run.commit.destination.path, run.names)


def _from_cache(run: OpenRun, plan: FromCache, machine: Machine, events: Events) -> RelabelSummary:
    # CLIP's cache (the only scorer with embeddings): the text tower, and the image tower only to embed goal
    # images (frames come from the cache)
    card = plan.result.card
    assert isinstance(card, ModelCard)  # caches hold CLIP embeddings, named by CLIP's card
    model, score_fn = score.load_scorer(run, card, machine, events, bool(run.config.goal_images))
    scored = score.score_from_cache(run, plan.matches, score_fn, model, events)
    return _commit_run(run, model, scored, plan.result.result_id, "using cached embeddings")


def _from_frames(run: OpenRun, plan: FromFrames, scorer: Scorer, machine: Machine, events: Events) -> Summary:
    """Score frames with saved progress, then commit (a whole run) or save the part (a shard)."""
    identity, wanted, numerics = plan.result.identity, plan.result.result_id, run_numerics(machine.device)
    if run.shard and score.part_done(run, identity, numerics, events):
        return score.shard_summary(run, 0.0, True)
    score.start_workers(run)
    loaded = scorer.load(run, plan.result.card, machine, events)
    model, width = loaded.model, scorer.width(run)
    checkpoints = [Checkpoint(folder, identity, numerics, width, events) for folder in checkpoint_folders(run)]
    try:
        scored = loaded.score(run, checkpoints, events)
        if run.shard:
            score.save_part(run, scored, score.part_meta(run, model, scored, identity, numerics, wanted))
            summary: Summary = score.shard_summary(run, scored.seconds, False)
        else:
            summary = _commit_run(run, model, scored, wanted, plan.cache_miss.reason)
    except WorkerLost:
        _discard([c for c in checkpoints if not c.holds_rows], run.work)  # a fault, like a kill (below)
        raise
    except VlmlabelError:
        # Bad input or a changed source: what was saved cannot serve a rerun.
        _discard(checkpoints, run.work)
        raise
    except BaseException:
        # Signals, kills, a full disk: saved rows serve the rerun; a sidecar holding none is only junk.
        _discard([c for c in checkpoints if not c.holds_rows], run.work)
        raise
    _discard(checkpoints, run.work)
    return summary


# -- the steps' parts ---------------------------------------------------------------------------------


def _commit_run(
    run: OpenRun, model: ScoringModel, scored: score.Scored, wanted: str, cache_note: str
) -> RelabelSummary:
    run.close()
    written, final = run.commit.write(
        scored.raw, model.logit_scale, model.logit_bias, score.provenance(run, model, scored, wanted)
    )
    push(written, run.request.push_to_hub, run.source)
    result = RelabelResult(run.episodes, final, sum(e.steps for e in run.episodes), scored.seconds, scored.resumed)
    return RelabelSummary(
        result,
        written,
        run.names,
        run.config.goals,
        model,
        run.source.layout,
        ", ".join(run.cameras.keys),
        scored.used_cache,
        cache_note,
        run.commit.raw_names,
        run.cameras.column_names(run.names),
    )


def _discard(checkpoints: list[Checkpoint], work: Path) -> None:
    with deferred():  # never half removed
        for checkpoint in checkpoints:
            checkpoint.discard()
        with contextlib.suppress(OSError):
            work.rmdir()  # when empty
