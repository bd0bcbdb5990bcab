"""Model resolution as users write it: folders, local-dir:, hf-hub: from a pre-filled cache, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import pytest

from tests import layouts
from vlmlabel.errors import ModelError
from vlmlabel.model import describe_model, load_model


def test_plain_folder_and_local_dir_prefix_load_the_same_weights(tiny_model_dir):
    a = load_model(str(tiny_model_dir))
    b = load_model(f"local-dir:{tiny_model_dir}")
    assert a.pretrained == b.pretrained == "bundled"
    for (name, x), (_, y) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert (x == y).all(), name


def test_random_weights_refused_outside_bench():
    with pytest.raises(ModelError, match="only accepted by `vlmlabel bench`"):
        load_model("ViT-B-32", "random")


def test_hf_hub_model_loads_offline_from_a_prefilled_cache(tmp_path, tiny_model_dir):
    """hf-hub:ORG/REPO resolves from the Hugging Face cache layout with HF_HUB_OFFLINE=1 and no network."""
    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-clip" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    source = layouts.build_robomimic(tmp_path / "r.h5").path
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmlabel",
            "relabel",
            str(source),
            "--model",
            "hf-hub:acme/tiny-clip",
            "--goal",
            "a cup",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    with h5py.File(source, "r") as f:
        assert f["data/demo_0/vlm_reward"].attrs["pretrained"] == "hf-hub:acme/tiny-clip"


def test_text_only_load_matches_the_whole_model(tiny_model_dir):
    """A relabel served by the cache loads the text tower only: same text embeddings to the bit, same logit
    scale, same description (so the same cache matches and the same result id), and no image weights."""
    import torch

    whole = load_model(str(tiny_model_dir))
    texts = load_model(str(tiny_model_dir), image_tower=False)
    goals = ["a red block on a plate", "the drawer is open"]
    assert torch.equal(whole.encode_texts(goals), texts.encode_texts(goals))
    assert texts.logit_scale == whole.logit_scale
    assert texts.describe() == whole.describe() and texts.weights_identity() == whole.weights_identity()
    assert whole.has_image_tower and not texts.has_image_tower
    assert not any(name.startswith("visual.") for name, _ in texts.module.named_parameters())
    with pytest.raises(ModelError, match="without its image tower"):
        texts.encode_images(torch.zeros(1, 3, *texts.preprocess.size))
    assert torch.nn.init.normal_(torch.zeros(2)).abs().sum() > 0  # the load leaves torch's initialisers working


@pytest.mark.parametrize(("name", "pretrained"), [(None, None), ("ViT-B-32", "random"), ("RN50", "random")])
def test_a_models_card_describes_it_as_the_loaded_model_does(name, pretrained, tiny_model_dir):
    """A run names its result (and matches a cache) from the card, before any weight loads: the card must say
    what the loaded model records, to the byte (preprocessing from the architecture, weights hashed)."""
    name = name or str(tiny_model_dir)
    card = describe_model(name, pretrained, "fp32", allow_random=True)
    loaded = load_model(name, pretrained, allow_random=True)
    assert card.describe() == loaded.describe() and card.weights_identity() == loaded.weights_identity()
    given = load_model(name, pretrained, allow_random=True, card=card)  # the weights are not hashed again
    assert given.describe() == loaded.describe()


def test_a_card_refuses_what_the_load_refuses(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        describe_model("ViT-B-33")
    with pytest.raises(ModelError, match="open_clip_config.json"):
        describe_model(f"local-dir:{tmp_path}")


def test_random_weights_have_no_text_only_load():
    model = load_model("ViT-B-32", "random", allow_random=True, image_tower=False)
    assert model.has_image_tower  # nothing to load the text tower from: the whole random model


def test_text_only_load_of_a_checkpoint_missing_text_weights_fails_as_the_whole_load(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "open_clip_model.safetensors"
    state = load_file(str(weights))
    del state["ln_final.weight"]
    save_file(state, str(weights))
    with pytest.raises(ModelError, match="could not load model"):
        load_model(str(broken), image_tower=False)
