"""``embed``: store every frame's unit image embedding in the source's cache file, so relabel needs no model pass.

open (the source, the cache file and where it is written, every check, the lock) -> the model loads -> the
frames are embedded while ``cache.store.write`` fills the cache in one all-or-nothing write, like rewards.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from vlmlabel.cache import layout, store
from vlmlabel.destinations.base import check_folder, check_output_suffix, check_space
from vlmlabel.destinations.hdf5 import check_output_file, hdf5_suffixes, refuse_if_busy
from vlmlabel.engine import embed_segments
from vlmlabel.errors import OutputError, VlmlabelError
from vlmlabel.events import QUIET, Events
from vlmlabel.files.interrupt import stoppable
from vlmlabel.files.stamp import Stamp
from vlmlabel.model import DEFAULT_MODEL, ClipModel, load_model
from vlmlabel.reader.decode_workers import resolve_workers
from vlmlabel.reader.readahead import prepare_workers
from vlmlabel.run.locking import RunLock
from vlmlabel.run.setup import Machine, model_loads
from vlmlabel.run.shards import dest_lock
from vlmlabel.sources import open_source
from vlmlabel.sources.base import VideoDecoder, content_fingerprint


@dataclass
class EmbedRequest:
    source: Path | str
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    image_key: str | None = None
    output: Path | None = None
    overwrite: bool = False  # an existing --output file; a cache already in the file is always replaced
    batch_size: int | None = None
    precision: str = "auto"
    device: str = "auto"
    split: str = "train"
    revision: str | None = None
    workers: int | None = None  # decoding processes; None: usable cores minus one (at most 8); 0: this process
    video_decoder: VideoDecoder = VideoDecoder.cpu  # nvdec: the run's GPU decodes video (the same pixels)


@dataclass
class EmbedSummary:
    written_to: Path
    locations: list[str]
    frames: int
    dim: int
    seconds: float
    model: ClipModel
    image_key: str


@stoppable()
def embed_file(
    request: EmbedRequest,
    events: Events = QUIET,
) -> EmbedSummary:
    """Store every frame's unit image embedding in the source's cache file (safe write, like rewards)."""
    machine = Machine.of(request.device, request.precision, request.batch_size, request.video_decoder)
    with (
        open_source(
            str(request.source), request.image_key, request.split, request.revision, nvdec_gpu=machine.nvdec
        ) as source,
        contextlib.ExitStack() as stack,
    ):
        if source.cache_file is None:
            raise VlmlabelError(
                f"{request.source}: a streamed dataset cannot keep an embedding cache; "
                "download it (drop --streaming) to make one"
            )
        target = request.output or source.cache_file
        base = source.cache_file if source.cache_file.exists() else None
        plans = store.plan(source)
        locations = [layout.location(source, p.array) for p in plans]
        _check_embed_target(request, base, target, source.cache_file)
        store.refuse_unsafe(source, target, plans)
        stamp = Stamp.of(source.paths)
        fingerprint = content_fingerprint(source)
        RunLock(dest_lock(target), str(target), events).held_by(stack)
        workers = resolve_workers(request.workers)
        prepare_workers(source, workers)  # the decoding workers' server starts while the model loads
        model_loads()
        model = load_model(request.model, request.pretrained, machine.device, machine.precision)
        segments = [s for p in plans for s in p.segments]
        total = sum(len(s) for s in segments)
        events.start(total)
        start = time.perf_counter()
        # Embeddings are computed while the copy is written, so memory stays at one batch.
        blocks = embed_segments(source, model, segments, machine.batch_size, events, workers)
        written, width = store.write(
            source, plans, blocks, model, fingerprint, base, target, stamp, keep_mode=request.output is None
        )
        seconds = time.perf_counter() - start
    return EmbedSummary(written, locations, total, width, seconds, model, source.image_key)


def _check_embed_target(request: EmbedRequest, base: Path | None, target: Path, default: Path) -> None:
    output = request.output
    if output is not None and base is not None and output.exists() and output.resolve() == base.resolve():
        raise OutputError(f"--output {output} is where the cache already goes; drop --output")
    if output is not None:  # an HDF5 file, whatever the source: the cache file (or the HDF5 source) copied
        check_output_suffix(output, hdf5_suffixes(default), "HDF5")
    check_output_file(output, request.overwrite)
    folder = target.resolve().parent
    check_folder(folder)
    check_space(folder, base.stat().st_size if base is not None else 0, "the embedding cache")
    if base is not None and output is None:
        refuse_if_busy(base)
