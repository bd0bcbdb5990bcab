"""What every output family offers the run lifecycle: early checks, what is already there, one atomic write."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vlmlabel.errors import OutputError
from vlmlabel.files.provenance import CAMERA_OF_ATTR, RAW_OF_ATTR, REWARD_KEY_ATTR, VERSION_ATTR
from vlmlabel.sources.base import FILE_SUFFIXES, show_path

NAME_MAX = 255  # bytes in one file name on common file systems (ext4, xfs, NFS, Lustre)


@dataclass(frozen=True)
class Present:
    """Something already stored under a reward's name: where, and its attributes ({} if vlmlabel did not write it)."""

    location: str
    attrs: dict[str, Any]

    @property
    def ours(self) -> bool:
        return VERSION_ATTR in self.attrs


@dataclass
class RewardColumn:
    """One reward to write: a float32 value per step, one array per episode in episode order, and its provenance."""

    name: str
    values: list[np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> np.ndarray:
        return np.concatenate(self.values).astype(np.float32) if self.values else np.empty(0, np.float32)


class Destination(Protocol):
    """Where one source's rewards go. Built by ``vlmlabel.destinations.destination_for``."""

    path: Path  # the file or folder the user gets

    def check(self, names: list[str], overwrite: bool) -> None:
        """Refuse, before any model is loaded, what ``write`` would refuse (location, permissions, space)."""
        ...

    def replaced(self, names: list[str]) -> dict[str, Present]:
        """Of ``names``, those the write would replace."""
        ...

    def written(self, names: list[str]) -> dict[str, Present]:
        """Of ``names``, those already at the destination (in every place the write puts them)."""
        ...

    def carried(self) -> dict[str, dict[str, Any]]:
        """Every column the write carries over from the source (HDF5: the datasets beside the first episode's data),
        with what vlmlabel recorded of it ({} for one it did not write)."""
        ...

    def write(self, columns: list[RewardColumn], overwrite: bool, dropped: list[str]) -> Path:
        """Put the rewards at the destination, without the carried columns ``dropped``, in one atomic step; the
        source is only read."""
        ...


def whole_results(key: str, names: list[str], carried: dict[str, dict[str, Any]]) -> list[str]:
    """The carried columns that writing ``names`` under ``--reward-key key`` replaces besides ``names`` themselves:
    every other column of each result it replaces, so that no part of an earlier result stays beside the new one.

    A result is what one run wrote: NAME (or NAME_0, NAME_1.. for several goals), NAME_raw, NAME_cam_*; each of its
    columns records the run's ``REWARD_KEY_ATTR``. Replaced are the earlier result under ``key`` and every result
    one of ``names`` belongs to. Columns written before results recorded their key count by their links: the raw
    and per-camera columns (``raw_of``, ``camera_of``) of one of ``names``. A column vlmlabel did not write (no
    ``VERSION_ATTR``) never counts: the user's own NAME_raw is left alone, or refused where a run writes it."""
    ours = {name: attrs for name, attrs in carried.items() if VERSION_ATTR in attrs}
    keys = {key} | {str(ours[n][REWARD_KEY_ATTR]) for n in names if REWARD_KEY_ATTR in ours.get(n, {})}

    def belongs(attrs: dict[str, Any]) -> bool:
        if REWARD_KEY_ATTR in attrs:
            return str(attrs[REWARD_KEY_ATTR]) in keys
        return any(str(attrs.get(link)) in names for link in (RAW_OF_ATTR, CAMERA_OF_ATTR) if link in attrs)

    return [name for name, attrs in ours.items() if name not in names and belongs(attrs)]


def check_names(names: list[str], derived: Iterable[str]) -> None:
    """Refuse reward names that cannot be datasets, columns or file names, before anything runs."""
    for name in names:
        if not name.strip() or name in (".", "..") or "/" in name or "\0" in name:
            raise OutputError(f"--reward-key {name!r} must be a non-empty name without '/' (not '.' or '..')")
    for file_name in derived:
        if len(os.fsencode(file_name)) > NAME_MAX:
            raise OutputError(
                f"a file vlmlabel keeps beside the output ({file_name[:40]}...) would be over the "
                f"{NAME_MAX}-byte file name limit; choose a shorter --reward-key or --output name"
            )


def check_output_suffix(output: Path, suffixes: tuple[str, ...], written: str) -> None:
    """Refuse an ``--output`` whose name says another format than ``written``: a file (``suffixes``, the first one
    advised; '' among them allows a name without one) ends in one of ``suffixes``, a folder (no ``suffixes``) in
    none of a file format's."""
    suffix, shown = output.suffix.lower(), show_path(output)
    if suffixes and output.is_dir():
        raise OutputError(
            f"--output {shown} is a folder; name the {written} file to write, e.g. "
            f"{show_path(output / ('labelled' + suffixes[0]))}"
        )
    if suffixes and suffix not in suffixes:
        endings = " or ".join(s for s in suffixes if s)
        raise OutputError(
            f"--output {shown} is written as {written}, a file, so its name must end in "
            f"{endings}, e.g. {output.stem or 'labelled'}{suffixes[0]} "
            f"({suffix or 'no suffix'} would name another format)"
        )
    if not suffixes and suffix in FILE_SUFFIXES:
        raise OutputError(
            f"--output {shown} is written as {written}, a folder, so its name must not "
            f"end in {suffix}, which names a file format, e.g. {output.stem}"
        )


def refuse_replacing(names: list[str], replaced: dict[str, Present], where: object, overwrite: bool) -> None:
    """--overwrite replaces only rewards vlmlabel wrote; anything else is never touched."""
    foreign = [replaced[n].location for n in names if n in replaced and not replaced[n].ours]
    if foreign:
        raise OutputError(
            f"{foreign[0]} already exists in {where} and was not written by vlmlabel; "
            "vlmlabel never replaces it, even with --overwrite: choose another --reward-key"
        )
    ours = [replaced[n].location for n in names if n in replaced]
    if ours and not overwrite:
        shown = ", ".join(ours[:4]) + (" ..." if len(ours) > 4 else "")
        raise OutputError(
            f"{shown} already exist(s) in {where}; pass --overwrite to replace them (a result "
            "vlmlabel wrote is replaced whole), or choose another --reward-key"
        )


def check_space(folder: Path, needed: int, what: str) -> None:
    """Refuse a write that cannot fit, before any compute."""
    free = shutil.disk_usage(folder).free
    needed += 16 * 1024 * 1024
    if free < needed:
        raise OutputError(
            f"{folder} has {free / 2**20:.0f} MiB free but {what} needs about "
            f"{needed / 2**20:.0f} MiB; free space or use --output elsewhere"
        )


def check_folder(folder: Path) -> None:
    """The folder a destination is written in must exist, be a folder and be writable."""
    if not folder.exists():
        raise OutputError(f"output folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder; choose an --output inside a folder")
    if not os.access(folder, os.W_OK):
        raise OutputError(
            f"cannot write in {folder}; vlmlabel writes a copy there and renames it into place: "
            "use --output in a folder you can write"
        )
