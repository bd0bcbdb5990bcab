"""How good is a written VLM reward? Correlations with a ground-truth signal already in the data, plus sanity baselines.

Spearman is Pearson on average ranks (ties share their mean rank), computed with numpy alone.
Where the reference is binary (success labels), the EPIC-style distance sqrt((1 - r) / 2) is reported from
the Pearson r, the shortcut used for state-only rewards by Rocamonde et al. 2023 ("Vision-Language Models
are Zero-Shot Reward Models for RL", after Gleave et al. 2021's EPIC): 0 is a perfect match, 0.5 no relation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmlabel import labelled
from vlmlabel.device import resolve_device, resolve_precision
from vlmlabel.errors import SourceError, VlmlabelError
from vlmlabel.formulation import RewardConfig, build_score_fn
from vlmlabel.model import load_model
from vlmlabel.preprocess import DevicePreprocess
from vlmlabel.sources import Align, Episode, open_any_camera
from vlmlabel.sources.base import LabelledData

SUCCESS_KEYS = ("success", "successes", "is_success", "next.success")
# --against names and the per-step keys each stands for (HDF5 layouts, Hugging Face tables, LeRobot).
REFERENCE_KEYS = {"rewards": ("rewards", "reward", "next.reward"), "success": SUCCESS_KEYS}
BLANK_LEVELS = {"black": 0, "gray": 128, "white": 255}
SHUFFLE_SEED = 0


def ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (no correlation is defined)."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(ranks(np.asarray(a)), ranks(np.asarray(b)))


def epic_distance(r: float) -> float:
    return math.sqrt(max(0.0, (1.0 - r) / 2.0))


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(np.unique(values), [0, 1]).all())


def _summary(values: list[float]) -> dict[str, float | int]:
    finite = np.array([v for v in values if np.isfinite(v)])
    if not len(finite):
        return {"mean": float("nan"), "median": float("nan"), "episodes": 0}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "episodes": int(len(finite))}


@dataclass
class EvaluateRequest:
    source: Path
    reward_key: str
    against: str = "rewards"
    image_key: str | None = None
    model: str | None = None  # default: what the reward's attributes record
    pretrained: str | None = None
    blank: bool = True
    device: str = "auto"
    split: str = "train"  # of a DatasetDict folder or a Hub dataset


@dataclass
class Evaluation:
    reward_key: str
    against: str
    steps: int
    episodes: int
    pearson: float
    spearman: float
    per_episode_pearson: dict[str, float | int]
    per_episode_spearman: dict[str, float | int]
    reference_binary: bool
    epic_distance: float | None
    time_spearman_successful: dict[str, float | int] | None
    shuffled_pearson: float
    shuffled_spearman: float
    blank_scores: dict[str, float] | None = None
    above_blank_fraction: float | None = None
    notes: list[str] = field(default_factory=list)
    per_episode: list[dict[str, Any]] = field(default_factory=list)  # JSON only: one row per episode

    def as_json(self) -> dict[str, Any]:
        """Plain JSON (NaN -> null)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean(asdict(self))


def _per_episode(source: LabelledData, episodes: list[Episode], key: str, what: str) -> list[np.ndarray]:
    """Per-step values of a key the data holds (a reference, success flags); [] when absent."""
    values = labelled.series(source, episodes, key, what)
    if values is None:
        return []
    steps = [labelled.per_step(v, e, Align.next) for v, e in zip(values, episodes, strict=True)]
    for episode, found in zip(episodes, steps, strict=True):
        if len(found) != episode.transitions:
            raise SourceError(
                f"{what} {key!r} has {len(found)} values in {episode.name}, which has "
                f"{episode.transitions} steps; choose a per-step key"
            )
    return steps


def _reference(source: LabelledData, episodes: list[Episode], against: str) -> tuple[str, list[np.ndarray]]:
    keys = REFERENCE_KEYS.get(against, (against,))
    for key in keys:
        values = _per_episode(source, episodes, key, "--against")
        if values:
            return key, values
    tried = ", ".join(keys)
    raise VlmlabelError(
        f"--against {against}: no per-step dataset {tried} found in every episode; name one with --against KEY"
    )


