"""`vlmlabel merge`: gather shard results and perform the one final write.

Merging refuses unless every episode of the file is covered exactly once, by shards made
with the same options from the same, unchanged source; the write itself goes through the
same copy-fsync-rename path as a single run, with the same attributes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vlmlabel.checkpoint import differences
from vlmlabel.errors import VlmlabelError
from vlmlabel.locking import RunLock, describe_holder, holder_alive, read_holder
from vlmlabel.formulation import RewardConfig
from vlmlabel.pipeline import DEFAULT_REWARD_KEY, RAW_SUFFIX, hdf5_datasets, reward_names, reward_provenance
from vlmlabel.rewards import Normalize, RewardMode, Shaping
from vlmlabel.shards import ShardResult, dest_lock, list_results, read_result, work_dir
from vlmlabel.sources import Align, open_source
from vlmlabel.sources.base import reward_path
from vlmlabel.writers.hdf5 import SourceStamp, check_writable, destination, write_rewards


@dataclass
class MergeSummary:
    written_to: Path
    shards: int
    episodes: int
    frames: int
    reward_names: list[str]
    goals: list[str]
    rewards: np.ndarray  # all rows, file order


def _shard_list(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)


def _check_complete(results: list[ShardResult], work: Path) -> None:
    counts = sorted({r.count for r in results})
    if len(counts) > 1:
        raise VlmlabelError(f"{work} holds results of different splits ({', '.join(f'of {c}' for c in counts)}); "
                            "remove the stale shard files and merge again")
    count = counts[0]
    missing = sorted(set(range(count)) - {r.index for r in results})
    if missing:
        raise VlmlabelError(f"missing shard(s) {_shard_list(missing)} of {count} (no "
                            f"{work / f'shard-{missing[0]}-of-{count}.npz'}); run them with --num-shards {count} "
                            f"--shard-index {missing[0] if len(missing) == 1 else 'I'} and merge again")
    for index in range(count):
        holder = read_holder(work / f"shard-{index}-of-{count}.lock")
        if holder is not None and holder_alive(holder):
            raise VlmlabelError(f"shard {index} of {count} is still running ({describe_holder(holder)}); "
                                "merge when it has finished")
    first = results[0]
    for other in results[1:]:
        for part in ("identity", "numerics"):
            changed = differences(first.meta.get(part, {}), other.meta.get(part, {}))
            if changed:
                raise VlmlabelError(f"shard {other.index} was made with other options than shard {first.index} "
                                    f"({', '.join(changed)} differ); run the shards again with the same options")
        if other.meta.get("batch_size") != first.meta.get("batch_size"):
            raise VlmlabelError(f"shard {other.index} used --batch-size {other.meta.get('batch_size')} but shard "
                                f"{first.index} used {first.meta.get('batch_size')}; the rewards would not equal a "
                                "single run bit for bit — run the shards again with one --batch-size")


def merge_shards(source: Path, reward_key: str = DEFAULT_REWARD_KEY, output: Path | None = None,
                 overwrite: bool = False, on_note: Callable[[str], None] | None = None,
                 count: int | None = None) -> MergeSummary:
    """Verify the shard results cover the file exactly once with one configuration, then write them.

    ``count`` (torchrun: the world size) ignores results left by an earlier split into another number of shards.
    """
    dest = destination(source, output)
    work = work_dir(dest, reward_key)
    paths = [p for p in list_results(work) if count is None or p.name.endswith(f"-of-{count}.npz")]
    if not paths:
        raise VlmlabelError(f"no shard results in {work}; run `vlmlabel relabel ... --num-shards N --shard-index I` "
                            "for every shard first (same --reward-key and --output)")
    with RunLock(dest_lock(dest), str(dest), on_note):
        results = [read_result(p) for p in paths]
        _check_complete(results, work)
        meta = results[0].meta
        identity = meta["identity"]
        if not source.exists():
            raise VlmlabelError(f"{source} does not exist; check the path")
        stamp = SourceStamp.of(source)
        if (str(source.resolve()), stamp.size, stamp.mtime_ns) != (
                identity["source"], identity["source_size"], identity["source_mtime_ns"]):
            raise VlmlabelError(f"the shards were computed from {identity['source']} as it was before; {source} "
                                "is another file or has changed since — run the shards again")
        config = config_from_dict(meta["config"])
        goals = config.goals
        names = reward_names(reward_key, len(goals))
        raw_names = [f"{n}{RAW_SUFFIX}" for n in names] if config.keeps_raw else []
        with open_source(str(source), identity["image_key"]) as opened:
            episodes = opened.episodes(Align(meta["align"]))
            targets = sorted({e.target for e in episodes})
            existing = opened.existing([reward_path(t, n) for t in targets for n in names + raw_names])
        raw = _gather(episodes, results)
        check_writable(source, output, existing, overwrite)
        final = config.postprocess(raw)
        provenance = reward_provenance(config, raw, final, names, raw_names, meta["logit_scale"], meta["base_attrs"])
        written = write_rewards(source, output, hdf5_datasets(provenance, episodes, targets), overwrite, stamp)
        shutil.rmtree(work, ignore_errors=True)
    return MergeSummary(written, len(results), len(episodes), sum(e.steps for e in episodes), names, goals,
                        np.concatenate(final))


def config_from_dict(values: dict) -> RewardConfig:
    """The reward configuration a shard recorded (the inverse of ``pipeline.config_dict``)."""
    enums = {"mode": RewardMode, "shaping": Shaping, "normalize": Normalize}
    return RewardConfig(**{k: enums[k](v) if k in enums else v for k, v in values.items()})


def _gather(episodes: list, results: list[ShardResult]) -> list[np.ndarray]:
    """Each episode's rewards from the one shard that covers it; refuse gaps, overlaps and strangers."""
    found: dict[str, tuple[int, np.ndarray]] = {}
    for result in results:
        offsets = np.concatenate([[0], np.cumsum(result.steps, dtype=np.int64)])
        for name, lo, hi in zip(result.names, offsets[:-1], offsets[1:]):
            if name in found:
                raise VlmlabelError(f"episode {name!r} is covered by shards {found[name][0]} and {result.index}; "
                                    "remove the stale shard files and run the shards again")
            found[name] = (result.index, result.rewards[lo:hi])
    known = {e.name for e in episodes}
    strangers = sorted(set(found) - known)
    if strangers:
        raise VlmlabelError(f"shard results name episodes the file does not have ({', '.join(strangers[:3])}); "
                            "they were made from another file")
    missing = [e.name for e in episodes if e.name not in found]
    if missing:
        raise VlmlabelError(f"{len(missing)} episode(s) are in no shard result (first: {missing[0]!r}); "
                            "run the shards again")
    for episode in episodes:
        if len(found[episode.name][1]) != episode.steps:
            raise VlmlabelError(f"shard {found[episode.name][0]} has {len(found[episode.name][1])} rewards for "
                                f"{episode.name!r}, which has {episode.steps} steps; run that shard again")
    return [found[e.name][1] for e in episodes]
