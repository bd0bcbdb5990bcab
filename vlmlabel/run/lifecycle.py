"""One run lifecycle for every format: open -> score -> commit.

- *open*: the source, its destination (from the registry), output names, and every check that can refuse
  (names, space, permissions, existing rewards, the lock) before the model loads. A run whose identical
  rewards are already written stops here and says so.
- *score*: one strategy: from the embedding cache, or frames on the fixed batch grid with saved progress
  (the whole dataset, or one shard of whole episodes).
- *commit*: post-processing, provenance and the destination's one atomic write. A shard run instead saves
  its part; ``merge`` gathers the parts and ends with the same commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmlabel import __version__, cache, goal_images
from vlmlabel.decode_workers import resolve_workers
from vlmlabel.destinations import Destination, RewardColumn, Stamp, atomic, destination_for, family_of, journal
from vlmlabel.destinations.base import RESULT_ATTR, REWARD_KEY_ATTR, Present, check_names, whole_results
from vlmlabel.destinations.hdf5 import (
    check_output_file,
    hdf5_suffixes,
    refuse_external,
    refuse_if_busy,
    write_file,
)
from vlmlabel.device import default_batch_size, resolve_device, resolve_precision
from vlmlabel.engine import FrameScorer, RelabelResult, embed_segments, prepare_workers
from vlmlabel.errors import LockedError, OutputError, VlmlabelError, WorkerLost
from vlmlabel.formulation import RewardConfig, build_score_fn, check_prompt_lengths
from vlmlabel.model import DEFAULT_MODEL, ClipModel, load_model
from vlmlabel.rewards import CameraReduce
from vlmlabel.run.cameras import Cameras
from vlmlabel.run.checkpoint import FILE_STATE, Checkpoint, frame_differences, run_numerics
from vlmlabel.run.interrupt import check, deferred, pause_at, stoppable
from vlmlabel.run.locking import RunLock
from vlmlabel.run.resumable import DEFAULT_CHECKPOINT_EVERY, grid_span, score_span
from vlmlabel.run.shards import (
    PartMeta,
    ShardSpec,
    SlurmArrayTask,
    dest_lock,
    part_meta,
    plan,
    shard_result,
    work_dir,
    write_result,
)
from vlmlabel.sources import Align, open_source
from vlmlabel.sources.base import CachingSource, DatasetSource, Episode, VideoDecoder, content_fingerprint
from vlmlabel.sources.hdf5 import EMBEDDING_ROWS_SUFFIX, HDF5Source
from vlmlabel.sources.video import nvdec_gpu

DEFAULT_REWARD_KEY = "vlm_reward"
RAW_SUFFIX = "_raw"


@dataclass
class Events:
    """What a run tells its caller: the frame total once known, frames done, and notes (resume, stale lock...)."""

    on_start: Callable[[int], None] | None = None
    on_progress: Callable[[int], None] | None = None
    on_note: Callable[[str], None] | None = None

    def start(self, total: int) -> None:
        if self.on_start is not None:
            self.on_start(total)

    def note(self, message: str) -> None:
        if self.on_note is not None:
            self.on_note(message)


@dataclass
class RelabelRequest:
    source: Path | str
    goals: list[str]
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    image_key: str | list[str] | None = None  # several: each camera scored, combined by ``camera_reduce``
    reward_key: str = DEFAULT_REWARD_KEY
    output: Path | None = None
    overwrite: bool = False
    batch_size: int | None = None
    precision: str = "auto"
    device: str = "auto"
    align: Align = Align.next  # r_t rewards o_{t+1}, the offline RL convention; Align.frame scores o_t
    camera_reduce: CameraReduce = CameraReduce.mean
    link: bool = False  # hard-link unchanged files into a new dataset (shares storage with the source)
    split: str = "train"
    revision: str | None = None
    streaming: bool = False
    push_to_hub: str | None = None
    formulation: RewardConfig | None = None  # None: plain cosine to ``goals``
    use_cache: bool = True
    restart: bool = False
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    shard: ShardSpec | None = None
    array: SlurmArrayTask | None = None  # a SLURM job array task without --num-shards: its shard is found at open
    compile: bool = False
    workers: int | None = None  # decoding processes; None: usable cores minus one (at most 8); 0: this process
    video_decoder: VideoDecoder = VideoDecoder.cpu  # nvdec: the run's GPU decodes video (the same pixels)

    def reward_config(self) -> RewardConfig:
        config = self.formulation if self.formulation is not None else RewardConfig(goals=list(self.goals))
        return config.validate()

    def image_keys(self) -> list[str | None]:
        """The cameras asked for, in order, each once; [None] to detect the one there is."""
        if self.image_key is None or isinstance(self.image_key, str):
            return [self.image_key]
        return list(dict.fromkeys(self.image_key)) or [None]


@dataclass
class RelabelSummary:
    result: RelabelResult
    written_to: Path
    reward_names: list[str]
    goals: list[str]
    model: ClipModel
    layout: str
    image_key: str
    used_cache: bool = False
    cache_note: str = ""
    raw_names: list[str] = field(default_factory=list)
    camera_names: list[str] = field(default_factory=list)


@dataclass
class ShardSummary:
    """What a shard run computed and where its result waits for ``vlmlabel merge``."""

    shard: ShardSpec
    path: Path
    episodes: int
    frames: int
    seconds: float
    already_done: bool


@dataclass
class FinishedSummary:
    """Nothing to do: the destination already holds these rewards from an identical run."""

    written_to: Path
    reward_names: list[str]


Summary = RelabelSummary | ShardSummary | FinishedSummary


def reward_names(key: str, goal_count: int) -> list[str]:
    """NAME for one goal; NAME_0, NAME_1, ... for several."""
    return [key] if goal_count == 1 else [f"{key}_{i}" for i in range(goal_count)]


def _batch_size(requested: int | None, device: torch.device) -> int:
    if requested is not None and requested < 1:
        raise VlmlabelError(f"--batch-size must be at least 1, not {requested}")
    return requested or default_batch_size(device)


def base_attrs(
    align: Align, image_key: str, used_cache: bool, model_attrs: dict[str, Any], per_observation: bool
) -> dict[str, Any]:
    """Attributes every written reward records besides its formulation. ``rows`` says what one value is:
    a step's reward, or (Minari infos) an observation's score, T+1 of them, step t reading row t+1 (next)
    or t (frame)."""
    return {
        "align": align.value,
        "rows": "observations" if per_observation else "steps",
        "image_key": image_key,
        "embeddings": "cache" if used_cache else "frames",
        "vlmlabel_version": __version__,
        **model_attrs,
    }


def frames_fingerprint(fingerprints: list[str]) -> str:
    """What the frames of a run are: its camera's ``content_fingerprint``, or one digest of every camera's."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256("".join(fingerprints).encode()).hexdigest()[:32]


