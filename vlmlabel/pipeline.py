"""`relabel` as a library call: open the source, check the write can happen, score, write."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from vlmlabel import __version__
from vlmlabel.device import default_batch_size, resolve_device, resolve_precision
from vlmlabel import cache
from vlmlabel.engine import RelabelResult, embed_segments, relabel
from vlmlabel.errors import VlmlabelError
from vlmlabel.model import DEFAULT_MODEL, ClipModel, load_model
from vlmlabel.formulation import RewardConfig, build_score_fn
from vlmlabel.sources import Align, HDF5Source, open_source
from vlmlabel.sources.base import reward_path, stores_embeddings
from vlmlabel.sources.hdf5 import EMBEDDING_ROWS_SUFFIX
from vlmlabel.writers import tables as table_writer
from vlmlabel.writers.hdf5 import RewardDataset, SourceStamp, check_writable, write_rewards

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
                 on_progress: Callable[[int], None] | None = None) -> RelabelSummary:
    """Score every step and write the rewards; the source is only read until the final atomic write."""
    config = request.reward_config()
    goals = config.goals
    if not request.reward_key.strip() or "/" in request.reward_key:
        raise VlmlabelError(f"--reward-key {request.reward_key!r} must be a non-empty name without '/'")
    names = reward_names(request.reward_key, len(goals))
    raw_names = [f"{n}{RAW_SUFFIX}" for n in names] if config.keeps_raw else []
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    batch_size = _batch_size(request.batch_size, device)

    with open_source(str(request.source), request.image_key, request.split, request.revision,
                     request.streaming) as source:
        episodes = source.episodes(request.align)
        targets = sorted({e.target for e in episodes})
        if isinstance(source, HDF5Source):
            if request.push_to_hub:
                raise VlmlabelError("--push-to-hub works for Hugging Face and LeRobot datasets, not HDF5 files")
            stamp = SourceStamp.of(request.source)
            planned = [reward_path(t, n) for t in targets for n in names + raw_names]
            check_writable(request.source, request.output, source.existing(planned), request.overwrite)
        else:
            destination = table_writer.check_output(source, request.output, names + raw_names, request.overwrite)
        model = load_model(request.model, request.pretrained, device, precision)
        score_fn = build_score_fn(config, model.encode_texts, model.logit_scale)
        match = cache.find(source, episodes, model, source.image_key) if request.use_cache else "--no-cache"
        if on_start is not None:
            on_start(sum(e.steps for e in episodes))
        if isinstance(match, cache.CacheMatch):
            result = cache.relabel_cached(source, match, episodes, score_fn, model.device, on_progress)
        else:
            result = relabel(source, model, goals, request.align, batch_size, on_progress, score_fn=score_fn)
        layout, image_key = source.layout, source.image_key

    used_cache = isinstance(match, cache.CacheMatch)
    final = config.postprocess(result.rewards)
    provenance = []
    for goal_index in range(len(goals)):
        attrs = {
            **config.attrs(goal_index, model.logit_scale),
            "align": request.align.value,
            "image_key": image_key,
            "embeddings": "cache" if used_cache else "frames",
            "vlmlabel_version": __version__,
            **model.describe(),
        }
        columns = [(names[goal_index], final, attrs)]
        if raw_names:
            raw_attrs = {**attrs, "formula": attrs["formula"].split(" -> ")[0], "raw_of": names[goal_index]}
            columns.append((raw_names[goal_index], result.rewards, raw_attrs))
            attrs["raw_key"] = raw_names[goal_index]
        provenance.extend((goal_index, *column) for column in columns)
    if isinstance(source, HDF5Source):
        datasets = [RewardDataset(reward_path(target, name), _column(result.episodes, values, goal_index, target),
                                  attrs)
                    for goal_index, name, values, attrs in provenance for target in targets]
        written = write_rewards(request.source, request.output, datasets, request.overwrite, stamp)
    else:
        columns = [table_writer.RewardColumn(name, np.concatenate(values)[:, goal_index], attrs)
                   for goal_index, name, values, attrs in provenance]
        written = _write_table(source, destination, columns, request.push_to_hub)
    result.rewards = final
    note = "using cached embeddings" if used_cache else str(match)
    return RelabelSummary(result, written, names, goals, model, layout, image_key, used_cache, note, raw_names)


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
