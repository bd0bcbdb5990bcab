"""A written reward as the per-frame progress file LeRobot's reward-aligned behaviour cloning (RA-BC) trains on.

lerobot 0.6.1's ``RABCWeights`` (``lerobot/rewards/sarm/rabc.py``) reads a parquet of ``index`` (the global frame
index a training batch carries), ``episode_index`` and ``progress_sparse`` or ``progress_dense``; frame i's weight
comes from progress[i + chunk_size] - progress[i], its episode spanning [min index, max index + 1). So each
episode's ``index`` must be one consecutive run. The file also follows LeRobot main's unreleased "frame signals"
contract (``lerobot/rewards/scoring/schema.py``, format ``lerobot.frame_signals`` version 1): int64 ``index``,
``episode_index``, ``frame_index``; rows ordered by episode, ``index`` strictly increasing, ``index - frame_index``
constant per episode; format, version, provenance, signal descriptors and episodes in the key-value metadata.
The reward is read through ``labelled.read_reward`` only, and the file is put in place by ``atomic.staged``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlabel import __version__, labelled
from vlmlabel.destinations.base import check_output_suffix
from vlmlabel.destinations.lerobot import provenance
from vlmlabel.errors import OutputError, SourceError, VlmlabelError
from vlmlabel.files import atomic
from vlmlabel.files.provenance import RESULT_ATTR, REWARD_KEY_ATTR, VERSION_ATTR
from vlmlabel.rewards import Normalize, constant, normalize
from vlmlabel.sources import Align, Episode, open_any_camera
from vlmlabel.sources.base import PARQUET_SUFFIX, LabelledData, show_path

# LeRobot main's frame-signal contract (schema.py): metadata keys, format name and version, reserved columns.
FORMAT = "lerobot.frame_signals"
SCHEMA_VERSION = 1
RESERVED = ("index", "episode_index", "frame_index")
_META = "lerobot.reward_scoring."
FORMAT_KEY, VERSION_KEY = f"{_META}format", f"{_META}schema_version"
PROVENANCE_KEY, DESCRIPTORS_KEY, EPISODES_KEY = f"{_META}provenance", f"{_META}descriptors", f"{_META}episode_indices"
SORT_HINT = "sort the dataset by episode_index, frame_index"


class ProgressHead(str, enum.Enum):
    """The column RABCWeights reads: ``progress_{head_mode}``; LeRobot's default head_mode is sparse."""

    sparse = "progress_sparse"
    dense = "progress_dense"


class ProgressScale(str, enum.Enum):
    """How the reward becomes progress in [0, 1]."""

    episode_minmax = "episode-minmax"  # each episode from 0 (its lowest reward) to 1 (its highest)
    dataset_minmax = "dataset-minmax"  # one range over the dataset: a failed episode stays low
    none = "none"  # the reward as written, which must lie in [0, 1] already


# The frame-signal comparison scope each scaling gives (``global``: raw values compare across everything).
SCOPES = {
    ProgressScale.episode_minmax: "episode",
    ProgressScale.dataset_minmax: "dataset",
    ProgressScale.none: "global",
}


@dataclass(frozen=True)
class ProgressRequest:
    source: Path
    output: Path
    reward_key: str = "vlm_reward"
    column: ProgressHead = ProgressHead.sparse
    scale: ProgressScale = ProgressScale.episode_minmax
    overwrite: bool = False
    image_key: str | None = None
    split: str = "train"


@dataclass(frozen=True)
class EpisodeKeys:
    """One episode's row keys: its ``episode_index`` and, per row, the global ``index`` and ``frame_index``;
    ``position``: where it comes in ``source.episodes`` (the order its reward values are read in)."""

    position: int
    episode: int
    index: np.ndarray  # int64
    frame: np.ndarray  # int64


@dataclass(frozen=True)
class ProgressSummary:
    output: Path
    column: str
    frames: int
    episodes: int
    constant_episodes: int  # episodes whose reward is constant (rewards.constant); episode-minmax gives them 0
    index_from: str  # "dataset" (its own index/episode_index columns) or "rows" (running row number)


def write_progress(request: ProgressRequest) -> ProgressSummary:
    """Write ``request.reward_key`` of ``request.source`` as a progress parquet; refused in one line, with
    nothing written, when the output name, the reward or the dataset's row keys do not make a valid file."""
    output = _checked_output(request)
    with open_any_camera(str(request.source), request.image_key, request.split) as source:
        _refuse_inside_source(output, request.source, source.paths)
        episodes = source.episodes(Align.frame)
        reward = labelled.read_reward(source, episodes, request.reward_key)
        keys, index_from = episode_keys(source, episodes)
    values = SCALES[request.scale](reward.rows)
    if request.scale is ProgressScale.none:
        _refuse_out_of_range(request.reward_key, values)
    table = progress_table(keys, values, request.column, _descriptor(request), _provenance(request, reward.attrs))
    with atomic.staged(output) as tmp:
        pq.write_table(table, tmp)
    flat = sum(bool(constant(r)) for r in reward.rows)
    return ProgressSummary(output, request.column.value, table.num_rows, len(keys), flat, index_from)


