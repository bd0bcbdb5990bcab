"""--reward sigmoid: SigLIP's readout sigmoid(logit_scale * cos + logit_bias), with the model's own scale and bias.

The oracle is open_clip itself: a tiny random sigmoid-trained model (``tests/tiny_siglip.py``: a CustomTextCLIP
built with ``init_logit_bias``, in local-dir layout, with a Hugging Face tokenizer) is loaded by open_clip, each
frame goes through open_clip's own PIL preprocessing one at a time, and ``model(image, text)`` gives the
features, the logit scale and the logit bias; the probability is the sigmoid of the logits open_clip's
``get_logits`` forms of them. vlmlabel loads the same folder through ``--model`` and scores in batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests import layouts, tiny_siglip
from tests.cluster_files import make_dataset, read_attrs, read_rewards
from tests.tiny_siglip import LOGIT_BIAS, LOGIT_SCALE, build_siglip_dir
from vlmlabel import rewards
from vlmlabel.api import RewardModel
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import RewardConfig, build_score_fn
from vlmlabel.rewards import RewardMode

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
GOALS = ["the drawer is open", "a blue cube on a green plate"]
ATOL = 5e-4  # the frame path's tolerance against open_clip (tests/test_relabel_hdf5.py)
FP16_ATOL = 3e-3  # cached embeddings are float16 (tests/test_cache.py)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    return build_siglip_dir(tmp_path_factory.mktemp("models") / "tiny-siglip")


@pytest.fixture(scope="module")
def open_clip_sigmoid(siglip_dir):
    return tiny_siglip.open_clip_sigmoid(siglip_dir)


def _relabel(source: Path, model_dir: Path, *extra: str):
    goals = [a for g in GOALS for a in ("--goal", g)]
    args = ["relabel", str(source), "--model", f"local-dir:{model_dir}", "--reward", "sigmoid", *goals, *extra]
    return runner.invoke(app, args, terminal_width=300)


def test_the_tiny_model_is_sigmoid_trained_like_siglip(siglip_dir):
    """What the oracle stands on: open_clip builds a CustomTextCLIP whose forward returns its logit bias."""
    import open_clip

    model = open_clip.create_model(f"local-dir:{siglip_dir}")
    assert isinstance(model, open_clip.CustomTextCLIP)
    assert float(model.logit_bias.detach()) == LOGIT_BIAS
    assert type(open_clip.get_tokenizer(f"local-dir:{siglip_dir}")).__name__ == "HFTokenizer"


@pytest.mark.parametrize("align", ["frame", "next"])
def test_sigmoid_rewards_equal_open_clips_own_logits(tmp_path, siglip_dir, open_clip_sigmoid, align):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    result = _relabel(lf.path, siglip_dir, "--align", align, "--batch-size", "5", "-q")
    assert result.exit_code == 0, result.output
    frames = lf.frame_steps if align == "frame" else lf.next_steps
    with h5py.File(lf.path, "r") as f:
        for path, episode in zip(lf.reward_paths, frames, strict=True):
            want = open_clip_sigmoid(episode, GOALS)
            assert 0.01 < want.min() and want.max() < 0.99  # probabilities that move with the cosine: a test
            for goal_index in range(len(GOALS)):
                got = f[path.replace("vlm_reward", f"vlm_reward_{goal_index}")][()]
                np.testing.assert_allclose(got, want[:, goal_index], atol=ATOL)


def test_provenance_records_the_models_scale_and_bias(tmp_path, siglip_dir):
    lf = layouts.build_robomimic(tmp_path / "data.h5")
    assert _relabel(lf.path, siglip_dir, "-q", "--threshold", "0.5").exit_code == 0
    with h5py.File(lf.path, "r") as f:
        attrs = dict(f[lf.reward_paths[0].replace("vlm_reward", "vlm_reward_0")].attrs)
        raw = f[lf.reward_paths[0].replace("vlm_reward", "vlm_reward_0_raw")][()]
        thresholded = f[lf.reward_paths[0].replace("vlm_reward", "vlm_reward_0")][()]
    spec = json.loads(attrs["reward_spec"])
    assert spec["reward"] == "sigmoid" and spec["logit_bias"] == LOGIT_BIAS
    assert spec["logit_scale"] == pytest.approx(np.exp(LOGIT_SCALE), rel=1e-6) and spec["threshold"] == 0.5
    assert attrs["logit_bias"] == LOGIT_BIAS
    assert attrs["formula"] == f"{rewards.SIGMOID_FORMULA} -> 1[p >= 0.5]"
    np.testing.assert_array_equal(thresholded, (raw >= 0.5).astype(np.float32))
    assert RewardConfig.from_attrs(attrs).mode is RewardMode.sigmoid  # evaluate rebuilds it


def test_sigmoid_from_the_cache_and_through_shards(tmp_path, siglip_dir, open_clip_sigmoid):
    """The embedding cache (a text-only load of the model) and shards + merge keep the bias."""
    source = make_dataset(tmp_path / "data.h5", lengths=(5, 7, 4))
    model = f"local-dir:{siglip_dir}"
    assert runner.invoke(app, ["embed", str(source), "--model", model, "-q"]).exit_code == 0
    cached = _relabel(source, siglip_dir)
    assert cached.exit_code == 0 and "using cached embeddings" in cached.output, cached.output
    with h5py.File(source, "r") as f:
        frames = {name: f[f"data/{name}/obs/agentview_image"][()] for name in f["data"]}
    for name, got in read_rewards(source, "vlm_reward_1").items():
        want = open_clip_sigmoid(np.concatenate([frames[name][1:], frames[name][-1:]]), GOALS)[:, 1]
        np.testing.assert_allclose(got, want, atol=FP16_ATOL)
    sharded = make_dataset(tmp_path / "sharded.h5", lengths=(5, 7, 4))
    for index in (1, 0):
        shard = _relabel(sharded, siglip_dir, "--num-shards", "2", "--shard-index", str(index), "-q")
        assert shard.exit_code == 0, shard.output
    assert runner.invoke(app, ["merge", str(sharded)]).exit_code == 0
    spec = json.loads(str(read_attrs(sharded, "vlm_reward_0")["reward_spec"]))
    assert spec["logit_bias"] == LOGIT_BIAS
    for name, got in read_rewards(sharded, "vlm_reward_0").items():
        want = open_clip_sigmoid(np.concatenate([frames[name][1:], frames[name][-1:]]), GOALS)[:, 0]
        np.testing.assert_allclose(got, want, atol=ATOL)


def test_the_python_api_gives_the_same_probabilities(siglip_dir, open_clip_sigmoid):
    frames = layouts.make_frames(6, 40, 48, seed=3)
    reward_model = RewardModel(model=f"local-dir:{siglip_dir}", goals=GOALS, reward="sigmoid", device="cpu")
    np.testing.assert_allclose(reward_model(frames), open_clip_sigmoid(frames, GOALS), atol=ATOL)


def test_sigmoid_formula_and_its_checks():
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    goals = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    want = 1 / (1 + np.exp(-(7.0 * (x @ goals.T).numpy() - 2.0)))
    np.testing.assert_allclose(rewards.sigmoid(x, goals, 7.0, -2.0).numpy(), want, rtol=1e-6)
    config = RewardConfig(goals=["a", "b"], mode=RewardMode.sigmoid).validate()
    encode = lambda texts: goals[[["a", "b"].index(t) for t in texts]]  # noqa: E731
    np.testing.assert_allclose(build_score_fn(config, encode, 7.0, -2.0)(x).numpy(), want, rtol=1e-6)
    with pytest.raises(VlmlabelError, match="needs a model trained with a sigmoid loss"):
        build_score_fn(config, encode, 7.0, None)
    with pytest.raises(VlmlabelError, match="--baseline only applies"):
        RewardConfig(goals=["a"], mode=RewardMode.sigmoid, baselines=["b"]).validate()
    with pytest.raises(VlmlabelError, match="--threshold only applies to --reward softmax or sigmoid"):
        RewardConfig(goals=["a"], mode=RewardMode.cosine, threshold=0.5).validate()
