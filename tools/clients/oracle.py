"""Runs in the project's interpreter (open_clip installed), never imports vlmlabel.

python oracle.py make-model DIR                    a tiny random open_clip model in local-dir layout
python oracle.py score DIR GOAL IN.npy OUT.npy     cosine(image, goal) per uint8 frame, by open_clip's own
                                                   pipeline: PIL preprocess per frame, fp32 (the oracle the
                                                   project's tests use, tests/conftest.py `reference`)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Same architecture and preprocessing as tests/conftest.py TINY_CFG / TINY_PREPROCESS.
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_PREPROCESS = {
    "mean": [0.5, 0.45, 0.4],
    "std": [0.25, 0.3, 0.27],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def make_model(folder: Path, seed: int = 0) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CFG)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": TINY_PREPROCESS}, indent=2) + "\n"
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    print(f"tiny open_clip model written to {folder}")


def score(folder: Path, goal: str, src: Path, dst: Path) -> None:
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    frames = np.load(src)
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer([goal])), dim=-1)
        out = []
        for start in range(0, len(frames), 64):
            pixels = torch.stack([transform(Image.fromarray(f)) for f in frames[start : start + 64]])
            image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
            out.append((image @ text.T)[:, 0].numpy())
    np.save(dst, np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32))


if __name__ == "__main__":
    if sys.argv[1] == "make-model":
        make_model(Path(sys.argv[2]))
    elif sys.argv[1] == "score":
        score(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
    else:
        raise SystemExit(__doc__)
