"""`relabel` as a library call: open the source, check the write can happen, score, write."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlmlabel import __version__
from vlmlabel.device import default_batch_size, resolve_device, resolve_precision
from vlmlabel import cache
from vlmlabel.checkpoint import Checkpoint, run_identity, run_numerics
from vlmlabel.engine import FrameScorer, RelabelResult, embed_segments, relabel
from vlmlabel.errors import VlmlabelError
from vlmlabel.interrupt import GracefulStop
from vlmlabel.locking import RunLock
from vlmlabel.model import DEFAULT_MODEL, ClipModel, load_model
from vlmlabel.formulation import RewardConfig, build_score_fn
from vlmlabel.resumable import DEFAULT_CHECKPOINT_EVERY, grid_span, score_span
from vlmlabel.shards import ShardSpec, dest_lock, plan, read_result, shard_result, work_dir, write_result
from vlmlabel.sources import Align, HDF5Source, open_source
from vlmlabel.sources.base import reward_path, stores_embeddings
from vlmlabel.sources.hdf5 import EMBEDDING_ROWS_SUFFIX
from vlmlabel.writers import tables as table_writer
from vlmlabel.writers.hdf5 import RewardDataset, SourceStamp, check_destination, check_writable, write_rewards
from vlmlabel.writers.hdf5 import destination as destination_of

DEFAULT_REWARD_KEY = "vlm_reward"
RAW_SUFFIX = "_raw"


@dataclass
class RelabelRequest:
    source: Path
    goals: list[str]
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    image_key: str | None = None
    reward_key: str = DEFAULT_REWARD_KEY
    output: Path | None = None
    overwrite: bool = False
    batch_size: int | None = None
    precision: str = "auto"
    device: str = "auto"
    align: Align = Align.frame
    split: str = "train"
    revision: str | None = None
    streaming: bool = False
    push_to_hub: str | None = None
    formulation: RewardConfig | None = None  # None: plain cosine to ``goals``
    use_cache: bool = True
    restart: bool = False
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    shard: ShardSpec | None = None  # HDF5 only
    compile: bool = False

    def reward_config(self) -> RewardConfig:
        config = self.formulation if self.formulation is not None else RewardConfig(goals=list(self.goals))
        return config.validate()


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
class EmbedRequest:
    source: Path
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    image_key: str | None = None
    output: Path | None = None
    overwrite: bool = False  # an existing --output file; a cache already in the file is always replaced
    batch_size: int | None = None
    precision: str = "auto"
    device: str = "auto"


@dataclass
class EmbedSummary:
    written_to: Path
    locations: list[str]
    frames: int
    dim: int
    seconds: float
    model: ClipModel
    image_key: str


def reward_names(key: str, goal_count: int) -> list[str]:
    """NAME for one goal; NAME_0, NAME_1, ... for several."""
    return [key] if goal_count == 1 else [f"{key}_{i}" for i in range(goal_count)]


def _batch_size(requested: int | None, device) -> int:
    if requested is not None and requested < 1:
        raise VlmlabelError(f"--batch-size must be at least 1, not {requested}")
    return requested or default_batch_size(device)


def relabel_file(request: RelabelRequest, on_start: Callable[[int], None] | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> RelabelSummary | ShardSummary:
    """Score every step (or one shard's) and write the rewards (or the shard's result).

    The source is only read until the final atomic write. For HDF5 files, progress is saved
    beside the destination so a killed run resumes, and a lock keeps a second run off it.
    """
    config = request.reward_config()
    goals = config.goals
    if not request.reward_key.strip() or "/" in request.reward_key:
        raise VlmlabelError(f"--reward-key {request.reward_key!r} must be a non-empty name without '/'")
    names = reward_names(request.reward_key, len(goals))
    raw_names = [f"{n}{RAW_SUFFIX}" for n in names] if config.keeps_raw else []
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    batch_size = _batch_size(request.batch_size, device)
    if request.checkpoint_every < 1:
        raise VlmlabelError(f"--checkpoint-every must be at least 1 frame, not {request.checkpoint_every}")
    shard = request.shard

    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_source(str(request.source), request.image_key, request.split,
                                                 request.revision, request.streaming))
        hdf5 = isinstance(source, HDF5Source)
        stop = None
        if hdf5:
            check_destination(request.source, request.output, request.overwrite)  # before the lock is made
            dest = destination_of(request.source, request.output)
            work = work_dir(dest, request.reward_key)
            stack.enter_context(RunLock(work / f"{shard.name}.lock" if shard else dest_lock(dest),
                                        f"{shard.name} of {dest}" if shard else str(dest), on_note))
            stop = stack.enter_context(GracefulStop())
        elif shard is not None and shard.origin.startswith("SLURM"):
            if on_note is not None:
                on_note(f"{shard.origin}: shards are for HDF5 files; relabelling the whole dataset")
            shard = None
        elif shard is not None:
            raise VlmlabelError("--num-shards works for HDF5 files; Hugging Face, LeRobot and parquet datasets "
                                "are relabelled in one run")
        episodes = source.episodes(request.align)
        targets = sorted({e.target for e in episodes})
        if hdf5:
            if request.push_to_hub:
                raise VlmlabelError("--push-to-hub works for Hugging Face and LeRobot datasets, not HDF5 files")
            stamp = SourceStamp.of(request.source)
            planned = [reward_path(t, n) for t in targets for n in names + raw_names]
            check_writable(request.source, request.output, source.existing(planned), request.overwrite)
        else:
            destination = table_writer.check_output(source, request.output, names + raw_names, request.overwrite)
        model = load_model(request.model, request.pretrained, device, precision)
        score_fn = build_score_fn(config, model.encode_texts, model.logit_scale)
        use_cache = request.use_cache and shard is None  # shards score frames, like every other shard
        match = cache.find(source, episodes, model, source.image_key) if use_cache else "--no-cache"
        if request.compile:
            model.compile_image_tower()
        layout, image_key = source.layout, source.image_key
        if isinstance(match, cache.CacheMatch):
            if on_start is not None:
                on_start(sum(e.steps for e in episodes))
            result = cache.relabel_cached(source, match, episodes, score_fn, model.device, on_progress)
        elif hdf5:
            identity = run_identity(request.source, stamp, layout, image_key, request.align.value,
                                    config_dict(config), request.model, request.pretrained, model.describe())
            numerics = run_numerics(device)
            steps = [e.steps for e in episodes]
            bounds = np.concatenate([[0], np.cumsum(steps, dtype=np.int64)]).tolist()
            lo, hi = plan(steps, shard.count)[shard.index] if shard else (0, len(episodes))
            if shard and _shard_done(shard_result(work, shard), identity, numerics, on_note):
                return ShardSummary(shard, shard_result(work, shard), hi - lo, bounds[hi] - bounds[lo], 0.0, True)
            checkpoint = Checkpoint(work / (f"{shard.name}.progress" if shard else "progress"),
                                    identity, numerics, len(goals), on_note)
            scored = score_span(
                source, FrameScorer(model, goals, score_fn), episodes,
                lambda size: grid_span(bounds[lo], bounds[hi], size, bounds[-1]),
                batch_size, checkpoint, stop, request.restart, request.checkpoint_every,
                on_start, on_progress, on_note)
            raw = [scored.scores[bounds[i] - scored.start:bounds[i + 1] - scored.start] for i in range(lo, hi)]
            if shard:
                source.close()
                meta = {"identity": identity, "numerics": numerics, "batch_size": scored.batch_size,
                        "config": config_dict(config), "logit_scale": model.logit_scale,
                        "base_attrs": base_attrs(request.align, image_key, False, model.describe()),
                        "align": request.align.value}
                path = shard_result(work, shard)
                write_result(path, np.concatenate(raw) if raw else np.empty((0, len(goals)), np.float32),
                             [e.name for e in episodes[lo:hi]], steps[lo:hi], meta)
                checkpoint.discard()
                return ShardSummary(shard, path, hi - lo, bounds[hi] - bounds[lo], scored.seconds, False)
            result = RelabelResult(episodes, raw, bounds[-1], scored.seconds, scored.resumed)
        else:
            if on_start is not None:
                on_start(sum(e.steps for e in episodes))
            result = relabel(source, model, goals, request.align, batch_size, on_progress, score_fn=score_fn,
                              episodes=episodes)
        source.close()

        used_cache = isinstance(match, cache.CacheMatch)
        final = config.postprocess(result.rewards)
        provenance = reward_provenance(config, result.rewards, final, names, raw_names, model.logit_scale,
                                       base_attrs(request.align, image_key, used_cache, model.describe()))
        if hdf5:
            written = write_rewards(request.source, request.output,
                                    hdf5_datasets(provenance, result.episodes, targets),
                                    request.overwrite, stamp)
            if not used_cache:
                checkpoint.discard()
                _remove_if_empty(work)
        else:
            columns = [table_writer.RewardColumn(name, np.concatenate(values)[:, goal_index], attrs)
                       for goal_index, name, values, attrs in provenance]
            written = _write_table(source, destination, columns, request.push_to_hub)
    result.rewards = final
    note = "using cached embeddings" if used_cache else str(match)
    return RelabelSummary(result, written, names, goals, model, layout, image_key, used_cache, note, raw_names)


def config_dict(config: RewardConfig) -> dict[str, Any]:
    """The reward configuration as plain JSON values (for fingerprints and shard results)."""
    return {f.name: (value.value if isinstance(value, enum.Enum) else value)
            for f in dataclasses.fields(config) for value in [getattr(config, f.name)]}


def base_attrs(align: Align, image_key: str, used_cache: bool, model_attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes every written reward records besides its formulation."""
    return {"align": align.value, "image_key": image_key, "embeddings": "cache" if used_cache else "frames",
            "vlmlabel_version": __version__, **model_attrs}


