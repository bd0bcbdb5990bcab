"""Decoding worker processes (``--workers N``): the same rewards as decoding in this process, in order, on every
encoded backend; a worker's refusal raised here as the same one-line error; bounded buffers; and nothing left
behind (processes, shared memory) after success, an error or Ctrl-C."""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import multiprocessing.synchronize
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests import layouts, table_layouts, test_video_seek
from vlmlabel import engine
from vlmlabel.cli import app
from vlmlabel.errors import SourceError, VlmlabelError, WorkerLost
from vlmlabel.model import load_model
from vlmlabel.reader import buffers, decode_workers, readahead
from vlmlabel.rewards import cosine
from vlmlabel.sources import Align, open_source
from vlmlabel.sources.base import Reopenable, Segment

GOALS = ["a red square", "a blue sky"]
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def _hdf5(builder: Callable[[Path], layouts.LayoutFile]) -> Callable[[Path], tuple[Path, str]]:
    return lambda root: (builder(root / "data.h5").path, "")


def _table(builder: Callable[[Path], table_layouts.TableCase]) -> Callable[[Path], tuple[Path, str]]:
    def build(root: Path) -> tuple[Path, str]:
        case = builder(root)
        return case.path, case.image_key

    return build


ENCODED: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "hdf5_gzip": _hdf5(layouts.build_flat_d4rl),
    "hdf5_lzf": _hdf5(layouts.build_robomimic),
    "hdf5_png_vlen": _hdf5(layouts.build_minari_png),
    "hdf5_jpeg_rows": _hdf5(layouts.build_episodes_gray_jpeg),
    "save_to_disk_png": _table(table_layouts.build_disk_image),
    "parquet_png": _table(table_layouts.build_parquet_folder),
    "parquet_float_chw": _table(table_layouts.build_parquet_float_chw),
    "lerobot_image": _table(lambda root: table_layouts.build_lerobot(root, video=False)),
    "lerobot_video": _table(lambda root: table_layouts.build_lerobot(root, video=True)),
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", precision="fp32")


def _open(path: Path, key: str):
    return open_source(str(path), key or None)


def _scores(tiny, path: Path, key: str, workers: int, batch_size: int = 3, align: Align = Align.frame) -> np.ndarray:
    with _open(path, key) as source:
        return engine.score_episodes(source, tiny, GOALS, align, batch_size, workers=workers).all_rewards()


def _children() -> set[int]:
    return {p.pid for p in mp.active_children() if p.name.startswith("vlmlabel-decoder")}


def _live_semaphores() -> int:
    """Named semaphores (the queues' locks) this process still holds: each is unlinked from /dev/shm when its
    object goes away. (The batch buffers are shared by file descriptor and never have a name there.) /dev/shm
    itself is not compared: other processes on the machine use it too. Garbage is collected first: a semaphore
    left only in a reference cycle (a finished test's traceback) is not held, and goes at the next collection."""
    gc.collect()
    return sum(isinstance(o, multiprocessing.synchronize.SemLock) for o in gc.get_objects())


def _semaphores_back_to(before: int, wait: float = 5.0) -> int:
    """``_live_semaphores`` once it is at most ``before``, or after ``wait`` seconds: a closed queue's feeder thread
    lets go of the queue's locks a moment after the queue is closed (a leak still holds them after ``wait``)."""
    deadline = time.monotonic() + wait
    while (count := _live_semaphores()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ENCODED))
