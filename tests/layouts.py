"""Small HDF5 files in every layout vlmlabel reads, with what a correct relabel must produce."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image


def make_frames(count: int, height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth random images (a colour gradient plus a moving square), uint8 HWC."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    out = np.empty((count, height, width, channels), dtype=np.uint8)
    for i in range(count):
        base = rng.uniform(0, 255, size=channels)
        slope = rng.uniform(-2, 2, size=(2, channels))
        img = base + ys[..., None] * slope[0] + xs[..., None] * slope[1]
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        img[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.uniform(0, 255, size=channels)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def encode(frame: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def decode(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


@dataclass
class LayoutFile:
    """A file plus the truth: per episode, the RGB frames that must score each step under each alignment."""

    path: Path
    layout: str
    image_key: str
    frame_steps: list[np.ndarray]  # align=frame: frames scoring steps 0..T-1 (Minari: observations 0..T)
    next_steps: list[np.ndarray]  # align=next (Minari: observations 0..T)
    reward_paths: list[str]  # where the rewards land, per target (flat: one path)
    flat: bool = False

    @property
    def steps(self) -> list[int]:
        """Reward values per episode (Minari: one per observation)."""
        return [len(f) for f in self.frame_steps]

    @property
    def transitions(self) -> list[int]:
        """Steps per episode, as the dataset's own per-step arrays count them."""
        return [n - 1 for n in self.steps] if self.layout == "minari" else self.steps


LENGTHS = (5, 7, 4)


def _split(frames: np.ndarray, lengths=LENGTHS) -> list[np.ndarray]:
    return np.split(frames, np.cumsum(lengths)[:-1])


def build_flat_d4rl(path: Path) -> LayoutFile:
    """D4RL style: root `observations`, `terminals`/`timeouts`, `next_observations`."""
    n = sum(LENGTHS)
    obs = make_frames(n, 40, 48, seed=10)
    nxt = make_frames(n, 40, 48, seed=11)
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    terminals[LENGTHS[0] - 1] = True
    timeouts[LENGTHS[0] + LENGTHS[1] - 1] = True  # the last episode ends with the file
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=obs, chunks=(4, 40, 48, 3), compression="gzip")
        f.create_dataset("next_observations", data=nxt, chunks=(4, 40, 48, 3))
        f.create_dataset("terminals", data=terminals)
        f.create_dataset("timeouts", data=timeouts)
        f.create_dataset("rewards", data=np.arange(n, dtype=np.float32))
        f.create_dataset("actions", data=np.zeros((n, 2), np.float32))
    eps, neps = _split(obs), _split(nxt)
    nexts = [np.concatenate([e[1:], ne[-1:]]) for e, ne in zip(eps, neps)]
    return LayoutFile(path, "flat", "observations", eps, nexts, ["vlm_reward"], flat=True)


def build_flat_chw_step_type(path: Path) -> LayoutFile:
    """dm_env style: `obs/pixels` stored CHW, episodes from `step_type`, no next observations."""
    n = sum(LENGTHS)
    obs = make_frames(n, 36, 36, seed=20)
    step_type = np.ones(n, np.uint8)
    for end in np.cumsum(LENGTHS):
        step_type[end - 1] = 2
    with h5py.File(path, "w") as f:
        f.create_dataset("obs/pixels", data=obs.transpose(0, 3, 1, 2))
        f.create_dataset("step_type", data=step_type)
    eps = _split(obs)
    nexts = [np.concatenate([e[1:], e[-1:]]) for e in eps]
    return LayoutFile(path, "flat", "obs/pixels", eps, nexts, ["vlm_reward"], flat=True)


def build_robomimic(path: Path) -> LayoutFile:
    """robomimic: `data/demo_K/obs/agentview_image`, `next_obs/...`; rewards in `data/demo_K/`."""
    eps, nexts, paths = [], [], []
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for k, length in enumerate(LENGTHS):
            obs = make_frames(length, 42, 42, seed=30 + k)
            nxt = make_frames(length, 42, 42, seed=40 + k)
            demo = data.create_group(f"demo_{k}")
            demo.create_dataset("obs/agentview_image", data=obs, chunks=(2, 42, 42, 3), compression="lzf")
            demo.create_dataset("obs/robot0_eef_pos", data=np.zeros((length, 3), np.float32))
            demo.create_dataset("next_obs/agentview_image", data=nxt)
            demo.create_dataset("actions", data=np.zeros((length, 7), np.float32))
            demo.create_dataset("rewards", data=np.zeros(length, np.float32))
            demo.attrs["num_samples"] = length
            eps.append(obs)
            nexts.append(np.concatenate([obs[1:], nxt[-1:]]))
            paths.append(f"data/demo_{k}/vlm_reward")
    return LayoutFile(path, "robomimic", "obs/agentview_image", eps, nexts, paths)


