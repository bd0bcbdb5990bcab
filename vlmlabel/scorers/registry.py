"""The scorers a run can use, by name (``--scorer``): the one place that lists them."""

from __future__ import annotations

from vlmlabel.errors import VlmlabelError
from vlmlabel.scorers.base import Scorer
from vlmlabel.scorers.clip import ClipScorer
from vlmlabel.scorers.vlm import VlmScorer

SCORERS: dict[str, Scorer] = {scorer.name: scorer for scorer in (ClipScorer(), VlmScorer())}
DEFAULT_SCORER = "clip"


def scorer_for(name: str) -> Scorer:
    """The scorer named ``name``; an unknown name is refused in one line."""
    try:
        return SCORERS[name]
    except KeyError:
        raise VlmlabelError(f"unknown scorer {name!r}; use one of {', '.join(SCORERS)}") from None
