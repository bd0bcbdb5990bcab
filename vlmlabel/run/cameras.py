"""Several cameras, one reward: each camera is scored on its own, the written reward combines them.

Scores travel through progress, shard parts and merge as one (steps, cameras x goals) array, camera
by camera; only ``commit`` splits it. Each camera's own scores are written too, as
``NAME_cam_SHORT`` (SHORT: the camera key without its path or ``observation.images.`` prefix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmlabel.errors import VlmlabelError
from vlmlabel.rewards import CameraReduce, combine_cameras

_PREFIXES = ("observation.images.", "observation.")


def short_name(key: str) -> str:
    """``obs/agentview_image`` -> ``agentview_image``; ``observation.images.top`` -> ``top``."""
    last = key.rsplit("/", 1)[-1]
    for prefix in _PREFIXES:
        if last.startswith(prefix) and len(last) > len(prefix):
            return last[len(prefix) :]
    return last


@dataclass(frozen=True)
class Cameras:
    """The image streams a run scores, and how their scores make the written reward."""

    keys: tuple[str, ...]
    reduce: CameraReduce = CameraReduce.mean

    def __post_init__(self) -> None:
        shorts = [short_name(k) for k in self.keys]
        if len(set(shorts)) != len(shorts):
            raise VlmlabelError(
                f"cameras {', '.join(self.keys)} would write columns of the same name; "
                "score them in separate runs with different --reward-key"
            )

    @property
    def several(self) -> bool:
        return len(self.keys) > 1

    def column_names(self, names: list[str]) -> list[str]:
        """The per-camera columns written beside ``names`` (none for one camera)."""
        if not self.several:
            return []
        return [f"{name}_cam_{short_name(key)}" for name in names for key in self.keys]

    def combine(self, raw: list[np.ndarray], goals: int) -> list[np.ndarray]:
        """Per episode (steps, cameras x goals) -> (steps, goals)."""
        if not self.several:
            return raw
        return [combine_cameras(r.reshape(len(r), len(self.keys), goals), self.reduce) for r in raw]

    def camera(self, raw: list[np.ndarray], goals: int, index: int) -> list[np.ndarray]:
        """One camera's (steps, goals) scores per episode."""
        return [r[:, index * goals : (index + 1) * goals] for r in raw]

    def attrs(self) -> dict[str, Any]:
        """What the combined reward records about its cameras."""
        return {"cameras": json.dumps(list(self.keys)), "camera_reduce": self.reduce.value} if self.several else {}
