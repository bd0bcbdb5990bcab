"""vlmlabel.RewardModel, the library door, against open_clip's own pipeline and direct NumPy formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests import layouts
from tests.conftest import TINY_CFG, build_model_dir
from vlmlabel import RewardModel
from vlmlabel.errors import VlmlabelError
from vlmlabel.rewards import RewardMode

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models only lose from intra-op threads

GOALS = ["a red square", "a blue circle on the left"]
NEGATIVES = ["a green triangle", "an empty frame", "a dog"]
TOL = 2e-3

# A second model that differs in everything the preprocessing reads: input size, resize mode, filter, statistics.
OTHER_CFG = {**TINY_CFG, "embed_dim": 24, "vision_cfg": {**TINY_CFG["vision_cfg"], "image_size": 48, "patch_size": 12}}
OTHER_PREPROCESS = {
    "mean": [0.3, 0.5, 0.6],
    "std": [0.2, 0.22, 0.3],
    "interpolation": "bilinear",
    "resize_mode": "squash",
}


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("models") / "other-clip", 1, OTHER_CFG, OTHER_PREPROCESS)


def _oracle(model_dir: Path):
    """open_clip's PIL pipeline in fp32: (image embeddings of NHWC RGB frames, text embedder, logit scale)."""
    import open_clip
    from PIL import Image

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")

    def images(frames: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            pixels = torch.stack([transform(Image.fromarray(f)) for f in frames])
            return torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()

    def texts(prompts: list[str]) -> np.ndarray:
        with torch.no_grad():
            return torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1).numpy()

    return images, texts, float(model.logit_scale.detach().exp())


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return layouts.make_frames(6, 40, 52, seed=7)


@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir) -> RewardModel:
    return RewardModel(model=str(tiny_model_dir), goals=GOALS, device="cpu", batch_size=4)


def test_exported_lazily_from_the_package():
    import vlmlabel
    import vlmlabel.api

    assert vlmlabel.RewardModel is vlmlabel.api.RewardModel
    assert "RewardModel" in vlmlabel.__all__


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "HWC", "CHW", "torch-NHWC", "torch-NCHW", "list"])
def test_matches_open_clip_reference_in_every_layout(tiny_rm, reference, rgb, layout):
    expected = reference(rgb, GOALS)
    frames = {
        "NHWC": rgb,
        "NCHW": np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)),
        "HWC": rgb[2],
        "CHW": rgb[2].transpose(2, 0, 1),  # non-contiguous view
        "torch-NHWC": torch.from_numpy(rgb),
        "torch-NCHW": torch.from_numpy(rgb).permute(0, 3, 1, 2),
        "list": list(rgb),
    }[layout]
    got = tiny_rm(frames)
    assert got.dtype == np.float32
    if layout in ("HWC", "CHW"):
        assert got.shape == (1, len(GOALS))
        np.testing.assert_allclose(got[0], expected[2], atol=TOL)
    else:
        assert got.shape == (len(rgb), len(GOALS))  # 6 frames in batches of 4: the batching is invisible
        np.testing.assert_allclose(got, expected, atol=TOL)


def test_grayscale_frames_score_like_their_rgb_expansion(tiny_rm, reference):
    gray = layouts.make_frames(3, 36, 44, seed=9, channels=1)
    expected = reference(np.repeat(gray, 3, axis=-1), GOALS)
    np.testing.assert_allclose(tiny_rm(gray), expected, atol=TOL)  # (N, H, W, 1)
    np.testing.assert_allclose(tiny_rm(gray.transpose(0, 3, 1, 2)), expected, atol=TOL)  # (N, 1, H, W)
    np.testing.assert_allclose(tiny_rm(gray[1, :, :, 0]), expected[1:2], atol=TOL)  # one (H, W) frame


def test_one_goal_gives_one_reward_per_frame(tiny_model_dir, reference, rgb):
    rm = RewardModel(model=str(tiny_model_dir), goals="a red square", device="cpu")
    assert rm.goals == ["a red square"]
    many, one = rm(rgb), rm(rgb[0])
    assert many.shape == (len(rgb),) and one.shape == (1,)
    np.testing.assert_allclose(many, reference(rgb, ["a red square"])[:, 0], atol=TOL)
    np.testing.assert_allclose(one, many[:1], atol=1e-5)
    assert rm(rgb[:0]).shape == (0,)


def test_embed_gives_the_reference_unit_embeddings(tiny_rm, tiny_model_dir, rgb):
    images, _, _ = _oracle(tiny_model_dir)
    embedded = tiny_rm.embed(rgb)
    assert embedded.shape == (len(rgb), TINY_CFG["embed_dim"]) and embedded.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedded, images(rgb), atol=TOL)
    assert tiny_rm.embed(rgb[:0]).shape == (0, TINY_CFG["embed_dim"])


