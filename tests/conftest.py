"""Fixtures: tiny random open_clip models saved in local-dir layout, and small HDF5 files of every layout."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Digests vlmlabel remembers between runs go to a folder of the test session, not the user's ~/.cache.
_CACHE_DIR = tempfile.TemporaryDirectory(prefix="vlmlabel-tests-")  # removed when the session's interpreter exits
os.environ["VLMLABEL_CACHE_DIR"] = _CACHE_DIR.name

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests import layouts  # noqa: E402
from vlmlabel.model import create_untrained, save_local_dir  # noqa: E402

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Deliberately not OpenAI's statistics: the transform must come from the model's own config.
TINY_PREPROCESS = {
    "mean": [0.5, 0.45, 0.4],
    "std": [0.25, 0.3, 0.27],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def build_model_dir(
    folder: Path, seed: int, cfg: dict = TINY_CFG, preprocess: dict = TINY_PREPROCESS, nan_weights: bool = False
) -> Path:
    """A random open_clip model saved in local-dir layout, loaded by tests through the users' code path;
    ``nan_weights``: its image projection is NaN, so every image embedding and score it gives is NaN."""
    torch.manual_seed(seed)
    model = create_untrained(cfg)
    if nan_weights:
        with torch.no_grad():
            model.visual.proj.fill_(float("nan"))
    return save_local_dir(model, cfg, preprocess, folder)


# Read once, before any test hides the GPU: initialising CUDA here fixes which GPUs this process sees.
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """Every test not marked ``gpu`` runs as on a CPU-only machine, in this process and in those it starts: they
    leave the device on auto and compare with open_clip's fp32 CPU pipeline at CPU tolerances, expect CPU
    defaults (fp32, batch 32) and the "no CUDA GPU" refusal. Tests marked ``gpu`` run on the GPU and are
    skipped without one."""
    if request.node.get_closest_marker("gpu"):
        if not CUDA:
            pytest.skip("needs a CUDA GPU")
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """``tiny_vlm(family) -> Path``: a tiny random VLM of that family (tools/synthetic/tiny_vlm.FAMILIES),
    seed 0, built once per session. transformers is the optional ``vlm`` extra: tests without it are skipped."""
    pytest.importorskip("transformers")
    from tools.synthetic.tiny_vlm import build_tiny_vlm

    root = tmp_path_factory.mktemp("vlms")
    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_vlm(family, root / family, seed=0)
        return built[family]

    return folder


@pytest.fixture()
def frames() -> np.ndarray:
    return layouts.make_frames(24, 40, 48, seed=1)


@pytest.fixture(params=sorted(layouts.BUILDERS))
def layout_file(request, tmp_path) -> layouts.LayoutFile:
    return layouts.BUILDERS[request.param](tmp_path / f"{request.param}.h5")


@pytest.fixture()
def one_thread():
    """Tiny models only lose from intra-op threads, badly so on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    """open_clip's own pipeline, the oracle: its PIL preprocess per frame, fp32, cosine with each goal."""
    import open_clip
    from PIL import Image

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")

    def score(frames: np.ndarray, goals: list[str]) -> np.ndarray:
        with torch.no_grad():
            pixels = torch.stack([transform(Image.fromarray(f)) for f in frames])
            image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
            text = torch.nn.functional.normalize(model.encode_text(tokenizer(goals)), dim=-1)
        return (image @ text.T).numpy()

    return score
