"""Encoded frames are scored exactly as open_clip's PIL pipeline scores the image as opened, or refused.

open_clip's eval transform resizes and crops the PIL image in its own mode and only then converts it to
RGB. vlmlabel decodes to RGB first and preprocesses on the device. Which image modes that reproduces was
found by comparing both pipelines on each mode (below): every accepted mode is shown equal here, every
refused one is shown to differ (so refusing it is necessary) and to be refused with one clear line.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import datasets
import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.layouts import make_frames
from vlmlabel.cli import app
from vlmlabel.engine import FrameScorer, score_episodes
from vlmlabel.errors import SourceError
from vlmlabel.model import load_model
from vlmlabel.preprocess import DevicePreprocess
from vlmlabel.reader.buffers import as_nchw
from vlmlabel.reader.readahead import iter_batches
from vlmlabel.rewards import cosine
from vlmlabel.sources import Align, open_source

pytestmark = pytest.mark.usefixtures("one_thread")

GOALS = ["a red square", "a blue sky"]
H, W = 60, 90  # resized to the tiny model's 32 x 32: filters and the order of resize and conversion show


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", precision="fp32")


def _png(array: np.ndarray, colour: int, depth: int) -> bytes:
    """A PNG written by hand: PIL cannot save 16-bit colour."""
    height, width = array.shape[:2]
    rows = b"".join(b"\0" + array[y].astype(">u2" if depth == 16 else np.uint8).tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _save(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _blobs(case: str, count: int = 3) -> list[bytes]:
    """``count`` frames of one image mode, encoded."""
    return [_encode(case, rgb, np.random.default_rng(i)) for i, rgb in enumerate(make_frames(count, H, W, seed=7))]


def _encode(case: str, rgb: np.ndarray, rng: np.random.Generator) -> bytes:
    gray = rgb[..., 0]
    opaque, alpha = np.full((H, W), 255, np.uint8), rng.integers(0, 256, (H, W), dtype=np.uint8)
    rgb16 = rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape).astype(np.uint16)
    gray16 = rgb16[..., 0]
    full16 = np.full((H, W), 65535, np.uint16)
    return {
        "RGB PNG": lambda: _save(Image.fromarray(rgb)),
        "L PNG": lambda: _save(Image.fromarray(gray)),
        "L 4-bit PNG": lambda: _save(Image.fromarray(gray // 17 * 17), bits=4),
        "L PNG with tRNS": lambda: _save(Image.fromarray(gray), transparency=int(gray[0, 0])),
        "RGB PNG with tRNS": lambda: _save(Image.fromarray(rgb), transparency=tuple(int(v) for v in rgb[0, 0])),
        "RGBA PNG opaque": lambda: _save(Image.fromarray(np.dstack([rgb, opaque]))),
        "LA PNG opaque": lambda: _save(Image.fromarray(np.dstack([gray, opaque]), "LA")),
        "RGB 16-bit PNG": lambda: _png(rgb16, 2, 16),
        "RGBA 16-bit PNG opaque": lambda: _png(np.dstack([rgb16, full16]), 6, 16),
        "LA 16-bit PNG opaque": lambda: _png(np.dstack([gray16, full16]), 4, 16),
        "RGB JPEG": lambda: _save(Image.fromarray(rgb), "JPEG", quality=95),
        "L JPEG": lambda: _save(Image.fromarray(gray), "JPEG", quality=95),
        "RGB JPEG 4:4:4": lambda: _save(Image.fromarray(rgb), "JPEG", quality=90, subsampling=0),
        "RGB JPEG 4:2:2": lambda: _save(Image.fromarray(rgb), "JPEG", quality=90, subsampling=1),
        "RGB JPEG progressive": lambda: _save(Image.fromarray(rgb), "JPEG", quality=80, progressive=True),
        "RGB JPEG optimized, quality 40": lambda: _save(Image.fromarray(rgb), "JPEG", quality=40, optimize=True),
        "RGB WEBP": lambda: _save(Image.fromarray(rgb), "WEBP", lossless=True),
        # refused
        "RGBA PNG transparent": lambda: _save(Image.fromarray(np.dstack([rgb, alpha]))),
        "LA PNG transparent": lambda: _save(Image.fromarray(np.dstack([gray, alpha]), "LA")),
        "RGBA 16-bit PNG transparent": lambda: _png(np.dstack([rgb16, alpha.astype(np.uint16) * 257]), 6, 16),
        "P PNG": lambda: _save(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)),
        "P PNG with tRNS": lambda: _save(
            Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), transparency=0
        ),
        "1-bit PNG": lambda: _save(Image.fromarray(rng.random((H, W)) > 0.5)),
        "I;16 PNG": lambda: _png(gray16, 0, 16),
        "CMYK JPEG": lambda: _save(Image.fromarray(np.dstack([rgb, alpha]), "CMYK"), "JPEG", quality=95),
        "RGBA WEBP transparent": lambda: _save(Image.fromarray(np.dstack([rgb, alpha])), "WEBP", lossless=True),
        "GIF": lambda: _save(Image.fromarray(rgb), "GIF"),
    }[case]()


ACCEPTED = [
    "RGB PNG",
    "L PNG",
    "L 4-bit PNG",
    "L PNG with tRNS",
    "RGB PNG with tRNS",
    "RGBA PNG opaque",
    "LA PNG opaque",
    "RGB 16-bit PNG",
    "RGBA 16-bit PNG opaque",
    "LA 16-bit PNG opaque",
    "RGB JPEG",
    "L JPEG",
    "RGB WEBP",
]
JPEGS = [
    "RGB JPEG",
    "L JPEG",
    "RGB JPEG 4:4:4",
    "RGB JPEG 4:2:2",
    "RGB JPEG progressive",
    "RGB JPEG optimized, quality 40",
]
ACCEPTED += JPEGS[2:]
REFUSED = {  # case -> what the message names
    "RGBA PNG transparent": "is a PNG with transparency (RGBA)",
    "LA PNG transparent": "is a PNG with transparency (LA)",
    "RGBA 16-bit PNG transparent": "is a PNG with transparency (RGBA)",
    "P PNG": "is a palette PNG (P)",
    "P PNG with tRNS": "is a palette PNG (P)",
    "1-bit PNG": "is a 1-bit PNG (1)",
    "I;16 PNG": "is a 16-bit grayscale PNG (I;16)",
    "CMYK JPEG": "is a CMYK JPEG (CMYK)",
    "RGBA WEBP transparent": "is a WEBP with transparency (RGBA)",
    "GIF": "is a palette GIF (P)",
}


def _h5(path: Path, blobs: list[bytes], bad: list[bytes] = (), at: int = 0) -> Path:
    """Flat file of encoded frames (vlen uint8, as Minari writes them); ``bad`` frames inserted at row ``at``."""
    rows = blobs[:at] + list(bad) + blobs[at:]
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("observations", (len(rows),), dtype=h5py.vlen_dtype(np.uint8))
        for i, blob in enumerate(rows):
            dset[i] = np.frombuffer(blob, np.uint8)
        f.create_dataset("terminals", data=np.zeros(len(rows), bool))
    return path


def _pil_pixels(model, blobs: list[bytes]) -> torch.Tensor:
    """open_clip's own PIL transform on each image as PIL opens it: the oracle."""
    transform = model.reference_transform()
    return torch.stack([transform(Image.open(io.BytesIO(blob))) for blob in blobs])


