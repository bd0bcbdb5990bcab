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

from vlmlabel.errors import VlmlabelError
from vlmlabel.files import atomic

_SHARD_FILE = re.compile(r"shard-(\d+)-of-(\d+)\.npz")
# Everything a shard leaves in the work folder: its part, its saved progress (one folder per camera), its lock.
_SHARD_TRACE = re.compile(r"shard-(\d+)-of-(\d+)\.(npz|lock|progress(-cam\d+)?)")
_ARRAY_VARS = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_ARRAY_JOB_ID",
)


@dataclass(frozen=True)
class ArrayNumbering:
    """How a SLURM job array numbers its shards: task ``first + step * i`` scores shard i of ``count``.

    Saved with each part a task of the array makes, so that a task resubmitted alone (whose variables no
    longer describe the whole array) finds its shard."""

    first: int
    step: int
    count: int
    job: str = ""  # SLURM_ARRAY_JOB_ID, for messages

    def index_of(self, task: int) -> int | None:
        index, rest = divmod(task - self.first, self.step)
        return index if rest == 0 and 0 <= index < self.count else None

    def describe(self) -> str:
        last = self.first + self.step * (self.count - 1)
        tasks = f"tasks {self.first}-{last}" + (f":{self.step}" if self.step != 1 else "")
        return f"array job {self.job} ({tasks})" if self.job else f"a SLURM array of {tasks}"


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` (0-based) of ``count``, and where that choice came from (every message names it).

    ``numbering``: the SLURM job array whose task this shard is, kept with the part it makes."""

    index: int
    count: int
    origin: str = "--num-shards/--shard-index"
    numbering: ArrayNumbering | None = None

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


def shard_from_options(num_shards: int | None, shard_index: int | None) -> ShardSpec | None:
    """The shard ``--num-shards N --shard-index I`` ask for; None for the whole dataset.

    ``--num-shards 1`` (``--shard-index 0`` may be added) is the whole dataset in one run that writes the rewards
    itself, inside a SLURM job array too."""
    if num_shards is None:
        if shard_index is not None:
            raise VlmlabelError(f"--shard-index {shard_index} needs --num-shards N, the number of shards it is one of")
        return None
    if num_shards < 1:
        raise VlmlabelError(f"--num-shards must be at least 1, not {num_shards}")
    if num_shards == 1 and shard_index in (None, 0):
        return None
    if shard_index is None:
        raise VlmlabelError(
            f"--num-shards {num_shards} needs --shard-index I (0..{num_shards - 1}): which shard "
            "this run scores (--num-shards 1 scores the whole dataset)"
        )
    if not 0 <= shard_index < num_shards:
        raise VlmlabelError(f"--shard-index must be in 0..{num_shards - 1}, not {shard_index}")
    return ShardSpec(shard_index, num_shards, f"--num-shards {num_shards} --shard-index {shard_index}")


@dataclass(frozen=True)
class SlurmArrayTask:
    """This process's task of a SLURM job array, as its SLURM_ARRAY_* variables describe it.

    ``numbering`` is None when they cannot say how many shards the job has: a single task (``sbatch --array=5``,
    a task resubmitted alone), an irregular list of tasks (``--array=2,5``), or variables missing. The shard is
    then taken from what earlier tasks saved in the work folder (``shard``), or refused."""

    task: int
    described: str  # the variables as set, for messages
    numbering: ArrayNumbering | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SlurmArrayTask | None:
        task = _int_env(env, "SLURM_ARRAY_TASK_ID")
        if task is None:
            return None
        count, first, last = (_int_env(env, f"SLURM_ARRAY_TASK_{k}") for k in ("COUNT", "MIN", "MAX"))
        step = _int_env(env, "SLURM_ARRAY_TASK_STEP") or 1
        described = ", ".join(f"{name}={env[name]}" for name in _ARRAY_VARS if env.get(name))
        numbering = None
        if (
            count is not None
            and count > 1
            and first is not None
            and step > 0
            and (last is None or last == first + step * (count - 1))
        ):  # a range, not a list of tasks
            numbering = ArrayNumbering(first, step, count, env.get("SLURM_ARRAY_JOB_ID", ""))
        return cls(task, described, numbering)

    def shard(self, work: Path) -> ShardSpec:
        """The shard this task scores: from the array's variables, checked against the shards saved in ``work``
        (parts, progress, locks: they fix the job's shard count); or, when the variables cannot say, from the
        count and numbering those shards record. Refused (one line) whenever the two disagree or neither says."""
        saved = saved_shards(work)
        if self.numbering is not None:
            return self._from_variables(self.numbering, saved, work)
        if not saved:
            raise VlmlabelError(
                f"{self.described}: these SLURM variables do not say how many shards the job has "
                f"(a task resubmitted alone?), and {work} holds no shard of an earlier run; pass "
                "--num-shards N --shard-index I (--num-shards 1 scores the whole dataset)"
            )
        if len(saved) > 1:
            found = " and ".join(f"{saved[c][0].name}" for c in sorted(saved))
            raise VlmlabelError(
                f"{self.described}: these SLURM variables do not say how many shards the job has, "
                f"and {work} holds shards of different splits ({found}); pass --num-shards N "
                "--shard-index I, or remove the stale shard files"
            )
        count = next(iter(saved))
        numbering = _saved_numbering(saved[count])
        advice = f"pass --num-shards {count} --shard-index I{_missing_note(work, count)}"
        if numbering is None:
            raise VlmlabelError(
                f"{self.described}: these SLURM variables do not say how many shards the job has; "
                f"{work} holds shards of {count} ({saved[count][0].name}) but not the numbering of "
                f"an array that made them; {advice}"
            )
        index = numbering.index_of(self.task)
        if index is None:
            raise VlmlabelError(
                f"SLURM_ARRAY_TASK_ID={self.task} is no task of {numbering.describe()}, whose "
                f"{count} shards {work} holds; {advice}"
            )
        return ShardSpec(
            index,
            count,
            f"SLURM array task {self.task} resubmitted alone ({self.described}), taken "
            f"as task {self.task} of {numbering.describe()} from {work}",
            numbering,
        )

    def _from_variables(self, numbering: ArrayNumbering, saved: dict[int, list[Path]], work: Path) -> ShardSpec:
        others = sorted(c for c in saved if c != numbering.count)
        if others:
            raise VlmlabelError(
                f"{self.described}: this SLURM array makes {numbering.count} shards, but {work} holds "
                f"shards of {others[0]} ({saved[others[0]][0].name}), left by an earlier split or "
                "the array this task resubmits part of; to rerun one of those pass --num-shards "
                f"{others[0]} --shard-index I, to split anew remove {work}"
            )
        index = numbering.index_of(self.task)
        if index is None:
            raise VlmlabelError(
                f"cannot derive a shard from {self.described}: task {self.task} is no task of "
                f"{numbering.describe()}; pass --num-shards N --shard-index I"
            )
        return ShardSpec(index, numbering.count, f"SLURM array task {self.task} ({self.described})", numbering)


def saved_shards(work: Path) -> dict[int, list[Path]]:
    """What shards left in ``work`` (parts, saved progress, locks), by the shard count in their names."""
    found: dict[int, list[Path]] = {}
    if work.is_dir():
        for path in sorted(work.iterdir()):
            match = _SHARD_TRACE.fullmatch(path.name)
            if match is not None:
                found.setdefault(int(match.group(2)), []).append(path)
    return found


def _saved_numbering(paths: list[Path]) -> ArrayNumbering | None:
    """The SLURM array numbering the parts among ``paths`` record: None unless they all agree (arrays resubmitted
    whole under new job ids number their tasks alike)."""
    metas = [part_meta(p) for p in paths if p.suffix == ".npz"]
    numberings = {(n.first, n.step, n.count): n for m in metas if m is not None and (n := m.numbering) is not None}
    return next(iter(numberings.values())) if len(numberings) == 1 else None


def _missing_note(work: Path, count: int) -> str:
    done = {index for index, of in map(_shard_numbers, list_results(work)) if of == count}
    missing = [str(i) for i in range(count) if i not in done]
    return f" (no part yet for shard(s) {', '.join(missing)})" if missing else ""


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
    numbering: ArrayNumbering | None = None  # the SLURM job array that made the part, if one did
    logit_bias: float | None = None  # the model's (a sigmoid-trained one), for --reward sigmoid's record

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PartMeta:
        fields = json.loads(text)
        numbering = fields.pop("numbering", None)
        return cls(**fields, numbering=ArrayNumbering(**numbering) if numbering is not None else None)


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
        np.savez(
            handle,
            rewards=np.asarray(rewards, dtype=np.float32),
            names=np.array(names, dtype=str),
            steps=np.asarray(steps, dtype=np.int64),
            meta=np.array(meta.to_json()),
        )


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


def part_meta(path: Path) -> PartMeta | None:
    """How the part at ``path`` was made (its rows are not read); None when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return PartMeta.from_json(str(data["meta"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shard_numbers(path: Path) -> tuple[int, ...]:
    match = _SHARD_FILE.fullmatch(path.name)
    assert match is not None  # only shard result files are sorted
    return tuple(int(x) for x in match.groups())


def list_results(work: Path) -> list[Path]:
    if not work.is_dir():
        return []
    return sorted((p for p in work.iterdir() if _SHARD_FILE.fullmatch(p.name)), key=_shard_numbers)
