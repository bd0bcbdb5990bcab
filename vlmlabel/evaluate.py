"""How good is a written VLM reward? Its value-order correlation with time, how well it detects success, its
correlation with a ground-truth signal already in the data, and sanity baselines.

VOC (value-order correlation) is the Spearman correlation of an episode's reward with its step index 0..T-1: 1
when the reward only rises, -1 when it only falls (GVL: Ma et al. 2024, "Vision Language Models are In-Context
Value Learners", arXiv 2411.04549; reported as the mean over episodes by TOPReward: Chen et al. 2026, arXiv
2602.19313). Success AUROC is the area under the ROC curve of one score per episode (its final-step reward, or
its maximum) separating successful from failed episodes: U / (n_successful * n_failed), U the Mann-Whitney
statistic of the successful episodes' scores, i.e. the probability that a successful episode outscores a
failed one, ties counting one half.

Every statistic is scipy.stats' (``pearsonr``, ``spearmanr``, ``mannwhitneyu``), under one policy for what it
cannot define: ties share their average rank; steps where either side is NaN are left out, pairwise (the
reward is always finite: ``labelled.read_reward``; a reference may hold NaN); a correlation of fewer than two
pairs, or with a constant side, is NaN, and so is an AUROC without both successful and failed episodes. NaN
values are left out of every mean and median, and counted (an episode of one step, or of a constant reward, has
no VOC). Where the reference is binary (success labels), the EPIC-style distance sqrt((1 - r) / 2) is reported
from the Pearson r, the shortcut used for state-only rewards by Rocamonde et al. 2023 ("Vision-Language Models
are Zero-Shot Reward Models for RL", after Gleave et al. 2021's EPIC): 0 is a perfect match, 0.5 no relation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

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
DEFAULT_REFERENCE = "rewards"  # looked for when --against is not given; its absence is no error then
BLANK_LEVELS = {"black": 0, "gray": 128, "white": 255}
SHUFFLE_SEED = 0


def _defined(a: np.ndarray, b: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], Any]) -> float:
    """``statistic`` of the pairs where both sides are finite; NaN for fewer than two pairs or a constant side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    kept = np.isfinite(a) & np.isfinite(b)
    a, b = a[kept], b[kept]
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(statistic(a, b))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """scipy.stats.pearsonr's r, under the module's policy (NaN pairs left out; undefined is NaN)."""
    return _defined(a, b, lambda x, y: stats.pearsonr(x, y).statistic)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """scipy.stats.spearmanr's rho (ties share their average rank), under the module's policy."""
    return _defined(a, b, lambda x, y: stats.spearmanr(x, y).statistic)


def voc(reward: np.ndarray) -> float:
    """Value-order correlation of one episode: Spearman of its reward with the step index; NaN for one step or
    a constant reward."""
    return spearman(reward, np.arange(len(reward)))


def success_auroc(scores: np.ndarray, successful: np.ndarray) -> float:
    """ROC-AUC of ``scores`` (one per episode) for the flags ``successful``: U / (n_pos * n_neg), U the
    Mann-Whitney statistic of the successful scores; NaN scores left out; NaN unless both classes are present."""
    scores, successful = np.asarray(scores, dtype=np.float64), np.asarray(successful, dtype=bool)
    kept = np.isfinite(scores)
    scores, successful = scores[kept], successful[kept]
    positive, negative = scores[successful], scores[~successful]
    if not len(positive) or not len(negative):
        return float("nan")
    u = stats.mannwhitneyu(positive, negative, alternative="two-sided", method="asymptotic").statistic
    return float(u) / (len(positive) * len(negative))


def epic_distance(r: float) -> float:
    return math.sqrt(max(0.0, (1.0 - r) / 2.0))


def _is_binary(values: np.ndarray) -> bool:
    """Its finite values are 0s and 1s (and it has some)."""
    finite = values[np.isfinite(values)]
    return bool(len(finite)) and bool(np.isin(np.unique(finite), [0, 1]).all())


def _summary(values: list[float]) -> dict[str, float | int]:
    finite = np.array([v for v in values if np.isfinite(v)])
    if not len(finite):
        return {"mean": float("nan"), "median": float("nan"), "episodes": 0}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "episodes": int(len(finite))}


