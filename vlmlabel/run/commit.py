"""The end of every run: one ``CommitPlan`` says what is written where, made once by a single run at open and
by ``merge`` from its parts, then written in the destination's one atomic step with its provenance.

Also what names a result: the attributes every reward records (``base_attrs``) and the result id that tells
an identical rerun (``result_id``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmlabel import __version__
from vlmlabel.destinations import Destination, RewardColumn, family_of
from vlmlabel.destinations.base import Present, whole_results
from vlmlabel.files.interrupt import check
from vlmlabel.files.provenance import (
    CAMERA_OF_ATTR,
    RAW_KEY_ATTR,
    RAW_OF_ATTR,
    RESULT_ATTR,
    REWARD_KEY_ATTR,
    VERSION_ATTR,
)
from vlmlabel.formulation import RewardConfig
from vlmlabel.run.cameras import Cameras
from vlmlabel.run.request import output_names
from vlmlabel.sources import Align, FrameSource


def base_attrs(
    align: Align, image_key: str, used_cache: bool, model_attrs: dict[str, Any], per_observation: bool
) -> dict[str, Any]:
    """Attributes every written reward records besides its formulation. ``rows`` says what one value is:
    a step's reward, or (Minari infos) an observation's score, T+1 of them, step t reading row t+1 (next)
    or t (frame)."""
    return {
        "align": align.value,
        "rows": "observations" if per_observation else "steps",
        "image_key": image_key,
        "embeddings": "cache" if used_cache else "frames",
        VERSION_ATTR: __version__,
        **model_attrs,
    }


def provenance(
    align: Align,
    image_key: str,
    used_cache: bool,
    model_attrs: dict[str, Any],
    per_observation: bool,
    result: str,
) -> dict[str, Any]:
    """``base_attrs`` with the result id: what a run's (or a part's) every column records besides its formula."""
    return {**base_attrs(align, image_key, used_cache, model_attrs, per_observation), RESULT_ATTR: result}


def frames_fingerprint(fingerprints: list[str]) -> str:
    """What the frames of a run are: its camera's ``content_fingerprint``, or one digest of every camera's."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256("".join(fingerprints).encode()).hexdigest()[:32]


def result_id(identity: dict[str, Any], fingerprint: str) -> str:
    """Names the rewards a run makes: equal ids, identical rewards. The source's files and their times are
    left out (an in-place write changes them); what the frames are is in ``fingerprint``."""
    kept = {k: v for k, v in identity.items() if k not in ("source", "stamp")}
    text = json.dumps({**kept, "frames": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class CommitPlan:
    """What a result writes: its reward columns (``names``), raw scores, per-camera scores, into ``destination``,
    replacing ``dropped`` (the rest of the results it replaces whole, known after ``check``)."""

    destination: Destination
    config: RewardConfig
    cameras: Cameras
    reward_key: str
    overwrite: bool
    names: list[str]
    raw_names: list[str]
    dropped: list[str] = field(default_factory=list)

    @classmethod
    def of(
        cls, destination: Destination, config: RewardConfig, cameras: Cameras, reward_key: str, overwrite: bool
    ) -> CommitPlan:
        """The plan of ``reward_key``'s result (its names checked at open: ``run.plan.open_run``)."""
        names, raw_names = output_names(reward_key, config)
        return cls(destination, config, cameras, reward_key, overwrite, names, raw_names)

    @property
    def all_names(self) -> list[str]:
        return self.names + self.raw_names + self.cameras.column_names(self.names)

    def present(self) -> dict[str, Present]:
        """What the destination holds of this result's columns."""
        return self.destination.written(self.all_names)

    def results_in(self, present: dict[str, Present]) -> bool:
        """Whether ``present`` holds every column of this result with a result id: perhaps this very run's."""
        return all(n in present and RESULT_ATTR in present[n].attrs for n in self.all_names)

    def held_in(self, present: dict[str, Present], wanted: set[str]) -> bool:
        """Whether ``present`` holds every column of this result, made by a run with one of the ``wanted``
        result ids."""
        return all(n in present and str(present[n].attrs.get(RESULT_ATTR)) in wanted for n in self.all_names)

    def check(self) -> None:
        """The destination's own checks (names taken, --overwrite, space, permissions), with the results this
        one replaces whole."""
        self.dropped = whole_results(self.reward_key, self.all_names, self.destination.carried())
        self.destination.check(self.all_names + self.dropped, self.overwrite)

    def write(
        self, raw: list[np.ndarray], logit_scale: float, logit_bias: float | None, common: dict[str, Any]
    ) -> tuple[Path, list[np.ndarray]]:
        """Combine cameras, post-process, record provenance and write every column in one atomic step, which also
        removes ``dropped``. Every column records the --reward-key that names the result (``logit_scale`` and
        ``logit_bias``: the model's, recorded where the formula reads them)."""
        config, cameras = self.config, self.cameras
        goals = len(config.goals)
        common = {**common, REWARD_KEY_ATTR: self.reward_key}
        combined = cameras.combine(raw, goals)
        final = config.postprocess(combined)
        columns = []
        for goal_index, name in enumerate(self.names):
            attrs = {**config.attrs(goal_index, logit_scale, logit_bias), **common, **cameras.attrs()}
            formula = attrs["formula"].split(" -> ")[0]  # what raw and per-camera scores are
            columns.append(RewardColumn(name, [f[:, goal_index] for f in final], attrs))
            if self.raw_names:
                raw_attrs = {**attrs, "formula": formula, RAW_OF_ATTR: name}
                columns.append(
                    RewardColumn(self.raw_names[goal_index], [r[:, goal_index] for r in combined], raw_attrs)
                )
                attrs[RAW_KEY_ATTR] = self.raw_names[goal_index]
            per_camera = zip(cameras.keys, cameras.column_names([name]), strict=True) if cameras.several else []
            for index, (key, column) in enumerate(per_camera):
                scores = cameras.camera(raw, goals, index)
                camera_attrs = {
                    **common,
                    **config.attrs(goal_index, logit_scale, logit_bias),
                    "formula": formula,
                    "image_key": key,
                    CAMERA_OF_ATTR: name,
                }
                columns.append(RewardColumn(column, [s[:, goal_index] for s in scores], camera_attrs))
        return self.destination.write(columns, self.overwrite, self.dropped), final


def push(written: Path, hub_repo: str | None, source: FrameSource) -> None:
    """Upload the written dataset to the Hub when asked (as its source's family uploads)."""
    if hub_repo:
        check()  # a signal held while the write was put in place stops the run before the upload
        # Imported here: the Hub client stays off the CLI's startup path and off every run that does not push.
        from vlmlabel.destinations.hub import push as push_to_hub

        push_to_hub(written, family_of(source).push_as_dataset, hub_repo)
