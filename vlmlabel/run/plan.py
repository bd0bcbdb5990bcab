"""The first two steps of a run: *open* (sources, destination, names, every check that can refuse early) and
*plan* (what the run will do, decided before any model loads).

``plan_run`` names the result the run would make (from the scorer's card of its model, ``Namer.card``: no
weights loaded) and returns one typed plan: its rewards are already written (``AlreadyWritten``), the
embedding cache serves it (``FromCache``), or frames are scored (``FromFrames``: the whole dataset, or the
run's shard). Every plan but ``AlreadyWritten`` holds the lock, taken here and only here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vlmlabel import __version__, cache, goal_images
from vlmlabel.destinations import destination_for
from vlmlabel.destinations.base import check_names
from vlmlabel.errors import LockedError, VlmlabelError
from vlmlabel.events import Events
from vlmlabel.files import atomic, journal
from vlmlabel.files.stamp import Stamp
from vlmlabel.formulation import RewardConfig
from vlmlabel.model import ModelCard
from vlmlabel.rewards import CameraReduce
from vlmlabel.run.cameras import Cameras
from vlmlabel.run.checkpoint import FILE_STATE, Checkpoint
from vlmlabel.run.commit import CommitPlan, frames_fingerprint, result_id
from vlmlabel.run.locking import RunLock
from vlmlabel.run.request import RelabelRequest, output_names
from vlmlabel.run.setup import Machine
from vlmlabel.run.shards import ShardSpec, dest_lock, work_dir
from vlmlabel.sources import Align, open_source
from vlmlabel.sources.base import CachingSource, DatasetSource, Episode, content_fingerprint

# -- open ---------------------------------------------------------------------------------------------


@dataclass
class OpenRun:
    """Everything decided before the model loads."""

    request: RelabelRequest
    config: RewardConfig
    sources: list[DatasetSource]  # one per camera
    camera_episodes: list[list[Episode]]  # the same episodes, reading each camera's frames
    commit: CommitPlan
    work: Path
    shard: ShardSpec | None
    fingerprints: list[str]

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
    def names(self) -> list[str]:
        return self.commit.names

    @property
    def cameras(self) -> Cameras:
        return self.commit.cameras

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def identity(self, model: Card, used_cache: bool) -> dict[str, Any]:
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
    The destination's own checks and the lock follow in ``plan_run``. ``nvdec``: the CUDA device whose
    NVDEC decodes video."""
    config = request.reward_config()
    names, raw_names = output_names(request.reward_key, config)
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
        fingerprints = [
            content_fingerprint(s, e if request.align is Align.frame else None)
            for s, e in zip(sources, camera_episodes, strict=True)
        ]
        config = goal_images.resolved(config, sources, camera_episodes[0])  # a goal frame's hash, before the name
        commit = CommitPlan.of(destination, config, cameras, request.reward_key, request.overwrite)
        yield OpenRun(request, config, sources, camera_episodes, commit, work, shard, fingerprints)


def _refuse_split_episodes(config: RewardConfig, episodes: list[Episode]) -> None:
    """Per-episode post-processing, or a judge's context and anchors, on an episode whose rows are scattered would
    cross wrong boundaries."""
    if not config.needs_order:
        return
    seen: set[str] = set()
    for episode in episodes:
        if episode.key in seen:
            raise VlmlabelError(
                f"rows of {episode.key} are not consecutive; --normalize episode, --shaping and the vlm "
                "scorer's --context and --anchors need each episode's rows together and in frame order: sort the "
                "dataset by episode_index, frame_index first"
            )
        seen.add(episode.key)


# -- plan ---------------------------------------------------------------------------------------------


class Card(Protocol):
    """A model as a scorer knows it before any weight loads: what names it in a result."""

    def describe(self) -> dict[str, Any]: ...


class Namer(Protocol):
    """What planning asks of a scorer (``vlmlabel.scorers``), before any model loads: the model's card, and the
    embedding caches that serve the run (a scorer without embeddings has none)."""

    def card(self, request: RelabelRequest, machine: Machine) -> Card: ...

    def caches(self, run: OpenRun, card: Card) -> list[cache.CacheMatch] | cache.CacheMiss: ...


@dataclass(frozen=True)
class ResultName:
    """The result a run would make: the model's card, everything that determines the rewards, and its id."""

    card: Card
    identity: dict[str, Any]
    result_id: str


