"""Rewards from embeddings: pure math, no IO and no model.

Image rows x are unit-norm CLIP image embeddings (N, D); goal, baseline and negative rows are
text embeddings (already averaged over their prompts by the caller). Every formula returns an
(N, goals) fp32 tensor and is a row-wise function of x, so scores can be computed in any order
or chunking and gathered afterwards.
"""

from __future__ import annotations

import enum

import numpy as np
import torch

COSINE_FORMULA = "cos(CLIP_image(o), CLIP_text(goal))"
GOAL_IMAGE_FORMULA = "cos(CLIP_image(o), CLIP_image(goal image))"  # --goal-image, --goal-frame
PROJECTION_FORMULA = (
    "1 - 0.5 * |(x - g) P|^2, P = alpha d d^T / |d|^2 + (1 - alpha) I, d = g - b "
    "(Rocamonde et al. 2023, goal-baseline regularisation)"
)
SOFTMAX_FORMULA = "softmax(logit_scale * [x.g, x.n_1, ..., x.n_k])_0"
CONTRASTIVE_FORMULA = "x.g - mean_i x.n_i"
SIGMOID_FORMULA = "sigmoid(logit_scale * x.g + logit_bias)"
DELTA_FORMULA = "gamma * phi(o_{t+1}) - phi(o_t), phi(o_T) := phi(o_{T-1}) at the episode's last step"


class RewardMode(str, enum.Enum):
    """How an image embedding and the text embeddings become a reward."""

    cosine = "cosine"
    projection = "projection"
    softmax = "softmax"
    contrastive = "contrastive"
    sigmoid = "sigmoid"


class Shaping(str, enum.Enum):
    none = "none"
    delta = "delta"


class Normalize(str, enum.Enum):
    none = "none"
    episode = "episode"
    dataset = "dataset"
    minmax = "minmax"
    episode_minmax = "episode-minmax"  # TOPReward's 0..1 progress of each episode


class CameraReduce(str, enum.Enum):
    """How the scores of several cameras make one reward."""

    mean = "mean"
    max = "max"
    min = "min"


def combine_cameras(scores: np.ndarray, how: CameraReduce) -> np.ndarray:
    """(steps, cameras, goals) scores -> (steps, goals): each step's scores reduced over the cameras."""
    if how is CameraReduce.max:
        return scores.max(axis=1).astype(np.float32)
    if how is CameraReduce.min:
        return scores.min(axis=1).astype(np.float32)
    return scores.mean(axis=1, dtype=np.float64).astype(np.float32)


