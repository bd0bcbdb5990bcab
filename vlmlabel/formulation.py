"""A reward formulation as the user asked for it: prompts -> text embeddings -> a function of image embeddings.

Validation lives here so the CLI and the library refuse the same bad combinations with the same words,
and ``attrs`` records exactly how a written reward was made (enough to rebuild it in ``evaluate``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlmlabel import rewards
from vlmlabel.errors import VlmlabelError
from vlmlabel.queries import JudgeSpec
from vlmlabel.rewards import Normalize, RewardMode, Shaping

if TYPE_CHECKING:
    from vlmlabel.model import ClipModel

_FORMULAS = {
    RewardMode.cosine: rewards.COSINE_FORMULA,
    RewardMode.projection: rewards.PROJECTION_FORMULA,
    RewardMode.softmax: rewards.SOFTMAX_FORMULA,
    RewardMode.contrastive: rewards.CONTRASTIVE_FORMULA,
    RewardMode.sigmoid: rewards.SIGMOID_FORMULA,
}
_PROBABILITIES = (RewardMode.softmax, RewardMode.sigmoid)  # the formulations a --threshold may cut

# (N, D) unit image embeddings on the model's device -> (N, goals) fp32 scores.
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
# Goal texts -> one unit embedding per goal (texts: through the text tower; goal images: the image tower).
Encoder = Callable[[Sequence[str]], torch.Tensor]

_SHA = " sha256:"
JUDGED = "vlm"  # a judged reward's "reward" in its record, where CLIP's name their formula


class GoalSource(str, enum.Enum):
    """Where a goal image comes from: a file (--goal-image) or a frame of the dataset (--goal-frame)."""

    file = "image"
    frame = "frame"

    @property
    def attr(self) -> str:
        """The attribute that records the goal image's origin in a written reward."""
        return "goal_image" if self is GoalSource.file else "goal_frame"


@dataclass(frozen=True)
class GoalImageRef:
    """A goal given as an image, as its goal text names it: ``image:FILE sha256:HEX`` (a file, as given) or
    ``frame:EPISODE:STEP sha256:HEX`` (a frame of the dataset; before the dataset is opened, without its hash).

    The text is what ``RewardConfig.goals`` holds, what the provenance records and what ``result_id`` hashes, so
    another image (another hash) is another result. ``goal_images`` does the reading; this is only the name."""

    source: GoalSource
    where: str  # the file as given, or "EPISODE:STEP"
    sha256: str = ""  # of the file's bytes, or of the frame as stored

    @property
    def text(self) -> str:
        return f"{self.source.value}:{self.where}" + (f"{_SHA}{self.sha256}" if self.sha256 else "")

    @classmethod
    def parse(cls, text: str) -> GoalImageRef:
        """The inverse of ``text`` (ValueError for a text that names no goal image)."""
        kind, _, rest = text.partition(":")
        if not rest:
            raise ValueError(f"{text!r} names no goal image")
        where, _, sha = rest.rpartition(_SHA) if _SHA in rest else (rest, "", "")
        return cls(GoalSource(kind), where, sha)

    def attrs(self) -> dict[str, str]:
        """What a written reward records of its goal image, beside the goal text: the file as given or the
        frame (EPISODE:STEP), and the sha256 of its content."""
        return {self.source.attr: self.where, "goal_image_sha256": self.sha256}


