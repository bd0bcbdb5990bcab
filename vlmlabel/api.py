"""The library door: score frames in your own loop (an environment, a data loader) with the relabel pipeline.

``RewardModel`` loads a CLIP model once and turns batches of uint8 frames into rewards. It goes through the
same code as ``vlmlabel relabel``: ``model.load_model`` (weights and the model's own preprocessing config),
``formulation.RewardConfig`` + ``build_score_fn`` (the formulas and their validation) and
``engine.FrameScorer`` (device preprocessing, encode, score), so a reward computed here equals the one the
command writes for the same frame.

Only per-frame formulations apply: shaping and normalisation need whole episodes, so they are refused here
(run them on collected rewards with ``vlmlabel.rewards.delta_shaping`` / ``normalize``, or use ``relabel``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from vlmlabel import rewards
from vlmlabel.device import default_batch_size, resolve_device, resolve_precision
from vlmlabel.engine import FrameScorer
from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import RewardConfig, build_score_fn, check_prompt_lengths
from vlmlabel.model import DEFAULT_MODEL, ClipModel, load_model
from vlmlabel.reader.buffers import Batch
from vlmlabel.rewards import RewardMode

# One frame (H, W), (H, W, C), (C, H, W) or a batch (N, H, W, C), (N, C, H, W); or a list of equal frames.
Frames = np.ndarray | torch.Tensor | Sequence[np.ndarray] | Sequence[torch.Tensor]

_EPISODE_OPTIONS = ("shaping", "gamma", "normalize")


class RewardModel:
    """A CLIP reward R(o, l) for frames you hold in memory: load once, call on every batch.

    >>> rm = RewardModel(model="ViT-B-32", goals=["the pole is upright"])      # doctest: +SKIP
    >>> rm(frames)        # uint8 (N, H, W, 3) -> float32 (N,)                  # doctest: +SKIP

    Several goals give (N, G). ``reward`` picks the formulation (cosine, projection, softmax, contrastive, sigmoid)
    with ``templates``, ``baselines``, ``negatives``, ``alpha`` and ``threshold`` as in ``vlmlabel relabel``.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pretrained: str | None = None,
        goals: Sequence[str] | str = (),
        reward: RewardMode | str = RewardMode.cosine,
        device: str | torch.device = "auto",
        precision: str = "auto",
        *,
        templates: Sequence[str] = (),
        baselines: Sequence[str] = (),
        negatives: Sequence[str] = (),
        alpha: float = 1.0,
        threshold: float | None = None,
        batch_size: int | None = None,
        **unsupported: object,
    ) -> None:
        if unsupported:
            raise VlmlabelError(_unsupported_message(sorted(unsupported)))
        goal_list, template_list, baseline_list, negative_list = (
            _texts(what, given)
            for what, given in (
                ("goals", goals),
                ("templates", templates),
                ("baselines", baselines),
                ("negatives", negatives),
            )
        )
        # Validated before the model loads, with the same words as the command line.
        self.config = RewardConfig(
            goals=goal_list,
            mode=_reward_mode(reward),
            templates=template_list,
            baselines=baseline_list,
            negatives=negative_list,
            alpha=float(alpha),
            threshold=threshold,
        ).validate()
        resolved = resolve_device(str(device))  # a torch.device is checked like a string
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise VlmlabelError(f"batch_size must be a whole number at least 1, not {batch_size!r}")
        self.batch_size = batch_size or default_batch_size(resolved)
        self.model: ClipModel = load_model(model, pretrained, resolved, resolve_precision(precision, resolved))
        for note in check_prompt_lengths(self.config, self.model):
            warnings.warn(note, stacklevel=2)
        score_fn = build_score_fn(self.config, self.model.encode_texts, self.model.logit_scale, self.model.logit_bias)
        self._scorer = FrameScorer(self.model, score_fn=score_fn)

    @property
    def goals(self) -> list[str]:
        """The goals, in the order of the reward columns."""
        return list(self.config.goals)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __repr__(self) -> str:
        return (
            f"RewardModel(model={self.model.name!r}, pretrained={self.model.pretrained!r}, goals={self.goals!r}, "
            f"reward={self.config.mode.value!r}, device={str(self.device)!r}, "
            f"precision={self.model.precision!r})"
        )

    def __call__(self, frames: Frames) -> np.ndarray:
        """float32 rewards: (N,) for one goal, (N, G) for several; one frame in gives N = 1."""
        batches = frames_to_batches(frames, self.batch_size, self.device)
        if not batches:
            return _shaped(np.zeros((0, len(self.config.goals)), dtype=np.float32))
        scores = np.concatenate([self._scorer.score(b).float().cpu().numpy() for b in batches], axis=0)
        if self.config.threshold is not None:
            scores = rewards.threshold(scores, self.config.threshold)
        return _shaped(scores.astype(np.float32, copy=False))

    def embed(self, frames: Frames) -> np.ndarray:
        """Unit image embeddings (N, D) float32: score new goals later with one matrix product."""
        batches = frames_to_batches(frames, self.batch_size, self.device)
        if not batches:
            dim = int(getattr(self.model.module.visual, "output_dim", 0))
            return np.zeros((0, dim), dtype=np.float32)
        return np.concatenate([self._scorer.embed(b).float().cpu().numpy() for b in batches], axis=0)


