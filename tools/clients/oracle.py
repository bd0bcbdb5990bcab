"""Runs in the project's interpreter (open_clip installed), never imports vlmlabel.

python oracle.py make-model DIR                    a tiny random open_clip model in local-dir layout
python oracle.py score DIR GOAL IN.npy OUT.npy     cosine(image, goal) per uint8 frame, by open_clip's own
                                                   pipeline: PIL preprocess per frame, fp32 (the oracle the
                                                   project's tests use, tests/conftest.py `reference`)
python oracle.py make-vlm DIR                      a tiny random Qwen2-VL judge (tools/synthetic/tiny_vlm.py)
python oracle.py vlm-score DIR GOAL PROMPT ANSWER IN.npy OUT.npy
                                                   log P(ANSWER) at the first generated token, one frame
                                                   per query, by transformers' own generate() on the
                                                   processor's output for that query alone (fp32)
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


def make_vlm(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the source tree holding tools/synthetic
    from tools.synthetic.tiny_vlm import build_tiny_vlm

    build_tiny_vlm("qwen2_vl", folder)
    print(f"tiny qwen2_vl judge written to {folder}")


def vlm_score(folder: Path, goal: str, prompt: str, answer: str, src: Path, dst: Path) -> None:
    """The judge's readout of a one-frame query (``--context frame``), from ``generate`` on that query alone:
    the user turn holds the image then the prompt with ``{goal}`` filled in, under the model's chat template."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    ids = processor.tokenizer.encode(answer, add_special_tokens=False)
    if len(ids) != 1:
        raise SystemExit(f"answer {answer!r} is {len(ids)} tokens")
    content = [{"type": "image"}, {"type": "text", "text": prompt.replace("{goal}", goal)}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    out = []
    with torch.no_grad():
        for frame in np.load(src):
            inputs = processor(text=[text], images=[Image.fromarray(frame)], return_tensors="pt")
            gen = model.generate(
                **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            logp = torch.log_softmax(gen.logits[0][0].double(), dim=-1)
            out.append(float(logp[ids[0]]))
    np.save(dst, np.asarray(out, dtype=np.float64))


if __name__ == "__main__":
    if sys.argv[1] == "make-model":
        make_model(Path(sys.argv[2]))
    elif sys.argv[1] == "score":
        score(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
    elif sys.argv[1] == "make-vlm":
        make_vlm(Path(sys.argv[2]))
    elif sys.argv[1] == "vlm-score":
        vlm_score(Path(sys.argv[2]), *sys.argv[3:6], Path(sys.argv[6]), Path(sys.argv[7]))
    else:
        raise SystemExit(__doc__)
