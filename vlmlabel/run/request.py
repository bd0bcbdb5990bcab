"""What a relabel run is asked (``RelabelRequest``) and what it answers (one of the ``Summary`` types).

Shared by the CLI, the Python API, torchrun and ``merge``; nothing here runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from vlmlabel.engine import RelabelResult
from vlmlabel.formulation import RewardConfig
from vlmlabel.model import DEFAULT_MODEL
from vlmlabel.rewards import CameraReduce
from vlmlabel.run.resumable import DEFAULT_CHECKPOINT_EVERY
from vlmlabel.run.shards import ShardSpec, SlurmArrayTask
from vlmlabel.sources import Align
from vlmlabel.sources.base import VideoDecoder

DEFAULT_REWARD_KEY = "vlm_reward"
RAW_SUFFIX = "_raw"


def reward_names(key: str, goal_count: int) -> list[str]:
    """NAME for one goal; NAME_0, NAME_1, ... for several."""
    return [key] if goal_count == 1 else [f"{key}_{i}" for i in range(goal_count)]


def output_names(key: str, config: RewardConfig) -> tuple[list[str], list[str]]:
    """The reward columns of a result and, when the formulation keeps them, its raw-score columns."""
    names = reward_names(key, len(config.goals))
    return names, [f"{n}{RAW_SUFFIX}" for n in names] if config.keeps_raw else []


class ScoringModel(Protocol):
    """A loaded model as a run reports and records it, whichever scorer (``vlmlabel.scorers``) loaded it."""

    @property
    def name(self) -> str: ...

    @property
    def pretrained(self) -> str: ...

    @property
    def precision(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def logit_scale(self) -> float: ...

    @property
    def logit_bias(self) -> float | None: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class RelabelRequest:
    source: Path | str
    goals: list[str]
    model: str = DEFAULT_MODEL
    scorer: str = "clip"  # a name in vlmlabel.scorers.registry.SCORERS
    pretrained: str | None = None
    image_key: str | list[str] | None = None  # several: each camera scored, combined by ``camera_reduce``
    reward_key: str = DEFAULT_REWARD_KEY
    output: Path | None = None
    overwrite: bool = False
    batch_size: int | None = None
    precision: str = "auto"
    device: str = "auto"
    align: Align = Align.next  # r_t rewards o_{t+1}, the offline RL convention; Align.frame scores o_t
    camera_reduce: CameraReduce = CameraReduce.mean
    link: bool = False  # hard-link unchanged files into a new dataset (shares storage with the source)
    split: str = "train"
    revision: str | None = None
    streaming: bool = False
    push_to_hub: str | None = None
    formulation: RewardConfig | None = None  # None: plain cosine to ``goals``
    use_cache: bool | None = None  # None: when the scorer has embeddings (CLIP); True: refused by one without
    restart: bool = False
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    shard: ShardSpec | None = None
    array: SlurmArrayTask | None = None  # a SLURM job array task without --num-shards: its shard is found at open
    compile: bool = False
    workers: int | None = None  # decoding processes; None: usable cores minus one (at most 8); 0: this process
    video_decoder: VideoDecoder = VideoDecoder.cpu  # nvdec: the run's GPU decodes video (the same pixels)

    def reward_config(self) -> RewardConfig:
        config = self.formulation if self.formulation is not None else RewardConfig(goals=list(self.goals))
        return config.validate()

    def image_keys(self) -> list[str | None]:
        """The cameras asked for, in order, each once; [None] to detect the one there is."""
        if self.image_key is None or isinstance(self.image_key, str):
            return [self.image_key]
        return list(dict.fromkeys(self.image_key)) or [None]


@dataclass
class RelabelSummary:
    result: RelabelResult
    written_to: Path
    reward_names: list[str]
    goals: list[str]
    model: ScoringModel
    layout: str
    image_key: str
    used_cache: bool = False
    cache_note: str = ""
    raw_names: list[str] = field(default_factory=list)
    camera_names: list[str] = field(default_factory=list)


@dataclass
class ShardSummary:
    """What a shard run computed and where its result waits for ``vlmlabel merge``."""

    shard: ShardSpec
    path: Path
    episodes: int
    frames: int
    seconds: float
    already_done: bool


@dataclass
class FinishedSummary:
    """Nothing to do: the destination already holds these rewards from an identical run."""

    written_to: Path
    reward_names: list[str]


Summary = RelabelSummary | ShardSummary | FinishedSummary
