"""Pictures of a written reward: per-episode curves with frame thumbnails, and a histogram of all values."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmlabel import labelled
from vlmlabel.errors import VlmlabelError
from vlmlabel.sources import Align, Episode, Segment, open_any_camera, open_source

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
DEFAULT_EPISODES = 3
THUMBNAILS = 6
THUMB_HEIGHT = 64
WIDTH_IN, CURVE_IN, STRIP_IN, HIST_IN = 11.0, 2.2, 1.1, 2.4


@dataclass
class PlotRequest:
    source: Path
    reward_key: str
    out: Path = Path("rewards.png")
    episodes: list[int] | None = None
    image_key: str | None = None
    dpi: int = 100
    split: str = "train"  # of a DatasetDict folder or a Hub dataset


@dataclass
class PlotResult:
    out: Path
    keys: list[str]
    episodes: list[int]
    size: tuple[int, int]  # pixels (raster formats)


def parse_episodes(text: str) -> list[int]:
    """'0,3,7' -> [0, 3, 7]."""
    try:
        picked = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise VlmlabelError(f"--episodes {text!r} must be episode numbers separated by commas, e.g. 0,3,7") from None
    if not picked:
        raise VlmlabelError("--episodes is empty; give episode numbers such as 0,3,7")
    return picked


def figure_size(episodes: int, dpi: int) -> tuple[int, int]:
    """Pixel size of the figure for ``episodes`` panels: what the PNG will measure."""
    height = episodes * (CURVE_IN + STRIP_IN) + HIST_IN
    return round(WIDTH_IN * dpi), round(height * dpi)


def _reward_keys(source: Any, episode: Episode, key: str) -> list[str]:
    written = source.reward_keys(episode)
    if key in written:
        return [key]
    several = sorted(
        (k for k in written if k.startswith(f"{key}_") and k[len(key) + 1 :].isdigit()),
        key=lambda k: int(k[len(key) + 1 :]),
    )
    if several:
        return several
    raise labelled.unknown_reward(source, episode, key)


def _to_rgb(block: Any, axes: str) -> np.ndarray:
    """One frame as HWC uint8 RGB."""
    if axes == "encoded":
        from torchvision.io import ImageReadMode, decode_image  # torchvision loads for encoded frames only

        data = torch.from_numpy(np.frombuffer(np.asarray(block, dtype=np.uint8).tobytes(), dtype=np.uint8).copy())
        return decode_image(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
    frame = np.asarray(block)
    if axes == "CHW":
        frame = frame.transpose(1, 2, 0)
    if frame.ndim == 2:
        frame = frame[..., None]
    return np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame


def _frame_at(source: Any, episode: Episode, step: int) -> np.ndarray:
    offset = step
    for segment in episode.frames:
        if offset < len(segment):
            row = segment.start + offset
            block = next(iter(source.read_blocks(Segment(segment.array, row, row + 1), 1)))
            return _to_rgb(block[0], source.frame_format.axes)
        offset -= len(segment)
    raise IndexError(step)


def _strip(frames: list[np.ndarray]) -> np.ndarray:
    """Thumbnails of equal height side by side, with a white gap."""
    resized = []
    for frame in frames:
        height, width = frame.shape[:2]
        size = (max(1, round(width * THUMB_HEIGHT / height)), THUMB_HEIGHT)
        # Image.BILINEAR is set by setattr at import, so Pillow's types miss it; Image.Resampling needs pillow>=9.1
        resized.append(np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR)))  # type: ignore[attr-defined]
    gap = np.full((THUMB_HEIGHT, 6, 3), 255, dtype=np.uint8)
    return np.concatenate([part for frame in resized for part in (frame, gap)][:-1], axis=1)


def plot_file(request: PlotRequest) -> PlotResult:
    """Draw the reward of the chosen episodes (default: the first few) and the histogram of all its values."""
    fmt = FORMATS.get(request.out.suffix.lower())
    if fmt is None:
        raise VlmlabelError(f"--output {request.out} must end in .png, .svg or .pdf")
    if not request.out.resolve().parent.is_dir():
        raise VlmlabelError(f"folder {request.out.resolve().parent} does not exist; create it first")
    # Here, after the checks: a wrong --output is refused without loading matplotlib (slow), and the
    # headless backend is chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = open_any_camera(str(request.source), request.image_key, request.split)
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: source.close())
        # Per-row values by the episodes' own rows (``episodes`` under next start one frame later: o_{t+1}).
        rows = source.episodes(Align.frame)
        keys = _reward_keys(source, rows[0], request.reward_key)
        rewards = [labelled.read_reward(source, rows, k) for k in keys]
        align = rewards[0].align
        scored = str(rewards[0].attrs.get("image_key", ""))  # thumbnails from the camera the reward scored
        if request.image_key is None and scored != source.image_key and scored in source.cameras:
            source.close()
            source = open_source(str(request.source), scored, request.split)
        episodes = source.episodes(align)
        picked = request.episodes if request.episodes is not None else list(range(min(DEFAULT_EPISODES, len(episodes))))
        bad = [i for i in picked if not 0 <= i < len(episodes)]
        if bad:
            raise VlmlabelError(
                f"--episodes {bad[0]} is out of range: the file has {len(episodes)} episodes (0-{len(episodes) - 1})"
            )
        strips = []
        for index in picked:
            episode = episodes[index]
            steps = np.unique(np.linspace(0, episode.steps - 1, min(THUMBNAILS, episode.steps)).astype(int))
            strips.append((steps, _strip([_frame_at(source, episode, int(t)) for t in steps])))

    width, height = figure_size(len(picked), request.dpi)
    fig = plt.figure(figsize=(width / request.dpi, height / request.dpi), dpi=request.dpi)
    ratios = [r for _ in picked for r in (CURVE_IN, STRIP_IN)] + [HIST_IN]
    grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios, hspace=0.55)
    for row, (index, (steps, strip)) in enumerate(zip(picked, strips, strict=True)):
        curve = fig.add_subplot(grid[2 * row])
        for reward in rewards:
            curve.plot(reward.rows[index], label=f"{reward.key}: {reward.attrs.get('goal', '')}"[:70])
        curve.vlines(steps, *curve.get_ylim(), colors="0.8", linestyles=":", linewidth=0.8)
        curve.set_title(f"episode {index} ({episodes[index].name})", fontsize=9, loc="left")
        curve.set_xlabel("observation" if episodes[index].per_observation else "step", fontsize=8)
        curve.set_ylabel("reward", fontsize=8)
        curve.legend(fontsize=7, loc="best")
        thumbs = fig.add_subplot(grid[2 * row + 1])
        thumbs.imshow(strip)
        centres = (np.arange(len(steps)) + 0.5) * (strip.shape[1] + 6) / len(steps) - 3
        thumbs.set_xticks(centres, [f"t={t}" for t in steps], fontsize=7)
        thumbs.set_yticks([])
    histogram = fig.add_subplot(grid[-1])
    for reward in rewards:
        histogram.hist(np.concatenate(reward.rows), bins=50, alpha=0.6, label=reward.key)
    histogram.set_title(f"all {sum(e.steps for e in episodes):,} steps", fontsize=9, loc="left")
    histogram.set_xlabel("reward", fontsize=8)
    histogram.legend(fontsize=7)
    fig.savefig(request.out, format=fmt, dpi=request.dpi)
    plt.close(fig)
    return PlotResult(request.out, keys, picked, (width, height))