def test_a_second_model_uses_its_own_preprocessing(other_model_dir, rgb):
    images, texts, _ = _oracle(other_model_dir)
    rm = RewardModel(model=f"local-dir:{other_model_dir}", goals=GOALS, device="cpu")
    assert rm.model.preprocess.size == (48, 48) and rm.model.preprocess.resize_mode == "squash"
    expected = images(rgb) @ texts(GOALS).T
    np.testing.assert_allclose(rm(rgb), expected, atol=TOL)
    np.testing.assert_allclose(rm(rgb.transpose(0, 3, 1, 2)), expected, atol=TOL)
    assert rm.embed(rgb).shape == (len(rgb), OTHER_CFG["embed_dim"])


def test_softmax_and_threshold_match_numpy(tiny_model_dir, rgb):
    images, texts, scale = _oracle(tiny_model_dir)
    x, g, n = images(rgb), texts(GOALS), texts(NEGATIVES)
    expected = np.empty((len(rgb), len(GOALS)))
    for j in range(len(GOALS)):
        logits = scale * np.concatenate([x @ g[j : j + 1].T, x @ n.T], axis=1)
        logits -= logits.max(axis=1, keepdims=True)
        expected[:, j] = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)
    rm = RewardModel(model=str(tiny_model_dir), goals=GOALS, reward="softmax", negatives=NEGATIVES, device="cpu")
    got = rm(rgb)
    np.testing.assert_allclose(got, expected, atol=TOL)
    level = float(np.median(got))
    cut = RewardModel(
        model=str(tiny_model_dir),
        goals=GOALS,
        reward=RewardMode.softmax,
        negatives=NEGATIVES,
        threshold=level,
        device="cpu",
    )(rgb)
    np.testing.assert_array_equal(cut, (got >= level).astype(np.float32))
    assert 0 < cut.sum() < cut.size


def test_contrastive_with_a_prompt_ensemble_matches_numpy(tiny_model_dir, rgb):
    images, texts, _ = _oracle(tiny_model_dir)
    templates = ["a photo of {}", "{}"]

    def ensemble(words: list[str]) -> np.ndarray:
        rows = np.stack([texts([t.replace("{}", w) for t in templates]).mean(axis=0) for w in words])
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    x = images(rgb)
    expected = x @ ensemble(GOALS).T - (x @ ensemble(NEGATIVES).T).mean(axis=1, keepdims=True)
    rm = RewardModel(
        model=str(tiny_model_dir),
        goals=GOALS,
        reward="contrastive",
        negatives=NEGATIVES,
        templates=templates,
        device="cpu",
    )
    np.testing.assert_allclose(rm(rgb), expected, atol=TOL)


def test_projection_with_alpha_zero_is_cosine(tiny_model_dir, reference, rgb):
    rm = RewardModel(
        model=str(tiny_model_dir), goals=GOALS, reward="projection", baselines=["a picture"], alpha=0.0, device="cpu"
    )
    np.testing.assert_allclose(rm(rgb), reference(rgb, GOALS), atol=TOL)


@pytest.mark.parametrize(
    "frames, words",
    [
        (np.zeros((2, 16, 16, 3), dtype=np.float32), "convert them"),
        (torch.zeros((2, 3, 16, 16), dtype=torch.float16), "convert them"),
        (np.zeros((2, 16, 16, 3), dtype=np.int64), "uint8"),
        (np.zeros((2, 16, 16, 5), dtype=np.uint8), "1 or 3 channels"),
        (np.zeros((4, 16, 16), dtype=np.uint8), "(N, H, W, 1)"),
        (np.zeros((16,), dtype=np.uint8), "give one frame"),
        ("frame.png", "numpy array or a torch tensor"),
    ],
)
def test_bad_frames_are_refused_never_rescaled(tiny_rm, frames, words):
    with pytest.raises(VlmlabelError) as caught:
        tiny_rm(frames)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"shaping": "delta"}, "whole episodes"),
        ({"normalize": "episode"}, "whole episodes"),
        ({"reward": "hinge"}, "unknown reward"),  # "sigmoid" is a formulation since issue 22
        ({"reward": "softmax"}, "--negative"),
        ({"goals": []}, "no goal"),
        ({"negatives_": ["x"]}, "unknown option"),
    ],
)
def test_bad_formulations_are_refused_before_loading(options, words):
    # The model does not exist: every refusal must come before it would be loaded.
    with pytest.raises(VlmlabelError) as caught:
        RewardModel(**{"model": "/nonexistent/model", "goals": ["g"], "device": "cpu", **options})
    assert words in str(caught.value)
