"""`vlmlabel merge`: gather the parts of a sharded run, then the same commit as a single run.

Merging refuses unless every episode is covered exactly once, by parts made with the same options
from the same, unchanged source; the write is the destination's one atomic write, with the same
attributes a single run records.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmlabel.destinations import Stamp, destination_for, destination_path
from vlmlabel.destinations.base import RESULT_ATTR
from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import RewardConfig
from vlmlabel.rewards import CameraReduce
from vlmlabel.run.cameras import Cameras
from vlmlabel.run.checkpoint import differences
from vlmlabel.run.interrupt import deferred, pause_at, stoppable
from vlmlabel.run.lifecycle import DEFAULT_REWARD_KEY, RAW_SUFFIX, FinishedSummary, commit, reward_names
from vlmlabel.run.locking import RunLock, describe_holder, holder_alive, read_holder
from vlmlabel.run.shards import ShardResult, dest_lock, list_results, read_result, work_dir
from vlmlabel.sources import Align, open_any_camera
from vlmlabel.sources.base import Episode


@dataclass
class MergeSummary:
    written_to: Path
    shards: int
    episodes: int
    frames: int
    reward_names: list[str]
    goals: list[str]
    rewards: np.ndarray  # all rows, episode order


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
    first = results[0].meta
    for other in results[1:]:
        changed = differences(first.identity, other.meta.identity) + differences(first.numerics, other.meta.numerics)
        if changed:
            raise VlmlabelError(f"shard {other.index} was made with other options than shard {results[0].index} "
                                f"({', '.join(changed)} differ); run the shards again with the same options")
        if other.meta.batch_size != first.batch_size:
            raise VlmlabelError(f"shard {other.index} used --batch-size {other.meta.batch_size} but shard "
                                f"{results[0].index} used {first.batch_size}; the rewards would not equal a "
                                "single run bit for bit — run the shards again with one --batch-size")


@stoppable()
def merge_shards(source: Path | str, reward_key: str = DEFAULT_REWARD_KEY, output: Path | None = None,
                 overwrite: bool = False, on_note: Callable[[str], None] | None = None,
                 count: int | None = None, image_key: str | None = None, split: str = "train",
                 revision: str | None = None, link: bool = False) -> MergeSummary | FinishedSummary:
    """Verify the parts cover the dataset exactly once with one configuration, then commit them.

    ``count`` (torchrun: the world size) ignores parts left by an earlier split into another number of shards.
    Without parts, rewards already merged (a requeued merge job) are reported as done. SIGINT and SIGTERM stop
    it with the parts kept, or once the write is in place with the parts removed (``run.interrupt``).
    """
    with open_any_camera(str(source), image_key, split, revision) as opened:
        dest = destination_path(opened, output)
        work = work_dir(dest, reward_key)
        paths = [p for p in list_results(work) if count is None or p.name.endswith(f"-of-{count}.npz")]
        if not paths:
            merged = destination_for(opened, output, opened.episodes(Align.frame)).written(
                [reward_key, f"{reward_key}_0"])
            done = [name for name, present in merged.items() if RESULT_ATTR in present.attrs]
            if done:
                if on_note is not None:
                    on_note(f"{done[0]} is already merged into {dest}; nothing to do")
                return FinishedSummary(dest, done)
            raise VlmlabelError(f"no shard results in {work}; run `vlmlabel relabel ... --num-shards N --shard-index "
                                "I` for every shard first (same SOURCE, --image-key, --reward-key and --output)")
        with RunLock(dest_lock(dest), str(dest), on_note):
            pause_at("open")
            results = [read_result(p) for p in paths]
            _check_complete(results, work)
            meta = results[0].meta
            if image_key is not None and opened.image_key not in meta.cameras:
                raise VlmlabelError(f"the shards read frames from {', '.join(meta.cameras)}, not "
                                    f"{opened.image_key!r}; merge with --image-key {meta.cameras[0]}")
            if Stamp.of(opened.paths).as_json() != meta.identity["stamp"]:
                raise VlmlabelError(f"the shards were computed from {meta.identity['source']} as it was before; "
                                    f"{source} is another dataset or has changed since — run the shards again")
            config = RewardConfig.from_json(meta.config)
            names = reward_names(reward_key, len(config.goals))
            raw_names = [f"{n}{RAW_SUFFIX}" for n in names] if config.keeps_raw else []
            episodes = opened.episodes(Align(meta.align))
            raw = _gather(episodes, results)
            destination = destination_for(opened, output, episodes, link)
            cameras = Cameras(tuple(meta.cameras), CameraReduce(meta.camera_reduce))
            destination.check(names + raw_names + cameras.column_names(names), overwrite)
            opened.close()  # read: an HDF5 file nobody holds open takes its rewards in place, without a copy
            written, final = commit(destination, config, raw, names, raw_names, meta.logit_scale, meta.base_attrs,
                                    overwrite, cameras)
            with deferred():  # the parts are written: removed whole, never half
                shutil.rmtree(work, ignore_errors=True)
    return MergeSummary(written, len(results), len(episodes), sum(e.steps for e in episodes), names, config.goals,
                        np.concatenate(final))


def _gather(episodes: list[Episode], results: list[ShardResult]) -> list[np.ndarray]:
    """Each episode's rewards from the one shard that covers it; refuse gaps, overlaps and strangers."""
    found: dict[str, tuple[int, np.ndarray]] = {}
    for result in results:
        offsets = np.concatenate([[0], np.cumsum(result.steps, dtype=np.int64)])
        for name, lo, hi in zip(result.names, offsets[:-1], offsets[1:], strict=True):
            if name in found:
                raise VlmlabelError(f"episode {name!r} is covered by shards {found[name][0]} and {result.index}; "
                                    "remove the stale shard files and run the shards again")
            found[name] = (result.index, result.rewards[lo:hi])
    known = {e.name for e in episodes}
    strangers = sorted(set(found) - known)
    if strangers:
        raise VlmlabelError(f"shard results name episodes the dataset does not have ({', '.join(strangers[:3])}); "
                            "they were made from another dataset")
    missing = [e.name for e in episodes if e.name not in found]
    if missing:
        raise VlmlabelError(f"{len(missing)} episode(s) are in no shard result (first: {missing[0]!r}); "
                            "run the shards again")
    for episode in episodes:
        if len(found[episode.name][1]) != episode.steps:
            raise VlmlabelError(f"shard {found[episode.name][0]} has {len(found[episode.name][1])} rewards for "
                                f"{episode.name!r}, which has {episode.steps} steps; run that shard again")
    return [found[e.name][1] for e in episodes]