def test_workers_give_exactly_the_rewards_of_decoding_here(tiny, tmp_path, name):
    path, key = ENCODED[name](tmp_path)
    with _open(path, key) as source:
        source.episodes(Align.frame)  # a LeRobot video source knows its videos once its episodes are read
        assert isinstance(source, Reopenable)
        recipe = source.recipe()
        assert recipe is not None and recipe.decodes  # these are the sources the workers are for
    here = _scores(tiny, path, key, workers=0)
    for workers in (1, 2):
        np.testing.assert_array_equal(_scores(tiny, path, key, workers), here)
    # Batches of one frame: many small tasks completing out of order must still come back in order.
    np.testing.assert_array_equal(_scores(tiny, path, key, 2, batch_size=1), _scores(tiny, path, key, 0, batch_size=1))
    assert not _children()


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["h264_lerobot_g2", "av1_lerobot_g2"])
def test_workers_interleaving_over_one_multi_episode_video(tiny, tmp_path, codec):
    """Episodes sharing one video file encoded as LeRobot does (a keyframe every 2 frames), in batches long
    enough that a worker's next batch lies beyond a keyframe: workers seek instead of decoding the whole file,
    and the rewards stay those of one forward decode in this process."""
    case = test_video_seek.lerobot_video(tmp_path, codec, (37, 50, 23, 61, 29))
    here = _scores(tiny, case.path, case.image_key, workers=0, batch_size=20)
    for workers in (1, 2, 3):
        np.testing.assert_array_equal(_scores(tiny, case.path, case.image_key, workers, batch_size=20), here)
    assert not _children()


def test_raw_uncompressed_frames_stay_in_this_process(tiny, tmp_path):
    """Plain uint8 arrays are a copy, nothing to decode: read in this process whatever --workers says."""
    lf = layouts.build_minari(tmp_path / "raw.h5")
    array = table_layouts.build_disk_array(tmp_path)  # an HF Array3D uint8 column
    for path, key in ((lf.path, ""), (array.path, array.image_key)):
        with _open(path, key) as source:
            assert not source.recipe().decodes
        np.testing.assert_array_equal(_scores(tiny, path, key, workers=2), _scores(tiny, path, key, workers=0))
        assert not _children()