# -- where it goes -------------------------------------------------------------------------------------------


def _checked_output(request: ProgressRequest) -> Path:
    output = request.output
    check_output_suffix(output, (PARQUET_SUFFIX,), "progress parquet")
    folder = atomic.real_target(output).parent  # a symbolic link is written through: where it points
    if not folder.is_dir():
        raise OutputError(f"folder {show_path(folder)} does not exist; create it first")
    if output.exists() and not request.overwrite:
        raise OutputError(f"output {show_path(output)} already exists; choose another --output or pass --overwrite")
    return output


def _refuse_inside_source(output: Path, given: Path, paths: tuple[Path, ...]) -> None:
    """The output may not replace a file of the dataset, nor lie inside a dataset folder, where a reader would take
    it for data; a LeRobot dataset's root is where LeRobot looks for its progress file, and no data is read there."""
    target = atomic.real_target(output).resolve()
    if target in {p.resolve() for p in paths}:
        raise OutputError(f"--output {show_path(output)} is a file of SOURCE itself; write the progress elsewhere")
    folder = given.resolve()
    lerobot_root = (folder / "meta" / "info.json").is_file() and target.parent == folder
    if folder.is_dir() and folder in target.parents and not lerobot_root:
        raise OutputError(
            f"--output {show_path(output)} lies inside the dataset folder {show_path(given)}, where it would be "
            "read as part of the dataset; write it beside the folder"
        )


# -- which row is which ----------------------------------------------------------------------------------------


def episode_keys(source: LabelledData, episodes: list[Episode]) -> tuple[list[EpisodeKeys], str]:
    """Each episode's keys, ordered by ``episode_index``, and where ``index`` came from.

    A dataset holding ``episode_index`` and ``index`` (LeRobot, and tables made from it) keeps its own: the
    index a LeRobot training batch carries. Otherwise ``episode_index`` is the episode's position in reading order
    and ``index`` the running row number (row 0: the first row of the first episode). ``frame_index`` is the
    dataset's own where it has one, else the row's position in its episode. Refused in one line when RA-BC could
    not find an episode's frames from these (see ``check_keys``)."""
    ids = _whole_numbers(source, episodes, "episode_index")
    index = _whole_numbers(source, episodes, "index") if ids is not None else None
    frame = _whole_numbers(source, episodes, "frame_index")
    starts = np.concatenate([[0], np.cumsum([e.steps for e in episodes])])
    keys = []
    for position, episode in enumerate(episodes):
        rows = np.arange(episode.steps, dtype=np.int64)
        own = index[position] if index is not None else starts[position] + rows
        keys.append(
            EpisodeKeys(
                position,
                int(ids[position][0]) if ids is not None else position,
                own,
                frame[position] if frame is not None else own - own[0],
            )
        )
    keys.sort(key=lambda k: k.episode)
    check_keys(keys, episodes)
    return keys, "dataset" if index is not None else "rows"


def _whole_numbers(source: LabelledData, episodes: list[Episode], key: str) -> list[np.ndarray] | None:
    """The per-row column ``key`` of every episode as int64, None where an episode lacks it."""
    values = labelled.series(source, episodes, key, "column")
    if values is None:
        return None
    for episode, found in zip(episodes, values, strict=True):
        if len(found) != episode.steps or not np.array_equal(found, np.round(found)):
            raise SourceError(
                f"column {key!r} is not one whole number per row in {episode.name}; it cannot key a progress file"
            )
    return [found.astype(np.int64) for found in values]


def check_keys(keys: list[EpisodeKeys], episodes: list[Episode]) -> None:
    """Refuse keys RABCWeights or the frame-signal contract would misread: an episode in several runs of rows,
    a negative episode_index, an episode whose index is not consecutive (index + chunk_size must be the frame
    chunk_size steps later), a frame_index that does not move with index, an index not increasing over episodes."""
    ids, counts = np.unique([k.episode for k in keys], return_counts=True)
    if np.any(counts > 1):
        raise SourceError(f"the rows of episode {ids[counts > 1][0]} are not one consecutive run; {SORT_HINT} first")
    if ids[0] < 0:
        raise SourceError(f"episode_index {ids[0]} is negative; a progress file keys episodes by numbers from 0")
    for k in keys:
        if np.any(np.diff(k.index) != 1):
            raise SourceError(
                f"index is not consecutive within episode {k.episode}: RA-BC reads index + chunk_size as the frame "
                f"chunk_size steps later; {SORT_HINT} first"
            )
        if np.any(k.frame < 0) or np.any(k.index - k.frame != k.index[0] - k.frame[0]):
            raise SourceError(f"frame_index does not advance with index in episode {k.episode}; {SORT_HINT} first")
    firsts = np.array([k.index[0] for k in keys])
    lasts = np.array([k.index[-1] for k in keys])
    if np.any(firsts[1:] <= lasts[:-1]):
        raise SourceError(
            f"index does not increase with episode_index over {len(episodes)} episodes; {SORT_HINT} first"
        )