def _levels(model, got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Pixel differences in uint8 steps."""
    return (got - want).abs() * torch.tensor(model.preprocess.std).view(1, 3, 1, 1) * 255


def _decode_rgb_like_before(blob: bytes) -> torch.Tensor:
    """What plain RGB decoding gives (alpha dropped before the resize; 16 bits to their high byte)."""
    from torchvision.io import ImageReadMode, decode_image

    frame = decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return (frame.to(torch.int32) >> 8).to(torch.uint8) if frame.dtype != torch.uint8 else frame


@pytest.mark.parametrize("case", ACCEPTED)
def test_accepted_modes_score_exactly_as_open_clip_pil(case, tiny, tmp_path):
    blobs = _blobs(case)
    want_pixels = _pil_pixels(tiny, blobs)
    want = cosine(tiny.encode_images(want_pixels), tiny.encode_texts(GOALS)).numpy()
    with open_source(str(_h5(tmp_path / "f.h5", blobs))) as source:
        episodes = source.episodes(Align.frame)
        got = score_episodes(source, tiny, GOALS, Align.frame, batch_size=2, episodes=episodes).all_rewards()
        decoded = [f for batch in iter_batches(source, episodes, 8) for f in as_nchw(batch.frames, batch.form)]
    pixels = DevicePreprocess(tiny.preprocess, torch.device("cpu"))(torch.stack(decoded))
    levels = _levels(tiny, pixels, want_pixels)
    assert levels.max() <= 1.01 and levels.mean() < 0.05, case  # uint8 rounding only
    np.testing.assert_allclose(got, want, atol=2e-3)


def _decoded(path: Path, batch_size: int) -> list[np.ndarray]:
    """The frames of a flat file as the batches hold them, (H, W, 3) each."""
    with open_source(str(path)) as source:
        return [
            f.permute(1, 2, 0).numpy()
            for batch in iter_batches(source, source.episodes(Align.frame), batch_size)
            for f in as_nchw(batch.frames, batch.form)
        ]


@pytest.mark.parametrize("case", JPEGS)
def test_jpeg_frames_are_decoded_to_pils_very_pixels(case, tmp_path, monkeypatch):
    """The JPEG decoder (simplejpeg, libjpeg-turbo) gives what PIL's gives, bit for bit, in every batch slot: a
    frame of another size in the middle of a batch (here larger, so it and the frames after it spill) too."""
    import simplejpeg

    decoded = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: decoded.append(1) or real(*a, **k))
    small = make_frames(2, 30, 44, seed=3)
    blobs = _blobs(case, 5)
    blobs[2:2] = [_encode(case, frame, np.random.default_rng(9)) for frame in small]
    want = [np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in blobs]
    for batch_size in (1, 4, 7):
        got = _decoded(_h5(tmp_path / f"{batch_size}.h5", blobs[2:] + blobs[:2]), batch_size)  # small ones first
        assert len(got) == len(want)
        for mine, pils in zip(got, want[2:] + want[:2], strict=True):
            np.testing.assert_array_equal(mine, pils, err_msg=f"{case}, batch of {batch_size}")
    # Every frame by simplejpeg, none left to the fallback (and each file's first once more, to size the buffers).
    assert len(decoded) == 3 * (len(blobs) + 1)


def test_a_jpeg_simplejpeg_refuses_is_decoded_by_torchvision(tmp_path, monkeypatch):
    """The fallback: what simplejpeg does not decode, torchvision's decoder decodes (or refuses, by row)."""
    import simplejpeg

    def refuse(*args, **kwargs):
        raise ValueError("refused here")

    blobs = _blobs("RGB JPEG", 3)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", refuse)
    got = _decoded(_h5(tmp_path / "f.h5", blobs), 2)
    for mine, blob in zip(got, blobs, strict=True):
        np.testing.assert_array_equal(mine, np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
    truncated = _h5(tmp_path / "t.h5", blobs, [blobs[0][: len(blobs[0]) // 2]], at=1)
    with pytest.raises(SourceError, match="frame 1 of observations is not a decodable JPEG/PNG image"):
        _decoded(truncated, 2)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_modes_differ_from_open_clip_pil(case, tiny):
    """Why each refusal is needed: decoding to RGB and preprocessing does not give PIL's pixels."""
    blobs = _blobs(case)
    ours = DevicePreprocess(tiny.preprocess, torch.device("cpu"))(
        torch.stack([_decode_rgb_like_before(b) for b in blobs])
    )
    assert _levels(tiny, ours, _pil_pixels(tiny, blobs)).max() > 10, case


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_modes_are_named_with_their_frame(case, tiny, tmp_path):
    path = _h5(tmp_path / "f.h5", _blobs("RGB PNG", 5), _blobs(case, 1), at=3)
    with open_source(str(path)) as source, pytest.raises(SourceError) as info:
        score_episodes(source, tiny, GOALS, batch_size=2)
    message = str(info.value)
    assert message.startswith(
        f"frame 3 of observations {REFUSED[case]}; vlmlabel cannot score it exactly as CLIP's PIL pipeline does"
    ), message
    assert "\n" not in message and ("convert it to RGB" in message or "save it as" in message)


def test_cmyk_jpeg_is_refused_before_device_decoding(tiny, tmp_path):
    path = _h5(tmp_path / "f.h5", _blobs("RGB JPEG", 2), _blobs("CMYK JPEG", 1), at=1)
    with open_source(str(path)) as source, pytest.raises(SourceError, match="frame 1 of observations is a CMYK"):
        list(iter_batches(source, source.episodes(Align.frame), 4, jpeg_on_device=True))


def test_transparent_frame_exits_2_with_one_line(tiny_model_dir, tmp_path):
    path = _h5(tmp_path / "f.h5", _blobs("RGB PNG", 2), _blobs("RGBA PNG transparent", 1), at=2)
    result = CliRunner().invoke(
        app,
        ["relabel", str(path), "--goal", "x", "--model", str(tiny_model_dir), "--device", "cpu"],
        terminal_width=400,
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "frame 2 of observations is a PNG with transparency (RGBA)" in lines[0]
    assert "alpha_composite" in lines[0]


def test_hf_image_column_refuses_a_palette_frame_and_accepts_16_bit(tiny, tmp_path):
    features = datasets.Features({"image": datasets.Image()})
    rows = [{"bytes": b, "path": None} for b in _blobs("RGB 16-bit PNG", 2) + _blobs("P PNG", 1)]
    datasets.Dataset.from_dict({"image": rows}, features=features).save_to_disk(str(tmp_path / "bad"))
    with open_source(str(tmp_path / "bad")) as source, pytest.raises(SourceError, match=r"frame 2 of .* \(P\)"):
        score_episodes(source, tiny, GOALS, batch_size=4)
    good = _blobs("RGB 16-bit PNG", 3)
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in good]}, features=features).save_to_disk(
        str(tmp_path / "good")
    )
    with open_source(str(tmp_path / "good")) as source:
        got = score_episodes(source, tiny, GOALS, batch_size=2).all_rewards()
    want = cosine(tiny.encode_images(_pil_pixels(tiny, good)), tiny.encode_texts(GOALS)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_nested_robomimic_float_frames_get_the_float_message(tmp_path):
    path = tmp_path / "float.h5"
    with h5py.File(path, "w") as f:
        for demo in ("demo_0", "demo_1"):
            f.create_dataset(f"data/{demo}/obs/agentview_image", data=np.random.rand(4, 16, 16, 3).astype(np.float32))
            f.create_dataset(f"data/{demo}/actions", data=np.zeros((4, 2), np.float32))
    with pytest.raises(SourceError) as info:
        open_source(str(path))
    message = str(info.value)
    assert "data/demo_0/obs/agentview_image" in message and "float frames" in message
    assert "(x * 255).astype('uint8')" in message and "no image dataset" not in message


def test_device_scorer_keeps_frame_order_with_mixed_sizes_and_alpha(tiny, tmp_path):
    """Opaque RGBA frames lose only their alpha: batches mixing them with RGB score as the frames one by one."""
    blobs = _blobs("RGBA PNG opaque", 2) + _blobs("RGB JPEG", 2) + _blobs("LA 16-bit PNG opaque", 1)
    with open_source(str(_h5(tmp_path / "f.h5", blobs))) as source:
        batches = list(iter_batches(source, source.episodes(Align.frame), 5))
    assert all(f.shape == (3, H, W) and f.dtype == torch.uint8 for f in as_nchw(batches[0].frames, batches[0].form))
    scores = FrameScorer(tiny, GOALS).score(batches[0]).numpy()
    want = cosine(tiny.encode_images(_pil_pixels(tiny, blobs)), tiny.encode_texts(GOALS)).numpy()
    np.testing.assert_allclose(scores, want, atol=2e-3)


def test_bytes_that_are_no_image_are_named_without_the_decoders_internals(tmp_path):
    path = _h5(tmp_path / "f.h5", _blobs("RGB PNG", 3), [b"these bytes are no image at all"], at=2)
    with pytest.raises(SourceError) as info:
        _decoded(path, 4)
    assert str(info.value).startswith(
        "frame 2 of observations is not a decodable JPEG/PNG image (Unsupported "
        "image file); check the file or choose another --image-key"
    )