def _mixed_sizes(path: Path) -> np.ndarray:
    """PNG bytes whose first frame is the smallest: later frames spill out of the buffers sized from it."""
    sizes = [(20, 24), (30, 34), (30, 34), (20, 24), (40, 28), (20, 24), (30, 34)]
    frames = [layouts.make_frames(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    with h5py.File(path, "w") as f:
        data = f.create_dataset("observations", (len(frames),), dtype=h5py.vlen_dtype(np.uint8))
        for i, frame in enumerate(frames):
            data[i] = np.frombuffer(layouts.encode(frame, "PNG"), np.uint8)
    return np.asarray(frames, dtype=object)


def test_frames_of_different_sizes_and_spills_keep_order(tiny, tmp_path):
    path = tmp_path / "mixed.h5"
    frames = _mixed_sizes(path)
    here = _scores(tiny, path, "", workers=0, batch_size=4)
    np.testing.assert_array_equal(_scores(tiny, path, "", workers=2, batch_size=4), here)
    transform = tiny.reference_transform()
    pixels = torch.stack([transform(Image.fromarray(f)) for f in frames])
    expected = cosine(tiny.encode_images(pixels), tiny.encode_texts(GOALS)).numpy()
    np.testing.assert_allclose(here, expected, atol=2e-3)


def _with_palette_frame(path: Path, row: int) -> None:
    frames = layouts.make_frames(9, 16, 16, seed=3)
    with h5py.File(path, "w") as f:
        data = f.create_dataset("observations", (len(frames),), dtype=h5py.vlen_dtype(np.uint8))
        for i, frame in enumerate(frames):
            image = Image.fromarray(frame)
            if i == row:
                image = image.convert("P")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data[i] = np.frombuffer(buffer.getvalue(), np.uint8)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_refused_frame_is_one_line_from_any_worker(tiny, tmp_path, workers):
    path = tmp_path / "palette.h5"
    _with_palette_frame(path, row=6)
    before = _live_semaphores()
    with pytest.raises(SourceError) as caught:
        _scores(tiny, path, "", workers=workers, batch_size=2)
    message = str(caught.value)
    del caught  # its traceback holds the frames that held the workers' queues
    assert message.startswith("frame 6 of observations is a palette PNG (P)") and "\n" not in message
    assert not _children()
    assert _semaphores_back_to(before) <= before


def test_undecodable_bytes_are_the_same_error_with_workers(tiny, tmp_path):
    path = tmp_path / "broken.h5"
    with h5py.File(path, "w") as f:
        data = f.create_dataset("observations", (5,), dtype=h5py.vlen_dtype(np.uint8))
        for i, frame in enumerate(layouts.make_frames(5, 16, 16, seed=4)):
            blob = np.frombuffer(layouts.encode(frame, "PNG"), np.uint8)
            data[i] = blob[:40] if i == 3 else blob  # truncated PNG
    messages = []
    for workers in (0, 1):
        with pytest.raises(SourceError) as caught:
            _scores(tiny, path, "", workers=workers, batch_size=2)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "not a decodable JPEG/PNG image" in messages[0]


def test_buffers_are_bounded_by_the_worker_count(tiny, tmp_path, monkeypatch):
    lf = layouts.build_minari_png(tmp_path / "png.h5")
    pools: list[buffers.BufferPool] = []

    class Recorded(buffers.BufferPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(readahead, "BufferPool", Recorded)
    _scores(tiny, lf.path, "", workers=2, batch_size=2)
    assert len(pools) == 1 and len(pools[0].buffers) == 2 + 4  # workers + 2 in flight, the model's, a spare
    frame = int(np.prod(lf.frame_steps[0].shape[1:]))  # every frame of the file has the first one's size
    assert all(b.tensor.numel() == 2 * frame for b in pools[0].buffers)
    assert pools[0].free.qsize() == len(pools[0].buffers)  # all given back


def test_ctrl_c_in_the_consumer_stops_the_workers(tiny, tmp_path):
    lf = layouts.build_minari_png(tmp_path / "png.h5")
    before = _live_semaphores()
    calls = []

    def compute(batch: buffers.Batch) -> torch.Tensor:
        calls.append(batch.size)
        if len(calls) == 2:
            raise KeyboardInterrupt
        batch.release()
        return torch.zeros(batch.size, 1)

    with open_source(str(lf.path)) as source, pytest.raises(KeyboardInterrupt):
        list(engine.compute_rows(source, source.episodes(Align.frame), 2, torch.device("cpu"), compute, workers=2))
    assert not _children()
    assert _semaphores_back_to(before) <= before


def test_a_worker_that_dies_is_an_error_not_a_hang(tiny, tmp_path):
    lf = layouts.build_minari_png(tmp_path / "png.h5")

    def compute(batch: buffers.Batch) -> torch.Tensor:
        for pid in _children():
            os.kill(pid, signal.SIGKILL)
        batch.release()
        return torch.zeros(batch.size, 1)

    with open_source(str(lf.path)) as source, pytest.raises(SourceError, match="a decoding worker stopped"):
        list(engine.compute_rows(source, source.episodes(Align.frame), 1, torch.device("cpu"), compute, workers=1))
    assert not _children()


def _spilling_file(path: Path) -> Path:
    """One small frame first (the buffers are sized from it), then large ones: every batch spills, so each result
    a worker sends is megabytes (the pipe holds 64 KiB)."""
    small, big = layouts.make_frames(1, 8, 8, seed=1)[0], layouts.make_frames(1, 256, 256, seed=2)[0]
    blobs = [_png(small)] + [_png(big)] * 47
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("observations", (len(blobs),), dtype=h5py.vlen_dtype(np.uint8))
        for row, blob in enumerate(blobs):
            dset[row] = np.frombuffer(blob, np.uint8)
        f.create_dataset("terminals", data=np.arange(len(blobs)) == len(blobs) - 1)
    return path


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_worker_killed_halfway_through_sending_a_large_batch_is_an_error_not_a_hang(tmp_path):
    """While the model is busy, both workers block sending spilled batches; killed then, the main process must
    see it (each worker has a pipe of its own: a shared one would wait for the rest of the message forever)."""
    path = _spilling_file(tmp_path / "spill.h5")
    calls = []

    def compute(batch: buffers.Batch) -> torch.Tensor:
        calls.append(batch.size)
        if len(calls) == 1:
            time.sleep(2)  # the workers fill the next batches and block writing them
            for pid in _children():
                os.kill(pid, signal.SIGKILL)
        batch.release()
        return torch.zeros(batch.size, 1)

    with open_source(str(path)) as source, pytest.raises(WorkerLost, match="a decoding worker stopped"):
        list(engine.compute_rows(source, source.episodes(Align.frame), 16, torch.device("cpu"), compute, workers=2))
    assert not _children()


def test_a_batch_too_large_to_send_is_reported_not_dropped():
    """Pickling a large spilled batch can run out of memory: the main process gets a one-line error for that
    batch instead of waiting for it forever."""
    reading, writing = mp.Pipe(duplex=False)
    sent = []

    class Refusing:
        def send(self, message):
            if not sent:
                sent.append(message)
                raise MemoryError
            writing.send(message)

    assert decode_workers._send(Refusing(), 3, decode_workers.Failure("unused", None))
    index, outcome = reading.recv()
    assert index == 3 and outcome.error is WorkerLost and "ran out of memory sending batch 3" in outcome.message
    writing.close()
    assert not decode_workers._send(_Closed(), 4, outcome)  # the main process is gone: the worker stops


class _Closed:
    def send(self, message):
        raise BrokenPipeError


def test_stopping_with_many_unread_tasks_does_not_wait_for_the_pipe(tmp_path):
    """Thousands of short episodes make tasks of many row ranges; stopping at once drops the unread ones."""
    lf = layouts.build_minari_png(tmp_path / "png.h5")
    with open_source(str(lf.path)) as source:
        recipe = source.recipe()
        assert isinstance(source, Reopenable) and recipe is not None
        buffers = [torch.zeros(64, dtype=torch.uint8).share_memory_()]
        workers = decode_workers.DecodeWorkers(recipe, buffers, 1, source.frame_format, "observations")
        pieces = tuple(Segment("nothing", row, row + 1) for row in range(4000))  # about 200 KB pickled
        for index in range(5):
            workers.submit(index, 0, pieces)
        for process in workers._processes:
            os.kill(process.pid, signal.SIGKILL)
        closing = threading.Thread(target=workers.close, args=(False,), daemon=True)
        closing.start()
        closing.join(30)
        assert not closing.is_alive()
    assert not _children()


def test_default_worker_count(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert decode_workers.default_workers() == 8  # capped
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert decode_workers.default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert decode_workers.default_workers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four ranks share the node's cores
    assert decode_workers.default_workers() == 3
    assert decode_workers.resolve_workers(0) == 0
    with pytest.raises(VlmlabelError, match="--workers"):
        decode_workers.resolve_workers(-1)


@pytest.mark.slow
def test_cli_relabel_and_embed_take_workers(tiny_model_dir, tmp_path):
    case = table_layouts.build_disk_image(tmp_path)
    outputs = []
    for workers in ("0", "2"):
        out = tmp_path / f"out-{workers}"
        result = runner.invoke(
            app,
            [
                "relabel",
                str(case.path),
                "--goal",
                GOALS[0],
                "--model",
                str(tiny_model_dir),
                "--device",
                "cpu",
                "--batch-size",
                "4",
                "--output",
                str(out),
                "--quiet",
                "--workers",
                workers,
            ],
        )
        assert result.exit_code == 0, result.output
        outputs.append(np.asarray(datasets.load_from_disk(str(out))["vlm_reward"], dtype=np.float32))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    result = runner.invoke(
        app, ["embed", str(case.path), "--model", str(tiny_model_dir), "--device", "cpu", "--quiet", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["relabel", str(case.path), "--goal", "x", "--workers", "-1"])
    assert result.exit_code == 2 and "--workers" in result.output and result.output.count("\n") == 1