def reward_provenance(config: RewardConfig, raw: list[np.ndarray], final: list[np.ndarray], names: list[str],
                      raw_names: list[str], logit_scale: float, common: dict[str, Any]) -> list[tuple]:
    """(goal index, name, per-episode values, attrs) of every reward column to write, raw ones included."""
    provenance = []
    for goal_index in range(len(config.goals)):
        attrs = {**config.attrs(goal_index, logit_scale), **common}
        columns = [(names[goal_index], final, attrs)]
        if raw_names:
            raw_attrs = {**attrs, "formula": attrs["formula"].split(" -> ")[0], "raw_of": names[goal_index]}
            columns.append((raw_names[goal_index], raw, raw_attrs))
            attrs["raw_key"] = raw_names[goal_index]
        provenance.extend((goal_index, *column) for column in columns)
    return provenance


def hdf5_datasets(provenance: list[tuple], episodes, targets: list[str]) -> list[RewardDataset]:
    return [RewardDataset(reward_path(target, name), _column(episodes, values, goal_index, target), attrs)
            for goal_index, name, values, attrs in provenance for target in targets]


def _shard_done(path: Path, identity: dict[str, Any], numerics: dict[str, str],
                on_note: Callable[[str], None] | None) -> bool:
    """Whether this shard's result is already there from the same options (a requeued array task)."""
    if not path.exists():
        return False
    try:
        meta = read_result(path).meta
    except VlmlabelError:
        meta = {}
    if meta.get("identity") == identity and meta.get("numerics") == numerics:
        if on_note is not None:
            on_note(f"{path.name} is already done with the same options; nothing to compute")
        return True
    if on_note is not None:
        on_note(f"{path} was made with other options; computing it again")
    return False


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _column(episodes, values, goal_index: int, target: str) -> np.ndarray:
    """One goal's rewards for the episodes written under ``target``, in episode order."""
    return np.concatenate([v[:, goal_index] for e, v in zip(episodes, values) if e.target == target])