@dataclass
class RewardConfig:
    """Everything that decides a reward's values besides the model and the frames."""

    goals: list[str]
    mode: RewardMode = RewardMode.cosine
    templates: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    alpha: float = 1.0
    threshold: float | None = None
    shaping: Shaping = Shaping.none
    gamma: float = 0.99
    normalize: Normalize = Normalize.none
    # The goals (texts in ``goals``, see ``GoalImageRef``) that are images: scored by cosine with the frames'
    # embeddings, never through the text tower. Left out of ``to_json`` when empty, so runs without goal images
    # keep their result ids.
    goal_images: list[str] = field(default_factory=list)
    # A generative VLM judges the steps (``--scorer vlm``): the query and its readout replace the formula. Left
    # out of ``to_json`` when None, so CLIP runs keep their result ids.
    judge: JudgeSpec | None = None

    def validate(self) -> RewardConfig:
        """Refuse contradictory or incomplete options before any model is loaded."""
        self._validate_goals()
        for template in self.templates:
            if template.count("{}") != 1:
                raise VlmlabelError(
                    f"--goal-template {template!r} must contain '{{}}' exactly once, "
                    'where the goal goes, e.g. "a photo of {}"'
                )
        mode = self.mode
        if self.judge is not None:
            self._refuse_clip_options()
            self.judge.validate()
        if self.goal_images and mode is not RewardMode.cosine:
            raise VlmlabelError(
                f"--reward {mode.value} does not apply to goal images (--goal-image, --goal-frame): it compares "
                "frames with texts (baselines, negatives) or reads logits calibrated on image-text pairs; a goal "
                "image is scored by --reward cosine"
            )
        if mode is RewardMode.projection and not self.baselines:
            raise VlmlabelError(
                '--reward projection needs --baseline TEXT (what any frame shows, e.g. "a robot arm on a table")'
            )
        if mode is not RewardMode.projection and self.baselines:
            raise VlmlabelError("--baseline only applies to --reward projection")
        if not 0.0 <= self.alpha <= 1.0:
            raise VlmlabelError(f"--alpha must be in [0, 1], not {self.alpha}")
        if mode in (RewardMode.softmax, RewardMode.contrastive) and not self.negatives:
            raise VlmlabelError(
                f"--reward {mode.value} needs at least one --negative TEXT "
                '(what the goal is not, e.g. "the drawer is closed")'
            )
        if mode not in (RewardMode.softmax, RewardMode.contrastive) and self.negatives:
            raise VlmlabelError("--negative only applies to --reward softmax or contrastive")
        if self.threshold is not None:
            if mode not in _PROBABILITIES:
                raise VlmlabelError("--threshold only applies to --reward softmax or sigmoid (a probability to cut)")
            if not 0.0 <= self.threshold <= 1.0:
                raise VlmlabelError(f"--threshold must be in [0, 1], not {self.threshold}")
        if not 0.0 <= self.gamma <= 1.0:
            raise VlmlabelError(f"--gamma must be in [0, 1], not {self.gamma}")
        return self

    def _validate_goals(self) -> None:
        self.goals = [g.strip() for g in self.goals]
        if not self.goals:
            raise VlmlabelError(
                'no goal given; pass --goal "describe the goal in words", --goal-image FILE or '
                "--goal-frame EPISODE:STEP"
            )
        if any(not g for g in self.goals):
            raise VlmlabelError('--goal is empty; describe the goal in words, e.g. --goal "the drawer is open"')

    def _refuse_clip_options(self) -> None:
        """A VLM judge reads its own answer: the options that shape CLIP's formula do not apply."""
        clip_only = {
            "--reward": self.mode is not RewardMode.cosine,
            "--goal-template": bool(self.templates),
            "--baseline": bool(self.baselines),
            "--negative": bool(self.negatives),
            "--threshold": self.threshold is not None,
            "--goal-image/--goal-frame": bool(self.goal_images),
        }
        given = [name for name, used in clip_only.items() if used]
        if given:
            raise VlmlabelError(
                f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to --scorer clip; the vlm scorer "
                "reads its answer "
                "(--answer, --versus, --answer-values) to a --prompt"
            )

    @property
    def per_episode(self) -> bool:
        """Whether post-processing reads whole episodes (so their boundaries must be right)."""
        episode_wise = self.normalize in (Normalize.episode, Normalize.episode_minmax)
        return episode_wise or self.shaping is not Shaping.none

    @property
    def keeps_raw(self) -> bool:
        """Whether the written reward differs from the formula's output, so the raw scores are written too; a
        judge's raw readouts are always kept."""
        changed = self.threshold is not None or self.shaping is not Shaping.none or self.normalize is not Normalize.none
        return changed or self.judge is not None

    @property
    def needs_order(self) -> bool:
        """Whether each episode's rows must be together and in frame order (post-processing, a judge's context)."""
        return self.per_episode or (self.judge is not None and self.judge.needs_order)

    def prompts(self, text: str) -> list[str]:
        """The prompt ensemble for one goal/baseline/negative: each template filled in, or the text itself."""
        return [t.replace("{}", text) for t in self.templates] if self.templates else [text]

    def postprocess(self, raw: list[np.ndarray]) -> list[np.ndarray]:
        """Per-episode raw scores -> written rewards: threshold, then normalise, then shape within episodes.

        Scores are finite by construction; NaN or infinity (a damaged embedding cache or shard part, a model
        the engine did not see overflow) is refused here, before a threshold would turn it into 0."""
        bad = sum(int(np.count_nonzero(~np.isfinite(r))) for r in raw)
        if bad:
            raise VlmlabelError(
                f"{bad} raw score(s) are NaN or infinite, so no reward can be made of them (a "
                "damaged embedding cache or shard part?); nothing was written: run again with "
                "--no-cache, or run the shards again"
            )
        values = [rewards.threshold(r, self.threshold) for r in raw] if self.threshold is not None else raw
        values = rewards.normalize(values, self.normalize)
        if self.shaping is Shaping.delta:
            values = rewards.delta_shaping(values, self.gamma)
        return values

    def is_image(self, goal: str) -> bool:
        """Whether ``goal`` (one of ``goals``) is a goal image, not a text."""
        return goal in self.goal_images

    @property
    def text_goals(self) -> list[str]:
        return [g for g in self.goals if not self.is_image(g)]

    def attrs(self, goal_index: int, logit_scale: float, logit_bias: float | None = None) -> dict[str, Any]:
        """What the written dataset records about how its values were made (``logit_scale`` and ``logit_bias``:
        the model's, recorded where the formula reads them; a goal image: its file or frame and its sha256)."""
        goal = self.goals[goal_index]
        if self.judge is not None:
            return self._judge_attrs(goal, self.judge)
        image = self.is_image(goal)
        spec: dict[str, Any] = {
            "reward": self.mode.value,
            "goal": goal,
            "prompts": [] if image else self.prompts(goal),
            "templates": [] if image else self.templates,
        }
        if image:
            spec.update(GoalImageRef.parse(goal).attrs())
        if self.mode is RewardMode.projection:
            spec.update(baselines=self.baselines, alpha=self.alpha)
        if self.mode in (RewardMode.softmax, RewardMode.contrastive):
            spec["negatives"] = self.negatives
        if self.mode in _PROBABILITIES:
            spec["logit_scale"] = logit_scale
            if self.mode is RewardMode.sigmoid:
                spec["logit_bias"] = logit_bias
            if self.threshold is not None:
                spec["threshold"] = self.threshold
        formula = rewards.GOAL_IMAGE_FORMULA if image else _FORMULAS[self.mode]
        return self._finish_attrs(spec, formula)

    def _judge_attrs(self, goal: str, judge: JudgeSpec) -> dict[str, Any]:
        """A judged reward's record: the query and its readout (``rows``: which steps were queried)."""
        query = {k: v for k, v in judge.to_json().items() if v is not None}  # attributes hold no None
        spec: dict[str, Any] = {"reward": JUDGED, "goal": goal, **query, "anchor_rows": judge.anchor_rule()}
        return self._finish_attrs(spec, judge.formula)

    def _finish_attrs(self, spec: dict[str, Any], formula: str) -> dict[str, Any]:
        """The post-processing's part of the record, the formula with its steps, and the flat attributes."""
        spec.update(shaping=self.shaping.value, normalize=self.normalize.value)
        if self.shaping is Shaping.delta:
            spec["gamma"] = self.gamma
        steps = []
        if self.threshold is not None:
            steps.append(f"1[p >= {self.threshold}]")
        if self.normalize is not Normalize.none:
            steps.append(f"normalize({self.normalize.value})")
        if self.shaping is Shaping.delta:
            steps.append(f"delta shaping: {rewards.DELTA_FORMULA} with gamma={self.gamma}")
        formula += "".join(f" -> {s}" for s in steps)
        flat = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in spec.items()}
        return {**flat, "formula": formula, "reward_spec": json.dumps(spec)}

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON values: the one serialisation of a configuration (fingerprints, shard parts)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        if not self.goal_images:
            del values["goal_images"]
        if self.judge is None:
            del values["judge"]
        else:
            values["judge"] = self.judge.to_json()
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in values.items()}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RewardConfig:
        """The inverse of ``to_json``."""
        enums = {"mode": RewardMode, "shaping": Shaping, "normalize": Normalize}
        made = {k: enums[k](v) if k in enums else v for k, v in values.items() if k != "judge"}
        judge = values.get("judge")
        return cls(**made, judge=JudgeSpec.from_json(judge) if judge is not None else None)

    @classmethod
    def _judged_from_spec(cls, goal: str, spec: dict[str, Any]) -> RewardConfig:
        fields = ("prompt", "answer", "versus", "answer_values", "context", "context_frames", "anchors")
        judge = JudgeSpec.from_json({name: spec.get(name) for name in fields})
        return cls(
            goals=[goal],
            judge=judge,
            shaping=Shaping(spec.get("shaping", "none")),
            gamma=_typed(spec, "gamma", float, 0.99),
            normalize=Normalize(spec.get("normalize", "none")),
        )

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> RewardConfig:
        """Rebuild the raw formulation of a written reward (one goal) from its ``reward_spec`` attribute.

        The attribute was read from a file that may have been edited: anything but a JSON object whose every
        field has the type and range a run writes is refused in one line (VlmlabelError), never used."""
        if "reward_spec" not in attrs:
            # Rewards written before formulations were recorded are plain cosine.
            return cls(goals=[str(attrs.get("goal", ""))])
        try:
            spec = json.loads(attrs["reward_spec"])
            if not isinstance(spec, dict):
                raise TypeError(f"a JSON {type(spec).__name__}, not an object")
            goal = _typed(spec, "goal", str)
            if spec.get("reward") == JUDGED:
                return cls._judged_from_spec(goal, spec).validate()
            config = cls(
                goals=[goal],
                goal_images=[goal] if "goal_image_sha256" in spec else [],
                mode=RewardMode(spec["reward"]),
                templates=_texts(spec, "templates"),
                baselines=_texts(spec, "baselines"),
                negatives=_texts(spec, "negatives"),
                alpha=_typed(spec, "alpha", float, 1.0),
                threshold=_typed(spec, "threshold", float, None),
                shaping=Shaping(spec.get("shaping", "none")),
                gamma=_typed(spec, "gamma", float, 0.99),
                normalize=Normalize(spec.get("normalize", "none")),
            )
            return config.validate()
        except (ValueError, KeyError, TypeError, AttributeError, VlmlabelError) as exc:
            reason = str(exc) if isinstance(exc, VlmlabelError) else f"{type(exc).__name__}: {exc}"
            raise VlmlabelError(
                f"the reward's reward_spec attribute is damaged ({reason}); relabel to write it again"
            ) from None


