"""`vlmlabel merge`: gather the parts of a sharded run, then the same commit as a single run.

Merging refuses unless every episode is covered exactly once, by parts made with the same options
from the same frames (their content fingerprint: rewards vlmlabel wrote into the file since do not
count); the write is the destination's one atomic write, with the same attributes a single run
records. A merge whose rewards are already written from these very parts (a requeued merge killed
before its cleanup) only removes the parts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmlabel.destinations import destination_for, destination_path
from vlmlabel.errors import VlmlabelError
from vlmlabel.events import QUIET, Events
from vlmlabel.files.interrupt import deferred, pause_at, stoppable
from vlmlabel.files.provenance import RESULT_ATTR
from vlmlabel.formulation import RewardConfig
from vlmlabel.rewards import CameraReduce
from vlmlabel.run.cameras import Cameras
from vlmlabel.run.checkpoint import differences, frame_differences
from vlmlabel.run.commit import CommitPlan, frames_fingerprint
from vlmlabel.run.locking import RunLock, describe_holder, holder_alive, read_holder
from vlmlabel.run.request import DEFAULT_REWARD_KEY, FinishedSummary
from vlmlabel.run.shards import PartMeta, ShardResult, dest_lock, list_results, read_result, saved_shards, work_dir
from vlmlabel.sources import Align, open_any_camera, open_source
from vlmlabel.sources.base import DatasetSource, Episode, content_fingerprint


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
        raise VlmlabelError(
            f"{work} holds results of different splits ({', '.join(f'of {c}' for c in counts)}); "
            "remove the stale shard files and merge again"
        )
    count = counts[0]
    missing = sorted(set(range(count)) - {r.index for r in results})
    if missing:
        raise VlmlabelError(
            f"missing shard(s) {_shard_list(missing)} of {count} (no "
            f"{work / f'shard-{missing[0]}-of-{count}.npz'}); run them with --num-shards {count} "
            f"--shard-index {missing[0] if len(missing) == 1 else 'I'} and merge again"
        )
    _refuse_running(work)
    first = results[0].meta
    for other in results[1:]:
        changed = frame_differences(first.identity, other.meta.identity) + differences(
            first.numerics, other.meta.numerics
        )
        if changed:
            raise VlmlabelError(
                f"shard {other.index} was made with other options than shard {results[0].index} "
                f"({', '.join(changed)} differ); run the shards again with the same options"
            )
        if other.meta.batch_size != first.batch_size:
            raise VlmlabelError(
                f"shard {other.index} used --batch-size {other.meta.batch_size} but shard "
                f"{results[0].index} used {first.batch_size}; the rewards would not equal a "
                "single run bit for bit — run the shards again with one --batch-size"
            )


def _refuse_running(work: Path) -> None:
    """A shard still running (its lock held by a live run) would be merged half done, or lose its part."""
    for paths in saved_shards(work).values():
        for lock in (p for p in paths if p.suffix == ".lock"):
            holder = read_holder(lock)
            if holder is not None and holder_alive(holder):
                raise VlmlabelError(
                    f"{lock.stem.replace('-', ' ')} is still running ({describe_holder(holder)}); "
                    "merge when it has finished"
                )


def _commit_plan(
    opened: DatasetSource,
    episodes: list[Episode],
    meta: PartMeta,
    reward_key: str,
    output: Path | None,
    link: bool,
    overwrite: bool,
) -> CommitPlan:
    """The commit a single run with the parts' options plans at open (``run.plan.open_run``), same destination."""
    destination = destination_for(opened, output, episodes, link)
    cameras = Cameras(tuple(meta.cameras), CameraReduce(meta.camera_reduce))
    return CommitPlan.of(destination, RewardConfig.from_json(meta.config), cameras, reward_key, overwrite)


def _already_merged(plan: CommitPlan, results: list[ShardResult]) -> bool:
    """Whether the destination holds every reward from these very parts (same result id): a merge killed between
    its write and its cleanup, requeued."""
    wanted = {r.meta.result_id for r in results}
    return len(wanted) == 1 and plan.held_in(plan.present(), wanted)


def _refuse_other_frames(
    source: Path | str, opened: DatasetSource, meta: PartMeta, split: str, revision: str | None
) -> None:
    """The parts were scored from the frames the source holds now (each camera's content fingerprint)."""
    fingerprints = []
    for key in meta.cameras:
        if key == opened.image_key:
            fingerprints.append(content_fingerprint(opened))
            continue
        with open_source(str(source), key, split, revision) as camera:
            fingerprints.append(content_fingerprint(camera))
    if frames_fingerprint(fingerprints) != meta.identity.get("frames"):
        raise VlmlabelError(
            f"the shards were computed from other frames than {source} holds now (made from "
            f"{meta.identity['source']}, whose frames have changed since, or another dataset); "
            "run the shards again"
        )


