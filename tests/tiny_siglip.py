"""A tiny random sigmoid-trained (SigLIP-shaped) open_clip model in local-dir layout, for tests.

Like open_clip's SigLIP configs (``ViT-B-16-SigLIP.json``): a ``CustomTextCLIP`` (``custom_text``) built with
``init_logit_bias``, a bidirectional text tower pooled at the last token, and a Hugging Face tokenizer named by
``hf_tokenizer_name``, which open_clip's ``get_tokenizer`` reads from the model folder itself for a
``local-dir:`` model. The tokenizer is a word-level one trained here by the ``tokenizers`` library on a few
sentences and saved with ``transformers``' ``PreTrainedTokenizerFast``, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.conftest import TINY_PREPROCESS
from vlmlabel.model import save_local_dir

CORPUS = [
    "a robot arm reaches the red block",
    "the drawer is open",
    "the drawer is closed",
    "a blue cube on a green plate",
    "the gripper holds nothing",
]
SPECIALS = ["<pad>", "<unk>", "</s>"]
CONTEXT = 16
LOGIT_SCALE = 2.0  # exp(2) = 7.4 (SigLIP: about 110): the tiny model's cosines then spread its probabilities
LOGIT_BIAS = -0.5  # not SigLIP's -10: a random tiny model's probabilities then stay away from 0 and 1


def _tokenizer(folder: Path) -> int:
    """Train and save the word-level tokenizer; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return tokenizer.get_vocab_size()


def build_siglip_dir(folder: Path, seed: int = 0) -> Path:
    """The model folder: open_clip_config.json, safetensors weights and the tokenizer's files."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(folder)
    text_cfg = {
        "context_length": CONTEXT,
        "vocab_size": vocab,
        "hf_tokenizer_name": "tiny-siglip-tokenizer",  # any name: a local-dir model's tokenizer is its folder
        "tokenizer_kwargs": {"clean": "canonicalize"},
        "width": 64,
        "heads": 2,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
    }
    vision_cfg = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0}
    cfg = {"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": text_cfg, "init_logit_bias": LOGIT_BIAS}
    torch.manual_seed(seed)
    module = open_clip.CustomTextCLIP(**cfg)
    with torch.no_grad():
        module.logit_scale.fill_(LOGIT_SCALE)
    save_local_dir(module, {**cfg, "custom_text": True}, TINY_PREPROCESS, folder)
    return folder


def open_clip_sigmoid(model_dir: Path) -> Callable[[np.ndarray, list[str]], np.ndarray]:
    """open_clip's own computation, one frame at a time: PIL transform, ``model(image, text)``, sigmoid."""
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")

    def probabilities(frames: np.ndarray, goals: list[str]) -> np.ndarray:
        rows = []
        with torch.no_grad():
            for frame in frames:
                image, text, scale, bias = model(transform(Image.fromarray(frame)).unsqueeze(0), tokenizer(goals))
                rows.append(torch.sigmoid(scale * image @ text.T + bias)[0].numpy())
        return np.stack(rows)

    return probabilities
