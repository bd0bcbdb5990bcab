"""Train the tiny sample CLIP on synthetic scenes: seeded, CPU-friendly, saved in open_clip's local-dir layout.

Why it exists: real CLIP weights cannot be downloaded on an offline machine, so the quickstart and
the semantic end-to-end test need a model the repository can rebuild itself. The model is a small
open_clip ``CLIP`` (ViT image tower, transformer text tower with open_clip's standard BPE tokenizer)
trained with the usual symmetric contrastive loss on (rendered scene, true caption) pairs.

How the pairs teach relations: a batch is made of groups of scenes that share the same objects
and differ only in where they are, each captioned with the relation it realises ("the red ball is
on / near / far from / left of the green square"). Telling the members of a group apart is only
possible by reading the relation, so the model must learn it, not just colours and shapes.
Captions that are the same string are all counted as positives of each other.

Images go through ``vlmlabel.preprocess.DevicePreprocess`` with the model's own preprocessing
config, exactly as ``vlmlabel relabel`` feeds frames at inference. The normalisation statistics
are measured on rendered scenes, not copied from another model.

Regenerate the shipped model (2000 steps: 24 minutes with one thread on a busy 2-core machine;
one thread avoids OpenMP spin-waiting when the cores are shared)::

    python -m tools.synthetic.train --out sample_data/reach-clip --threads 1
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tools.synthetic import scenes
from vlmlabel.model import PreprocessConfig, create_untrained, get_tokenizer, save_local_dir
from vlmlabel.preprocess import DevicePreprocess

SAMPLE_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 96, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    # open_clip's BPE vocabulary (49408 tokens) dominates the size: keep the text width small.
    # Captions are short, so a 24-token context is enough; the tokenizer reads it back from the config.
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3, "mlp_ratio": 2.0},
}
TOKENIZER = "ViT-B-32"  # open_clip's standard SimpleTokenizer
RELATION_WEIGHTS = {
    "on": 0.3,
    "near": 0.2,
    "far from": 0.2,
    "left of": 0.075,
    "right of": 0.075,
    "above": 0.075,
    "below": 0.075,
}
INVERSE = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "near": "near",
    "far from": "far from",
}


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    group_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 150
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    model_cfg: dict[str, Any] = field(default_factory=lambda: SAMPLE_MODEL_CFG)


@dataclass
class TrainResult:
    module: torch.nn.Module
    preprocess_cfg: dict[str, Any]
    losses: list[float]
    seconds: float


def sample_batch(rng: np.random.Generator, batch_size: int, group_size: int) -> tuple[np.ndarray, list[str]]:
    """``batch_size`` rendered scenes (N, 84, 84, 3) uint8 and one true caption each, in groups of shared objects."""
    frames, captions = [], []
    while len(captions) < batch_size:
        count = int(rng.integers(2, 5))
        identities = scenes.random_identities(rng, count)
        radii = [float(r) for r in rng.uniform(5.5, 9.0, count)]
        for _ in range(min(group_size, batch_size - len(captions))):
            scene, caption = _sample_member(rng, identities, radii)
            frames.append(scenes.render(scene))
            captions.append(caption)
    return np.stack(frames), captions


def _sample_member(rng: np.random.Generator, identities: list, radii: list) -> tuple[scenes.Scene, str]:
    relations = list(RELATION_WEIGHTS)
    weights = np.array(list(RELATION_WEIGHTS.values()))
    while True:
        # Usually about the first two objects; sometimes the mover relates to a distractor instead.
        order = list(range(len(identities)))
        if len(order) > 2 and rng.random() < 0.3:
            other = int(rng.integers(2, len(order)))
            order[1], order[other] = order[other], order[1]
        wanted = str(rng.choice(relations, p=weights / weights.sum()))
        scene = scenes.sample_pair_scene(
            rng, [identities[i] for i in order], wanted, scenes.random_background(rng), [radii[i] for i in order]
        )
        if scene is not None:
            break
    anchor, mover = scene.objects[-2], scene.objects[-1]
    if rng.random() < 0.15:
        shown = list(scene.objects)
        rng.shuffle(shown)
        return scene, scenes.presence_caption(tuple(shown))
    holding = scenes.relations(mover, anchor)
    relation = wanted if wanted in holding else str(rng.choice(holding)) if holding else None
    if relation is None:
        return scene, scenes.presence_caption((mover, anchor))
    if relation in INVERSE and rng.random() < 0.3:
        return scene, scenes.relation_caption(anchor, INVERSE[relation], mover)
    return scene, scenes.relation_caption(mover, relation, anchor)


def measure_preprocess(rng: np.random.Generator, image_size: int, samples: int = 512) -> dict[str, Any]:
    """open_clip preprocessing config with the per-channel mean and std of rendered scenes."""
    frames, _ = sample_batch(rng, samples, 4)
    pixels = frames.reshape(-1, 3).astype(np.float64) / 255.0
    return {
        "size": image_size,
        "mean": [round(float(v), 4) for v in pixels.mean(0)],
        "std": [round(float(v), 4) for v in pixels.std(0)],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP cross-entropy; ``same[i, j]`` marks pairs whose captions are equal (all positives)."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _same_caption(captions: list[str]) -> torch.Tensor:
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    index = torch.tensor([ids[c] for c in captions])
    return (index[:, None] == index[None, :]).float()


def _optimizer(module: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in module.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in module.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train from scratch; the same config and seed give the same losses on the same machine."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    image_size = config.model_cfg["vision_cfg"]["image_size"]
    context_length = config.model_cfg["text_cfg"]["context_length"]
    preprocess_cfg = measure_preprocess(rng, image_size)
    preprocess = DevicePreprocess(PreprocessConfig.from_open_clip(preprocess_cfg), torch.device("cpu"))
    tokenizer = get_tokenizer(TOKENIZER)
    module = create_untrained(config.model_cfg)
    module.train()
    optimizer = _optimizer(module, config)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        frames, captions = sample_batch(rng, config.batch_size, config.group_size)
        pixels = preprocess(torch.from_numpy(frames).permute(0, 3, 1, 2))
        tokens = tokenizer(captions, context_length=context_length)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = contrastive_loss(
            module.encode_image(pixels), module.encode_text(tokens), module.logit_scale, _same_caption(captions)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % config.log_every == 0:
            recent = np.mean(losses[-config.log_every :])
            log(
                f"step {step + 1}/{config.steps} loss {recent:.4f} "
                f"scale {float(module.logit_scale.detach().exp()):.1f} {time.perf_counter() - start:.0f}s"
            )
    module.eval()
    return TrainResult(module, preprocess_cfg, losses, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the tiny sample CLIP on synthetic scenes.")
    parser.add_argument("--out", type=Path, required=True, help="Folder to write (open_clip local-dir layout).")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    args = parser.parse_args(argv)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads)
    result = train(config, log=lambda line: print(line, flush=True))
    save_local_dir(result.module, config.model_cfg, result.preprocess_cfg, args.out, dtype=torch.float16)
    print(f"trained {config.steps} steps in {result.seconds / 60:.1f} min; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
