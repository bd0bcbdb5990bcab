"""Rewards from embeddings: pure math, no IO and no model."""

from __future__ import annotations

import torch

COSINE_FORMULA = "cos(CLIP_image(o), CLIP_text(goal))"


def cosine(image_embeddings: torch.Tensor, goal_embeddings: torch.Tensor) -> torch.Tensor:
    """R[i, g] = <x_i, g> for unit-norm image rows x_i and unit-norm goal rows g, in fp32."""
    return image_embeddings.float() @ goal_embeddings.float().T
