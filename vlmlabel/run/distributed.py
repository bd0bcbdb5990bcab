"""torchrun / torch.distributed: one rank per GPU, each scoring one shard; rank 0 merges.

Ranks exchange only a few words (did my shard succeed?), so the process group always uses
gloo over TCP, even on GPUs: no tensor crosses ranks, and a rank waiting hours for a slower
one should not trip NCCL's watchdog. Each rank computes on ``cuda:LOCAL_RANK`` when CUDA is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from vlmlabel.errors import VlmlabelError
from vlmlabel.run.interrupt import killable
from vlmlabel.run.lifecycle import FinishedSummary, RelabelRequest, relabel_file
from vlmlabel.run.merge import MergeSummary, merge_shards
from vlmlabel.run.shards import ShardSpec

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Ranks wait for the slowest one before rank 0 merges; shards can take many hours.
WAIT_LIMIT = timedelta(hours=72)


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int


def torchrun_env(env: Mapping[str, str] = os.environ) -> TorchrunEnv | None:
    """The rank this process is under torchrun (or another torch.distributed launcher), else None."""
    if not all(env.get(name) for name in _TORCHRUN_VARS):
        return None
    try:
        found = TorchrunEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
    except ValueError:
        raise VlmlabelError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    return found if found.world_size > 1 else None


def rank_device(spec: str, local_rank: int) -> str:
    """auto/cuda mean this rank's own GPU, cuda:LOCAL_RANK; anything else is kept as given."""
    if spec.strip().lower() in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return spec


def relabel_torchrun(request: RelabelRequest, env: TorchrunEnv,
                     on_start: Callable[[int], None] | None = None,
                     on_progress: Callable[[int], None] | None = None,
                     on_note: Callable[[str], None] | None = None) -> MergeSummary | FinishedSummary | None:
    """Score shard RANK of WORLD_SIZE, wait for all ranks, and on rank 0 merge and write; None on other ranks.

    When the rewards are already written by an identical run (a relaunched job), every rank says so and
    nothing is merged."""
    if request.shard is not None:
        raise VlmlabelError("--num-shards/--shard-index cannot be combined with torchrun: each rank takes one shard")
    shard = ShardSpec(env.rank, env.world_size, f"torchrun rank {env.rank}")
    mine = replace(request, shard=shard, device=rank_device(request.device, env.local_rank))
    with killable():  # waiting for the other ranks, in C: a signal ends the process
        dist.init_process_group("gloo", timeout=WAIT_LIMIT)
    try:
        outcome: tuple[str | None, bool] = (None, False)
        try:
            summary = relabel_file(mine, on_start, on_progress, on_note)
            outcome = (None, isinstance(summary, FinishedSummary))
        except (VlmlabelError, OSError) as exc:
            outcome = (str(exc), False)
        outcomes: list = [None] * env.world_size
        with killable():
            dist.all_gather_object(outcomes, outcome)
        failed = [(rank, message) for rank, (message, _) in enumerate(outcomes) if message is not None]
        if failed:
            rank, message = failed[0]
            raise VlmlabelError(f"rank {rank} failed: {message}" if rank != env.rank else message)
        if env.rank != 0:
            return None
        if all(finished for _, finished in outcomes):
            return summary if isinstance(summary, FinishedSummary) else None
        return merge_shards(request.source, request.reward_key, request.output, request.overwrite, on_note,
                            count=env.world_size, image_key=request.image_keys()[0], split=request.split,
                            revision=request.revision, link=request.link)
    finally:
        dist.destroy_process_group()