_MISSING = object()


def _typed(spec: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    """``spec[name]`` when it is a ``kind`` (a float may be written as an int; a bool is no number), else TypeError;
    ``default`` when absent (KeyError without one). None is kept where it is the default."""
    if name not in spec:
        if default is _MISSING:
            raise KeyError(name)
        return default
    value = spec[name]
    if value is None and default is None:
        return None
    number = kind is float and isinstance(value, int | float) and not isinstance(value, bool)
    if not (number or (kind is not float and isinstance(value, kind))):
        raise TypeError(f"{name} is {value!r}, not a {'number' if kind is float else kind.__name__}")
    return float(value) if number else value


def _texts(spec: dict[str, Any], name: str) -> list[str]:
    values = _typed(spec, name, list, [])
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} is {values!r}, not a list of texts")
    return values


def _ensemble(
    encode: Callable[[Sequence[str]], torch.Tensor], config: RewardConfig, texts: Sequence[str], renormalize: bool
) -> torch.Tensor:
    """One row per text: the average of its prompts' embeddings (unit again when ``renormalize``)."""
    groups = [config.prompts(t) for t in texts]
    embedded = encode([p for g in groups for p in g])
    bounds = np.cumsum([0] + [len(g) for g in groups])
    return torch.stack(
        [rewards.prompt_average(embedded[a:b], renormalize) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    )


def check_prompt_lengths(config: RewardConfig, model: ClipModel) -> list[str]:
    """Notes for prompts longer than the model's context (the tokenizer cuts them: say what it keeps and drops);
    refuses two goals the cut makes identical, as they would get identical rewards."""
    notes, cut = [], False
    for role, texts in (("goal", config.text_goals), ("baseline", config.baselines), ("negative", config.negatives)):
        for text in texts:
            for prompt in config.prompts(text):
                truncation = model.truncation(prompt)
                if truncation is not None:
                    cut = True
                    notes.append(truncation.describe(role if prompt == text else f"{role} prompt"))
    if not cut:
        return notes
    goals = config.text_goals
    tokens = [model.tokenizer(config.prompts(goal)) for goal in goals]
    for i, first in enumerate(goals):
        for j in range(i + 1, len(goals)):
            second = goals[j]
            if first != second and torch.equal(tokens[i], tokens[j]):
                raise VlmlabelError(
                    f"goals {i} ({_short(first)}) and {j} ({_short(second)}) are the same once cut "
                    f"to the model's context: they share the first {model.context_length} tokens, "
                    "all the model reads, so their rewards would be identical; shorten them so they "
                    "differ early"
                )
    return notes


def _short(text: str, limit: int = 48) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _sigmoid_bias(logit_bias: float | None) -> float:
    """The model's logit bias, which a sigmoid readout needs: a model trained with the softmax (InfoNCE) loss has
    none, and its logits are meaningful only against each other."""
    if logit_bias is None:
        raise VlmlabelError(
            "--reward sigmoid needs a model trained with a sigmoid loss, which carries a logit_bias (SigLIP, "
            "SigLIP2, e.g. ViT-B-16-SigLIP webli); this model has none: use --reward softmax with --negative, "
            "or cosine"
        )
    return logit_bias


def _goal_rows(config: RewardConfig, encode_texts: Encoder, encode_goal_images: Encoder | None) -> torch.Tensor:
    """One unit row per goal, in the order of ``goals``: text goals ensembled over their prompts, goal images
    embedded by ``encode_goal_images``."""
    if not config.goal_images:
        return _ensemble(encode_texts, config, config.goals, renormalize=True)
    if encode_goal_images is None:
        raise VlmlabelError(
            f"the goal {config.goal_images[0]!r} is an image, which only relabel reads and embeds; "
            "evaluate a goal-image reward with --no-blank"
        )
    texts, images = config.text_goals, [g for g in config.goals if config.is_image(g)]
    parts = [_ensemble(encode_texts, config, texts, renormalize=True).float()] if texts else []
    embedded = torch.cat([*parts, encode_goal_images(images).float()])
    order = [*texts, *images]
    return embedded[[order.index(g) for g in config.goals]]


def build_score_fn(
    config: RewardConfig,
    encode_texts: Encoder,
    logit_scale: float,
    logit_bias: float | None = None,
    encode_goal_images: Encoder | None = None,
) -> ScoreFn:
    """Embed the prompts (and goal images) once and return the formula as a function of image embeddings
    (``logit_scale`` and ``logit_bias``: the model's; sigmoid is refused for a model without a bias)."""
    mode = config.mode
    if mode is RewardMode.projection:
        # Rocamonde et al.: g and b are prompt averages, not re-normalised.
        goals = _ensemble(encode_texts, config, config.goals, renormalize=False)
        baseline = _ensemble(encode_texts, config, config.baselines, renormalize=False).mean(dim=0)
        same = [g for g, row in zip(config.goals, goals, strict=True) if torch.equal(row.float(), baseline.float())]
        if same:
            raise VlmlabelError(
                f"--goal {same[0]!r} embeds exactly like the --baseline, so the projection has no "
                "direction (d = g - b is zero); choose a baseline that differs from the goal"
            )
        return lambda x: rewards.projection(x, goals, baseline, config.alpha)
    goals = _goal_rows(config, encode_texts, encode_goal_images)
    if mode is RewardMode.cosine:
        return lambda x: rewards.cosine(x, goals)
    if mode is RewardMode.sigmoid:
        bias = _sigmoid_bias(logit_bias)
        return lambda x: rewards.sigmoid(x, goals, logit_scale, bias)
    negatives = _ensemble(encode_texts, config, config.negatives, renormalize=True)
    if mode is RewardMode.softmax:
        return lambda x: rewards.softmax(x, goals, negatives, logit_scale)
    return lambda x: rewards.contrastive(x, goals, negatives)
