"""Decoding in worker processes (``--workers N``).

PNG/JPEG decoders, PyAV and h5py's filters hold the GIL, so threads cannot decode in parallel: processes
can. Each worker opens the source again from its picklable recipe (``sources.base.SourceRecipe``: paths and
what to read, never an open handle), takes whole batches from one task queue and writes their frames
straight into shared-memory batch buffers (``batchfill.fill``, the code the reader thread runs with
``--workers 0``). The main process hands the batches to the model in order. Memory stays bounded: a fixed
set of buffers, each refilled only once the model has released it.

Workers ignore SIGINT and SIGTERM: the main process decides when they stop (a first Ctrl-C finishes the batch
in hand and saves progress), kills them when the run fails, and they exit by themselves when it dies.

Each worker sends its results down a pipe of its own, pickled in its own thread: a worker that dies, even in
the middle of a message, closes the only writing end, so the main process sees it at once (a shared queue
would wait for the rest of the message forever), and a result that cannot be sent (out of memory while
pickling a large batch) is reported, never dropped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess

import torch
import torch.multiprocessing  # noqa: F401  (registers the pickling that shares a tensor's memory with a worker)

from vlmlabel.errors import SourceError, VlmlabelError, WorkerLost
from vlmlabel.reader.batchfill import Filled, fill
from vlmlabel.sources.base import FrameFormat, FrameReader, Segment, SourceRecipe
from vlmlabel.sources.video import share_cores

MAX_DEFAULT_WORKERS = 8
POLL_SECONDS = 0.2  # how often a waiting process checks that the other side is still alive
JOIN_SECONDS = 5.0
# Imported once by the fork server, so each worker starts in milliseconds with decoders and readers loaded. A
# worker runs the main script's imports again (multiprocessing's rule for a script run by path, such as the
# `vlmlabel` command): the CLI's are here, so they cost nothing. ("__main__" itself is not preloaded: each
# worker would then run the whole script again, about a second.)
_PRELOAD = ["vlmlabel.cli", "vlmlabel.reader.decode_workers", "vlmlabel.sources.lerobot"]


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
        import multiprocessing.forkserver  # only where the platform has a fork server

        _context()
        multiprocessing.forkserver.ensure_running()


@dataclass(frozen=True)
class Failure:
    """A batch a worker could not fill: the one-line message of the error to raise in the main process
    (``error``), or a traceback (``error`` None: a bug, not the data)."""

    message: str
    error: type[SourceError] | None


def _send(results: Connection, index: int, outcome: Filled | Failure) -> bool:
    """Send one batch's outcome; False when the main process is gone."""
    try:
        results.send((index, outcome))
    except (BrokenPipeError, ConnectionResetError):
        return False
    except MemoryError:  # pickling a large spilled batch: nothing was sent
        results.send(
            (
                index,
                Failure(
                    f"a decoding worker ran out of memory sending batch {index}; run again with "
                    "fewer --workers or a smaller --batch-size",
                    WorkerLost,
                ),
            )
        )
    return True


def _work(
    recipe: SourceRecipe,
    buffers: list[torch.Tensor],
    fmt: FrameFormat,
    where: str,
    tasks: mp.Queue,
    results: Connection,
    cores: int,
) -> None:
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
            outcome: Filled | Failure
            try:
                if reader is None:
                    reader = recipe.open()
                outcome = fill(reader, pieces, slots[slot], fmt, where)
            except SourceError as exc:  # raised again in the main process from its message alone
                outcome = Failure(str(exc), WorkerLost if isinstance(exc, WorkerLost) else SourceError)
            except Exception:  # a bug, not the data: the main process shows the worker's traceback
                outcome = Failure(traceback.format_exc(), None)
            if not _send(results, index, outcome):
                return
    finally:
        if reader is not None:
            reader.close()
        results.close()


class DecodeWorkers:
    """``count`` worker processes filling the shared tensors ``buffers`` (the caller decides which buffer
    each batch goes to and when it is free again). Use as a context manager: leaving it stops them."""

    def __init__(self, recipe: SourceRecipe, buffers: Sequence[torch.Tensor], count: int, fmt: FrameFormat, where: str):
        context = _context()
        self._tasks: mp.Queue | None = context.Queue()
        pipes = [context.Pipe(duplex=False) for _ in range(count)]
        self._results = [reading for reading, _ in pipes]
        self._done: dict[int, Filled | Failure] = {}
        self._processes = [
            context.Process(
                target=_work,
                name=f"vlmlabel-decoder-{i}",
                daemon=True,
                args=(recipe, list(buffers), fmt, where, self._tasks, writing, max(1, usable_cores() // count)),
            )
            for i, (_, writing) in enumerate(pipes)
        ]
        try:
            for process in self._processes:
                process.start()
        except BaseException:
            self.close(wait=False)
            raise
        finally:
            for _, writing in pipes:
                writing.close()  # each worker holds its own: its death is the end of its pipe

    def submit(self, index: int, slot: int, pieces: tuple[Segment, ...]) -> None:
        """Ask for batch ``index`` (rows ``pieces``) to be filled into buffer ``slot``."""
        assert self._tasks is not None, "the workers were stopped"
        self._tasks.put((index, slot, pieces))

    def result(self, index: int) -> Filled:
        """Wait for batch ``index``; a worker's ``SourceError`` is raised here, as the same one-line error."""
        assert self._tasks is not None, "the workers were stopped"
        while index not in self._done:
            ready = wait(self._results, timeout=POLL_SECONDS)
            if not ready:
                self._check_alive()
            for reading in ready:
                assert isinstance(reading, Connection)
                try:
                    done, outcome = reading.recv()
                except (EOFError, OSError):  # its worker died, maybe halfway through a message
                    process = self._processes[self._results.index(reading)]
                    process.join(JOIN_SECONDS)
                    raise self._lost(process) from None
                self._done[done] = outcome
        outcome = self._done.pop(index)
        if isinstance(outcome, Failure):
            if outcome.error is not None:
                raise outcome.error(outcome.message)
            raise RuntimeError(f"a decoding worker failed:\n{outcome.message}")
        return outcome

    def _check_alive(self) -> None:
        stopped = next((process for process in self._processes if not process.is_alive()), None)
        if stopped is not None:
            raise self._lost(stopped)

    @staticmethod
    def _lost(process: BaseProcess) -> WorkerLost:
        code = process.exitcode
        why = (
            f"killed by signal {-code}"
            if code is not None and code < 0
            else f"exit code {code}"
            if code is not None
            else "its pipe closed"
        )
        return WorkerLost(
            f"a decoding worker stopped unexpectedly ({why}; out of memory?); run again, with fewer "
            "--workers or --workers 0 to decode in this process"
        )

    def close(self, wait: bool) -> None:
        """Stop the workers: after their current batch when ``wait``, else at once (they only read)."""
        if self._tasks is None:
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
        # Tasks nobody will read may fill the pipe (thousands of episodes' rows): drop them rather than wait.
        self._tasks.cancel_join_thread()
        self._tasks.close()
        for reading in self._results:
            reading.close()
        # The last references to the queue: its named semaphores are unlinked now, not when a traceback that
        # holds this object goes away.
        self._processes, self._tasks, self._results = [], None, []

    def __enter__(self) -> DecodeWorkers:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(wait=exc_type is None)
