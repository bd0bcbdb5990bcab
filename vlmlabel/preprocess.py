"""Batched preprocessing on the compute device, equal to open_clip's PIL eval transform within rounding.

open_clip resizes a uint8 PIL image (antialiased bicubic, rounded back to uint8), crops, then
scales to [0, 1] and normalises. Resizing uint8 tensors with antialias reproduces PIL's filter
and its rounding, so a whole batch can be transformed on the GPU with the same result.
Everything here is built from the model's ``PreprocessConfig``: no constants of its own.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from vlmlabel.model import PreprocessConfig


class DevicePreprocess:
    """Turn a batch of uint8 frames (N, C, H, W) on the device into the model's input."""

    def __init__(self, cfg: PreprocessConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.mean = torch.tensor(cfg.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        bilinear = cfg.interpolation == "bilinear"
        self.interpolation = InterpolationMode.BILINEAR if bilinear else InterpolationMode.BICUBIC

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 frames (N, 1|3, H, W), got {tuple(frames.shape)} {frames.dtype}")
        frames = self._resize_and_crop(frames)
        if frames.shape[1] == 1:
            frames = frames.expand(-1, 3, -1, -1)
        pixels = frames.float().div_(255.0)
        return pixels.sub_(self.mean).div_(self.std)

    def _resize_and_crop(self, frames: torch.Tensor) -> torch.Tensor:
        height, width = frames.shape[-2:]
        target_h, target_w = self.cfg.size
        mode = self.cfg.resize_mode
        if mode == "squash":
            return self._resize(frames, [target_h, target_w], self.interpolation)
        if mode == "longest":
            ratio = max(height / target_h, width / target_w)
            frames = self._resize(frames, [round(height / ratio), round(width / ratio)], self.interpolation)
            return _center_crop_or_pad(frames, target_h, target_w, self.cfg.fill_color)
        if target_h == target_w:
            # torchvision's Resize(int): shortest side to the target, the other side int(size * long / short).
            frames = self._resize(frames, [target_h], self.interpolation)
        else:
            # open_clip's ResizeKeepRatio path for non-square targets is always bicubic.
            ratio = min(height / target_h, width / target_w)
            frames = self._resize(frames, [round(height / ratio), round(width / ratio)], InterpolationMode.BICUBIC)
        return _center_crop_or_pad(frames, target_h, target_w, fill=0)

    @staticmethod
    def _resize(frames: torch.Tensor, size: list[int], interpolation: InterpolationMode) -> torch.Tensor:
        height, width = frames.shape[-2:]
        if len(size) == 1:  # torchvision's Resize(int): shortest side to size, the other int(size * long / short)
            short, long = min(height, width), max(height, width)
            other = int(size[0] * long / short)
            size = [size[0], other] if height <= width else [other, size[0]]
        new_h, new_w = size
        # One separable pass per side, each rounded to uint8, in the order that reproduces Pillow's output
        # (checked in tests/test_preprocess.py): the more strongly reduced side first, width on a tie.
        # A side that keeps its length is not resampled.
        if height / new_h > width / new_w:
            frames = TF.resize(frames, [new_h, width], interpolation=interpolation, antialias=True)
        if new_w != width:
            frames = TF.resize(frames, [frames.shape[-2], new_w], interpolation=interpolation, antialias=True)
        if frames.shape[-2] != new_h:
            frames = TF.resize(frames, [new_h, new_w], interpolation=interpolation, antialias=True)
        return frames


def _center_crop_or_pad(frames: torch.Tensor, crop_h: int, crop_w: int, fill: int) -> torch.Tensor:
    height, width = frames.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_left = (crop_w - width) // 2 if crop_w > width else 0
        pad_top = (crop_h - height) // 2 if crop_h > height else 0
        pad_right = (crop_w - width + 1) // 2 if crop_w > width else 0
        pad_bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        frames = torch.nn.functional.pad(frames, (pad_left, pad_right, pad_top, pad_bottom), value=fill)
        height, width = frames.shape[-2:]
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return frames[..., top : top + crop_h, left : left + crop_w]