@dataclass
class EvaluateRequest:
    source: Path
    reward_key: str
    against: str | None = None  # None: the environment's rewards when the data holds them, else no reference
    image_key: str | None = None
    model: str | None = None  # default: what the reward's attributes record
    pretrained: str | None = None
    blank: bool = True
    device: str = "auto"
    split: str = "train"  # of a DatasetDict folder or a Hub dataset


@dataclass
class Evaluation:
    """What ``evaluate`` reports; NaN (JSON null) where a statistic is undefined, None where it does not apply
    (no reference, no success flag)."""

    reward_key: str
    against: str | None  # the reference's key; None: no reference
    steps: int
    episodes: int
    # Value-order correlation (GVL, TOPReward) over the episodes that have one, and over the successful ones.
    voc_mean: float
    voc_median: float
    voc_episodes: int
    voc_episodes_undefined: int  # one step, or a constant reward: no VOC, left out of its mean and median
    voc_successful_mean: float | None = None
    voc_successful_median: float | None = None
    voc_successful_episodes: int | None = None
    # Success detection: ROC-AUC of the final-step reward and of the episode's maximum.
    successful_episodes: int | None = None
    failed_episodes: int | None = None
    success_auroc_final: float | None = None
    success_auroc_max: float | None = None
    # Against the reference (--against).
    pearson: float | None = None
    spearman: float | None = None
    per_episode_pearson: dict[str, float | int] | None = None
    per_episode_spearman: dict[str, float | int] | None = None
    reference_binary: bool | None = None
    reference_nan_steps: int | None = None  # steps left out of every correlation with the reference
    epic_distance: float | None = None
    # Baselines: frames shuffled across episodes, and blank frames.
    shuffled_voc_mean: float = float("nan")
    shuffled_pearson: float | None = None
    shuffled_spearman: float | None = None
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

    def rows(self) -> list[tuple[str, str]]:
        """The table ``evaluate`` prints: (measure, value), undefined values as n/a."""
        fmt = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731
        undefined = f", {self.voc_episodes_undefined} undefined" if self.voc_episodes_undefined else ""
        rows = [
            (
                f"VOC (Spearman of reward with step index per episode): mean / median ({self.voc_episodes} "
                f"episodes{undefined})",
                f"{fmt(self.voc_mean)} / {fmt(self.voc_median)}",
            )
        ]
        if self.voc_successful_episodes is not None:
            rows.append(
                (
                    f"VOC, successful episodes: mean / median ({self.voc_successful_episodes})",
                    f"{fmt(self.voc_successful_mean)} / {fmt(self.voc_successful_median)}",
                )
            )
            rows.append(
                (
                    f"success AUROC of the final-step / maximum reward ({self.successful_episodes} successful, "
                    f"{self.failed_episodes} failed episodes)",
                    f"{fmt(self.success_auroc_final)} / {fmt(self.success_auroc_max)}",
                )
            )
        return rows + self._reference_rows(fmt) + self._baseline_rows(fmt)

    def _reference_rows(self, fmt: Callable[[float | None], str]) -> list[tuple[str, str]]:
        if self.per_episode_pearson is None or self.per_episode_spearman is None:
            return []
        rows = [("Pearson (all steps)", fmt(self.pearson)), ("Spearman (all steps)", fmt(self.spearman))]
        for name, found in (("Pearson", self.per_episode_pearson), ("Spearman", self.per_episode_spearman)):
            rows.append(
                (
                    f"{name} per episode: mean / median ({found['episodes']} episodes)",
                    f"{fmt(found['mean'])} / {fmt(found['median'])}",
                )
            )
        if self.epic_distance is not None:
            rows.append(("EPIC-style distance sqrt((1-r)/2) (binary reference)", fmt(self.epic_distance)))
        return rows

    def _baseline_rows(self, fmt: Callable[[float | None], str]) -> list[tuple[str, str]]:
        if self.shuffled_pearson is None:
            rows = [("baseline: frames shuffled across episodes, VOC mean", fmt(self.shuffled_voc_mean))]
        else:
            rows = [
                (
                    "baseline: frames shuffled across episodes, VOC mean / Pearson / Spearman",
                    f"{fmt(self.shuffled_voc_mean)} / {fmt(self.shuffled_pearson)} / {fmt(self.shuffled_spearman)}",
                )
            ]
        if self.blank_scores is not None:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in self.blank_scores.items())
            rows.append(
                (
                    f"baseline: blank frames ({shown}); steps scoring above the best",
                    f"{100 * (self.above_blank_fraction or 0):.1f}%",
                )
            )
        return rows


