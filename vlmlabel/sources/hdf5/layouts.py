"""The HDF5 layouts vlmlabel reads, one class each, and how a file's is found: the first of ``LAYOUTS`` whose
``detect`` recognises the file (as destinations are chosen from their registry).

A layout says where a file's episodes are (one group per episode, or the rows of flat arrays cut at episode
ends), where the frames are chosen (``Layout.group``), where the next observations and the per-step values lie.
Its ``name`` is recorded in provenance and printed. What the layouts look at in the file is looked at once,
when first asked (``Survey``): a layout later in the list reuses what an earlier one looked at.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from vlmlabel.errors import SourceError
from vlmlabel.sources.base import EMBEDDING_GROUP, Align, Episode, FrameFormat, Segment, step_segments
from vlmlabel.sources.hdf5.links import checked_dataset, refuse_missing_files
from vlmlabel.sources.hdf5.raw import frame_format_of

_FLAT_OBS_GROUPS = ("observations", "observation", "obs")
_NEXT_OBS = {"observations": "next_observations", "observation": "next_observation", "obs": "next_obs"}
_EPISODE_END_KEYS = ("terminals", "timeouts")
_STEP_TYPE_LAST = 2  # dm_env StepType.LAST


def _member(group: h5py.Group, name: str) -> str:
    return f"{group.name.rstrip('/')}/{name}"


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _image_candidates(
    group: h5py.Group, prefix: str = "", depth: int = 2, only: tuple[str, ...] | None = None
) -> list[str]:
    """Datasets under ``group`` that look like frames (uint8 image arrays or encoded images); ``only``: the
    subgroups of ``group`` looked into (None: all; the others' members are never opened)."""
    found = []
    for name in _names(group):
        path = f"{prefix}{name}"
        if name.startswith("next_") or name == EMBEDDING_GROUP:
            continue  # next observations are read for --align next, never scored as the frames
        if only is not None and name not in only and _is_group(group, name):
            continue
        item = group.get(name)
        if isinstance(item, h5py.Dataset):
            if isinstance(frame_format_of(item), FrameFormat):
                found.append(path)
        elif isinstance(item, h5py.Group) and depth > 0:
            found.extend(_image_candidates(item, f"{path}/", depth - 1))
    return found


def _names(group: h5py.Group) -> list[str]:
    """The names in ``group``; one that is not UTF-8 (h5py gives it as bytes) is refused: episodes, frames and
    rewards are named by text paths."""
    names = list(group)
    odd = next((n for n in names if not isinstance(n, str)), None)
    if odd is not None:
        raise SourceError(
            f"{group.name} in {group.file.filename} holds a name that is not UTF-8 ({odd!r}); rename it "
            "(h5py: group.move(old, new)) so vlmlabel can name what it reads and writes"
        )
    return names


def _is_group(parent: h5py.Group, name: str, strict: bool = False) -> bool:
    """Whether ``parent[name]`` is a group, from the object's header alone (about 9 us; opening it through h5py
    costs twice that). Where the header cannot be read (a broken link), h5py's own answer: ``get`` (no group),
    or with ``strict`` the error of ``parent[name]``."""
    try:
        return bool(h5py.h5o.get_info(parent.id, name.encode()).type == h5py.h5o.TYPE_GROUP)
    except (KeyError, RuntimeError, OSError, ValueError):
        return isinstance(parent[name] if strict else parent.get(name), h5py.Group)


def _float_image_like(group: h5py.Group, prefix: str = "", depth: int = 3) -> list[str]:
    """The first float array shaped like frames under ``group`` (deep enough for data/demo_0/obs/x), if any."""
    for name, item in group.items():
        if (
            isinstance(item, h5py.Dataset)
            and item.ndim == 4
            and item.dtype.kind == "f"
            and (item.shape[-1] in (1, 3) or item.shape[1] in (1, 3))
        ):
            return [f"{prefix}{name}"]
        if isinstance(item, h5py.Group) and depth > 0:
            found = _float_image_like(item, f"{prefix}{name}/", depth - 1)
            if found:
                return found
    return []


def key_paths(key: str) -> list[str]:
    """Where ``--image-key KEY`` may be, inside a group."""
    return [key, f"obs/{key}", f"observations/{key}"]


def find_key(group: h5py.Group, key: str) -> str | None:
    for candidate in key_paths(key):
        if isinstance(group.get(candidate), h5py.Dataset):
            return candidate
    return None


def next_candidates(key: str) -> list[str]:
    """Where the next observation of frames at ``key`` may be, inside the same group."""
    head, _, tail = key.partition("/")
    candidates = [f"{_NEXT_OBS[head]}/{tail}" if tail else _NEXT_OBS[head]] if head in _NEXT_OBS else []
    return list(dict.fromkeys(candidates + [f"next_{key}"]))


def next_obs_path(handle: h5py.File, group: str, candidates: list[str]) -> str | None:
    """The first of ``candidates`` (paths inside ``group``; "" for the root) that is a dataset of ``handle``."""
    for candidate in candidates:
        path = f"{group}/{candidate}" if group else candidate
        if isinstance(handle.get(path), h5py.Dataset):
            return path
    return None


def check_next(file: Path, next_array: str, next_rows: int, array: str, rows: int) -> None:
    """``--align next`` scores an episode's last step by the stored next observation of its row: the arrays
    must line up row for row."""
    if next_rows != rows:
        raise SourceError(
            f"{next_array} has {next_rows} rows but {array} has {rows} in {file}: the next "
            "observations do not line up with the frames; fix the file, or score each step by "
            "its own frame with --align frame"
        )


class Opened(Protocol):
    """What a layout reads through: an open ``HDF5Source`` (its file, where it lies, the frames chosen, and its
    lookups of the episode groups' arrays, made once per source)."""

    file: h5py.File
    path: Path
    image_key: str
    _next_rows: dict[str, int]  # rows of the next-observation arrays the low-level lookups found

    def _group_arrays(self, name: str) -> tuple[str, int, str | None]: ...


class Survey:
    """What a file's root holds, for the layouts' ``detect``: each looked at once, when first asked."""

    def __init__(self, root: h5py.File, path: Path, image_key: str | None):
        self.root, self.path, self.image_key = root, path, image_key

    @cached_property
    def minari(self) -> list[str]:
        """The groups named ``episode_N`` at the root, in natural order."""
        root = self.root
        return sorted(
            (k for k in _names(root) if re.fullmatch(r"episode_\d+", k) and _is_group(root, k, strict=True)),
            key=_natural_key,
        )

    @cached_property
    def flat(self) -> list[str]:
        """Frames at the root or in observations/ (observation/, obs/)."""
        return _image_candidates(self.root, depth=1, only=_FLAT_OBS_GROUPS)

    @cached_property
    def parent(self) -> h5py.Group:
        """Where episode groups would be: data/ if there is one, else the root."""
        root = self.root
        return root["data"] if isinstance(root.get("data"), h5py.Group) else root

    @property
    def prefix(self) -> str:
        return "data/" if self.parent is not self.root else ""

    @cached_property
    def groups(self) -> list[str]:
        """The groups under ``parent`` that may be episodes, in natural order (at the root: not observations/
        or next_observations/)."""
        parent, prefix = self.parent, self.prefix
        return sorted(
            (
                k
                for k in _names(parent)
                if k != EMBEDDING_GROUP
                and _is_group(parent, k)
                and (prefix or (k not in _FLAT_OBS_GROUPS and k not in _NEXT_OBS.values()))
            ),
            key=_natural_key,
        )

    @cached_property
    def first(self) -> h5py.Group | None:
        return self.parent[self.groups[0]] if self.groups else None

    @cached_property
    def episodic(self) -> bool:
        """Whether the first group holds frames (or the frames ``--image-key`` names)."""
        first, key = self.first, self.image_key
        return first is not None and bool(_image_candidates(first) or (key and find_key(first, key)))

    @property
    def key_at_root(self) -> bool:
        """No ``--image-key``, or one naming a dataset at the root."""
        return self.image_key is None or isinstance(self.root.get(self.image_key), h5py.Dataset)


class Layout:
    """One way episodes are laid out in an HDF5 file (see the module docstring)."""

    name: str  # recorded in provenance and printed: "flat", "robomimic", "episodes", "minari"
    groups: list[str]  # the episode groups, in file order (none for a flat file)
    group: h5py.Group  # where the frames are chosen
    where: str  # that place, as messages name it
    candidates: list[str] | None  # the frames found there; None: looked for when chosen

    @classmethod
    def detect(cls, survey: Survey) -> Layout | None:
        """This layout, if the file surveyed is laid out so."""
        raise NotImplementedError

    def episodes(self, source: Opened, align: Align) -> list[Episode]:
        """Episodes in file order, each with the frame rows that score its steps under ``align``."""
        raise NotImplementedError

    def next_candidates(self, key: str) -> list[str]:
        """Where the next observation of frames at ``key`` may be, inside the same group."""
        return next_candidates(key)

    def first_frames(self, source: Opened) -> h5py.Dataset:
        """The first frame array (the others are taken to be stored like it)."""
        raise NotImplementedError

    def step_values(self, source: Opened, episode: Episode, key: str) -> np.ndarray | None:
        """A per-step dataset (rewards, success, a written reward...) for one episode, or None if absent."""
        raise NotImplementedError


class Flat(Layout):
    """D4RL and alike: the frames are the rows of one array at the root (or in observations/), cut into episodes
    at ``terminals``/``timeouts`` (else dm_env's ``step_type``); per-step values are root arrays of as many rows.
    Chosen when there are such frames, unless ``--image-key`` names none at the root and episode groups hold
    frames."""

    name = "flat"

    def __init__(self, root: h5py.File, where: str, candidates: list[str]):
        self.groups, self.group, self.where, self.candidates = [], root, where, candidates

    @classmethod
    def detect(cls, survey: Survey) -> Layout | None:
        flat, episodic, key_at_root = survey.flat, survey.episodic, survey.key_at_root  # each looked at, in order
        return cls(survey.root, "the file root", flat) if flat and (key_at_root or not episodic) else None

    def episodes(self, source: Opened, align: Align) -> list[Episode]:
        image_key, handle = source.image_key, source.file
        total = handle[image_key].shape[0]
        if total == 0:
            raise SourceError(f"{image_key} in {source.path} has 0 frames")
        ends = self._episode_ends(source, total)
        next_array = next_obs_path(handle, "", self.next_candidates(image_key))
        if align is Align.next and next_array is not None:
            check_next(source.path, next_array, handle[next_array].shape[0], image_key, total)
        episodes, start = [], 0
        for index, end in enumerate(ends):
            segments = step_segments(image_key, start, end, align, next_array)
            episodes.append(Episode(f"episode {index} (rows {start}-{end - 1})", end - start, segments, ""))
            start = end
        return episodes

    @staticmethod
    def _episode_ends(source: Opened, total: int) -> list[int]:
        """Row index after each episode's last step, from terminals/timeouts or step_type."""
        handle, image_key = source.file, source.image_key
        done = np.zeros(total, dtype=bool)
        markers = [k for k in _EPISODE_END_KEYS if isinstance(handle.get(k), h5py.Dataset)]
        for key in markers:
            flags = checked_dataset(handle, key, source.path)
            if flags.shape[0] != total:
                raise SourceError(
                    f"{key} has {flags.shape[0]} rows but {image_key} has {total}; the file is inconsistent"
                )
            done |= np.asarray(flags[:]).reshape(total, -1)[:, 0].astype(bool)
        if not markers and isinstance(handle.get("step_type"), h5py.Dataset):
            step_type = checked_dataset(handle, "step_type", source.path)
            if step_type.shape[0] != total:
                raise SourceError(f"step_type has {step_type.shape[0]} rows but {image_key} has {total}")
            done = np.asarray(step_type[:]).reshape(total) == _STEP_TYPE_LAST
        ends = (np.flatnonzero(done) + 1).tolist()
        if not ends or ends[-1] != total:
            ends.append(total)
        return ends

    def first_frames(self, source: Opened) -> h5py.Dataset:
        return source.file[source.image_key]

    def step_values(self, source: Opened, episode: Episode, key: str) -> np.ndarray | None:
        handle = source.file
        item = handle.get(key)
        if not isinstance(item, h5py.Dataset):
            return None
        rows, frames = (item.shape or (0,))[0], handle[episode.frames[0].array].shape[0]
        if rows != frames:  # a slice of it would pass for one value per step
            raise SourceError(
                f"{key} has {rows} rows but the frames {episode.frames[0].array} have {frames}: "
                "not one value per step of this file"
            )
        start = episode.frames[0].start
        return np.asarray(checked_dataset(handle, key, source.path)[start : start + episode.steps])


class EpisodeGroups(Layout):
    """One group per episode, under data/ or at the root (robomimic's data/demo_N, named "robomimic"; others
    "episodes"): each holds its episode's frames, next observations and per-step values, and its rewards go
    beside them."""

    def __init__(self, name: str, groups: list[str], first: h5py.Group):
        self.name, self.groups, self.group, self.where, self.candidates = name, groups, first, groups[0], None

    @classmethod
    def detect(cls, survey: Survey) -> Layout | None:
        if not survey.episodic or survey.first is None:
            return None
        prefix, names = survey.prefix, survey.groups
        name = "robomimic" if prefix and all(g.startswith("demo_") for g in names) else "episodes"
        return cls(name, [f"{prefix}{g}" for g in names], survey.first)

    def episodes(self, source: Opened, align: Align) -> list[Episode]:
        return [self.episode(source, name, align) for name in self.groups]

    def episode(self, source: Opened, name: str, align: Align) -> Episode:
        array, rows, next_array = source._group_arrays(name)
        if rows == 0:
            raise SourceError(f"episode {name} is empty ({array} has 0 frames); remove it or fix the file")
        if align is Align.next and next_array is not None:
            next_rows = source._next_rows.get(next_array)
            check_next(
                source.path,
                next_array,
                source.file[next_array].shape[0] if next_rows is None else next_rows,
                array,
                rows,
            )
        return Episode(name, rows, step_segments(array, 0, rows, align, next_array), name)

    def first_frames(self, source: Opened) -> h5py.Dataset:
        group = source.file[self.groups[0]]
        return group[find_key(group, source.image_key) or source.image_key]

    def step_values(self, source: Opened, episode: Episode, key: str) -> np.ndarray | None:
        group = episode.name
        for path in (f"{group}/{key}", f"{episode.target}/{key}", f"{group}/infos/{key}"):
            if isinstance(source.file.get(path), h5py.Dataset):
                return np.asarray(checked_dataset(source.file, path, source.path)[:])
        return None


class Minari(EpisodeGroups):
    """Minari: groups ``episode_N`` at the root, each with T+1 observations and T+1 infos (the reset's, then one
    per step) and no next observations; found before any other layout."""

    @classmethod
    def detect(cls, survey: Survey) -> Layout | None:
        groups = survey.minari
        return cls("minari", groups, survey.root[groups[0]]) if groups else None

    def episode(self, source: Opened, name: str, align: Align) -> Episode:
        # the reward lands in infos with one score per observation, whatever the alignment; step t reads row
        # t+1 (next) or row t (frame).
        array, rows, _ = source._group_arrays(name)
        if rows <= 1:
            raise SourceError(f"episode {name} has {rows} observation(s) and no steps; remove it or fix the file")
        return Episode(name, rows, (Segment(array, 0, rows),), f"{name}/infos", per_observation=True)

    def next_candidates(self, key: str) -> list[str]:
        return []


class NamedFlat(Flat):
    """A file no layout above recognises, read as flat when ``--image-key`` names its frames at the root (refused
    as not found there, listing none, when it does not; a key leading through a link to a missing file from
    the first group is refused as that)."""

    @classmethod
    def detect(cls, survey: Survey) -> Layout | None:
        key = survey.image_key
        if key is None:
            return None
        if survey.first is not None:  # the key may name frames behind a link to a missing file
            refuse_missing_files(survey.root, [_member(survey.first, p) for p in key_paths(key)], survey.path)
        return cls(survey.root, "the file", [])


LAYOUTS: tuple[type[Layout], ...] = (Minari, Flat, EpisodeGroups, NamedFlat)


def detect(survey: Survey) -> Layout | None:
    """The first of ``LAYOUTS`` that recognises the file surveyed, or None (no frames found)."""
    for kind in LAYOUTS:
        layout = kind.detect(survey)
        if layout is not None:
            return layout
    return None
