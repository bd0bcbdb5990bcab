"""torchrun / torch.distributed: one rank per GPU, each scoring one shard; rank 0 merges.

Ranks exchange only a few words (did my shard succeed?), so the process group always uses
gloo over TCP, even on GPUs: no tensor crosses ranks, and a rank waiting hours for a slower
one should not trip NCCL's watchdog. Each rank computes on ``cuda:LOCAL_RANK`` when CUDA is used.

Joining the other ranks (the rendezvous) waits minutes, not hours, saying so as it waits: torch.distributed
variables left in an environment with no other rank alive end in one line naming them. Only once every rank
is there does a rank wait as long as the slowest shard takes (``WAIT_LIMIT``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from vlmlabel.errors import VlmlabelError
from vlmlabel.events import QUIET, Events
from vlmlabel.files.interrupt import killable
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.merge import MergeSummary, merge_shards
from vlmlabel.run.request import FinishedSummary, RelabelRequest
from vlmlabel.run.shards import ShardSpec

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Ranks wait for the slowest one before rank 0 merges; shards can take many hours.
WAIT_LIMIT = timedelta(hours=72)
# How long a rank waits for the others to join; torchrun starts them together, so minutes are plenty.
RENDEZVOUS_ENV = "VLMLABEL_RENDEZVOUS_TIMEOUT"
RENDEZVOUS_LIMIT = timedelta(minutes=10)


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    described: str = field(default="", compare=False)  # the variables as set, for messages
    master: tuple[str, int] = field(default=("", 0), compare=False)  # MASTER_ADDR, MASTER_PORT

    @property
    def origin(self) -> str:
        return f"torchrun rank {self.rank} of {self.world_size} ({self.described})"


def torchrun_env(env: Mapping[str, str] = os.environ) -> TorchrunEnv | None:
    """The rank this process is under torchrun (or another torch.distributed launcher), else None."""
    if not all(env.get(name) for name in _TORCHRUN_VARS):
        return None
    described = ", ".join(f"{name}={env[name]}" for name in _TORCHRUN_VARS)
    try:
        found = TorchrunEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env["LOCAL_RANK"]),
            described,
            (env["MASTER_ADDR"], int(env["MASTER_PORT"])),
        )
    except ValueError:
        raise VlmlabelError(
            f"RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers (set by torchrun): {described}"
        ) from None
    return found if found.world_size > 1 else None


def rendezvous_limit(env: Mapping[str, str] = os.environ) -> timedelta:
    """How long to wait for every rank to join: $VLMLABEL_RENDEZVOUS_TIMEOUT seconds, else 10 minutes."""
    value = env.get(RENDEZVOUS_ENV)
    if not value:
        return RENDEZVOUS_LIMIT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise VlmlabelError(f"{RENDEZVOUS_ENV}={value!r} must be a number of seconds greater than 0")
    return timedelta(seconds=seconds)


def rank_device(spec: str, local_rank: int) -> str:
    """auto/cuda mean this rank's own GPU, cuda:LOCAL_RANK; anything else is kept as given."""
    if spec.strip().lower() in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return spec


@contextmanager
def _waiting_notes(events: Events, what: str, limit: timedelta) -> Iterator[None]:
    """Notes every few seconds (at most 30) while the block runs, so a wait is never silent."""
    every = min(30.0, max(limit.total_seconds() / 4, 1.0))
    done = threading.Event()
    start = time.monotonic()

    def tell() -> None:
        while not done.wait(every) and time.monotonic() - start < limit.total_seconds():
            events.note(f"{what}: {time.monotonic() - start:.0f} s of at most {limit.total_seconds():.0f} s")

    teller = threading.Thread(target=tell, name="vlmlabel-rendezvous-notes", daemon=True)
    teller.start()
    try:
        yield
    finally:
        done.set()
        teller.join()


def _answers(address: tuple[str, int], deadline: float) -> bool:
    """Whether something accepts connections at ``address`` before ``deadline`` (time.monotonic)."""
    while True:
        try:
            with socket.create_connection(address, timeout=min(2.0, max(deadline - time.monotonic(), 0.1))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)