def _write_table(source, destination: Path, columns: list[table_writer.RewardColumn], push_to_hub: str | None) -> Path:
    """The writer that keeps the source's own format: LeRobot, save_to_disk/Hub, parquet, or a sidecar."""
    if source.kind == "lerobot":
        from vlmlabel.writers.lerobot import write_lerobot

        written = write_lerobot(source, destination, columns)
    elif source.kind == "stream":
        from vlmlabel.writers.sidecar import write_sidecar

        written = write_sidecar(source, destination, columns)
    else:
        written = table_writer.write_dataset(source, destination, columns)
    if push_to_hub:
        from vlmlabel.writers.hub import push

        push(written, source.kind, push_to_hub)
    return written


def embed_file(request: EmbedRequest, on_start: Callable[[int], None] | None = None,
               on_progress: Callable[[int], None] | None = None) -> EmbedSummary:
    """Store every frame's unit image embedding beside the frames (safe write, like rewards)."""
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    batch_size = _batch_size(request.batch_size, device)
    with open_source(str(request.source), request.image_key) as source:
        stamp = SourceStamp.of(request.source)
        if not stores_embeddings(source):
            raise VlmlabelError(f"{request.source}: this kind of dataset cannot hold an embedding cache yet")
        plans = cache.plan(source)
        locations = [source.embedding_location(p.array) for p in plans]
        check_writable(request.source, request.output, [], request.overwrite)
        model = load_model(request.model, request.pretrained, device, precision)
        segments = [s for p in plans for s in p.segments]
        total = sum(len(s) for s in segments)
        if on_start is not None:
            on_start(total)
        start = time.perf_counter()
        # Embeddings are computed while the copy is written, so memory stays at one batch.
        blocks = embed_segments(source, model, segments, batch_size, on_progress)
        indices, stream = cache.cache_stream(source, plans, blocks, model, source.image_key)
        stale_rows = [loc + EMBEDDING_ROWS_SUFFIX for p, loc in zip(plans, locations) if p.dense]
        written = write_rewards(request.source, request.output, indices, True, stamp, remove=stale_rows,
                                stream=stream)
        seconds = time.perf_counter() - start
        image_key = source.image_key
    return EmbedSummary(written, locations, total, stream.width, seconds, model, image_key)
