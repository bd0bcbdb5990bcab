"""Split a file into shards of whole episodes, and store each shard's rewards for a later merge.

Shards are contiguous runs of episodes balanced by frame count, so each shard's frames are
one range of the file's frame order and can be scored on the same batch grid as a single
run (see ``resumable``): merged shards equal a single run bit for bit. A shard never writes
the shared output; it writes ``shard-I-of-N.npz`` into the run's work folder beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmlabel.destinations import atomic
from vlmlabel.errors import VlmlabelError

_SHARD_FILE = re.compile(r"shard-(\d+)-of-(\d+)\.npz")


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` (0-based) of ``count``, and where that choice came from (for messages)."""

    index: int
    count: int
    origin: str = "--num-shards/--shard-index"

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


def work_dir(dest: Path, reward_key: str) -> Path:
    """Folder beside the destination holding one reward key's progress and shard results."""
    target = atomic.real_target(dest)
    return target.parent / f"{target.name}.vlmlabel-{reward_key}"


def dest_lock(dest: Path) -> Path:
    target = atomic.real_target(dest)
    return target.parent / f"{target.name}.vlmlabel.lock"


def shard_result(work: Path, shard: ShardSpec) -> Path:
    return work / f"{shard.name}.npz"


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise VlmlabelError(f"environment variable {name}={value!r} is not an integer") from None


def shard_from_options(num_shards: int | None, shard_index: int | None,
                       env: Mapping[str, str] = os.environ) -> ShardSpec | None:
    """The shard this run takes: from the options, else from a SLURM job array; None for the whole file."""
    if num_shards is None and shard_index is None:
        count = _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        task = _int_env(env, "SLURM_ARRAY_TASK_ID")
        if count is None or task is None or count <= 1:
            return None
        low = _int_env(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int_env(env, "SLURM_ARRAY_TASK_STEP") or 1
        index, rest = divmod(task - low, step)
        if rest or not 0 <= index < count:
            raise VlmlabelError(f"cannot derive a shard from SLURM_ARRAY_TASK_ID={task} (min {low}, step {step}, "
                                f"count {count}); pass --num-shards N --shard-index I explicitly")
        return ShardSpec(index, count, f"SLURM array task {task}")
    if num_shards is None or shard_index is None:
        raise VlmlabelError("--num-shards and --shard-index go together; give both (or neither)")
    if num_shards < 1:
        raise VlmlabelError(f"--num-shards must be at least 1, not {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise VlmlabelError(f"--shard-index must be in 0..{num_shards - 1}, not {shard_index}")
    return None if num_shards == 1 else ShardSpec(shard_index, num_shards)


def plan(steps: list[int], count: int) -> list[tuple[int, int]]:
    """Episode index ranges [lo, hi) of ``count`` contiguous shards with balanced frame counts.

    Boundary k sits at the episode boundary nearest to k/count of all frames (ties: the earlier),
    so the plan depends only on the episode lengths.
    """
    cumulative = np.concatenate([[0], np.cumsum(steps, dtype=np.int64)])
    total = int(cumulative[-1])
    bounds = [0]
    for k in range(1, count):
        # |count * C[j] - k * total| in integers, minimised over boundaries at or after the previous one.
        candidates = np.arange(bounds[-1], len(cumulative))
        error = np.abs(count * cumulative[candidates] - k * total)
        bounds.append(int(candidates[np.argmin(error)]))
    bounds.append(len(steps))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass(frozen=True)
class PartMeta:
    """How a shard's rewards were made: merge refuses parts that disagree, and commits with these attributes."""

    identity: dict[str, Any]  # everything that determines the rewards (compared field by field)
    numerics: dict[str, str]  # what changes only their last bits (device, torch)
    batch_size: int
    config: dict[str, Any]  # RewardConfig.to_json()
    logit_scale: float
    base_attrs: dict[str, Any]
    align: str
    cameras: list[str]  # image keys, in the order of the score columns
    camera_reduce: str
    result_id: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PartMeta:
        return cls(**json.loads(text))


@dataclass
class ShardResult:
    path: Path
    index: int
    count: int
    rewards: np.ndarray
    names: list[str]
    steps: list[int]
    meta: PartMeta


def write_result(path: Path, rewards: np.ndarray, names: list[str], steps: list[int], meta: PartMeta) -> None:
    """Write a shard's rewards atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.staged(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, rewards=np.asarray(rewards, dtype=np.float32), names=np.array(names, dtype=str),
                 steps=np.asarray(steps, dtype=np.int64), meta=np.array(meta.to_json()))


def read_result(path: Path) -> ShardResult:
    match = _SHARD_FILE.fullmatch(path.name)
    if match is None:
        raise VlmlabelError(f"{path} is not a shard result (shard-I-of-N.npz)")
    try:
        with np.load(path, allow_pickle=False) as data:
            rewards, names, steps = data["rewards"], [str(n) for n in data["names"]], data["steps"].tolist()
            meta = PartMeta.from_json(str(data["meta"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VlmlabelError(f"shard result {path} is unreadable ({exc}); run that shard again") from None
    return ShardResult(path, int(match.group(1)), int(match.group(2)), rewards, names, steps, meta)


def _shard_numbers(path: Path) -> tuple[int, ...]:
    match = _SHARD_FILE.fullmatch(path.name)
    assert match is not None  # only shard result files are sorted
    return tuple(int(x) for x in match.groups())


def list_results(work: Path) -> list[Path]:
    if not work.is_dir():
        return []
    return sorted((p for p in work.iterdir() if _SHARD_FILE.fullmatch(p.name)), key=_shard_numbers)
