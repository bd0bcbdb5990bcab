"""Per-step values read back from a labelled dataset for ``evaluate`` and ``plot``, checked once where they are read.

What a labelled dataset holds may have been edited or damaged since vlmlabel wrote it. ``read_reward`` is the one
door through which both commands read a written reward: it returns its values and provenance only when every
episode holds one finite number per row and the attributes are those a run writes (``align``, ``reward_spec``,
``raw_key``, the same in every episode); anything else is a one-line ``SourceError``, so neither command draws
or correlates what it cannot trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmlabel.errors import SourceError, VlmlabelError
from vlmlabel.files.provenance import RAW_KEY_ATTR
from vlmlabel.formulation import RewardConfig
from vlmlabel.sources.base import Align, Episode, LabelledData, is_utf8

RELABEL = "relabel to write it again"


def numbers(found: Any, key: str, episode: Episode, what: str) -> np.ndarray:
    """``found`` as one float64 per row; refused when it is not numbers or holds more than one number per row."""
    values = np.asarray(found)
    scalar_rows = values.ndim == 1 or (values.ndim > 1 and int(np.prod(values.shape[1:])) == 1)
    if values.dtype.kind not in "biuf" or not scalar_rows:
        raise SourceError(
            f"{what} {key!r} has shape {values.shape} ({values.dtype}) in {episode.name}: not one number "
            "per step; choose a per-step scalar key"
        )
    return values.astype(np.float64).reshape(len(values))


def series(
    source: LabelledData, episodes: list[Episode], key: str, what: str, nan_ok: bool = False
) -> list[np.ndarray] | None:
    """Per episode (as ``episodes(Align.frame)`` gives them), the numbers of ``key``, all finite (``nan_ok``:
    NaN allowed, as missing values); None when an episode lacks it."""
    values = []
    for episode in episodes:
        found = source.step_values(episode, key)
        if found is None:
            return None
        found = numbers(found, key, episode, what)
        bad = int(np.count_nonzero(np.isinf(found) if nan_ok else ~np.isfinite(found)))
        if bad:
            raise SourceError(
                f"{what} {key!r} holds {bad} {'infinite' if nan_ok else 'NaN or infinite'} value(s) in "
                f"{episode.name}; nothing drawn "
                "or correlated from them would mean anything: relabel, or find what wrote them"
            )
        values.append(found)
    return values


def per_step(values: np.ndarray, episode: Episode, align: Align) -> np.ndarray:
    """One value per step. Data with one value per observation (Minari infos: T+1 rows, row 0 the reset's)
    gives step t the row of the observation that scores it: t+1 (next; also every info the step returned)
    or t (frame)."""
    if not episode.per_observation or len(values) != episode.steps:
        return values
    return values[1:] if align is Align.next else values[:-1]


def unknown_reward(source: LabelledData, episode: Episode, key: str) -> VlmlabelError:
    written = source.reward_keys(episode)
    listed = ", ".join(written) if written else "none (run `vlmlabel relabel` first)"
    return VlmlabelError(f"unknown reward key {key!r}; rewards written by vlmlabel here: {listed}")


@dataclass(frozen=True)
class WrittenReward:
    """A reward as read back: per episode one finite value per row, and how it was made (checked)."""

    key: str
    attrs: dict[str, Any]  # the provenance as recorded ({} for a per-step key vlmlabel did not write)
    align: Align  # which observation scored step t
    config: RewardConfig  # its formulation (plain cosine for rewards written before it was recorded)
    rows: list[np.ndarray]  # per episode, one float64 per row of ``episodes(Align.frame)``
    raw: list[np.ndarray] | None  # the raw scores it was post-processed from (``raw_key``), else None

    def steps(self, episodes: list[Episode]) -> list[np.ndarray]:
        """One value per step of each episode (per-observation data gives step t its scoring observation's)."""
        return [per_step(v, e, self.align) for v, e in zip(self.rows, episodes, strict=True)]

    def raw_steps(self, episodes: list[Episode]) -> list[np.ndarray]:
        """The raw scores per step: the reward itself when it was written as the formula gave it."""
        raw = self.raw if self.raw is not None else self.rows
        return [per_step(v, e, self.align) for v, e in zip(raw, episodes, strict=True)]


def read_reward(source: LabelledData, episodes: list[Episode], key: str) -> WrittenReward:
    """The reward ``key`` of ``episodes`` (``episodes(Align.frame)``), refused in one line unless it is whole:
    the same provenance in every episode, a valid ``align`` and ``reward_spec``, a ``raw_key`` that names raw
    scores as whole, and one finite number per row of every episode."""
    attrs = source.dataset_attrs(episodes[0], key)
    if attrs is None:
        raise unknown_reward(source, episodes[0], key)
    for episode in episodes[1:]:
        other = source.dataset_attrs(episode, key)
        if other is not None and _described(other) != _described(attrs):
            raise SourceError(
                f"reward {key!r} in {episode.name} records another provenance than in "
                f"{episodes[0].name} (attributes {', '.join(_differing(attrs, other))}): parts of two "
                f"results, or an edited file; {RELABEL}"
            )
    for name, value in attrs.items():
        if isinstance(value, str) and not is_utf8(value):  # h5py and JSON escapes decode what is not UTF-8 this way
            raise SourceError(
                f"reward {key!r}: its {name!r} attribute is not UTF-8 text (the file was edited or damaged); {RELABEL}"
            )
    align = _align(attrs, key)
    config = RewardConfig.from_attrs(attrs)
    rows = _whole(source, episodes, key, "reward")
    raw_key = attrs.get(RAW_KEY_ATTR)
    raw = None
    if raw_key is not None:
        if not isinstance(raw_key, str) or not raw_key or raw_key == key:
            raise SourceError(f"reward {key!r}: its raw_key attribute {raw_key!r} names no other reward; {RELABEL}")
        raw = _whole(source, episodes, raw_key, "raw scores")
    return WrittenReward(key, dict(attrs), align, config, rows, raw)


def _whole(source: LabelledData, episodes: list[Episode], key: str, what: str) -> list[np.ndarray]:
    rows = series(source, episodes, key, what)
    if rows is None:
        lacking = next(e for e in episodes if source.step_values(e, key) is None)
        raise SourceError(f"{what} {key!r} is missing in {lacking.name}; {RELABEL}")
    for episode, values in zip(episodes, rows, strict=True):
        if len(values) != episode.steps:
            raise SourceError(
                f"{what} {key!r} has {len(values)} values in {episode.name}, which has {episode.steps} "
                f"frames: not this dataset's reward (edited, or copied from another?); {RELABEL}"
            )
    return rows


def _align(attrs: dict[str, Any], key: str) -> Align:
    """The alignment a reward was written with (rewards written before it was recorded scored o_t)."""
    recorded = attrs.get("align", Align.frame.value)
    try:
        return Align(recorded if isinstance(recorded, str) else None)
    except ValueError:
        raise SourceError(
            f"reward {key!r}: its align attribute {recorded!r} is not one of "
            f"{', '.join(a.value for a in Align)}: the file was edited; {RELABEL}"
        ) from None


def _described(attrs: dict[str, Any]) -> dict[str, str]:
    return {k: repr(v) for k, v in attrs.items()}


def _differing(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    a, b = _described(first), _described(other)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
