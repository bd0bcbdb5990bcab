"""Goal images for tests, and the oracle for them: open_clip's own computation, one image at a time."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.layouts import make_frames


def write_goal_image(path: Path, fmt: str = "PNG", seed: int = 11, size: tuple[int, int] = (52, 70)) -> Path:
    """An RGB goal image of another size than the frames (its own resize and crop), saved as ``fmt``."""
    Image.fromarray(make_frames(1, *size, seed=seed)[0]).save(path, format=fmt, quality=95)
    return path


@functools.lru_cache(maxsize=4)
def _open_clip(model_dir: str):
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    return model.eval(), transform


def open_clip_image_cosines(model_dir: Path, frames: np.ndarray, goals: list[Image.Image | np.ndarray]) -> np.ndarray:
    """cos(encode_image(frame), encode_image(goal)) per frame and goal image, through open_clip's PIL transform,
    one image at a time: goal files as PIL opens them, frames (and goal frames) as RGB arrays."""
    model, transform = _open_clip(str(model_dir))

    def embed(image: Image.Image | np.ndarray) -> torch.Tensor:
        pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        with torch.no_grad():
            return torch.nn.functional.normalize(model.encode_image(transform(pil).unsqueeze(0)), dim=-1)[0]

    goal_rows = torch.stack([embed(g) for g in goals])
    return np.stack([(goal_rows @ embed(frame)).numpy() for frame in frames])


def opened(path: Path) -> Image.Image:
    """The goal image file as an open_clip user opens it."""
    return Image.open(io.BytesIO(path.read_bytes()))


def sixteen_bit_gray(path: Path) -> Path:
    """A 16-bit grayscale PNG: PIL clips it when converting to RGB, so no exact score exists (refused)."""
    Image.fromarray(make_frames(1, 30, 30, seed=5)[0][..., 0].astype(np.uint16) * 257).save(path, format="PNG")
    return path


def cmyk_jpeg(path: Path) -> Path:
    """A CMYK JPEG: PIL resizes it in CMYK before converting to RGB (refused)."""
    Image.fromarray(make_frames(1, 30, 30, seed=6)[0]).convert("CMYK").save(path, format="JPEG")
    return path


def not_an_image(path: Path) -> Path:
    path.write_text("a photo of the goal, in words\n")
    return path
