"""Train the tiny sample VLM judge on synthetic reach episodes: seeded, CPU, saved as a Hugging Face folder.

Why it exists: no real VLM can be downloaded on an offline machine, so the VLM scorer's quickstart needs
a judge the repository can rebuild itself. The model is a small Qwen2-VL (video input) with a tokenizer
that knows the scene vocabulary, trained to answer the judge's own query:

    chat template, one user turn = [video of the context frames (one image when there is one frame)]
    + vlmlabel.judge's default prompt with the goal, add_generation_prompt=True; the readout is the next
    token's distribution over "True" / "False".

What it learns: episodes are rendered fresh by ``tools.synthetic.reach.plan_episode`` (a seed unlike
``sample_data/reach.h5``'s, and agents / targets of every colour and shape, so the goal must be read).
Each query's goal says that one object is on another; the target is soft and comes from the geometry
of the last frame: P(True) falls with the distance between the two named objects, and is near zero when
one of them is not in the scene (a swapped colour, a missing shape). The loss is the cross-entropy of the
full-vocabulary next-token log-probabilities against (q, 1 - q), each answer's mass split over its two
spellings ("True" / " True"), so log P of either and P(True) / (P(True) + P(False)) follow the distance.

Inputs are made by the saved processor exactly as the judge makes them (chat template, left padding,
video frames as one clip), and the context is the judge's default: up to 8 frames spaced evenly over the
episode so far, oldest first; some queries use the last frame only or a window, for the other contexts.

Build the sample model (sample_data/README.md says what was measured: it is not shipped yet, because
training on the shared CPU did not get past the average answer in the time)::

    python -m tools.synthetic.train_vlm --out sample_data/reach-vlm --threads 1 --evaluate sample_data/reach.h5
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.synthetic import reach, scenes
from tools.synthetic.tiny_vlm import build_tiny_vlm
from vlmlabel import judge

# The judge's default query (vlmlabel.judge.default_prompt of its default readout), so the shipped model
# answers what `vlmlabel relabel --scorer vlm` asks it by default.
PROMPT = judge.default_prompt(judge.parse_readout(None, None, None))
GOAL_FIELD = "{goal}"  # where a prompt takes the goal (the judge's contract)
# The answer follows the assistant header's newline: "True", but a readout may name " True" (TOPReward's
# spelling). The model is taught to split each answer's mass evenly over both spellings, so log P of either
# and P(True) / (P(True) + P(False)) of either pair all follow the target.
ANSWERS = {True: ("True", " True"), False: ("False", " False")}
CONTEXT_FRAMES = 8
SEED = 1  # sample_data/reach.h5 is written with seed 0: the training episodes are other episodes

# P(True) for "the A is on the B" at centre distance d (pixels): ~1 on, falling smoothly so that far
# distances are still ordered, and a floor below every distance for objects that are not there.
ON_PLATEAU = 3.0
ON_DECAY = 12.0
TRUE_MAX = 0.97
ABSENT = 1e-3

# Each clip is asked about the mover on its target, about one other pair of the scene (labelled by its
# own distance) and about a pair the scene lacks (the first goal's colours swapped, or a stranger).
GOALS_PER_CLIP = 3
REACH_SHARE = 0.45  # episodes with the shipped task's bodies (red ball, green square)
REACH_FRACTION = 0.65  # episodes that steer to the target, as in reach.h5
CONTEXTS = {"prefix": 0.7, "frame": 0.15, "window": 0.15}


@dataclass(frozen=True)
class Example:
    """One clip and the goals asked about it, each with its target P(True)."""

    frames: np.ndarray  # (K, 84, 84, 3) uint8, oldest first
    goals: tuple[str, ...]
    targets: tuple[float, ...]


@dataclass
class TrainConfig:
    steps: int = 1800
    clips: int = 20  # clips per step; each is asked GOALS_PER_CLIP goals
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    seed: int = SEED
    threads: int = 1
    log_every: int = 25
    save_every: int = 100  # 0: only at the end


def on_probability(d: float) -> float:
    return TRUE_MAX * math.exp(-max(0.0, d - ON_PLATEAU) / ON_DECAY)


def goal_text(a: scenes.SceneObject | tuple[str, str], b: scenes.SceneObject | tuple[str, str]) -> str:
    name = lambda o: o.name if isinstance(o, scenes.SceneObject) else f"{o[0]} {o[1]}"
    return f"the {name(a)} is on the {name(b)}"


def prefix_indices(last: int, k: int = CONTEXT_FRAMES) -> np.ndarray:
    """The judge's default context: min(k, last + 1) frame indices spaced evenly over 0..last, oldest first."""
    return np.linspace(0, last, min(k, last + 1)).round().astype(int)


