"""Seeded builders of tiny random-weight vision-language models, saved as ordinary Hugging Face folders.

Why it exists: the VLM judge's tests need real transformers models of each family (their processors, chat
templates, vision towers and position schemes) without downloading weights. A builder writes, in about a
second, a folder that ``AutoProcessor.from_pretrained`` and ``AutoModelForImageTextToText.from_pretrained``
load offline: ``config.json``, ``model.safetensors`` (float32), a tokenizer trained here by the ``tokenizers``
library, the image (and video) processor configs and a chat template written here.

Invariants:
- the same family, seed and overrides give byte-identical weights;
- the tokenizer has single tokens for ``REQUIRED_SINGLE`` (" True", "False", " 1".." 5", "Yes", ...) and
  splits ``MULTI_TOKEN_WORD`` (" Truthfully") into several, so refusals of multi-token answers can be tested;
- images are small (32 px by default), so a forward pass takes milliseconds on one CPU thread.

Families (``FAMILIES``): ``qwen2_vl`` and ``qwen3_vl`` take images and video; ``idefics3`` (the architecture
and processor of SmolVLM v1) takes images only, with image splitting off. Video, as transformers 5.25 does it:
frames are merged in pairs (temporal patch 2; an odd count is padded by repeating the last frame), Qwen3-VL
refuses a one-frame video, writes "<t seconds>" timestamps from the metadata's fps and frame indices, and
resamples a clip to 2 fps unless ``do_sample_frames=False`` is passed (as in the real checkpoints).

    python -m tools.synthetic.tiny_vlm --family qwen2_vl --out /tmp/tiny-qwen2-vl
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen3_vl", "idefics3")

# Answers the judge reads as one token, with and without the leading space a chat template may leave.
ANSWERS: tuple[str, ...] = ("True", "False", "Yes", "No", "1", "2", "3", "4", "5")
REQUIRED_SINGLE: tuple[str, ...] = ANSWERS + tuple(" " + a for a in ANSWERS)
MULTI_TOKEN_WORD = " Truthfully"  # never in the training text, so it is several tokens

# Words of chat roles, default prompts and the reach scenes; any other text still encodes, byte by byte.
BASE_WORDS: tuple[str, ...] = (
    "system user assistant User Assistant You are a helpful robot . , : ? ! ' \" ( ) - the a an is are of to in"
    " on and or it this that does do did task goal video image frame frames shows show complete completed"
    " completing success successful progress score rate from how far well answer Answer with only one word"
    " number between true false yes no Is Has been has robot arm gripper object seconds"
).split()

QWEN_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
IDEFICS3_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)

# Jinja chat templates written here. Content is a string or a list of {"type": "text"|"image"|"video"} items.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}:"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<image>"
    "{%- elif item['type'] == 'text' -%}{{ ' ' + item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<end_of_utterance>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


def train_tokenizer(specials: Sequence[str], extra_words: Iterable[str] = (), vocab_size: int = 2048) -> Tokenizer:
    """A byte-level BPE tokenizer trained offline on ``BASE_WORDS``, the answers and ``extra_words``, each with
    and without a leading space. Every trained word ends as one token (training stops when no pair is left;
    ``vocab_size`` is only a cap), any other text still encodes through the 256 byte tokens, and the
    ``specials`` come first, with ids 0.. in order. Raises ValueError if a required answer is not one token."""
    words = sorted({*BASE_WORDS, *ANSWERS, *(w for text in extra_words for w in text.split())})
    corpus = [w for word in words for w in (word, " " + word)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    for word in REQUIRED_SINGLE:
        if len(tokenizer.encode(word, add_special_tokens=False).ids) != 1:
            raise ValueError(f"{word!r} is not one token: raise vocab_size")
    return tokenizer


def _save_tokenizer(tokenizer: Tokenizer, out: Path, chat_template: str, special: dict[str, str]) -> Any:
    """Saves through transformers' generic fast-tokenizer class, so the folder loads exactly this pipeline;
    returns that transformers tokenizer."""
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=chat_template, **special)
    fast.save_pretrained(out)
    return fast


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    assert token_id is not None, token
    return token_id


# --- sizes -------------------------------------------------------------------------------------------------

DEFAULT_SIZES: dict[str, Any] = {
    "hidden_size": 32,  # language model width
    "layers": 1,  # language model layers
    "heads": 2,
    "vision_hidden_size": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "patch_size": 8,
    "image_size": 32,  # frames are resized to about this many pixels on a side
    "extra_words": (),  # added to the tokenizer's training words (e.g. a scene vocabulary)
}


def _sizes(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; known: {sorted(DEFAULT_SIZES)}")
    s = {**DEFAULT_SIZES, **overrides}
    # A frame is a whole number of 2 x 2 merged patches; attention heads split the widths evenly, and the
    # rotary head size is even and splits into three mrope sections.
    if s["image_size"] % (2 * s["patch_size"]):
        raise ValueError(f"image_size {s['image_size']} is not a multiple of 2 * patch_size ({2 * s['patch_size']})")
    for width, heads in (("hidden_size", "heads"), ("vision_hidden_size", "vision_heads")):
        if s[width] % (4 * s[heads]):
            raise ValueError(f"{width} {s[width]} is not a multiple of 4 * {heads} ({4 * s[heads]})")
    return s


# --- Qwen2-VL / Qwen3-VL ---------------------------------------------------------------------------------


def _qwen_pixels(s: dict[str, Any]) -> dict[str, int]:
    """The pixel budget of one frame: images are resized so their area is between these, to multiples of
    patch_size * merge_size (2); with the default 32 px and patch 8 a square frame is 4 x 4 patches."""
    factor = s["patch_size"] * 2
    side = max(factor, s["image_size"] // factor * factor)
    return {"shortest_edge": factor * factor, "longest_edge": side * side}


def _qwen_text_config(s: dict[str, Any], vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    head_dim = s["hidden_size"] // s["heads"]
    # mrope sections (temporal, height, width) count rotary frequency pairs: they sum to head_dim / 2.
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    return {
        "vocab_size": vocab,
        "hidden_size": s["hidden_size"],
        "intermediate_size": 2 * s["hidden_size"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["heads"],
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def _qwen2_vl_config(s: dict[str, Any], vocab: int, ids: dict[str, int]) -> Any:
    text = _qwen_text_config(s, vocab, ids)
    text.pop("head_dim")  # Qwen2-VL derives it from hidden_size / heads
    vision = {
        "depth": s["vision_layers"],
        "embed_dim": s["vision_hidden_size"],
        "hidden_size": s["hidden_size"],  # the merger's output: the language model's width
        "mlp_ratio": 2,
        "num_heads": s["vision_heads"],
        "patch_size": s["patch_size"],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(ids))


def _qwen3_vl_config(s: dict[str, Any], vocab: int, ids: dict[str, int]) -> Any:
    text = _qwen_text_config(s, vocab, ids)
    text["rope_parameters"]["mrope_interleaved"] = True
    grid = max(1, s["image_size"] // s["patch_size"])
    vision = {
        "depth": s["vision_layers"],
        "hidden_size": s["vision_hidden_size"],
        "intermediate_size": 2 * s["vision_hidden_size"],
        "num_heads": s["vision_heads"],
        "patch_size": s["patch_size"],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": s["hidden_size"],
        "num_position_embeddings": grid * grid,  # a square grid of learned positions, interpolated
        "deepstack_visual_indexes": [s["vision_layers"] - 1],  # one deepstack layer, the last
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(ids))


def _qwen_token_ids(ids: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


@dataclass(frozen=True)
class _QwenVariant:
    """What differs between the two Qwen families: the config, the processor classes and the statistics."""

    config: Callable[[dict[str, Any], int, dict[str, int]], Any]
    processor: type
    video_processor: type
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


QWEN2_VL = _QwenVariant(
    _qwen2_vl_config,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    (0.48145466, 0.4578275, 0.40821073),  # OpenAI CLIP's statistics, as Qwen2-VL
    (0.26862954, 0.26130258, 0.27577711),
)
QWEN3_VL = _QwenVariant(_qwen3_vl_config, Qwen3VLProcessor, Qwen3VLVideoProcessor, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _build_qwen(variant: _QwenVariant, out: Path, s: dict[str, Any]) -> Any:
    tokenizer = train_tokenizer(QWEN_SPECIALS, s["extra_words"])
    ids = {t: _token_id(tokenizer, t) for t in QWEN_SPECIALS}
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    fast = _save_tokenizer(tokenizer, out, QWEN_CHAT_TEMPLATE, special)
    common = {
        "patch_size": s["patch_size"],
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": _qwen_pixels(s),
        "image_mean": list(variant.mean),
        "image_std": list(variant.std),
    }
    # Frame sampling keeps transformers' defaults, as real checkpoints do: Qwen3-VL resamples a clip to 2 fps
    # (do_sample_frames=True) unless the caller passes do_sample_frames=False; Qwen2-VL does not resample.
    processor = variant.processor(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=fast,
        video_processor=variant.video_processor(**common),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return variant.config(s, tokenizer.get_vocab_size(), ids)


# --- Idefics3 (SmolVLM) ------------------------------------------------------------------------------------


def _build_idefics3(out: Path, s: dict[str, Any]) -> Any:
    tokenizer = train_tokenizer(IDEFICS3_SPECIALS, s["extra_words"])
    ids = {t: _token_id(tokenizer, t) for t in IDEFICS3_SPECIALS}
    special = {"eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>", "bos_token": "<|im_start|>"}
    fast = _save_tokenizer(tokenizer, out, IDEFICS3_CHAT_TEMPLATE, special)
    side = s["image_size"]
    scale_factor = 2  # pixel shuffle: the connector merges scale_factor**2 patches into one token
    image = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": side},
        max_image_size={"longest_edge": side},
    )
    image_seq_len = (side // s["patch_size"]) ** 2 // scale_factor**2
    processor = Idefics3Processor(
        image_processor=image, tokenizer=fast, image_seq_len=image_seq_len, chat_template=IDEFICS3_CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    vocab = tokenizer.get_vocab_size()
    text = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": s["hidden_size"],
        "intermediate_size": 2 * s["hidden_size"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["heads"],
        "max_position_embeddings": 4096,
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<end_of_utterance>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    vision = {
        "hidden_size": s["vision_hidden_size"],
        "intermediate_size": 2 * s["vision_hidden_size"],
        "num_hidden_layers": s["vision_layers"],
        "num_attention_heads": s["vision_heads"],
        "image_size": side,
        "patch_size": s["patch_size"],
    }
    return Idefics3Config(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<image>"],
        scale_factor=scale_factor,
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


# --- builders ------------------------------------------------------------------------------------------------


BUILDERS: dict[str, Callable[[Path, dict[str, Any]], Any]] = {
    "qwen2_vl": partial(_build_qwen, QWEN2_VL),
    "qwen3_vl": partial(_build_qwen, QWEN3_VL),
    "idefics3": _build_idefics3,
}
assert tuple(BUILDERS) == FAMILIES


def build_tiny_vlm(family: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Writes a tiny random ``family`` VLM into ``out`` (created) and returns ``out``. ``overrides`` replace
    ``DEFAULT_SIZES`` (hidden_size, layers, heads, vision_hidden_size, vision_layers, vision_heads, patch_size,
    image_size, extra_words). Weights are drawn from ``torch.manual_seed(seed)``, saved in float32."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = BUILDERS[family](out, _sizes(overrides))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_remote_code_vlm(out: Path) -> Path:
    """A folder whose config names an architecture only remote code defines (``auto_map`` and a model_type
    transformers does not know): loading it needs ``trust_remote_code``. No weights: it must be refused first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "tiny_remote_vlm",
        "architectures": ["TinyRemoteVlmForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_tiny_remote.TinyRemoteVlmConfig",
            "AutoModelForImageTextToText": "modeling_tiny_remote.TinyRemoteVlmForConditionalGeneration",
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The code it points at raises if it is ever run: a test that loads it fails loudly.
    for name in ("configuration_tiny_remote.py", "modeling_tiny_remote.py"):
        (out / name).write_text('raise RuntimeError("remote code was executed")\n')
    return out


def build_text_only_lm(out: Path, seed: int = 0) -> Path:
    """A tiny Qwen2 causal language model (no vision tower) with the Qwen tokenizer and chat template."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(QWEN_SPECIALS)
    ids = {t: _token_id(tokenizer, t) for t in QWEN_SPECIALS}
    _save_tokenizer(tokenizer, out, QWEN_CHAT_TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    text = _qwen_text_config(DEFAULT_SIZES, tokenizer.get_vocab_size(), ids)
    text["rope_parameters"].pop("mrope_section")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**text), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_vlm(args.family, args.out, args.seed))


if __name__ == "__main__":
    main()
