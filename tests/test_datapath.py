"""The optimised data path (buffer pool, background reader, device-side layout, lagged collection,
device JPEG decoding) gives the same rewards as the plain per-frame reference pipeline."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tests import layouts
from vlmlabel.engine import FrameScorer, score_episodes
from vlmlabel.model import load_model
from vlmlabel.reader.batchfill import DECODED_AXES
from vlmlabel.reader.buffers import BufferPool, as_nchw
from vlmlabel.reader.readahead import decode_jpegs, iter_batches, prefetch
from vlmlabel.rewards import cosine
from vlmlabel.sources import Align, open_source

GOALS = ["a red square", "a blue sky"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", precision="fp32")


def reference_rewards(model, frames: np.ndarray) -> np.ndarray:
    """open_clip's own PIL transform frame by frame, then encode and cosine: the plain path."""
    transform = model.reference_transform()
    pixels = torch.stack([transform(Image.fromarray(frame)) for frame in frames])
    return cosine(model.encode_images(pixels), model.encode_texts(GOALS)).numpy()


@pytest.mark.parametrize("align", [Align.frame, Align.next])
def test_optimised_path_matches_reference(tiny, layout_file, align):
    truth = layout_file.frame_steps if align is Align.frame else layout_file.next_steps
    expected = reference_rewards(tiny, np.concatenate(truth))
    with open_source(str(layout_file.path)) as source:
        batched = score_episodes(source, tiny, GOALS, align, batch_size=3).all_rewards()
        single = score_episodes(source, tiny, GOALS, align, batch_size=1).all_rewards()
    assert batched.shape == expected.shape
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # Preprocessing equals PIL's within uint8 rounding, which moves a tiny random model's cosine very little.
    np.testing.assert_allclose(batched, expected, atol=2e-3)


def test_jpeg_batches_decoded_on_the_device_match_cpu_decoding(tiny, tmp_path):
    layout_file = layouts.build_episodes_gray_jpeg(tmp_path / "jpeg.h5")
    with open_source(str(layout_file.path)) as source:
        episodes = source.episodes(Align.frame)
        on_device = list(iter_batches(source, episodes, 4, jpeg_on_device=True))
        on_host = list(iter_batches(source, episodes, 4))
    assert {b.form for b in on_device} == {"jpeg"} and {b.form for b in on_host} == {DECODED_AXES}
    scorer = FrameScorer(tiny, GOALS)
    device_scores = torch.cat([scorer.score(b) for b in on_device])
    host_scores = torch.cat([scorer.score(b) for b in on_host])
    torch.testing.assert_close(device_scores, host_scores)
    decoded = decode_jpegs(on_device[0].frames, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(decoded, as_nchw(on_host[0].frames, DECODED_AXES), strict=True))


def test_buffers_are_reused_and_hold_the_right_frames(tmp_path):
    layout_file = layouts.build_flat_d4rl(tmp_path / "flat.h5")
    expected = np.concatenate(layout_file.frame_steps)
    with open_source(str(layout_file.path)) as source:
        pool = BufferPool(2, (4, *source.frame_format.frame_shape), pin=False)
        seen, pointers = [], set()
        for batch in iter_batches(source, source.episodes(Align.frame), 4, pool):
            pointers.add(batch.frames.data_ptr())
            seen.append(batch.frames.numpy().copy())
            batch.release()
            batch.release()  # a second release must not put the buffer in the pool twice
    assert len(pointers) == 2
    assert pool.free.qsize() == 2
    np.testing.assert_array_equal(np.concatenate(seen), expected)


def test_reader_waits_for_a_free_buffer():
    pool = BufferPool(1, (2, 4, 4, 3), pin=False)
    held = pool.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (pool.acquire(), got.set()))
    waiter.start()
    assert not got.wait(0.2)  # the only buffer is still in use
    held.release()
    assert got.wait(5)
    waiter.join()


def test_stopping_early_releases_the_reader(tmp_path):
    layout_file = layouts.build_flat_d4rl(tmp_path / "flat.h5")
    with open_source(str(layout_file.path)) as source:
        pool = BufferPool(2, (2, *source.frame_format.frame_shape), pin=False)
        batches = prefetch(iter_batches(source, source.episodes(Align.frame), 2, pool), depth=1)
        next(batches)  # never released by the consumer
        batches.close()
    assert not any(t.name == "vlmlabel-reader" and t.is_alive() for t in threading.enumerate())