@dataclass(frozen=True)
class AlreadyWritten:
    """The destination holds every reward of this result from an identical run: nothing loads, nothing is scored."""

    result: ResultName


@dataclass(frozen=True)
class FromCache:
    """Every camera's embedding cache serves the run: the text tower loads, no frame is read."""

    result: ResultName
    matches: list[cache.CacheMatch]  # one per camera


@dataclass(frozen=True)
class FromFrames:
    """Frames are scored (the whole dataset, or the run's shard) by the whole model."""

    result: ResultName
    cache_miss: cache.CacheMiss  # why the cache does not serve it, for the summary


Plan = AlreadyWritten | FromCache | FromFrames


def find_caches(run: OpenRun, model: ModelCard) -> list[cache.CacheMatch] | cache.CacheMiss:
    """Every camera's usable cache, or why they cannot all be used."""
    matches = []
    for source, episodes, fingerprint in zip(run.sources, run.camera_episodes, run.fingerprints, strict=True):
        match = cache.find(source, episodes, model, fingerprint)
        if isinstance(match, cache.CacheMiss):
            return match
        matches.append(match)
    return matches


def plan_run(run: OpenRun, scorer: Namer, machine: Machine, stack: contextlib.ExitStack, events: Events) -> Plan:
    """What this run does, decided before any model loads. Rewards already there with a result id may be this
    very run's (a rerun, a requeued job): telling needs the result's name, so only then is it known before the
    checks that would refuse them. Any other plan passes the destination's checks and holds the lock (on
    ``stack``), before the model is described, as it was loaded after them."""
    present = run.commit.present()
    scoring = None
    if run.commit.results_in(present):
        scoring = _scoring(run, scorer, machine)
        if run.commit.held_in(present, {scoring.result.result_id}):
            return AlreadyWritten(scoring.result)
    _checks_and_lock(run, stack, events)
    return scoring or _scoring(run, scorer, machine)


def _scoring(run: OpenRun, scorer: Namer, machine: Machine) -> FromCache | FromFrames:
    """The result this run makes, from the caches that serve it or else from frames: both from the model's card."""
    request = run.request
    card = scorer.card(request, machine)
    # shards score frames, like every other shard
    asked = request.use_cache is not False and run.shard is None
    found = scorer.caches(run, card) if asked else cache.CacheMiss("--no-cache")
    match found:
        case cache.CacheMiss():
            return FromFrames(_result(run, card, used_cache=False), found)
        case _:
            return FromCache(_result(run, card, used_cache=True), found)


def _result(run: OpenRun, card: Card, used_cache: bool) -> ResultName:
    identity = run.identity(card, used_cache)
    return ResultName(card, identity, result_id(identity, run.fingerprint))


def checkpoint_folders(run: OpenRun) -> list[Path]:
    """Where each camera's progress is saved (the first camera's keeps the one-camera name)."""
    base = f"{run.shard.name}.progress" if run.shard else "progress"
    return [run.work / (base if index == 0 else f"{base}-cam{index}") for index in range(len(run.sources))]


def clear_finished(run: OpenRun, identity: dict[str, Any], stack: contextlib.ExitStack, events: Events) -> None:
    """A run killed after its write landed leaves its progress and its lock beside the data; the identical rerun,
    finding the rewards written, removes them once it holds the lock (a live run's are left alone), and only
    progress made towards these very rewards."""
    destination = run.commit.destination.path
    lock = dest_lock(destination)
    saved = [Checkpoint(f, identity, {}, 0) for f in checkpoint_folders(run) if f.exists()]
    if run.shard or not (saved or lock.exists()):
        return
    try:
        RunLock(lock, str(destination), events).held_by(stack)
    except (LockedError, OSError):  # a live run's, or a folder this user cannot write: left as they are
        return
    for checkpoint in saved:
        if checkpoint.made_for(ignoring=FILE_STATE):  # the file's stamp moved with the write
            checkpoint.discard()
    with contextlib.suppress(OSError):
        run.work.rmdir()  # when empty


def _checks_and_lock(run: OpenRun, stack: contextlib.ExitStack, events: Events) -> None:
    """The destination's own checks, then the lock (shards lock their own part)."""
    run.commit.check()
    shard, dest = run.shard, run.commit.destination.path
    lock = run.work / f"{shard.name}.lock" if shard else dest_lock(dest)
    RunLock(lock, f"{shard.name} of {dest}" if shard else str(dest), events).held_by(stack)