def _pick(rng: np.random.Generator, shares: dict[str, float]) -> str:
    p = np.array(list(shares.values()))
    return str(rng.choice(list(shares), p=p / p.sum()))


def _bodies(rng: np.random.Generator) -> tuple[reach.Body, reach.Body]:
    if rng.random() < REACH_SHARE:
        return reach.AGENT, reach.TARGET
    (ca, sa), (cb, sb) = scenes.random_identities(rng, 2)
    return (ca, sa, float(rng.uniform(5.5, 8.0))), (cb, sb, float(rng.uniform(6.5, 9.0)))


def _context(rng: np.random.Generator, last: int) -> np.ndarray:
    kind = _pick(rng, CONTEXTS)
    if kind == "frame" or last == 0:
        return np.array([last])
    if kind == "window":
        k = int(rng.integers(2, CONTEXT_FRAMES + 1))
        return np.arange(max(0, last - k + 1), last + 1)
    return prefix_indices(last)


def _absent_goal(rng: np.random.Generator, scene: scenes.Scene) -> tuple[str, float] | None:
    """A goal naming at least one body the scene lacks: the true goal's colours swapped, or a stranger."""
    present = {(o.colour, o.shape) for o in scene.objects}
    a, b = scene.objects[-1], scene.objects[-2]
    if rng.random() < 0.5:
        named = [(b.colour, a.shape), (a.colour, b.shape)]
    else:
        strangers = [(c, s) for c in scenes.COLOURS for s in scenes.SHAPES if (c, s) not in present]
        stranger = strangers[int(rng.integers(len(strangers)))]
        known = (a.colour, a.shape) if rng.random() < 0.5 else (b.colour, b.shape)
        named = [stranger, known] if rng.random() < 0.5 else [known, stranger]
    if all(n in present for n in named):
        return None  # the swap names two bodies that are there: that is an "other_pair" goal
    return goal_text(named[0], named[1]), ABSENT


def _goals(rng: np.random.Generator, scene: scenes.Scene) -> tuple[tuple[str, ...], tuple[float, ...]]:
    a, b = scene.objects[-1], scene.objects[-2]
    pairs = [(a, b)]
    if len(scene.objects) > 2 and rng.random() < 0.7:
        i, j = rng.choice(len(scene.objects), size=2, replace=False)
        pairs.append((scene.objects[int(i)], scene.objects[int(j)]))
    else:
        pairs.append((b, a))
    asked = [(goal_text(x, y), on_probability(scenes.distance(x, y))) for x, y in pairs]
    while (absent := _absent_goal(rng, scene)) is None:
        pass
    asked.append(absent)
    goals, targets = zip(*asked, strict=True)
    return tuple(goals), tuple(targets)


def sample_example(rng: np.random.Generator) -> Example:
    """A clip of a fresh episode up to a random frame, and goals whose targets come from that frame's geometry."""
    agent, target = _bodies(rng)
    plan = reach.plan_episode(rng, bool(rng.random() < REACH_FRACTION), agent, target, textured=rng.random() < 0.2)
    last = int(rng.integers(0, len(plan.positions)))
    frames = np.stack([scenes.render(plan.scene_at(int(i))) for i in _context(rng, last)])
    return Example(frames, *_goals(rng, plan.scene_at(last)))


# --- the query, as the judge makes it -------------------------------------------------------------------


