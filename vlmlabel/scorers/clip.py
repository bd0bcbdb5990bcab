"""The CLIP scorer: image embeddings scored against the goals' by the run's formulation (``--reward``), exactly
as open_clip computes them; the only scorer with embeddings, so the cache and ``vlmlabel embed`` serve it."""

from __future__ import annotations

from dataclasses import dataclass

from vlmlabel import cache
from vlmlabel.engine import FrameScorer
from vlmlabel.errors import VlmlabelError
from vlmlabel.events import Events
from vlmlabel.model import DEFAULT_MODEL, ClipModel, ModelCard, describe_model
from vlmlabel.run import score
from vlmlabel.run.checkpoint import Checkpoint
from vlmlabel.run.plan import Card, OpenRun, find_caches
from vlmlabel.run.request import RelabelRequest
from vlmlabel.run.setup import Machine


@dataclass
class LoadedClip:
    """The whole model, with the run's score function, scoring frames ``batch_size`` at a time."""

    clip: ClipModel
    frames: FrameScorer
    batch_size: int

    @property
    def model(self) -> ClipModel:
        return self.clip

    def score(self, run: OpenRun, checkpoints: list[Checkpoint], events: Events) -> score.Scored:
        return score.score_frames(run, self.frames, self.batch_size, checkpoints, events)


class ClipScorer:
    name = "clip"
    embeddings = True

    def default_model(self, model: str | None) -> str:
        return model or DEFAULT_MODEL

    def checked(self, request: RelabelRequest) -> RelabelRequest:
        if request.reward_config().judge is not None:
            raise VlmlabelError(
                "--prompt, --answer, --versus, --answer-values, --context, --context-frames and --anchors "
                "only apply to --scorer vlm"
            )
        return request

    def card(self, request: RelabelRequest, machine: Machine) -> ModelCard:
        return describe_model(request.model, request.pretrained, machine.precision)

    def caches(self, run: OpenRun, card: Card) -> list[cache.CacheMatch] | cache.CacheMiss:
        assert isinstance(card, ModelCard)  # this scorer's own card
        return find_caches(run, card)

    def width(self, run: OpenRun) -> int:
        return len(run.config.goals)

    def load(self, run: OpenRun, card: Card, machine: Machine, events: Events) -> LoadedClip:
        assert isinstance(card, ModelCard)  # this scorer's own card
        model, score_fn = score.load_scorer(run, card, machine, events, image_tower=True)
        return LoadedClip(model, FrameScorer(model, run.config.goals, score_fn), machine.batch_size)
