"""`relabel` as a library call: open the source, check the write can happen, score, write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vlmlabel import __version__
from vlmlabel.device import default_batch_size, resolve_device, resolve_precision
from vlmlabel.engine import RelabelResult, relabel
from vlmlabel.errors import VlmlabelError
from vlmlabel.model import DEFAULT_MODEL, ClipModel, load_model
from vlmlabel.rewards import COSINE_FORMULA
from vlmlabel.sources import Align, HDF5Source, open_source
from vlmlabel.sources.base import reward_path
from vlmlabel.writers import tables as table_writer
from vlmlabel.writers.hdf5 import RewardDataset, SourceStamp, check_writable, write_rewards

DEFAULT_REWARD_KEY = "vlm_reward"


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


@dataclass
class RelabelSummary:
    result: RelabelResult
    written_to: Path
    reward_names: list[str]
    goals: list[str]
    model: ClipModel
    layout: str
    image_key: str


def reward_names(key: str, goal_count: int) -> list[str]:
    """NAME for one goal; NAME_0, NAME_1, ... for several."""
    return [key] if goal_count == 1 else [f"{key}_{i}" for i in range(goal_count)]


def validate_goals(goals: list[str]) -> list[str]:
    cleaned = [g.strip() for g in goals]
    if not cleaned:
        raise VlmlabelError("no goal given; pass --goal \"describe the goal in words\"")
    if any(not g for g in cleaned):
        raise VlmlabelError("--goal is empty; describe the goal in words, e.g. --goal \"the drawer is open\"")
    return cleaned


def relabel_file(request: RelabelRequest, on_start: Callable[[int], None] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> RelabelSummary:
    """Score every step and write the rewards; the source is only read until the final atomic write."""
    goals = validate_goals(request.goals)
    if not request.reward_key.strip() or "/" in request.reward_key:
        raise VlmlabelError(f"--reward-key {request.reward_key!r} must be a non-empty name without '/'")
    names = reward_names(request.reward_key, len(goals))
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    if request.batch_size is not None and request.batch_size < 1:
        raise VlmlabelError(f"--batch-size must be at least 1, not {request.batch_size}")
    batch_size = request.batch_size or default_batch_size(device)

    with open_source(str(request.source), request.image_key, request.split, request.revision,
                     request.streaming) as source:
        episodes = source.episodes(request.align)
        targets = sorted({e.target for e in episodes})
        if isinstance(source, HDF5Source):
            if request.push_to_hub:
                raise VlmlabelError("--push-to-hub works for Hugging Face and LeRobot datasets, not HDF5 files")
            stamp = SourceStamp.of(request.source)
            planned = [reward_path(t, n) for t in targets for n in names]
            check_writable(request.source, request.output, source.existing(planned), request.overwrite)
        else:
            destination = table_writer.check_output(source, request.output, names, request.overwrite)
        model = load_model(request.model, request.pretrained, device, precision)
        if on_start is not None:
            on_start(sum(e.steps for e in episodes))
        result = relabel(source, model, goals, request.align, batch_size, on_progress)
        layout, image_key = source.layout, source.image_key

    provenance = [{"goal": goal, "formula": COSINE_FORMULA, "align": request.align.value, "image_key": image_key,
                   "vlmlabel_version": __version__, **model.describe()} for goal in goals]
    if not isinstance(source, HDF5Source):
        values = result.all_rewards()
        columns = [table_writer.RewardColumn(name, values[:, i], attrs)
                   for i, (name, attrs) in enumerate(zip(names, provenance))]
        written = _write_table(source, destination, columns, request.push_to_hub)
        return RelabelSummary(result, written, names, goals, model, layout, image_key)
    datasets = []
    for goal_index, (name, attrs) in enumerate(zip(names, provenance)):
        for target in targets:
            values = np.concatenate([r[:, goal_index] for e, r in zip(result.episodes, result.rewards)
                                     if e.target == target])
            datasets.append(RewardDataset(reward_path(target, name), values, attrs))
    written = write_rewards(request.source, request.output, datasets, request.overwrite, stamp)
    return RelabelSummary(result, written, names, goals, model, layout, image_key)


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
