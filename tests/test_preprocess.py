"""The device transform equals open_clip's PIL eval transform within uint8 rounding, for every resize mode."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from tests.conftest import TINY_PREPROCESS
from tests.layouts import make_frames
from vlmlabel.model import PreprocessConfig, load_model
from vlmlabel.preprocess import DevicePreprocess

CPU = torch.device("cpu")


def reference(cfg: PreprocessConfig, frames: np.ndarray) -> torch.Tensor:
    oc_cfg = open_clip.transform.PreprocessCfg(
        size=cfg.size, mean=cfg.mean, std=cfg.std, resize_mode=cfg.resize_mode, interpolation=cfg.interpolation
    )
    transform = open_clip.transform.image_transform_v2(oc_cfg, is_train=False)
    return torch.stack([transform(Image.fromarray(f.squeeze(-1) if f.shape[-1] == 1 else f)) for f in frames])


def ours(cfg: PreprocessConfig, frames: np.ndarray) -> torch.Tensor:
    return DevicePreprocess(cfg, CPU)(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous())


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(32, 32), (224, 224), (40, 48)])
@pytest.mark.parametrize("frame_hw", [(84, 84), (60, 90), (120, 64)])
def test_matches_open_clip_pil_transform(mode, size, frame_hw):
    cfg = PreprocessConfig(size=size, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25), resize_mode=mode)
    frames = make_frames(3, *frame_hw, seed=sum(frame_hw))
    want, got = reference(cfg, frames), ours(cfg, frames)
    assert got.shape == want.shape
    # Differences are uint8 rounding steps. For 'shortest'/'longest' (every pretrained open_clip model):
    # at most 2 levels anywhere. For 'squash' on these pure-noise frames the order of Pillow's rounded
    # passes shows on a few pixels (up to 10 levels), still almost none on average.
    levels = (got - want).abs() * torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    assert levels.max() <= (2.01 if mode != "squash" else 10.01)
    assert levels.mean() < 0.15


def test_grayscale_frames_are_expanded_like_pil_convert_rgb():
    cfg = PreprocessConfig(size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    gray = make_frames(2, 50, 50, seed=3, channels=1)
    levels = (ours(cfg, gray) - reference(cfg, gray)).abs() * 255 * 0.3
    assert levels.max() <= 2.01


def test_preprocess_config_comes_from_the_loaded_model(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    assert model.preprocess.mean == tuple(TINY_PREPROCESS["mean"])
    assert model.preprocess.std == tuple(TINY_PREPROCESS["std"])
    assert model.preprocess.size == (32, 32)


def test_embeddings_match_reference_and_tolerance_separates_filters(tiny_model_dir):
    """vlmlabel's embeddings equal open_clip's within 5e-4; a bilinear resize would not pass that bar."""
    model = load_model(str(tiny_model_dir))
    ref_model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    frames = make_frames(8, 42, 42, seed=5)
    with torch.no_grad():
        want = torch.nn.functional.normalize(
            ref_model.eval().encode_image(torch.stack([transform(Image.fromarray(f)) for f in frames])), dim=-1
        )
    batch = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    preprocess = DevicePreprocess(model.preprocess, CPU)
    assert (model.encode_images(preprocess(batch)) - want).abs().max() < 5e-4
    preprocess.interpolation = InterpolationMode.BILINEAR
    assert (model.encode_images(preprocess(batch)) - want).abs().max() > 5e-4