@dataclass(frozen=True)
class Reference:
    """The per-step signal a reward is compared with (``--against``), one array per episode (NaN allowed)."""

    key: str
    values: list[np.ndarray]


def _per_episode(source: LabelledData, episodes: list[Episode], key: str, what: str) -> list[np.ndarray]:
    """Per-step values of a key the data holds (a reference, success flags; NaN kept, infinity refused);
    [] when absent."""
    values = labelled.series(source, episodes, key, what, nan_ok=True)
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


def _reference(source: LabelledData, episodes: list[Episode], against: str | None) -> Reference | None:
    """The reference ``--against`` names (refused when absent), or without it the environment's rewards when
    the data holds them (else None)."""
    keys = REFERENCE_KEYS.get(against or DEFAULT_REFERENCE, (against,))
    for key in keys:
        values = _per_episode(source, episodes, str(key), "--against")
        if values:
            return Reference(str(key), values)
    if against is None:
        return None
    tried = ", ".join(str(k) for k in keys)
    raise VlmlabelError(
        f"--against {against}: no per-step dataset {tried} found in every episode; name one with --against KEY"
    )


def _success_flags(source: LabelledData, episodes: list[Episode], reference: Reference | None) -> list[np.ndarray]:
    """Per-step success flags: a binary reference itself, else the first binary success key the data holds; [] if
    none (a success key of other values, e.g. a classifier's probabilities, flags nothing: it is left out)."""
    if reference is not None and _is_binary(np.concatenate(reference.values)):
        return reference.values
    found = (_per_episode(source, episodes, k, "success") for k in SUCCESS_KEYS)
    return next((v for v in found if v and _is_binary(np.concatenate(v))), [])


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
    """Judge the reward ``reward_key``: its VOC, how well it detects success where the data flags success, and
    its correlation with the reference signal (``against``), episode by episode and overall."""
    with open_any_camera(str(request.source), request.image_key, request.split) as source:
        episodes = source.episodes(Align.frame)
        reward = labelled.read_reward(source, episodes, request.reward_key)
        reference = _reference(source, episodes, request.against)
        flags = _success_flags(source, episodes, reference)
    steps = reward.steps(episodes)
    # An episode succeeds when any of its steps is flagged (a NaN flag is not).
    successful = [bool(np.any(f >= 1)) for f in flags] if flags else None
    result = _judge(request.reward_key, [e.name for e in episodes], steps, successful)
    if reference is not None:
        _compare(result, steps, reference)
    else:
        tried = ", ".join(REFERENCE_KEYS[DEFAULT_REFERENCE])
        result.notes.append(f"no reference ({tried}) in the data: correlations skipped; name one with --against KEY")
    _baselines(result, reward, reward.raw_steps(episodes), reference)
    # A goal image's blank scores would need the image; a judge's, a query of blank frames (not done here).
    if request.blank and not reward.config.goal_images and reward.config.judge is None:
        result.blank_scores = blank_scores(
            reward.attrs, reward.config, request.model, request.pretrained, request.device
        )
        raw = np.concatenate(reward.raw_steps(episodes))
        result.above_blank_fraction = float((raw > max(result.blank_scores.values())).mean())
    return result


def _judge(key: str, names: list[str], reward: list[np.ndarray], successful: list[bool] | None) -> Evaluation:
    """The reward on its own: VOC per episode, and with success flags VOC on successful episodes and AUROC."""
    vocs = [voc(r) for r in reward]
    found = _summary(vocs)
    result = Evaluation(
        reward_key=key,
        against=None,
        steps=sum(len(r) for r in reward),
        episodes=len(reward),
        voc_mean=float(found["mean"]),
        voc_median=float(found["median"]),
        voc_episodes=int(found["episodes"]),
        voc_episodes_undefined=len(vocs) - int(found["episodes"]),
        per_episode=[
            {"episode": i, "name": name, "steps": len(r), "voc": v, "success": None}
            for i, (name, r, v) in enumerate(zip(names, reward, vocs, strict=True))
        ],
    )
    if result.voc_episodes_undefined:
        result.notes.append(
            f"{result.voc_episodes_undefined} episode(s) of one step or of a constant reward have no VOC: "
            "left out of its mean and median"
        )
    if successful is None:
        result.notes.append(
            "no success flag (a 0/1 success key or a binary --against): VOC on successful episodes and success "
            "AUROC skipped"
        )
    else:
        _detect_success(result, reward, vocs, successful)
    return result