def result_id(identity: dict[str, Any], fingerprint: str) -> str:
    """Names the rewards a run makes: equal ids, identical rewards. The source's files and their times are
    left out (an in-place write changes them); what the frames are is in ``fingerprint``."""
    kept = {k: v for k, v in identity.items() if k not in ("source", "stamp")}
    text = json.dumps({**kept, "frames": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# -- open ---------------------------------------------------------------------------------------------


@dataclass
class OpenRun:
    """Everything decided before the model loads."""

    request: RelabelRequest
    config: RewardConfig
    sources: list[DatasetSource]  # one per camera
    camera_episodes: list[list[Episode]]  # the same episodes, reading each camera's frames
    cameras: Cameras
    destination: Destination
    names: list[str]
    raw_names: list[str]
    work: Path
    shard: ShardSpec | None
    fingerprints: list[str]
    dropped: list[str] = field(default_factory=list)  # columns of the results this run replaces whole (checks)

    @property
    def source(self) -> DatasetSource:
        return self.sources[0]

    @property
    def episodes(self) -> list[Episode]:
        return self.camera_episodes[0]

    @property
    def fingerprint(self) -> str:
        return frames_fingerprint(self.fingerprints)

    @property
    def all_names(self) -> list[str]:
        return self.names + self.raw_names + self.cameras.column_names(self.names)

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def identity(self, model: ClipModel, used_cache: bool) -> dict[str, Any]:
        """Everything that determines the rewards; any change makes saved progress and parts unusable.

        Cached embeddings are float16: rewards from them differ from frame rewards by rounding, so they count
        as another result."""
        request = self.request
        return {
            "source": str(Path(str(request.source)).resolve()),
            "stamp": Stamp.of(self.source.paths).as_json(),
            "frames": self.fingerprint,
            "layout": self.source.layout,
            "image_key": self.source.image_key if not self.cameras.several else list(self.cameras.keys),
            **self.cameras.attrs(),
            "align": request.align.value,
            "goals": self.config.goals,
            "reward": {k: v for k, v in self.config.to_json().items() if k != "goals"},
            "model_attrs": model.describe(),  # model_identity: local weights by path and sha256
            "embeddings": "cache" if used_cache else "frames",
            "vlmlabel": __version__,
        }

    def already_written(self, present: dict[str, Present], wanted: str) -> bool:
        """Whether every reward of this run is in ``present`` (what the destination holds), made by a run with the
        same result id."""
        return all(n in present and str(present[n].attrs.get(RESULT_ATTR)) == wanted for n in self.all_names)


def _shard_for(request: RelabelRequest, source: CachingSource, work: Path, events: Events) -> ShardSpec | None:
    """The shard this run scores (None: the whole dataset): asked for (options, torchrun), or that of a SLURM
    array task, checked against the shards saved in ``work``. Notes and refusals name where it came from."""
    array = request.array
    if array is not None and not source.seekable:
        events.note(f"{array.described}: a stream cannot be split into shards; relabelling the whole dataset")
        return None
    shard = array.shard(work) if array is not None else request.shard
    if shard is None:
        return None
    if not source.seekable:
        raise VlmlabelError(
            f"{shard.origin} asks for shard {shard.index} of {shard.count}, but a --streaming source "
            "is read front to back and cannot be split: relabel it in one (resumable) run"
        )
    if array is not None:
        events.note(
            f"{shard.origin}: scoring shard {shard.index} of {shard.count} (--num-shards 1 scores the whole dataset)"
        )
    return shard


@contextlib.contextmanager
def open_run(request: RelabelRequest, events: Events, nvdec: int | None = None) -> Iterator[OpenRun]:
    """Open the sources (one per camera) and the destination; refuse early names and cameras that cannot work.
    The destination's own checks and the lock follow in ``_checks_and_lock``. ``nvdec``: the CUDA device whose
    NVDEC decodes video."""
    config = request.reward_config()
    names = reward_names(request.reward_key, len(config.goals))
    raw_names = [f"{n}{RAW_SUFFIX}" for n in names] if config.keeps_raw else []
    check_names(names + raw_names, [])
    if request.checkpoint_every < 1:
        raise VlmlabelError(f"--checkpoint-every must be at least 1 frame, not {request.checkpoint_every}")
    for note in journal.recover(Path(str(request.source))):  # a write to it that a killed run left half done
        events.note(note)
    with contextlib.ExitStack() as stack:
        sources = [
            stack.enter_context(
                open_source(str(request.source), key, request.split, request.revision, request.streaming, nvdec)
            )
            for key in request.image_keys()
        ]
        source = sources[0]
        cameras = Cameras(tuple(s.image_key for s in sources), CameraReduce(request.camera_reduce))
        check_names(cameras.column_names(names), [])
        camera_episodes = [s.episodes(request.align) for s in sources]
        for key, episodes in zip(cameras.keys[1:], camera_episodes[1:], strict=True):
            if [e.steps for e in episodes] != [e.steps for e in camera_episodes[0]]:
                raise VlmlabelError(
                    f"cameras {cameras.keys[0]} and {key} do not have the same episodes and steps; "
                    "score them in separate runs"
                )
        _refuse_split_episodes(config, camera_episodes[0])
        destination = destination_for(source, request.output, camera_episodes[0], request.link)
        work = work_dir(destination.path, request.reward_key)
        check_names([], [work.name, dest_lock(destination.path).name, *atomic.staging_names(destination.path)])
        shard = _shard_for(request, source, work, events)
        run = OpenRun(
            request,
            config,
            sources,
            camera_episodes,
            cameras,
            destination,
            names,
            raw_names,
            work,
            shard,
            [
                content_fingerprint(s, e if request.align is Align.frame else None)
                for s, e in zip(sources, camera_episodes, strict=True)
            ],
        )
        yield run


def _refuse_split_episodes(config: RewardConfig, episodes: list[Episode]) -> None:
    """Per-episode post-processing on an episode whose rows are scattered would cross wrong boundaries."""
    if not config.per_episode:
        return
    seen: set[str] = set()
    for episode in episodes:
        if episode.key in seen:
            raise VlmlabelError(
                f"rows of {episode.key} are not consecutive; --normalize episode and --shaping "
                "need each episode's rows together and in frame order: sort the dataset by "
                "episode_index, frame_index first"
            )
        seen.add(episode.key)


def _checks_and_lock(run: OpenRun, stack: contextlib.ExitStack, events: Events) -> None:
    """The destination's own checks, then the lock (shards lock their own part)."""
    request, shard = run.request, run.shard
    run.dropped = whole_results(request.reward_key, run.all_names, run.destination.carried())
    run.destination.check(run.all_names + run.dropped, request.overwrite)
    dest = run.destination.path
    lock = run.work / f"{shard.name}.lock" if shard else dest_lock(dest)
    RunLock(lock, f"{shard.name} of {dest}" if shard else str(dest), events.on_note).held_by(stack)


# -- score --------------------------------------------------------------------------------------------


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


def find_caches(run: OpenRun, model: ClipModel) -> list[cache.CacheMatch] | str:
    """Every camera's usable cache, or why they cannot all be used."""
    matches = []
    for source, episodes, fingerprint in zip(run.sources, run.camera_episodes, run.fingerprints, strict=True):
        match = cache.find(source, episodes, model, fingerprint)
        if not isinstance(match, cache.CacheMatch):
            return match
        matches.append(match)
    return matches


def score_from_cache(
    run: OpenRun, matches: list[cache.CacheMatch], score_fn: Any, model: ClipModel, events: Events
) -> Scored:
    events.start(sum(e.steps for e in run.episodes) * len(run.sources))
    results = [
        cache.score_cached(source, match, episodes, score_fn, model.device, events.on_progress)
        for source, match, episodes in zip(run.sources, matches, run.camera_episodes, strict=True)
    ]
    raw = _side_by_side([r.rewards for r in results])
    return Scored(0, len(run.episodes), raw, sum(r.seconds for r in results), 0, 0, True)


def checkpoint_folders(run: OpenRun) -> list[Path]:
    """Where each camera's progress is saved (the first camera's keeps the one-camera name)."""
    base = f"{run.shard.name}.progress" if run.shard else "progress"
    return [run.work / (base if index == 0 else f"{base}-cam{index}") for index in range(len(run.sources))]


def score_frames(
    run: OpenRun, scorer: FrameScorer, batch_size: int, checkpoints: list[Checkpoint], events: Events
) -> Scored:
    """Frames of the whole dataset, or of one shard, on the fixed batch grid, saving progress as it goes;
    camera after camera."""
    steps = [e.steps for e in run.episodes]
    bounds = np.concatenate([[0], np.cumsum(steps, dtype=np.int64)]).tolist()
    lo, hi = plan(steps, run.shard.count)[run.shard.index] if run.shard else (0, len(run.episodes))
    count = len(run.sources)
    per_camera, seconds, resumed = [], 0.0, 0
    for index, (source, episodes, checkpoint) in enumerate(
        zip(run.sources, run.camera_episodes, checkpoints, strict=True)
    ):
        start = (lambda total: events.start(total * count)) if index == 0 else None
        span = score_span(
            source,
            scorer,
            episodes,
            lambda size: grid_span(bounds[lo], bounds[hi], size, bounds[-1]),
            batch_size,
            checkpoint,
            run.request.restart,
            run.request.checkpoint_every,
            start,
            events.on_progress,
            events.on_note,
            resolve_workers(run.request.workers),
        )
        per_camera.append([span.scores[bounds[i] - span.start : bounds[i + 1] - span.start] for i in range(lo, hi)])
        seconds, resumed, batch_size = seconds + span.seconds, resumed + span.resumed, span.batch_size
    return Scored(lo, hi, _side_by_side(per_camera), seconds, resumed, batch_size, False)


# -- commit -------------------------------------------------------------------------------------------


def commit(
    destination: Destination,
    config: RewardConfig,
    raw: list[np.ndarray],
    names: list[str],
    raw_names: list[str],
    logit_scale: float,
    common: dict[str, Any],
    overwrite: bool,
    cameras: Cameras,
    key: str,
    dropped: list[str],
    logit_bias: float | None = None,
) -> tuple[Path, list[np.ndarray]]:
    """Combine cameras, post-process, record provenance and write every reward column in one atomic step, which
    also removes ``dropped`` (the rest of the results replaced, ``whole_results``). Every column records ``key``,
    the --reward-key that names the result."""
    goals = len(config.goals)
    common = {**common, REWARD_KEY_ATTR: key}
    combined = cameras.combine(raw, goals)
    final = config.postprocess(combined)
    columns = []
    for goal_index, name in enumerate(names):
        attrs = {**config.attrs(goal_index, logit_scale, logit_bias), **common, **cameras.attrs()}
        formula = attrs["formula"].split(" -> ")[0]  # what raw and per-camera scores are
        columns.append(RewardColumn(name, [f[:, goal_index] for f in final], attrs))
        if raw_names:
            raw_attrs = {**attrs, "formula": formula, "raw_of": name}
            columns.append(RewardColumn(raw_names[goal_index], [r[:, goal_index] for r in combined], raw_attrs))
            attrs["raw_key"] = raw_names[goal_index]
        per_camera = zip(cameras.keys, cameras.column_names([name]), strict=True) if cameras.several else []
        for index, (key, column) in enumerate(per_camera):
            scores = cameras.camera(raw, goals, index)
            camera_attrs = {
                **common,
                **config.attrs(goal_index, logit_scale, logit_bias),
                "formula": formula,
                "image_key": key,
                "camera_of": name,
            }
            columns.append(RewardColumn(column, [s[:, goal_index] for s in scores], camera_attrs))
    return destination.write(columns, overwrite, dropped), final


def _push(run: OpenRun, written: Path) -> None:
    if run.request.push_to_hub:
        check()  # a signal held while the write was put in place stops the run before the upload
        from vlmlabel.destinations.hub import push

        push(written, family_of(run.source).push_as_dataset, run.request.push_to_hub)


# -- the run ------------------------------------------------------------------------------------------


def _model_loads() -> None:
    """The end of the open phase: a signal held while the lock was taken stops the run before the model loads."""
    pause_at("open")
    check()


@stoppable()
def relabel_file(
    request: RelabelRequest,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Summary:
    """Score every step (or one shard's) and write the rewards (or save the shard's part).

    The source is only read. Progress is saved beside the destination so a killed run resumes, and a
    lock keeps a second run off it. A run whose identical rewards are already written does nothing.
    SIGINT and SIGTERM stop it in any phase (``run.interrupt``), leaving only the progress saved.
    """
    events = Events(on_start, on_progress, on_note)
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    batch_size = _batch_size(request.batch_size, device)
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(open_run(request, events, nvdec_gpu(request.video_decoder, device)))
        run.config = goal_images.resolved(run.config, run.sources, run.episodes)  # a goal frame's hash
        # Rewards already there with a result id may be this very run's (a rerun, a requeued job): telling needs
        # the model's description, so only then do the checks that would refuse them wait for the model.
        present = run.destination.written(run.all_names)
        maybe_done = all(n in present and RESULT_ATTR in present[n].attrs for n in run.all_names)
        if not maybe_done:
            _checks_and_lock(run, stack, events)
        use_cache = request.use_cache and run.shard is None  # shards score frames, like every other shard
        cached = use_cache and all(
            cache.stored(source, episodes) for source, episodes in zip(run.sources, run.camera_episodes, strict=True)
        )
        if not (maybe_done or cached):  # frames will be read: the decoding workers' server starts as the model loads
            prepare_workers(run.source, resolve_workers(request.workers))
        _model_loads()
        # A run that may encode no frame (served by the cache, or already done) loads the text tower only, unless it
        # embeds goal images.
        model = load_model(
            request.model,
            request.pretrained,
            device,
            precision,
            image_tower=not (maybe_done or cached) or bool(run.config.goal_images),
        )
        match: list[cache.CacheMatch] | str = find_caches(run, model) if use_cache else "--no-cache"
        identity = run.identity(model, not isinstance(match, str))
        wanted = result_id(identity, run.fingerprint)
        if maybe_done and run.already_written(present, wanted):
            events.note(
                f"{', '.join(run.names)} already written to {run.destination.path} by an identical run "
                "(same frames, goals, model and formulation); nothing to do"
            )
            _clear_finished(run, identity, stack, events)
            return FinishedSummary(run.destination.path, run.names)
        if maybe_done:
            _checks_and_lock(run, stack, events)
        if isinstance(match, str) and not model.has_image_tower:  # frames to encode after all
            model = load_model(request.model, request.pretrained, device, precision)
        if request.compile:
            model.compile_image_tower()
        for note in check_prompt_lengths(run.config, model):
            events.note(note)
        goals = goal_images.encoder(run.config, run.source, run.episodes, model)
        score_fn = build_score_fn(run.config, model.encode_texts, model.logit_scale, model.logit_bias, goals)
        if not isinstance(match, str):
            return _commit_run(
                run, model, score_from_cache(run, match, score_fn, model, events), wanted, "using cached embeddings"
            )
        return _score_frames_and_finish(
            run, model, FrameScorer(model, run.config.goals, score_fn), identity, wanted, batch_size, events, str(match)
        )


def _score_frames_and_finish(
    run: OpenRun,
    model: ClipModel,
    scorer: FrameScorer,
    identity: dict[str, Any],
    wanted: str,
    batch_size: int,
    events: Events,
    cache_note: str,
) -> Summary:
    """Score frames with saved progress, then commit (a whole run) or save the part (a shard)."""
    numerics = run_numerics(model.device)
    if run.shard and _part_done(shard_result(run.work, run.shard), identity, numerics, events):
        return _shard_summary(run, 0.0, True)
    checkpoints = [
        Checkpoint(folder, identity, numerics, len(run.config.goals), events.on_note)
        for folder in checkpoint_folders(run)
    ]
    try:
        scored = score_frames(run, scorer, batch_size, checkpoints, events)
        if run.shard:
            _save_part(
                run,
                scored,
                PartMeta(
                    identity,
                    numerics,
                    scored.batch_size,
                    run.config.to_json(),
                    model.logit_scale,
                    _common_attrs(run, model, scored, wanted),
                    run.request.align.value,
                    list(run.cameras.keys),
                    run.cameras.reduce.value,
                    wanted,
                    run.shard.numbering,
                    model.logit_bias,
                ),
            )
            summary: Summary = _shard_summary(run, scored.seconds, False)
        else:
            summary = _commit_run(run, model, scored, wanted, cache_note)
    except VlmlabelError as exc:
        # Bad input or a changed source: what was saved cannot serve a rerun. A lost worker is a fault, like a kill.
        _discard([c for c in checkpoints if not c.holds_rows] if isinstance(exc, WorkerLost) else checkpoints, run.work)
        raise
    except BaseException:
        # Signals, kills, a full disk: saved rows serve the rerun; a sidecar holding none is only junk.
        _discard([c for c in checkpoints if not c.holds_rows], run.work)
        raise
    _discard(checkpoints, run.work)
    return summary


def _discard(checkpoints: list[Checkpoint], work: Path) -> None:
    with deferred():  # never half removed
        for checkpoint in checkpoints:
            checkpoint.discard()
        _remove_if_empty(work)


def _common_attrs(run: OpenRun, model: ClipModel, scored: Scored, wanted: str) -> dict[str, Any]:
    return {
        **base_attrs(
            run.request.align,
            run.source.image_key,
            scored.used_cache,
            model.describe(),
            run.episodes[0].per_observation,
        ),
        RESULT_ATTR: wanted,
    }


def _commit_run(run: OpenRun, model: ClipModel, scored: Scored, wanted: str, cache_note: str) -> RelabelSummary:
    run.close()
    written, final = commit(
        run.destination,
        run.config,
        scored.raw,
        run.names,
        run.raw_names,
        model.logit_scale,
        _common_attrs(run, model, scored, wanted),
        run.request.overwrite,
        run.cameras,
        run.request.reward_key,
        run.dropped,
        model.logit_bias,
    )
    _push(run, written)
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
        run.raw_names,
        run.cameras.column_names(run.names),
    )


def _save_part(run: OpenRun, scored: Scored, meta: PartMeta) -> None:
    """A shard's end: its raw scores and how they were made, for ``merge``."""
    assert run.shard is not None
    episodes = run.episodes[scored.lo : scored.hi]
    width = len(run.config.goals) * len(run.sources)
    part = np.concatenate(scored.raw) if scored.raw else np.empty((0, width), np.float32)
    write_result(shard_result(run.work, run.shard), part, [e.name for e in episodes], [e.steps for e in episodes], meta)


def _shard_summary(run: OpenRun, seconds: float, already_done: bool) -> ShardSummary:
    assert run.shard is not None
    steps = [e.steps for e in run.episodes]
    lo, hi = plan(steps, run.shard.count)[run.shard.index]
    return ShardSummary(run.shard, shard_result(run.work, run.shard), hi - lo, sum(steps[lo:hi]), seconds, already_done)


def _part_done(path: Path, identity: dict[str, Any], numerics: dict[str, str], events: Events) -> bool:
    """Whether this shard's part is already there from the same options and frames (a requeued array task; the
    source's files may have received other rewards since)."""
    if not path.exists():
        return False
    meta = part_meta(path)
    if meta is not None and not frame_differences(meta.identity, identity) and meta.numerics == numerics:
        events.note(f"{path.name} is already done with the same options; nothing to compute")
        return True
    events.note(f"{path} was made with other options; computing it again")
    return False


def _clear_finished(run: OpenRun, identity: dict[str, Any], stack: contextlib.ExitStack, events: Events) -> None:
    """A run killed after its write landed leaves its progress and its lock beside the data; the identical rerun,
    finding the rewards written, removes them once it holds the lock (a live run's are left alone), and only
    progress made towards these very rewards."""
    lock = dest_lock(run.destination.path)
    saved = [Checkpoint(f, identity, {}, 0) for f in checkpoint_folders(run) if f.exists()]
    if run.shard or not (saved or lock.exists()):
        return
    try:
        RunLock(lock, str(run.destination.path), events.on_note).held_by(stack)
    except (LockedError, OSError):  # a live run's, or a folder this user cannot write: left as they are
        return
    for checkpoint in saved:
        if checkpoint.made_for(ignoring=FILE_STATE):  # the file's stamp moved with the write
            checkpoint.discard()
    _remove_if_empty(run.work)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


# -- embed --------------------------------------------------------------------------------------------


@dataclass
class EmbedRequest:
    source: Path | str
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    image_key: str | None = None
    output: Path | None = None
    overwrite: bool = False  # an existing --output file; a cache already in the file is always replaced
    batch_size: int | None = None
    precision: str = "auto"
    device: str = "auto"
    split: str = "train"
    revision: str | None = None
    workers: int | None = None  # decoding processes; None: usable cores minus one (at most 8); 0: this process
    video_decoder: VideoDecoder = VideoDecoder.cpu  # nvdec: the run's GPU decodes video (the same pixels)


@dataclass
class EmbedSummary:
    written_to: Path
    locations: list[str]
    frames: int
    dim: int
    seconds: float
    model: ClipModel
    image_key: str


@stoppable()
def embed_file(
    request: EmbedRequest,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> EmbedSummary:
    """Store every frame's unit image embedding in the source's cache file (safe write, like rewards)."""
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    batch_size = _batch_size(request.batch_size, device)
    nvdec = nvdec_gpu(request.video_decoder, device)
    with (
        open_source(str(request.source), request.image_key, request.split, request.revision, nvdec_gpu=nvdec) as source,
        contextlib.ExitStack() as stack,
    ):
        if source.cache_file is None:
            raise VlmlabelError(
                f"{request.source}: a streamed dataset cannot keep an embedding cache; "
                "download it (drop --streaming) to make one"
            )
        target = request.output or source.cache_file
        base = source.cache_file if source.cache_file.exists() else None
        plans = cache.plan(source)
        locations = [source.embedding_location(p.array) for p in plans]
        _check_embed_target(request, base, target, source.cache_file)
        if isinstance(source, HDF5Source):  # the cache goes inside the source file (or its --output copy)
            refuse_external(source, target, locations, [p.array for p in plans[:1]])
        stamp = Stamp.of(source.paths)
        fingerprint = content_fingerprint(source)
        RunLock(dest_lock(target), str(target), on_note).held_by(stack)
        workers = resolve_workers(request.workers)
        prepare_workers(source, workers)  # the decoding workers' server starts while the model loads
        _model_loads()
        model = load_model(request.model, request.pretrained, device, precision)
        segments = [s for p in plans for s in p.segments]
        total = sum(len(s) for s in segments)
        if on_start is not None:
            on_start(total)
        start = time.perf_counter()
        # Embeddings are computed while the copy is written, so memory stays at one batch.
        blocks = embed_segments(source, model, segments, batch_size, on_progress, workers)
        indices, stream = cache.cache_stream(source, plans, blocks, model, fingerprint)
        stale_rows = [loc + EMBEDDING_ROWS_SUFFIX for p, loc in zip(plans, locations, strict=True) if p.dense]
        written = write_file(
            base, target, indices, True, stamp, remove=stale_rows, stream=stream, keep_mode=request.output is None
        )
        seconds = time.perf_counter() - start
    return EmbedSummary(written, locations, total, stream.width, seconds, model, source.image_key)


def _check_embed_target(request: EmbedRequest, base: Path | None, target: Path, default: Path) -> None:
    from vlmlabel.destinations.base import check_folder, check_output_suffix, check_space

    output = request.output
    if output is not None and base is not None and output.exists() and output.resolve() == base.resolve():
        raise OutputError(f"--output {output} is where the cache already goes; drop --output")
    if output is not None:  # an HDF5 file, whatever the source: the cache file (or the HDF5 source) copied
        check_output_suffix(output, hdf5_suffixes(default), "HDF5")
    check_output_file(output, request.overwrite)
    folder = target.resolve().parent
    check_folder(folder)
    check_space(folder, base.stat().st_size if base is not None else 0, "the embedding cache")
    if base is not None and output is None:
        refuse_if_busy(base)