def encode(processor: Any, frames: Sequence[np.ndarray], goals: Sequence[str]) -> Any:
    """The processor's batch for these queries: chat template, video (or one image), left padding."""
    texts, images, videos = [], [], []
    for clip, goal in zip(frames, goals, strict=True):
        media = {"type": "video"} if len(clip) > 1 else {"type": "image"}
        (videos if len(clip) > 1 else images).append(clip if len(clip) > 1 else clip[0])
        messages = [{"role": "user", "content": [media, {"type": "text", "text": PROMPT.replace(GOAL_FIELD, goal)}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images or None, videos=videos or None, padding=True, return_tensors="pt")


def answer_ids(processor: Any) -> dict[bool, tuple[int, ...]]:
    """The token ids of each answer's spellings; each spelling must be one token."""
    found = {}
    for truth, words in ANSWERS.items():
        ids = [processor.tokenizer.encode(word, add_special_tokens=False) for word in words]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"{words} must each be one token, got {ids}")
        found[truth] = tuple(i[0] for i in ids)
    return found


def answer_loss(logp: torch.Tensor, ids: dict[bool, tuple[int, ...]], q: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next-token log-probabilities against q (True) and 1 - q (False), each answer's
    mass split evenly over its spellings."""
    true = logp[:, list(ids[True])].mean(dim=1)
    false = logp[:, list(ids[False])].mean(dim=1)
    return -(q * true + (1 - q) * false).mean()


def next_token_logprobs(model: Any, batch: Any, **extra: Any) -> torch.Tensor:
    """(B, vocab) fp32 log-probabilities of the token after each (left-padded) query."""
    last = batch["attention_mask"].shape[1] - 1
    if not bool(batch["attention_mask"][:, last].all()):
        raise ValueError("the batch is not left-padded")
    logits = model(**batch, **extra, logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def shared_clip_logprobs(model: Any, processor: Any, examples: Sequence[Example]) -> torch.Tensor:
    """next_token_logprobs of every (clip, goal) query, the vision tower run once per clip.

    The batch is the processor's for all the queries; only the clips' encodings are computed once and
    handed to the model as its precomputed ``mm_encoder_outputs`` (what its forward would compute from the
    repeated pixels). Rows are the examples' goals in order."""
    clips = [e.frames for e in examples for _ in e.goals]
    goals = [g for e in examples for g in e.goals]
    batch = encode(processor, clips, goals)
    repeats = [len(e.goals) for e in examples]
    encoded: dict[str, Any] = {}
    for kind, single in (("video", False), ("image", True)):
        chosen = [
            (e.frames[0] if single else e.frames, n)
            for e, n in zip(examples, repeats, strict=True)
            if (len(e.frames) == 1) == single
        ]
        if not chosen:
            continue
        encoded[kind] = _encode_clips(model, processor, kind, chosen)
        batch.pop("pixel_values_videos" if kind == "video" else "pixel_values")
    return next_token_logprobs(model, batch, mm_encoder_outputs=encoded)


def _encode_clips(model: Any, processor: Any, kind: str, chosen: list[tuple[np.ndarray, int]]) -> Any:
    if kind == "video":
        pixels = processor.video_processor(videos=[c for c, _ in chosen], return_tensors="pt")
        out = model.model.get_video_features(pixels["pixel_values_videos"], pixels["video_grid_thw"], return_dict=True)
    else:
        pixels = processor.image_processor(images=[c for c, _ in chosen], return_tensors="pt")
        out = model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"], return_dict=True)
    out.pooler_output = tuple(f for f, (_, n) in zip(out.pooler_output, chosen, strict=True) for _ in range(n))
    return out


# --- training --------------------------------------------------------------------------------------------


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def train(
    model: Any,
    processor: Any,
    config: TrainConfig,
    log: Callable[[str], None] | None = None,
    checkpoint: Callable[[int], None] | None = None,
) -> tuple[list[float], float]:
    """Train in place; the same config and seed give the same losses on the same machine and thread count.
    ``checkpoint(step)`` is called every ``save_every`` steps (the model in train mode, to be saved)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    ids = answer_ids(processor)
    model.train()
    optimizer = _optimizer(model, config)
    losses: list[float] = []
    errors: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        examples = [sample_example(rng) for _ in range(config.clips)]
        q = torch.tensor([t for e in examples for t in e.targets])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        logp = shared_clip_logprobs(model, processor, examples)
        loss = answer_loss(logp, ids, q)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        errors.append(float((logp[:, list(ids[True])].detach().exp().sum(1) - q).abs().mean()))
        if log is not None and (step + 1) % config.log_every == 0:
            log(
                f"step {step + 1}/{config.steps} loss {np.mean(losses[-config.log_every :]):.4f} "
                f"|P(True) - q| {np.mean(errors[-config.log_every :]):.3f} {time.perf_counter() - start:.0f}s"
            )
        if checkpoint is not None and config.save_every and (step + 1) % config.save_every == 0:
            checkpoint(step + 1)
    model.eval()
    return losses, time.perf_counter() - start


# --- the untrained model ---------------------------------------------------------------------------------

SCENE_WORDS = " ".join([*scenes.COLOURS, *scenes.SHAPES, *scenes.DISTANCE_RELATIONS, *scenes.DIRECTION_RELATIONS])
# 1.4 M parameters (5.6 MB in float32): Qwen2-VL's own patching (14 px patches, pairs of frames, 2 x 2
# merge), so an 84 x 84 frame pair is 6 x 6 patches and 9 language tokens.
MODEL_SIZE: dict[str, Any] = {
    "hidden_size": 128,
    "layers": 4,
    "heads": 4,
    "vision_hidden_size": 96,
    "vision_layers": 4,
    "vision_heads": 4,
    "patch_size": 14,
    "image_size": scenes.CANVAS,
}


def build_untrained(out: Path, seed: int) -> Path:
    """The untrained judge: tiny_vlm's seeded Qwen2-VL at MODEL_SIZE, its tokenizer taught the scene words."""
    return build_tiny_vlm("qwen2_vl", out, seed, **MODEL_SIZE, extra_words=(SCENE_WORDS, PROMPT))


# --- evaluation on reach.h5, through the judge ------------------------------------------------------------


@dataclass
class ReachScore:
    spearman: float  # of the readout with the environment reward, all steps
    voc_mean: float  # mean over episodes of the Spearman of the readout with the step index
    env_voc_mean: float  # the same for the environment reward
    seconds: float


def load_default_judge(folder: Path, answer: str | None = None, versus: str | None = None) -> judge.Judge:
    """``folder`` as vlmlabel's VLM scorer loads it on the CPU, with the default prompt of the readout."""
    readout = judge.parse_readout(answer, versus, None)
    return judge.load_judge(
        judge.describe_judge(str(folder)), readout, judge.default_prompt(readout), torch.device("cpu"), "fp32"
    )


def reach_readouts(scorer: judge.Judge, path: Path, batch_size: int = 32) -> tuple[list, list]:
    """The readout per step of every episode (align next: step t's query ends at o_{t+1}, default prefix
    context), and the environment's rewards."""
    import h5py

    readouts, rewards = [], []
    with h5py.File(path, "r") as f:
        for name in sorted(f["data"], key=lambda n: int(n.split("_")[1])):
            demo = f["data"][name]
            frames = np.concatenate([demo["obs/agentview_image"][()], demo["next_obs/agentview_image"][-1:]])
            queries = [judge.Query(frames[prefix_indices(t + 1)], reach.GOAL) for t in range(len(frames) - 1)]
            readouts.append(
                np.concatenate(
                    [scorer.readouts(queries[i : i + batch_size]) for i in range(0, len(queries), batch_size)]
                )
            )
            rewards.append(demo["rewards"][()])
    return readouts, rewards


def score_reach(scorer: judge.Judge, path: Path) -> ReachScore:
    from vlmlabel.evaluate import spearman, voc

    start = time.perf_counter()
    readouts, rewards = reach_readouts(scorer, path)
    return ReachScore(
        spearman(np.concatenate(readouts), np.concatenate(rewards)),
        float(np.nanmean([voc(r) for r in readouts])),
        float(np.nanmean([voc(r) for r in rewards])),
        time.perf_counter() - start,
    )


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    parser = argparse.ArgumentParser(description="Train the tiny sample VLM judge on synthetic reach episodes.")
    parser.add_argument("--out", type=Path, required=True, help="Folder to write (a Hugging Face model folder).")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--clips", type=int, default=TrainConfig.clips, help="Clips per step (3 goals each).")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--evaluate", type=Path, help="Score this reach HDF5 file after training (never trained on).")
    args = parser.parse_args(argv)
    config = TrainConfig(steps=args.steps, clips=args.clips, lr=args.lr, seed=args.seed, threads=args.threads)
    torch.set_num_threads(config.threads)
    build_untrained(args.out, config.seed)
    processor = AutoProcessor.from_pretrained(args.out)
    model = AutoModelForImageTextToText.from_pretrained(args.out, dtype=torch.float32)
    losses, seconds = train(
        model,
        processor,
        config,
        log=lambda line: print(line, flush=True),
        checkpoint=lambda _: model.save_pretrained(args.out),
    )
    model.save_pretrained(args.out)
    print(f"trained {config.steps} steps in {seconds / 60:.1f} min; wrote {args.out}", flush=True)
    if args.evaluate is not None:
        score = score_reach(load_default_judge(args.out), args.evaluate)
        print(
            f"{args.evaluate}: Spearman {score.spearman:.3f}, VOC mean {score.voc_mean:.3f} "
            f"(environment reward {score.env_voc_mean:.3f}), {score.seconds:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
