"""Decoding in worker processes (``--workers N``).

PNG/JPEG decoders, PyAV and h5py's filters hold the GIL, so threads cannot decode in parallel: processes
can. Each worker opens the source again from its picklable recipe (``sources.base.SourceRecipe``: paths and
what to read, never an open handle), takes whole batches from one task queue and writes their frames
straight into shared-memory batch buffers (``batchfill.fill``, the code the reader thread runs with
``--workers 0``). The main process hands the batches to the model in order. Memory stays bounded: a fixed
set of buffers, each refilled only once the model has released it.

Workers ignore SIGINT and SIGTERM: the main process decides when they stop (a first Ctrl-C finishes the batch
in hand and saves progress), kills them when the run fails, and they exit by themselves when it dies.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext, SpawnContext

import torch
import torch.multiprocessing  # noqa: F401  (registers the pickling that shares a tensor's memory with a worker)

from vlmlabel.batchfill import Filled, fill
from vlmlabel.errors import SourceError, VlmlabelError
from vlmlabel.sources.base import FrameFormat, FrameReader, Segment, SourceRecipe
from vlmlabel.sources.video import share_cores

MAX_DEFAULT_WORKERS = 8
POLL_SECONDS = 0.2  # how often a waiting process checks that the other side is still alive
JOIN_SECONDS = 5.0
# Imported once by the fork server, so each worker starts in milliseconds with decoders and readers loaded. A
# worker runs the main script's imports again (multiprocessing's rule for a script run by path, such as the
# `vlmlabel` command): the CLI's are here, so they cost nothing. ("__main__" itself is not preloaded: each
# worker would then run the whole script again, about a second.)
_PRELOAD = ["vlmlabel.cli", "vlmlabel.decode_workers", "vlmlabel.sources.lerobot"]


def usable_cores() -> int:
    """This process's cores; under torchrun, its share of them (the node's ranks, LOCAL_WORLD_SIZE, share them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "")
    return cores // (max(1, int(ranks)) if ranks.isdigit() else 1)


def default_workers() -> int:
    """Usable cores minus one (the main process feeds the model), at most 8: more rarely pays, as every
    worker holds its own open source and the batches in flight grow with the count."""
    return max(0, min(MAX_DEFAULT_WORKERS, usable_cores() - 1))


def resolve_workers(requested: int | None) -> int:
    """``requested`` (None: the default); 0 decodes in the main process."""
    if requested is None:
        return default_workers()
    if requested < 0:
        raise VlmlabelError(f"--workers must be 0 (decode in this process) or more, not {requested}")
    return requested


def _context() -> ForkServerContext | SpawnContext:
    """A fork server where there is one: workers fork from a clean process with the decoders already
    imported (fork from this process could copy locks held by its threads); spawn elsewhere."""
    if "forkserver" in mp.get_all_start_methods():
        server = mp.get_context("forkserver")
        server.set_forkserver_preload(_PRELOAD)
        return server
    return mp.get_context("spawn")


def start_server() -> None:
    """Start the fork server now (where there is one): its imports then overlap the model's loading instead
    of delaying the first batch. Idempotent."""
    if "forkserver" in mp.get_all_start_methods():
        import multiprocessing.forkserver

        _context()
        multiprocessing.forkserver.ensure_running()


@dataclass(frozen=True)
class Failure:
    """A batch a worker could not fill: a ``SourceError``'s message (one line for the user) or a traceback."""

    message: str
    source_error: bool


def _work(recipe: SourceRecipe, buffers: list[torch.Tensor], fmt: FrameFormat, where: str,
          tasks: mp.Queue, results: mp.Queue, cores: int) -> None:
    """A worker's life: open the source once, fill the batches asked for, stop at None or when the main
    process is gone. ``cores``: its share of the cores, for the video decoder's threads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)  # one core per worker: intra-op threads would fight the other workers
    share_cores(cores)
    parent = mp.parent_process()
    slots = [buffer.numpy() for buffer in buffers]
    reader: FrameReader | None = None
    try:
        while True:
            try:
                task = tasks.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if task is None:
                return
            index, slot, pieces = task
            try:
                if reader is None:
                    reader = recipe.open()
                results.put((index, fill(reader, pieces, slots[slot], fmt, where)))
            except SourceError as exc:
                results.put((index, Failure(str(exc), True)))
            except Exception:  # a bug, not the data: the main process shows the worker's traceback
                results.put((index, Failure(traceback.format_exc(), False)))
    finally:
        if reader is not None:
            reader.close()


class DecodeWorkers:
    """``count`` worker processes filling the shared tensors ``buffers`` (the caller decides which buffer
    each batch goes to and when it is free again). Use as a context manager: leaving it stops them."""

    def __init__(self, recipe: SourceRecipe, buffers: Sequence[torch.Tensor], count: int, fmt: FrameFormat,
                 where: str):
        context = _context()
        self._tasks: mp.Queue | None = context.Queue()
        self._results: mp.Queue | None = context.Queue()
        self._done: dict[int, Filled | Failure] = {}
        self._processes = [context.Process(target=_work, name=f"vlmlabel-decoder-{i}", daemon=True,
                                           args=(recipe, list(buffers), fmt, where, self._tasks, self._results,
                                                 max(1, usable_cores() // count)))
                           for i in range(count)]
        try:
            for process in self._processes:
                process.start()
        except BaseException:
            self.close(wait=False)
            raise

    def submit(self, index: int, slot: int, pieces: tuple[Segment, ...]) -> None:
        """Ask for batch ``index`` (rows ``pieces``) to be filled into buffer ``slot``."""
        assert self._tasks is not None, "the workers were stopped"
        self._tasks.put((index, slot, pieces))

    def result(self, index: int) -> Filled:
        """Wait for batch ``index``; a worker's ``SourceError`` is raised here, as the same one-line error."""
        assert self._results is not None, "the workers were stopped"
        while index not in self._done:
            try:
                done, outcome = self._results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                self._check_alive()
                continue
            self._done[done] = outcome
        outcome = self._done.pop(index)
        if isinstance(outcome, Failure):
            if outcome.source_error:
                raise SourceError(outcome.message)
            raise RuntimeError(f"a decoding worker failed:\n{outcome.message}")
        return outcome

    def _check_alive(self) -> None:
        for process in self._processes:
            if not process.is_alive():
                code = process.exitcode
                why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                raise SourceError(f"a decoding worker stopped unexpectedly ({why}; out of memory?); "
                                  "run again with --workers 0 to decode in this process")

    def close(self, wait: bool) -> None:
        """Stop the workers: after their current batch when ``wait``, else at once (they only read)."""
        if self._tasks is None or self._results is None:
            return
        if wait:
            for _ in self._processes:
                self._tasks.put(None)
        for process in self._processes:
            if process.pid is None:  # never started
                continue
            process.join(JOIN_SECONDS if wait else 0)
            if process.is_alive():
                process.kill()
                process.join()
            process.close()
        for channel in (self._tasks, self._results):
            channel.close()
            channel.join_thread()  # a few small tasks at most, which fit the pipe whether or not a worker reads them
        # The last references to the queues: their named semaphores are unlinked now, not when a traceback that
        # holds this object goes away.
        self._processes, self._tasks, self._results = [], None, None

    def __enter__(self) -> DecodeWorkers:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(wait=exc_type is None)
