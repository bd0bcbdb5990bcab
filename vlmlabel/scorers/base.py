"""What a scorer provides to the run lifecycle (``run.lifecycle``): one door per phase.

- *checked* (before anything opens): the request's formulation as this scorer scores it, and the options it
  cannot honour refused in one line.
- *card* and *caches* (``run.plan.Namer``, before any model loads): the model's card, which names the result,
  and the embedding caches that serve the run (a scorer without embeddings has none: ``embeddings`` False).
- *width*: the columns of one row of saved progress (``run.checkpoint``).
- *load* (once, after the lock): the model, as a ``Loaded`` that scores the run's frames, or its shard, on the
  fixed batch grid with saved progress, and reports itself (``ScoringModel``) for the summary and provenance.

Adding a scorer is one module implementing this, one line in ``registry.SCORERS`` and one entry in the test
suites' scorer lists.
"""

from __future__ import annotations

from typing import Protocol

from vlmlabel.cache import CacheMatch, CacheMiss
from vlmlabel.events import Events
from vlmlabel.run.checkpoint import Checkpoint
from vlmlabel.run.plan import Card, OpenRun
from vlmlabel.run.request import RelabelRequest, ScoringModel
from vlmlabel.run.score import Scored
from vlmlabel.run.setup import Machine


class Loaded(Protocol):
    """A scorer's model, loaded for one run."""

    @property
    def model(self) -> ScoringModel: ...

    def score(self, run: OpenRun, checkpoints: list[Checkpoint], events: Events) -> Scored:
        """Raw scores of the run's episodes (or its shard's), one (steps, cameras x goals) array each, on the
        fixed batch grid, saving progress in ``checkpoints`` (one per camera)."""
        ...


class Scorer(Protocol):
    name: str
    embeddings: bool  # has image embeddings: the cache and ``vlmlabel embed`` serve it

    def default_model(self, model: str | None) -> str: ...

    def checked(self, request: RelabelRequest) -> RelabelRequest:
        """``request`` with its formulation as this scorer scores it; what it cannot honour refused in one line."""
        ...

    def card(self, request: RelabelRequest, machine: Machine) -> Card: ...

    def caches(self, run: OpenRun, card: Card) -> list[CacheMatch] | CacheMiss: ...

    def width(self, run: OpenRun) -> int: ...

    def load(self, run: OpenRun, card: Card, machine: Machine, events: Events) -> Loaded: ...
