"""Goal images: the goal given as a picture of the finished task (``--goal-image FILE``, ``--goal-frame EP:STEP``).

Each goal image is one goal column, scored by the cosine between each frame's embedding and the goal image's.
The goal image goes through the frames' own path: the same exact-or-refused check (``check_frame``), the same
decoders, the model's own device preprocessing and the same image tower (``engine.FrameScorer.embed``), so a
goal frame taken from the dataset embeds exactly as that frame does when it is scored. It is embedded once per
run; frames may come from the embedding cache, so a sweep over goal images costs one matrix product each.

A goal image is named by its goal text (``formulation.GoalImageRef``): the file as given or EPISODE:STEP, and the
sha256 of its content, so the provenance records it and another image is another ``result_id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlmlabel.engine import FrameScorer
from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import Encoder, GoalImageRef, GoalSource, RewardConfig
from vlmlabel.model import ClipModel
from vlmlabel.reader.batchfill import check_frame, decode_frame
from vlmlabel.reader.buffers import Batch
from vlmlabel.reader.readahead import iter_batches
from vlmlabel.sources.base import Episode, FrameSource, Segment

_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBERED = re.compile(r"(?:[A-Za-z]+[ _])?([0-9]+)")  # an episode's number in its name: 5, demo_5, episode 5
_FRAME_HELP = "give EPISODE:STEP, e.g. demo_0:-1 (STEP -1: the episode's last frame)"


def file_goal(path: str) -> str:
    """The goal text of ``--goal-image path``, once the file is read and shown to decode exactly (refused in one
    line otherwise: missing, unreadable, not an image, or an image CLIP's PIL pipeline would score otherwise)."""
    data = _read(path)
    _decoded(data, path)
    return GoalImageRef(GoalSource.file, path, hashlib.sha256(data).hexdigest()).text


def frame_goal(spec: str) -> str:
    """The goal text of ``--goal-frame spec`` before the dataset is opened (its hash comes with ``resolve``)."""
    episode, colon, step = spec.strip().rpartition(":")
    number = int(step) if _INTEGER.fullmatch(step) else None  # ASCII digits only: int() also takes "1_0", "١"
    if not colon or not episode or number is None:
        raise VlmlabelError(f"--goal-frame {spec!r} names no frame; {_FRAME_HELP}")
    return GoalImageRef(GoalSource.frame, f"{episode}:{number}").text


def resolved(config: RewardConfig, sources: Sequence[FrameSource], episodes: Sequence[Episode]) -> RewardConfig:
    """At open, before anything is computed: refuse goal images a run cannot score, and give each goal frame the
    sha256 of the frame as stored (``config`` with its goal text, in ``goals`` and ``goal_images``, completed)."""
    if not config.goal_images:
        return config
    if len(sources) > 1:
        raise VlmlabelError(
            "goal images (--goal-image, --goal-frame) show one camera's view: score one --image-key at a time"
        )
    for text in list(config.goal_images):
        ref = GoalImageRef.parse(text)
        if ref.source is GoalSource.frame and not ref.sha256:
            if not sources[0].seekable:
                raise VlmlabelError(
                    f"--goal-frame {ref.where}: a --streaming source is read front to back, so no frame can be "
                    "taken from it first; save the frame as a file and give it with --goal-image"
                )
            stored = _stored(sources[0], locate(ref.where, episodes))
            named = dataclasses.replace(ref, sha256=hashlib.sha256(stored).hexdigest()).text
            config = dataclasses.replace(
                config,
                goals=[named if g == text else g for g in config.goals],
                goal_images=[named if g == text else g for g in config.goal_images],
            )
    return config


def encoder(config: RewardConfig, source: FrameSource, episodes: Sequence[Episode], model: ClipModel) -> Encoder | None:
    """Goal texts -> unit embeddings of their goal images, computed as frames are (None: no goal images)."""
    if not config.goal_images:
        return None
    scorer = FrameScorer(model, score_fn=lambda x: x)

    def encode(texts: Sequence[str]) -> torch.Tensor:
        return torch.cat([scorer.embed(_batch(GoalImageRef.parse(t), source, episodes)) for t in texts])

    return encode


def locate(where: str, episodes: Sequence[Episode]) -> Segment:
    """The one-row segment of EPISODE:STEP: EPISODE an episode's name (an HDF5 group's path, or its last part),
    else its number (``_episode``); STEP within the frames the run scores (negative: from the end, -1 the last)."""
    episode_text, _, step_text = where.rpartition(":")
    episode = _episode(episode_text, episodes)
    step = int(step_text)
    count = sum(len(s) for s in episode.frames)
    if not -count <= step < count:
        raise VlmlabelError(
            f"--goal-frame {where}: episode {episode.name} has {count} frames, so STEP must be in "
            f"{-count}..{count - 1} (-1: the last)"
        )
    row = step % count
    for segment in episode.frames:
        if row < len(segment):
            return Segment(segment.array, segment.start + row, segment.start + row + 1)
        row -= len(segment)
    raise AssertionError("a row within the episode's frames")  # unreachable: count is the frames' total


def _episode(text: str, episodes: Sequence[Episode]) -> Episode:
    """By name (or its last part; a table's "episode 5"), else by number: the number the episode's name ends
    in (demo_5, a table's episode_index 5, Minari's episode_5), or, where names hold none, the position from 0."""
    named = [e for e in episodes if text in (e.name, e.key)] or [
        e for e in episodes if e.name.rsplit("/", 1)[-1] == text
    ]
    if len(named) == 1:
        return named[0]
    numbers = [_number(e) for e in episodes]
    numbered = any(n is not None for n in numbers)
    if re.fullmatch("[0-9]+", text):
        by_number = [e for e, n in zip(episodes, numbers, strict=True) if n == int(text)]
        named = by_number if numbered else list(episodes[int(text) : int(text) + 1])
    if len(named) == 1:
        return named[0]
    by = "by name or number" if numbered else f"by name, or by position 0..{len(episodes) - 1}"
    first = ", ".join(e.name for e in episodes[:3])
    raise VlmlabelError(f"--goal-frame: no episode {text!r} ({by}); the first are {first}")


def _number(episode: Episode) -> int | None:
    found = _NUMBERED.fullmatch(episode.key.rsplit("/", 1)[-1])
    return int(found[1]) if found else None


def _batch(ref: GoalImageRef, source: FrameSource, episodes: Sequence[Episode]) -> Batch:
    """The goal image as a batch of one frame, as the engine reads frames."""
    if ref.source is GoalSource.frame:
        segment = locate(ref.where, episodes)
        return next(iter(iter_batches(source, [Episode("goal frame", 1, (segment,), "")], 1)))
    data = _read(ref.where)
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise VlmlabelError(f"--goal-image {ref.where} changed while the run started; run again")
    return Batch([_decoded(data, ref.where)], 1, "decoded")


def _read(path: str) -> bytes:
    """The file's bytes; only a regular file (a pipe, e.g. bash's <(...), is read once at start and again to embed;
    /dev/zero never ends)."""
    if Path(path).exists() and not Path(path).is_file():
        kind = "a folder" if Path(path).is_dir() else "not a regular file (a pipe or a device?)"
        raise VlmlabelError(f"--goal-image {path} is {kind}; save the image as a file and give that")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise VlmlabelError(f"--goal-image {path} does not exist; give an image file (PNG or JPEG)") from None
    except OSError as exc:
        raise VlmlabelError(f"--goal-image {path} cannot be read ({exc.strerror or exc}); give an image file") from None


def _decoded(data: bytes, path: str) -> torch.Tensor:
    """The RGB (3, H, W) uint8 goal image, decoded as frames are; refused in one line as an inexact frame is."""
    where = f"--goal-image {path}"
    alpha = check_frame(data, 0, where)
    blob = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    return decode_frame(blob, where, alpha, fix="save the goal image as a PNG or JPEG again")


def _stored(source: FrameSource, segment: Segment) -> bytes:
    """The frame of ``segment`` as the dataset stores it (encoded bytes, or raw pixels)."""
    block = next(iter(source.read_blocks(segment, 1)))
    return np.ascontiguousarray(np.asarray(block[0])).tobytes()