def _detect_success(result: Evaluation, reward: list[np.ndarray], vocs: list[float], successful: list[bool]) -> None:
    flags = np.array(successful, dtype=bool)
    chosen = _summary([v for v, s in zip(vocs, successful, strict=True) if s])
    result.voc_successful_mean, result.voc_successful_median = float(chosen["mean"]), float(chosen["median"])
    result.voc_successful_episodes = int(chosen["episodes"])
    result.successful_episodes, result.failed_episodes = int(flags.sum()), int((~flags).sum())
    final = np.array([r[-1] if len(r) else np.nan for r in reward])
    peak = np.array([r.max() if len(r) else np.nan for r in reward])
    result.success_auroc_final, result.success_auroc_max = success_auroc(final, flags), success_auroc(peak, flags)
    for row, flag in zip(result.per_episode, successful, strict=True):
        row["success"] = flag
    if not result.successful_episodes or not result.failed_episodes:
        result.notes.append(
            f"{'every' if result.successful_episodes else 'no'} episode succeeds: success AUROC is undefined"
        )


def _compare(result: Evaluation, reward: list[np.ndarray], reference: Reference) -> None:
    """Correlations with the reference, over all steps and per episode (steps where it is NaN left out)."""
    all_reward, all_reference = np.concatenate(reward), np.concatenate(reference.values)
    result.against = reference.key
    result.reference_binary = _is_binary(all_reference)
    result.reference_nan_steps = int(np.count_nonzero(np.isnan(all_reference)))
    result.pearson, result.spearman = pearson(all_reward, all_reference), spearman(all_reward, all_reference)
    per_pearson = [pearson(r, g) for r, g in zip(reward, reference.values, strict=True)]
    per_spearman = [spearman(r, g) for r, g in zip(reward, reference.values, strict=True)]
    result.per_episode_pearson, result.per_episode_spearman = _summary(per_pearson), _summary(per_spearman)
    if result.reference_binary and np.isfinite(result.pearson):
        result.epic_distance = epic_distance(result.pearson)
    for row, p, q in zip(result.per_episode, per_pearson, per_spearman, strict=True):
        row.update(pearson=p, spearman=q)
    finite = all_reference[np.isfinite(all_reference)]
    if not len(finite) or np.ptp(finite) == 0:
        result.notes.append(f"the reference {reference.key!r} is constant: no correlation is defined")
    if result.reference_nan_steps:
        result.notes.append(
            f"the reference {reference.key!r} is NaN at {result.reference_nan_steps} step(s): left out of every "
            "correlation with it"
        )


def _baselines(
    result: Evaluation, written: labelled.WrittenReward, raw: list[np.ndarray], reference: Reference | None
) -> None:
    shuffled = _shuffled(written, raw)
    result.shuffled_voc_mean = float(_summary([voc(r) for r in shuffled])["mean"])
    if reference is not None:
        together, all_reference = np.concatenate(shuffled), np.concatenate(reference.values)
        result.shuffled_pearson = pearson(together, all_reference)
        result.shuffled_spearman = spearman(together, all_reference)


def _shuffled(reward: labelled.WrittenReward, raw: list[np.ndarray]) -> list[np.ndarray]:
    """The reward per episode as it would be on frames shuffled across episodes: raw per-frame scores permuted
    over the dataset, then thresholded/normalised/shaped within episodes exactly as the written reward was."""
    permuted = np.random.default_rng(SHUFFLE_SEED).permutation(np.concatenate(raw))
    bounds = np.cumsum([0] + [len(r) for r in raw])
    episodes = [permuted[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if reward.raw is None:
        return episodes
    return [e[:, 0] for e in reward.config.postprocess([e[:, None] for e in episodes])]