# -- the values ----------------------------------------------------------------------------------------------


def _each_episode(rows: list[np.ndarray]) -> list[np.ndarray]:
    """Min-max per episode (``rewards.normalize`` on one episode at a time): a constant episode is 0 throughout."""
    return [normalize([r[:, None]], Normalize.minmax)[0][:, 0] for r in rows]


def _over_dataset(rows: list[np.ndarray]) -> list[np.ndarray]:
    return [v[:, 0] for v in normalize([r[:, None] for r in rows], Normalize.minmax)]


def _as_written(rows: list[np.ndarray]) -> list[np.ndarray]:
    return normalize(rows, Normalize.none)


SCALES: dict[ProgressScale, Callable[[list[np.ndarray]], list[np.ndarray]]] = {
    ProgressScale.episode_minmax: _each_episode,
    ProgressScale.dataset_minmax: _over_dataset,
    ProgressScale.none: _as_written,
}


def _refuse_out_of_range(key: str, values: list[np.ndarray]) -> None:
    low, high = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    if low < 0.0 or high > 1.0:
        raise VlmlabelError(
            f"reward {key!r} runs from {low:.4g} to {high:.4g}, outside [0, 1], which progress must lie in; "
            "pass --normalize episode-minmax or dataset-minmax"
        )


# -- the file ------------------------------------------------------------------------------------------------


def _descriptor(request: ProgressRequest) -> dict[str, Any]:
    """The signal's descriptor, with the fields of every draft of LeRobot's ``SignalDescriptor`` seen so far
    (``missing_values``; ``allow_nan``; ``comparison_scope``), so each draft's reader accepts it."""
    how = {
        ProgressScale.episode_minmax: "min-max normalised per episode into [0, 1] (a constant episode is 0)",
        ProgressScale.dataset_minmax: "min-max normalised over the dataset into [0, 1]",
        ProgressScale.none: "as written",
    }[request.scale]
    return {
        "description": f"vlmlabel reward {request.reward_key!r}, {how}",
        "direction": "higher",
        "bounds": [0.0, 1.0],
        "unit": None,
        "comparison_scope": SCOPES[request.scale],
        "missing_values": "forbidden",
        "allow_nan": False,
    }


def _provenance(request: ProgressRequest, attrs: dict[str, Any]) -> dict[str, Any]:
    made = provenance(attrs)
    if RESULT_ATTR in attrs:
        made[RESULT_ATTR] = str(attrs[RESULT_ATTR])
    return {
        "producer": "vlmlabel",
        VERSION_ATTR: __version__,
        "source": str(request.source),
        REWARD_KEY_ATTR: request.reward_key,
        "normalize": request.scale.value,
        "reward": made,
    }


def canonical(value: Any) -> bytes:
    """JSON as LeRobot's contract writes its metadata: sorted keys, no spaces, finite numbers only."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise VlmlabelError(
            "the reward's provenance holds a NaN or infinite number; relabel to write it again"
        ) from None


def progress_table(
    keys: list[EpisodeKeys],
    values: list[np.ndarray],
    column: ProgressHead,
    descriptor: dict[str, Any],
    made: dict[str, Any],
) -> pa.Table:
    """The rows in ``keys`` order (``values[k.position]`` are episode k's), progress as float32 (as LeRobot's own
    writers store it), and the contract's metadata."""
    table = pa.table(
        {
            "index": np.concatenate([k.index for k in keys]),
            "episode_index": np.concatenate([np.full(len(k.index), k.episode, np.int64) for k in keys]),
            "frame_index": np.concatenate([k.frame for k in keys]),
            column.value: np.concatenate([values[k.position] for k in keys]).astype(np.float32),
        }
    )
    metadata = {
        FORMAT_KEY: FORMAT.encode(),
        VERSION_KEY: str(SCHEMA_VERSION).encode(),
        PROVENANCE_KEY: canonical(made),
        DESCRIPTORS_KEY: canonical({column.value: descriptor}),
        EPISODES_KEY: canonical([k.episode for k in keys]),
    }
    return table.replace_schema_metadata(metadata)