def _minari(path: Path, encoded: bool) -> LayoutFile:
    eps, nexts, paths = [], [], []
    with h5py.File(path, "w") as f:
        for k, length in enumerate(LENGTHS):
            obs = make_frames(length + 1, 32, 40, seed=50 + k)
            group = f.create_group(f"episode_{k}")
            if encoded:
                blobs = [np.frombuffer(encode(o, "PNG"), np.uint8) for o in obs]
                dset = group.create_dataset("observations", (len(blobs),), dtype=h5py.vlen_dtype(np.uint8))
                for i, blob in enumerate(blobs):
                    dset[i] = blob
            else:
                group.create_dataset("observations", data=obs)
            group.create_dataset("actions", data=np.zeros((length, 2), np.float32))
            group.create_dataset("rewards", data=np.zeros(length, np.float32))
            group.create_dataset("terminations", data=np.zeros(length, bool))
            group.create_dataset("truncations", data=np.zeros(length, bool))
            group.attrs["total_steps"] = length
            eps.append(obs)  # one score per observation (T+1), whatever the alignment
            nexts.append(obs)
            paths.append(f"episode_{k}/infos/vlm_reward")
    return LayoutFile(path, "minari", "observations", eps, nexts, paths)


def build_minari(path: Path) -> LayoutFile:
    """Minari: `episode_K/observations` holds T+1 frames; rewards go to `episode_K/infos/`, T+1 of them."""
    return _minari(path, encoded=False)


def build_minari_png(path: Path) -> LayoutFile:
    """Minari >= 0.5.3 style: frames as variable-length PNG bytes."""
    return _minari(path, encoded=True)


def build_episodes_gray_jpeg(path: Path) -> LayoutFile:
    """Top-level episode groups; one with grayscale frames would be (T, H, W): here JPEG in fixed-length rows."""
    eps, nexts, paths = [], [], []
    with h5py.File(path, "w") as f:
        for k, length in enumerate(LENGTHS):
            obs = make_frames(length, 30, 34, seed=60 + k)
            blobs = [encode(o, "JPEG") for o in obs]
            width = max(len(b) for b in blobs) + 7
            rows = np.zeros((length, width), np.uint8)
            for i, blob in enumerate(blobs):
                rows[i, : len(blob)] = np.frombuffer(blob, np.uint8)
            group = f.create_group(f"traj_{k}")
            group.create_dataset("camera_jpeg", data=rows)
            group.create_dataset("actions", data=np.zeros((length, 2), np.float32))
            decoded = np.stack([decode(b) for b in blobs])
            eps.append(decoded)
            nexts.append(np.concatenate([decoded[1:], decoded[-1:]]))
            paths.append(f"traj_{k}/vlm_reward")
    return LayoutFile(path, "episodes", "camera_jpeg", eps, nexts, paths)


def build_episodes_gray(path: Path) -> LayoutFile:
    """Episode groups under `data/` with grayscale (T, H, W) frames."""
    eps, nexts, paths = [], [], []
    with h5py.File(path, "w") as f:
        for k, length in enumerate(LENGTHS):
            gray = make_frames(length, 28, 28, seed=70 + k, channels=1)
            f.create_dataset(f"data/run{k}/frames", data=gray[..., 0])
            rgb = np.repeat(gray, 3, axis=-1)
            eps.append(rgb)
            nexts.append(np.concatenate([rgb[1:], rgb[-1:]]))
            paths.append(f"data/run{k}/vlm_reward")
    return LayoutFile(path, "episodes", "frames", eps, nexts, paths)


BUILDERS: dict[str, Callable[[Path], LayoutFile]] = {
    "flat_d4rl": build_flat_d4rl,
    "flat_chw_step_type": build_flat_chw_step_type,
    "robomimic": build_robomimic,
    "minari": build_minari,
    "minari_png": build_minari_png,
    "episodes_jpeg": build_episodes_gray_jpeg,
    "episodes_gray": build_episodes_gray,
}
