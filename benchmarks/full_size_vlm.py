"""A random-weight judge of Qwen3-VL-2B-Instruct's full size, for GPU benchmarks (speed does not depend on weight
values). No download: the architecture comes from the config values below, the tokenizer, chat template and
special tokens from ``tools/synthetic/tiny_vlm.py`` (its qwen3_vl builder), with the vocabulary kept at the real
151,936 entries so the embedding and the output head have their real size (the tokenizer uses the first ids).

Config values: the published ``config.json`` of Qwen/Qwen3-VL-2B-Instruct
(https://huggingface.co/Qwen/Qwen3-VL-2B-Instruct/blob/main/config.json); its language model is Qwen3-1.7B's
shape (28 layers, width 2048, 16 query and 8 key/value heads of 128, MLP 6144, tied embeddings), its vision tower
24 layers of width 1024 (patch 16, 2 x 2 merge, temporal patch 2, deepstack after layers 5, 11 and 17). The
processor keeps Qwen3-VL's pixel budgets (``preprocessor_config.json`` / ``video_preprocessor_config.json``):
images between 65,536 and 16,777,216 pixels, video frames between 4,096 and 25,165,824.

    python benchmarks/full_size_vlm.py --out DIR [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB_SIZE = 151_936
TEXT = {
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262_144,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
    "tie_word_embeddings": True,
}
VISION = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 2048,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}
PIXELS = {
    "image_processor": {"shortest_edge": 65_536, "longest_edge": 16_777_216},
    "video_processor": {"shortest_edge": 4_096, "longest_edge": 25_165_824},
}
TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
PARAMETERS = 2.13e9  # about 2.1 B parameters (tied embeddings counted once)


def full_size_config(tiny: dict[str, Any]) -> Any:
    """Qwen3-VL-2B's architecture, with the special token ids of the tiny builder's tokenizer (``tiny``: its
    config.json)."""
    from transformers import Qwen3VLConfig

    text = {**TEXT, "vocab_size": VOCAB_SIZE}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        text[key] = tiny["text_config"][key]
    ids = {key: tiny[key] for key in TOKEN_IDS}
    return Qwen3VLConfig(text_config=text, vision_config=VISION, tie_word_embeddings=True, **ids)


def build_full_size_vlm(out: Path, device: str = "cuda", dtype: str = "bf16", seed: int = 0) -> Path:
    """Writes the judge folder ``out``: the tiny builder's tokenizer and processor (pixel budgets set to
    Qwen3-VL's), and random weights of the full-size architecture in ``dtype``, drawn on ``device``."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tools.synthetic.tiny_vlm import build_tiny_vlm

    out = build_tiny_vlm("qwen3_vl", Path(out), seed=seed, patch_size=16, image_size=224)
    processor_file = out / "processor_config.json"
    processor = json.loads(processor_file.read_text())
    for part, size in PIXELS.items():
        processor[part]["size"] = size
    processor_file.write_text(json.dumps(processor, indent=2) + "\n")
    config = full_size_config(json.loads((out / "config.json").read_text()))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            config, dtype={"bf16": torch.bfloat16}.get(dtype, torch.float32)
        )
    model.eval().save_pretrained(out, safe_serialization=True)  # replaces the tiny config and weights
    return out


def parameter_count(config: Any) -> int:
    """Parameters of ``config``'s model, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="where the random weights are drawn (fast on a GPU)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = parser.parse_args()
    print(build_full_size_vlm(args.out, args.device, args.dtype))


if __name__ == "__main__":
    main()
