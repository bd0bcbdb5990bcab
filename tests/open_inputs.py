"""Datasets and arguments that must be refused when opened, before any model loads: text that is not UTF-8,
metadata files of the wrong shape, outputs named for another format (issue 23, item 7)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tests import table_layouts

NOT_UTF8 = os.fsdecode(b"\xff")  # what Python makes of the byte 0xff in argv (a surrogate escape)
ACCENTED_LATIN1 = os.fsdecode(b"donn\xe9es")  # "données" typed in a Latin-1 terminal: a legal Linux file name


def edited_json(path: Path, edit: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def set_key(key: str, value: Any) -> Callable[[dict], dict]:
    return lambda data: {**data, key: value}


def lerobot(root: Path, meta: str, edit: Callable[[Any], Any], video: bool = False) -> Path:
    """A LeRobot v3.0 folder whose ``meta/<meta>`` JSON file is replaced by ``edit`` of it."""
    case = table_layouts.build_lerobot(root, video=video)
    edited_json(case.path / "meta" / meta, edit)
    return case.path


def feature(name: str, entry: Any) -> Callable[[dict], dict]:
    return lambda info: {**info, "features": {**info["features"], name: entry}}


def lerobot_v21_episodes(root: Path, line: str) -> Path:
    """A LeRobot v2.1 folder with one more line in meta/episodes.jsonl."""
    case = table_layouts.build_lerobot_v21(root)
    with open(case.path / "meta" / "episodes.jsonl", "a") as handle:
        handle.write(line + "\n")
    return case.path


def disk(root: Path, meta: str, edit: Callable[[Any], Any]) -> Path:
    """A save_to_disk folder whose JSON file ``meta`` is edited: a DatasetDict's (splits train and test) when it
    is ``dataset_dict.json``."""
    build = table_layouts.build_dict_split if meta == "dataset_dict.json" else table_layouts.build_disk_image
    case = build(root)
    edited_json(case.path / meta, edit)
    return case.path


def parquet_with_metadata(path: Path, key: bytes, value: bytes) -> Path:
    """A parquet file of images whose schema metadata ``key`` is ``value``."""
    case = table_layouts.build_parquet_folder(path.parent / "built")
    table = pq.read_table(next((case.path / "data").glob("*.parquet")))
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), key: value}), path)
    return path


def model_config(path: Path, config: Any) -> Path:
    """A model folder whose open_clip_config.json holds ``config`` (and a file for weights)."""
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps(config))
    (path / "open_clip_model.safetensors").write_bytes(b"")
    return path


def parquet_named(path: Path, name: str) -> Path:
    """A parquet file of images called ``name`` (any bytes: pyarrow writes it under another name), beside ``path``."""
    return renamed(parquet_with_metadata(path.parent / "written.parquet", b"made by", b"tests"), name)


def renamed(path: Path, name: str) -> Path:
    return path.rename(path.with_name(name))