def frames_to_batches(frames: Frames, batch_size: int, device: torch.device | None = None) -> list[Batch]:
    """uint8 frames in any supported layout -> engine batches of at most ``batch_size`` frames (the pixels are not
    copied when the input is already a contiguous uint8 array)."""
    tensor, form = _as_frames_tensor(frames)
    if device is not None and device.type == "cpu" and tensor.device.type != "cpu":
        tensor = tensor.cpu()  # the engine reads CPU batches in place; it moves them only to other devices
    chunks = [tensor[i : i + batch_size] for i in range(0, len(tensor), batch_size)]
    return [Batch(chunk, len(chunk), form) for chunk in chunks]


def _as_frames_tensor(frames: Frames) -> tuple[torch.Tensor, str]:
    """A (N, ...) uint8 CPU-or-device tensor and its engine form: "HWC", "CHW" or "HW"."""
    tensor = _uint8_tensor(_stacked(frames))
    shape = tuple(tensor.shape)
    tensor, form = _with_form(tensor)
    spatial = tensor.shape[1:3] if form == "HWC" else tensor.shape[-2:]
    if min(spatial, default=0) < 1:
        raise VlmlabelError(f"frames of shape {shape} have no pixels")
    return tensor, form


def _stacked(frames: Frames) -> Frames:
    """A list or tuple of frames as one array (tensors stay tensors); anything else as it is."""
    if not isinstance(frames, (list, tuple)):
        return frames
    if not frames:
        raise VlmlabelError("no frames given: pass a uint8 array (N, H, W, C), (N, C, H, W) or one frame")
    if all(isinstance(f, torch.Tensor) for f in frames):
        return torch.stack(list(frames))
    shapes = {np.shape(f) for f in frames}
    if len(shapes) != 1:
        raise VlmlabelError(f"frames in a list must all have one shape, got {sorted(shapes)}")
    return np.stack([np.asarray(f) for f in frames])


def _uint8_tensor(frames: Frames) -> torch.Tensor:
    """A numpy array or torch tensor of uint8 pixels as a tensor (numpy memory shared, never written)."""
    if isinstance(frames, np.ndarray):
        _check_dtype(str(frames.dtype), frames.dtype == np.uint8)
        array = np.ascontiguousarray(frames)
        if not array.flags.writeable:  # torch.from_numpy warns on read-only memory; it is never written
            array = array.copy()
        return torch.from_numpy(array)
    if isinstance(frames, torch.Tensor):
        _check_dtype(str(frames.dtype).replace("torch.", ""), frames.dtype == torch.uint8)
        return frames
    raise VlmlabelError(f"frames must be a numpy array or a torch tensor of uint8 pixels, not {type(frames).__name__}")


def _with_form(tensor: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The frames as a batch (one frame gains a leading axis) and where their channel axis is."""
    shape = tuple(tensor.shape)
    if tensor.ndim == 2:
        return tensor.unsqueeze(0), "HW"
    if tensor.ndim == 3:
        # A 3-D array is one frame: the channel axis is last (HWC, preferred like gymnasium) or first (CHW).
        if shape[-1] in (1, 3):
            return tensor.unsqueeze(0), "HWC"
        if shape[0] in (1, 3):
            return tensor.unsqueeze(0), "CHW"
        raise VlmlabelError(
            f"frame of shape {shape}: a 3-D array is one frame (H, W, C) or (C, H, W) with 1 or "
            "3 channels; pass a batch of grayscale frames as (N, H, W, 1)"
        )
    if tensor.ndim == 4:
        if shape[-1] in (1, 3):
            return tensor, "HWC"
        if shape[1] in (1, 3):
            return tensor, "CHW"
        raise VlmlabelError(
            f"frames of shape {shape}: frames need 1 or 3 channels, first or last ((N, H, W, C) or (N, C, H, W))"
        )
    raise VlmlabelError(
        f"frames of shape {shape}: give one frame (H, W), (H, W, C), (C, H, W) or a batch (N, H, W, C), (N, C, H, W)"
    )


def _texts(what: str, given: Sequence[str] | str) -> list[str]:
    """Prompts as a list: one string is one prompt (never its characters); anything but text is refused."""
    texts = [given] if isinstance(given, str) else list(given)
    for text in texts:
        if not isinstance(text, str):
            raise VlmlabelError(f"{what} must be strings, not {type(text).__name__} {text!r}")
    return texts


def _check_dtype(name: str, is_uint8: bool) -> None:
    if is_uint8:
        return
    if name.startswith(("float", "bfloat", "half", "double")):
        raise VlmlabelError(
            f"frames are {name}; give uint8 images (0-255) as they were captured: convert them, "
            "e.g. (x * 255).round().astype('uint8') for values in [0, 1]. vlmlabel never rescales "
            "frames itself"
        )
    raise VlmlabelError(f"frames are {name}; give uint8 images (0-255)")


def _reward_mode(reward: RewardMode | str) -> RewardMode:
    if isinstance(reward, RewardMode):
        return reward
    try:
        return RewardMode(str(reward).strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in RewardMode)
        raise VlmlabelError(f"unknown reward {reward!r}; use one of {choices}") from None


def _unsupported_message(names: list[str]) -> str:
    episode = [n for n in names if n in _EPISODE_OPTIONS]
    if episode:
        return (
            f"{', '.join(episode)} need(s) whole episodes and does not apply to frames scored one batch at a "
            "time; apply vlmlabel.rewards.delta_shaping / vlmlabel.rewards.normalize to the collected rewards, "
            "or label the recorded episodes with `vlmlabel relabel`"
        )
    return (
        f"unknown option(s) {', '.join(names)}; RewardModel takes templates, baselines, negatives, alpha, "
        "threshold and batch_size"
    )


def _shaped(scores: np.ndarray) -> np.ndarray:
    """(N, 1) -> (N,): one goal gives one reward per frame."""
    return scores[:, 0] if scores.shape[1] == 1 else scores
