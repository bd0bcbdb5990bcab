"""On a CUDA GPU: nvJPEG decoding, pinned host buffers and mixed precision give what the CPU reference gives.

Skipped without a GPU (``gpu`` marker, tests/conftest.py); ``benchmarks/gpu_check.sh`` runs them. Tolerances:
nvJPEG and libjpeg-turbo may round the inverse DCT and chroma upsampling differently, so decoded pixels may
differ by a few levels (mean under 1); fp32 on the GPU uses TF32 for the patch convolution (cuDNN's default),
bf16 autocast keeps 8 bits of mantissa: rewards (cosines in [-1, 1]) within 5e-3 and 3e-2 of open_clip's fp32
CPU pipeline (1e-2 more from JPEG frames, which the reference decodes with PIL).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from tests import layouts
from vlmlabel.model import load_model
from vlmlabel.reader.buffers import BufferPool
from vlmlabel.reader.readahead import decode_jpegs, iter_batches
from vlmlabel.run.lifecycle import RelabelRequest, relabel_file
from vlmlabel.sources import Align, open_source

pytestmark = pytest.mark.gpu
GOALS = ["a red block on a plate", "the drawer is open"]
CUDA = torch.device("cuda", 0)
TOLERANCE = {"fp32": 5e-3, "bf16": 3e-2}
JPEG_DECODING = 1e-2  # the reference decodes with PIL, the GPU with nvJPEG: pixels a few levels apart


def _jpeg_blobs(tmp_path) -> list[torch.Tensor]:
    layout_file = layouts.build_episodes_gray_jpeg(tmp_path / "jpeg.h5")
    with open_source(str(layout_file.path)) as source:
        batches = list(iter_batches(source, source.episodes(Align.frame), 64, jpeg_on_device=True))
    assert {b.form for b in batches} == {"jpeg"}
    return [blob for batch in batches for blob in batch.frames]


def test_nvjpeg_decodes_the_batch_on_the_gpu_like_the_cpu_decoder(tmp_path):
    blobs = _jpeg_blobs(tmp_path)
    direct = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=CUDA)  # nvJPEG itself: no CPU fallback taken
    on_gpu = decode_jpegs(blobs, CUDA)
    on_cpu = decode_jpegs(blobs, torch.device("cpu"))
    assert all(frame.device.type == "cuda" for frame in on_gpu)
    for fast, nv, ref in zip(on_gpu, direct, on_cpu, strict=True):
        assert torch.equal(fast, nv)
        difference = (fast.cpu().int() - ref.int()).abs()
        assert fast.shape == ref.shape and difference.float().mean() < 1.0 and difference.max() <= 16


def test_pinned_buffers_are_reused_and_copied_whole(tmp_path):
    layout_file = layouts.build_flat_d4rl(tmp_path / "flat.h5")
    expected = np.concatenate(layout_file.frame_steps)
    with open_source(str(layout_file.path)) as source:
        pool = BufferPool(2, (4, *source.frame_format.frame_shape), pin=True)
        assert all(buffer.tensor.is_pinned() for buffer in pool.buffers)
        copies, pointers = [], set()
        for batch in iter_batches(source, source.episodes(Align.frame), 4, pool):
            assert isinstance(batch.frames, torch.Tensor) and batch.frames.is_pinned()
            pointers.add(batch.frames.data_ptr())
            copies.append(batch.frames.to(CUDA, non_blocking=True))
            event = torch.cuda.Event()
            event.record()
            batch.release(event)  # refilled only once this copy has completed
    assert len(pointers) == 2
    np.testing.assert_array_equal(torch.cat(copies).cpu().numpy(), expected)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "build, decoding",
    [(layouts.build_robomimic, 0.0), (layouts.build_episodes_gray_jpeg, JPEG_DECODING)],
    ids=["raw", "jpeg"],
)
def test_rewards_on_the_gpu_match_the_cpu_reference(tmp_path, tiny_model_dir, reference, precision, build, decoding):
    layout_file = build(tmp_path / "data.h5")
    summary = relabel_file(
        RelabelRequest(
            source=layout_file.path,
            goals=GOALS,
            model=str(tiny_model_dir),
            device="cuda",
            precision=precision,
            align=Align.frame,
            batch_size=5,
        )
    )
    assert summary.model.device.type == "cuda" and summary.model.precision == precision
    for got, frames in zip(summary.result.rewards, layout_file.frame_steps, strict=True):
        np.testing.assert_allclose(got, reference(frames, GOALS), atol=TOLERANCE[precision] + decoding)


def test_auto_means_the_gpu_in_bf16(tmp_path, tiny_model_dir):
    layout_file = layouts.build_robomimic(tmp_path / "data.h5")
    summary = relabel_file(RelabelRequest(source=layout_file.path, goals=GOALS[:1], model=str(tiny_model_dir)))
    assert summary.model.device.type == "cuda"
    assert summary.model.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_text_only_load_on_the_gpu_encodes_texts_like_the_whole_model(tiny_model_dir):
    whole = load_model(str(tiny_model_dir), device=CUDA, precision="bf16")
    texts = load_model(str(tiny_model_dir), device=CUDA, precision="bf16", image_tower=False)
    assert not texts.has_image_tower
    assert torch.equal(whole.encode_texts(GOALS), texts.encode_texts(GOALS))


@pytest.mark.parametrize("codec", ["libx264", "libsvtav1"])
def test_nvdec_decodes_lerobot_video_to_the_cpu_decoders_pixels(tmp_path, codec):
    """NVDEC (H.264, AV1, as LeRobot encodes them: g=2) gives the CPU decoder's frames, in any request order
    (seeks included), and the same rewards with or without decoding workers."""
    import av

    from tests.table_layouts import encode_mp4
    from tests.test_video_seek import moving_frames
    from vlmlabel.sources.video import VideoReader

    path = tmp_path / "v.mp4"
    encode_mp4(path, moving_frames(60, 96, 128), 10, codec, "yuv420p", {"g": "2", "crf": "30"})
    with av.open(str(path)) as container:
        times = np.asarray([f.time for f in container.decode(video=0)])
    order = np.concatenate([np.arange(30, 60), np.arange(0, 30), np.arange(40, 45)])
    nvdec, cpu = VideoReader(0.05, nvdec_gpu=0), VideoReader(0.05)
    np.testing.assert_array_equal(nvdec.frames(path, times[order]), cpu.frames(path, times[order]))
    nvdec.close()
    cpu.close()


def test_nvdec_rewards_equal_cpu_decoding_with_and_without_workers(tmp_path, tiny_model_dir):
    from tests import table_layouts
    from vlmlabel.sources.base import VideoDecoder

    folder = table_layouts.build_lerobot(tmp_path, video=True).path
    rewards = {}
    for decoder in VideoDecoder:
        for workers in (0, 2):
            out = tmp_path / f"{decoder.value}-{workers}"
            relabel_file(
                RelabelRequest(
                    source=folder,
                    goals=GOALS,
                    model=str(tiny_model_dir),
                    device="cuda",
                    precision="fp32",
                    image_key="observation.images.top",
                    output=out,
                    workers=workers,
                    video_decoder=decoder,
                    use_cache=False,
                )
            )
            with open_source(str(out), "observation.images.top") as labelled:
                rewards[decoder, workers] = [
                    labelled.step_values(e, "vlm_reward_0") for e in labelled.episodes(Align.next)
                ]
    first = rewards[VideoDecoder.cpu, 0]
    for key, found in rewards.items():
        for mine, want in zip(found, first, strict=True):
            np.testing.assert_array_equal(mine, want, err_msg=str(key))