def prompt_average(text_embeddings: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """Mean of one concept's prompt embeddings (a prompt ensemble); unit-norm again unless told not to."""
    mean = text_embeddings.float().mean(dim=0)
    return torch.nn.functional.normalize(mean, dim=0) if renormalize else mean


def cosine(image_embeddings: torch.Tensor, goal_embeddings: torch.Tensor) -> torch.Tensor:
    """R[i, g] = <x_i, g> for unit-norm image rows x_i and unit-norm goal rows g, in fp32."""
    return image_embeddings.float() @ goal_embeddings.float().T


def projection(
    image_embeddings: torch.Tensor, goals: torch.Tensor, baseline: torch.Tensor, alpha: float
) -> torch.Tensor:
    """1 - 0.5 |(x - g) P|^2 with P projecting towards d = g - b, expanded so it costs two matrix products.

    P is symmetric with P d = d, so |(x-g)P|^2 = (1-a)^2 |x-g|^2 + (2a - a^2) ((x-g).d)^2 / |d|^2.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    x = image_embeddings.float()
    g = goals.float()
    d = g - baseline.float().reshape(1, -1)
    d_norm2 = (d * d).sum(dim=1)
    if bool((d_norm2 == 0).any()):
        raise ValueError("a goal equals the baseline (d = g - b is zero); choose a different --baseline")
    x_g = x @ g.T
    x_d = x @ d.T
    diff_norm2 = (x * x).sum(dim=1, keepdim=True) - 2 * x_g + (g * g).sum(dim=1)
    diff_d = x_d - (g * d).sum(dim=1)
    return 1 - 0.5 * ((1 - alpha) ** 2 * diff_norm2 + (2 * alpha - alpha**2) * diff_d**2 / d_norm2)


def softmax(
    image_embeddings: torch.Tensor, goals: torch.Tensor, negatives: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Probability of each goal against the negatives: softmax(s [x.g, x.n_1, ...])_0, one goal at a time."""
    x = image_embeddings.float()
    goal_logits = logit_scale * (x @ goals.float().T)  # (N, G)
    negative_logits = logit_scale * (x @ negatives.float().T)  # (N, K)
    negative_lse = torch.logsumexp(negative_logits, dim=1, keepdim=True)
    return torch.exp(goal_logits - torch.logaddexp(goal_logits, negative_lse))


def contrastive(image_embeddings: torch.Tensor, goals: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """x.g minus the mean similarity to the negatives."""
    x = image_embeddings.float()
    return x @ goals.float().T - (x @ negatives.float().T).mean(dim=1, keepdim=True)


def sigmoid(image_embeddings: torch.Tensor, goals: torch.Tensor, logit_scale: float, logit_bias: float) -> torch.Tensor:
    """Each goal's match probability on its own, as a sigmoid-trained model (SigLIP) reads its logits:
    sigmoid(s x.g + b), the model's own logit scale s and bias b; no negatives compete."""
    x = image_embeddings.float()
    return torch.sigmoid(logit_scale * (x @ goals.float().T) + logit_bias)


def threshold(probabilities: np.ndarray, level: float) -> np.ndarray:
    """Binary success reward 1[p >= level]."""
    return (probabilities >= level).astype(np.float32)


def delta_shaping(potentials: list[np.ndarray], gamma: float) -> list[np.ndarray]:
    """Potential-based shaping gamma * phi(o_{t+1}) - phi(o_t), within each episode only.

    The step after an episode's last one is outside the data; its potential is taken as the last one's,
    so no value ever leaks from one episode into the next.
    """
    shaped = []
    for phi in potentials:
        following = np.concatenate([phi[1:], phi[-1:]], axis=0)
        shaped.append((gamma * following - phi).astype(np.float32))
    return shaped


# A series whose spread (max - min) is at most CONSTANT_SPREAD * max(1, max |x|) counts as constant.
# Scores are functions of unit vectors (cosines, probabilities, their differences: |x| <= 2), so their rounding
# error is absolute, set by the precision: the same frame scored at another batch position or batch size moved
# by 4.5e-8 in fp32 and by 4.7e-6 in bf16 (sample_data/reach-clip, CPU). 1e-4 is 20 times that bf16 figure and
# 100 times below what frames that differ visibly move a CLIP cosine (about 1e-2); the relative part keeps
# the rule scale-free for other values (rewards.normalize on rewards of any size).
CONSTANT_SPREAD = 1e-4


def constant(values: np.ndarray) -> np.ndarray:
    """Per column (axis 0): whether ``values`` are constant up to rounding noise (see ``CONSTANT_SPREAD``);
    an empty or one-row series is constant."""
    if not len(values):
        return np.ones(values.shape[1:], dtype=bool)
    x = np.asarray(values, dtype=np.float64)
    spread = x.max(axis=0) - x.min(axis=0)
    return spread <= CONSTANT_SPREAD * np.maximum(1.0, np.abs(x).max(axis=0))


def normalize(values: list[np.ndarray], how: Normalize) -> list[np.ndarray]:
    """Z-score per episode or over the dataset, or min-max to [0, 1] over the dataset or per episode (per goal
    column).

    A series that is ``constant`` (an episode for ``episode`` and ``episode-minmax``, every value for ``dataset``
    and ``minmax``;
    length 0 or 1 included) has no spread to scale by: its z-scores, or its min-max values, are 0, however
    the rounding noise in it lies. Values must be finite (ValueError otherwise: no statistic of NaN means
    anything; ``RewardConfig.postprocess`` refuses such scores before they get here).
    """
    if any(not np.isfinite(v).all() for v in values):
        raise ValueError("normalize needs finite values: NaN or infinite scores have no mean, spread or range")
    if how is Normalize.none:
        return [v.astype(np.float32) for v in values]
    if how is Normalize.episode:
        return [_zscore(v, v) for v in values]
    if how is Normalize.episode_minmax:
        return [_minmax(v, v) for v in values]
    everything = np.concatenate(values, axis=0).astype(np.float64)
    if how is Normalize.dataset:
        return [_zscore(v, everything) for v in values]
    return [_minmax(v, everything) for v in values]


def _minmax(values: np.ndarray, over: np.ndarray) -> np.ndarray:
    """``values`` mapped by the range of the series ``over`` onto [0, 1] (float64); 0 where ``over`` is constant."""
    if not len(over):
        return values.astype(np.float32)
    stats = np.asarray(over, dtype=np.float64)
    low, flat = stats.min(axis=0), constant(stats)
    span = np.where(flat, 1.0, stats.max(axis=0) - low)
    return np.where(flat, 0.0, (values - low) / span).astype(np.float32)


def _zscore(values: np.ndarray, over: np.ndarray) -> np.ndarray:
    """``values`` as z-scores of the series ``over`` (float64 statistics); 0 where ``over`` is constant."""
    if not len(over):
        return values.astype(np.float32)
    stats = np.asarray(over, dtype=np.float64)
    flat = constant(stats)
    std = np.where(flat, 1.0, stats.std(axis=0))
    return np.where(flat, 0.0, (values - stats.mean(axis=0)) / std).astype(np.float32)