def join_ranks(env: TorchrunEnv, events: Events = QUIET, limit: timedelta | None = None) -> None:
    """Meet the other ranks (torch.distributed's env:// rendezvous) within ``limit``, then start the gloo process
    group, whose collectives may wait ``WAIT_LIMIT``. A rank missing at the limit is one line naming the
    variables that asked for it.

    A rank other than 0 first waits here for the store at MASTER_ADDR:MASTER_PORT to answer, so that torch's own
    client does not log a stack of C++ frames per failed try."""
    limit = limit if limit is not None else rendezvous_limit()
    what = (
        f"waiting for the other torch.distributed ranks ({env.described}); set {RENDEZVOUS_ENV}=SECONDS to wait longer"
    )
    deadline = time.monotonic() + limit.total_seconds()
    with _waiting_notes(events, what, limit):
        try:
            if env.rank != 0 and not _answers(env.master, deadline):
                raise TimeoutError(f"nothing answers at {env.master[0]}:{env.master[1]}, where rank 0 should be")
            left = timedelta(seconds=max(deadline - time.monotonic(), 1.0))
            store, rank, world_size = next(dist.rendezvous("env://", timeout=left))
        except (RuntimeError, ValueError, OSError) as exc:  # torch's DistNetworkError, DistStoreError, ...
            detail = " ".join(str(exc).split())[:200].rstrip(".")
            raise VlmlabelError(
                f"rank {env.rank} of {env.world_size} could not meet the other ranks within "
                f"{limit.total_seconds():.0f} s ({detail}); {env.described} are set in the environment: if no "
                f"torchrun started this, unset them; else check the other ranks started (or set "
                f"{RENDEZVOUS_ENV}=SECONDS to wait longer)"
            ) from None
    store.set_timeout(WAIT_LIMIT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=WAIT_LIMIT)


def relabel_torchrun(
    request: RelabelRequest,
    env: TorchrunEnv,
    events: Events = QUIET,
    waits: Events | None = None,
) -> MergeSummary | FinishedSummary | None:
    """Score shard RANK of WORLD_SIZE, wait for all ranks, and on rank 0 merge and write; None on other ranks.

    When the rewards are already written by an identical run (a relaunched job), every rank says so and
    nothing is merged; rank 0 removes parts a merge killed before its cleanup left. ``on_wait``: notes while
    joining the other ranks (every rank's, where ``events`` may note rank 0's only)."""
    if request.shard is not None:
        raise VlmlabelError(
            f"{request.shard.origin} cannot be combined with torchrun ({env.origin}): each rank "
            "already scores one shard"
        )
    if request.array is not None:
        raise VlmlabelError(
            f"this run is both a task of a SLURM job array ({request.array.described}) and "
            f"{env.origin}, and each would pick the shard it scores; pass --num-shards 1 so that "
            "torchrun's ranks split the whole dataset (an array over several datasets), or run the "
            "array's tasks without torchrun"
        )
    shard = ShardSpec(env.rank, env.world_size, env.origin)
    mine = replace(request, shard=shard, device=rank_device(request.device, env.local_rank))
    with killable():  # waiting for the other ranks, in C: a signal ends the process
        join_ranks(env, waits or events)
    try:
        outcome: tuple[str | None, bool] = (None, False)
        try:
            outcome = (None, isinstance(relabel_file(mine, events), FinishedSummary))
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
        # Every rank finding the rewards written already said so: the merge then only clears a killed merge's parts.
        quiet = all(finished for _, finished in outcomes)
        return merge_shards(
            request.source,
            request.reward_key,
            request.output,
            request.overwrite,
            QUIET if quiet else events.notes_only(),
            count=env.world_size,
            image_key=request.image_keys()[0],
            split=request.split,
            revision=request.revision,
            link=request.link,
        )
    finally:
        dist.destroy_process_group()