@stoppable()
def merge_shards(
    source: Path | str,
    reward_key: str = DEFAULT_REWARD_KEY,
    output: Path | None = None,
    overwrite: bool = False,
    events: Events = QUIET,
    count: int | None = None,
    image_key: str | None = None,
    split: str = "train",
    revision: str | None = None,
    link: bool = False,
) -> MergeSummary | FinishedSummary:
    """Verify the parts cover the dataset exactly once with one configuration, then commit them.

    ``count`` (torchrun: the world size) ignores parts left by an earlier split into another number of shards.
    Without parts, rewards already merged (a requeued merge job) are reported as done. SIGINT and SIGTERM stop
    it with the parts kept, or once the write is in place with the parts removed (``files.interrupt``).
    """
    with open_any_camera(str(source), image_key, split, revision) as opened:
        dest = destination_path(opened, output)
        work = work_dir(dest, reward_key)
        paths = [p for p in list_results(work) if count is None or p.name.endswith(f"-of-{count}.npz")]
        if not paths:
            merged = destination_for(opened, output, opened.episodes(Align.frame)).written(
                [reward_key, f"{reward_key}_0"]
            )
            done = [name for name, present in merged.items() if RESULT_ATTR in present.attrs]
            if done:
                events.note(f"{done[0]} is already merged into {dest}; nothing to do")
                return FinishedSummary(dest, done)
            raise VlmlabelError(
                f"no shard results in {work}; run `vlmlabel relabel ... --num-shards N --shard-index "
                "I` for every shard first (same SOURCE, --image-key, --reward-key and --output)"
            )
        with RunLock(dest_lock(dest), str(dest), events):
            pause_at("open")
            results = [read_result(p) for p in paths]
            meta = results[0].meta
            episodes = opened.episodes(Align(meta.align))
            plan = _commit_plan(opened, episodes, meta, reward_key, output, link, overwrite)
            if _already_merged(plan, results):
                _refuse_running(work)
                with deferred():  # removed whole, never half
                    shutil.rmtree(work, ignore_errors=True)
                events.note(
                    f"{', '.join(plan.names)} already merged into {dest} from these shards (a merge stopped "
                    f"before it removed them); removed {work}"
                )
                return FinishedSummary(dest, plan.names)
            _check_complete(results, work)
            if image_key is not None and opened.image_key not in meta.cameras:
                raise VlmlabelError(
                    f"the shards read frames from {', '.join(meta.cameras)}, not "
                    f"{opened.image_key!r}; merge with --image-key {meta.cameras[0]}"
                )
            _refuse_other_frames(source, opened, meta, split, revision)
            raw = _gather(episodes, results)
            plan.check()
            opened.close()  # read: an HDF5 file nobody holds open takes its rewards in place, without a copy
            written, final = plan.write(raw, meta.logit_scale, meta.logit_bias, meta.base_attrs)
            with deferred():  # the parts are written: removed whole, never half
                shutil.rmtree(work, ignore_errors=True)
    return MergeSummary(
        written,
        len(results),
        len(episodes),
        sum(e.steps for e in episodes),
        plan.names,
        plan.config.goals,
        np.concatenate(final),
    )


def _gather(episodes: list[Episode], results: list[ShardResult]) -> list[np.ndarray]:
    """Each episode's rewards from the one shard that covers it; refuse gaps, overlaps and strangers."""
    found: dict[str, tuple[int, np.ndarray]] = {}
    for result in results:
        offsets = np.concatenate([[0], np.cumsum(result.steps, dtype=np.int64)])
        for name, lo, hi in zip(result.names, offsets[:-1], offsets[1:], strict=True):
            if name in found:
                raise VlmlabelError(
                    f"episode {name!r} is covered by shards {found[name][0]} and {result.index}; "
                    "remove the stale shard files and run the shards again"
                )
            found[name] = (result.index, result.rewards[lo:hi])
    known = {e.name for e in episodes}
    strangers = sorted(set(found) - known)
    if strangers:
        raise VlmlabelError(
            f"shard results name episodes the dataset does not have ({', '.join(strangers[:3])}); "
            "they were made from another dataset"
        )
    missing = [e.name for e in episodes if e.name not in found]
    if missing:
        raise VlmlabelError(
            f"{len(missing)} episode(s) are in no shard result (first: {missing[0]!r}); run the shards again"
        )
    for episode in episodes:
        if len(found[episode.name][1]) != episode.steps:
            raise VlmlabelError(
                f"shard {found[episode.name][0]} has {len(found[episode.name][1])} rewards for "
                f"{episode.name!r}, which has {episode.steps} steps; run that shard again"
            )
    return [found[e.name][1] for e in episodes]