def blank_scores(
    attrs: dict, config: RewardConfig, model_name: str | None, pretrained: str | None, device: str
) -> dict[str, float]:
    """The raw formula's score of constant frames (black, gray, white): what 'nothing to see' earns."""
    name = model_name or str(attrs.get("model", ""))
    if not name:
        raise VlmlabelError("the reward records no model; pass --model (and --pretrained) or --no-blank")
    tag = pretrained if model_name else attrs.get("pretrained")
    # Local folders and hf-hub repos carry their own weights: their label is not a --pretrained value.
    tag = None if tag is None or tag == "bundled" or str(tag).startswith("hf-hub:") else str(tag)
    resolved = resolve_device(device)
    model = load_model(name, tag, resolved, resolve_precision("auto", resolved))
    score_fn = build_score_fn(config, model.encode_texts, model.logit_scale, model.logit_bias)
    height, width = model.preprocess.size
    levels = torch.tensor(list(BLANK_LEVELS.values()), dtype=torch.uint8).view(-1, 1, 1, 1)
    frames = levels.expand(-1, 3, height, width).contiguous().to(model.device)
    scores = score_fn(model.encode_images(DevicePreprocess(model.preprocess, model.device)(frames)))
    return {k: float(v) for k, v in zip(BLANK_LEVELS, scores[:, 0].cpu().tolist(), strict=True)}


def evaluate_file(request: EvaluateRequest) -> Evaluation:
    """Compare the reward ``reward_key`` with the reference signal ``against``, episode by episode and overall."""
    with open_any_camera(str(request.source), request.image_key, request.split) as source:
        episodes = source.episodes(Align.frame)
        reward = labelled.read_reward(source, episodes, request.reward_key)
        reference_key, reference = _reference(source, episodes, request.against)
        success: list[np.ndarray] = []
        if not _is_binary(np.concatenate(reference)):
            success = next((v for k in SUCCESS_KEYS if (v := _per_episode(source, episodes, k, "success"))), [])
    return _evaluate(
        request,
        reward,
        [e.name for e in episodes],
        reward.steps(episodes),
        reward.raw_steps(episodes),
        reference_key,
        reference,
        success,
    )


def _shuffled(reward: labelled.WrittenReward, raw: list[np.ndarray]) -> np.ndarray:
    """The reward as it would be on frames shuffled across episodes: raw per-frame scores permuted over the
    dataset, then thresholded/normalised/shaped within episodes exactly as the written reward was."""
    permuted = np.random.default_rng(SHUFFLE_SEED).permutation(np.concatenate(raw))
    if reward.raw is None:
        return permuted
    bounds = np.cumsum([0] + [len(r) for r in raw])
    episodes = [permuted[a:b, None] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return np.concatenate(reward.config.postprocess(episodes))[:, 0]


def _evaluate(
    request: EvaluateRequest,
    written: labelled.WrittenReward,
    names: list[str],
    reward: list[np.ndarray],
    raw: list[np.ndarray],
    reference_key: str,
    reference: list[np.ndarray],
    success: list[np.ndarray],
) -> Evaluation:
    all_reward, all_reference = np.concatenate(reward), np.concatenate(reference)
    binary = _is_binary(all_reference)
    overall = pearson(all_reward, all_reference)
    notes = []
    if np.ptp(all_reference) == 0:
        notes.append(f"the reference {reference_key!r} is constant: no correlation is defined")
    if not binary and not success:
        notes.append("no binary reference or success key: time correlation on successful episodes skipped")
    flags = reference if binary else success
    time_rho = None
    if flags:
        time_rho = _summary(
            [spearman(r, np.arange(len(r))) for r, s in zip(reward, flags, strict=True) if s.max() >= 1]
        )
    shuffled = _shuffled(written, raw)
    per_pearson = [pearson(r, g) for r, g in zip(reward, reference, strict=True)]
    per_spearman = [spearman(r, g) for r, g in zip(reward, reference, strict=True)]
    result = Evaluation(
        reward_key=request.reward_key,
        against=reference_key,
        steps=len(all_reward),
        episodes=len(reward),
        pearson=overall,
        spearman=spearman(all_reward, all_reference),
        per_episode_pearson=_summary(per_pearson),
        per_episode_spearman=_summary(per_spearman),
        reference_binary=binary,
        epic_distance=epic_distance(overall) if binary and np.isfinite(overall) else None,
        time_spearman_successful=time_rho,
        shuffled_pearson=pearson(shuffled, all_reference),
        shuffled_spearman=spearman(shuffled, all_reference),
        notes=notes,
        per_episode=[
            {"episode": i, "name": name, "steps": len(r), "pearson": p, "spearman": q}
            for i, (name, r, p, q) in enumerate(zip(names, reward, per_pearson, per_spearman, strict=True))
        ],
    )
    if request.blank and not written.config.goal_images:  # a goal image's blank scores would need the image
        result.blank_scores = blank_scores(
            written.attrs, written.config, request.model, request.pretrained, request.device
        )
        result.above_blank_fraction = float((np.concatenate(raw) > max(result.blank_scores.values())).mean())
    return result
