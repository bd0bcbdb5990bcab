"""LeRobot datasets (v3.0, and v2.x) as frame sources: parquet tables plus image columns or MP4 videos.

Layout (v3.0): ``meta/info.json`` (features, fps, data_path, video_path), ``data/chunk-*/file-*.parquet``
(rows: episode_index, frame_index, index, timestamp, ...), ``videos/<key>/chunk-*/file-*.mp4`` holding
several episodes per file, and ``meta/episodes/chunk-*/file-*.parquet`` giving each episode's video
file and its ``from_timestamp`` offset in it. A row's frame is the video frame at
``from_timestamp + timestamp``; v2.x has one video per episode (offset 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlabel.errors import SourceError
from vlmlabel.metadata import NULL, JsonObject
from vlmlabel.sources.base import Align, Episode, FrameBlock, FrameFormat, Segment, SourceKind, SourceRecipe
from vlmlabel.sources.cameras import CameraChooser
from vlmlabel.sources.tables import TableFiles, TableSource, cache_beside, episode_runs
from vlmlabel.sources.video import VideoReader, probe

IMAGE_DTYPES = ("image", "video")
OBSERVATION_PREFIX = "observation."
_V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


def is_lerobot(folder: Path) -> bool:
    return (folder / "meta" / "info.json").is_file()


_DAMAGED = "is this a LeRobot dataset, written by LeRobot's own tools?"


class LeRobotSource(TableSource):
    """A LeRobot dataset folder, read-only; frames from an image column or from the episode videos."""

    def __init__(self, folder: Path, image_key: str | None, nvdec_gpu: int | None = None):
        self.folder = folder
        self.nvdec_gpu = nvdec_gpu  # videos decoded by this CUDA device's NVDEC; None: on the CPU
        info = JsonObject.read(folder / "meta" / "info.json", _DAMAGED)  # every value used below, checked
        self.info = info.values
        self.version = info.get("codebase_version", str, "v3.0")
        self.fps = float(info.get("fps", (float, NULL), None) or 0)
        self.video_path: str | None = info.get("video_path", (str, NULL), None)
        self.chunks_size = int(info.get("chunks_size", (int, NULL), None) or 1000)
        features = info.object("features").entries()
        for entry in features.values():
            entry.get("dtype", str, "")
            entry.list_of("shape", int, [])
        self.lerobot_features: dict = {name: entry.values for name, entry in features.items()}
        stats = folder / "meta" / "stats.json"
        if stats.is_file():  # carried into the labelled copy with the rewards' added: one object per feature
            JsonObject.read(stats, _DAMAGED).entries()
        files = tuple(sorted((folder / "data").rglob("*.parquet")))
        if not files:
            raise SourceError(f"{folder}/data holds no parquet files; the LeRobot dataset is incomplete")
        self._video: VideoRows | None = None
        self._videos: dict[int, tuple[Path, float]] | None = None
        super().__init__(
            TableFiles(files, "parquet"),
            image_key,
            SourceKind.lerobot,
            folder,
            base=folder,
            cache_file=cache_beside(folder),
        )
        self.layout = f"lerobot {self.version}"

    # -- keys -------------------------------------------------------------------------------------

    def _candidates(self) -> list[str]:
        return [k for k, f in self.lerobot_features.items() if f.get("dtype") in IMAGE_DTYPES]

    def _choose_key(self, image_key: str | None) -> None:
        found = self._candidates()
        self.cameras = found

        def find(key: str) -> str | None:
            named = (key, f"{OBSERVATION_PREFIX}images.{key}", f"{OBSERVATION_PREFIX}{key}")
            return next((k for k in named if k in found), None)

        chooser = CameraChooser("cameras", self.folder, f"is not an image or video feature of {self.folder}")
        image_key = chooser.choose(
            found,
            image_key,
            find,
            lambda: SourceError(
                f"{self.folder}/meta/info.json declares no image or video feature; name the frames with --image-key"
            ),
        )
        self.image_key = image_key
        self.is_video = self.lerobot_features[image_key]["dtype"] == "video"
        if not self.is_video:
            if image_key not in self.schema.names:
                raise SourceError(
                    f"{image_key!r} is declared in meta/info.json but is not a column of the data "
                    "files; the dataset is inconsistent"
                )
            self.frame_format = self._format_of(image_key)
            return
        if self.fps <= 0:
            raise SourceError(f"{self.folder}/meta/info.json has no fps; it is needed to find video frames")
        shape = self.lerobot_features[image_key].get("shape") or []
        self.frame_format = FrameFormat("HWC", tuple(shape), "uint8 (video)")

    # -- episodes ---------------------------------------------------------------------------------

    def episodes(self, align: Align) -> list[Episode]:
        index = self.index_columns()
        for needed in ("episode_index",) + (("timestamp",) if self.is_video else ()):
            if needed not in index:
                raise SourceError(
                    f"the data files of {self.folder} have no {needed!r} column; the LeRobot dataset is incomplete"
                )
        episode_index = index["episode_index"].astype(np.int64)
        if self._videos is None:  # checked once, however often the episodes are asked for
            self._check_lengths(episode_index)
            self._videos = self._video_locations(np.unique(episode_index)) if self.is_video else {}
        return episode_runs(self.rows, episode_index, index.get("frame_index"), align, self.image_key)

    def _episodes_meta(self, columns: list[str]) -> dict[str, np.ndarray]:
        """Columns of the per-episode metadata (v3.0 parquet files, v2.x episodes.jsonl); an episode listed twice
        is refused (which row would say where its frames are?)."""
        meta = self._read_episodes_meta(columns)
        if "episode_index" in meta:
            ids, counts = np.unique(meta["episode_index"], return_counts=True)
            if (counts > 1).any():
                raise SourceError(
                    f"the episode metadata of {self.folder} lists episode {ids[counts > 1][0]} "
                    f"{counts.max()} times; the dataset is inconsistent (fix meta/ to one row per "
                    "episode)"
                )
        return meta

    def _read_episodes_meta(self, columns: list[str]) -> dict[str, np.ndarray]:
        if self.version.startswith("v2"):
            path = self.folder / "meta" / "episodes.jsonl"
            try:
                lines = path.read_bytes().splitlines()
            except OSError as exc:
                raise SourceError(f"{path} cannot be read ({exc}); the LeRobot dataset is incomplete") from None
            rows = [
                JsonObject.parse(line, f"{path} line {number}", _DAMAGED)
                for number, line in enumerate(lines, 1)
                if line.strip()
            ]
            return {c: np.asarray([r.get(c, (int, float)) for r in rows]) for c in columns if rows and c in rows[0]}
        files = sorted((self.folder / "meta" / "episodes").rglob("*.parquet"))
        if not files:
            raise SourceError(f"{self.folder}/meta/episodes holds no parquet files; the LeRobot dataset is incomplete")
        tables = []
        for path in files:
            try:
                present = [c for c in columns if c in pq.read_schema(path).names]
                tables.append(pq.read_table(path, columns=present))
            except (OSError, pa.ArrowInvalid) as exc:
                raise SourceError(f"{path} cannot be read ({exc}); the LeRobot dataset is incomplete") from None
        table = pa.concat_tables(tables, promote_options="default")
        return {c: table.column(c).to_numpy() for c in table.column_names}

    def _check_lengths(self, episode_index: np.ndarray) -> None:
        meta = self._episodes_meta(["episode_index", "length"])
        if "length" not in meta or "episode_index" not in meta:
            return
        ids, counts = np.unique(episode_index, return_counts=True)
        declared = dict(zip(meta["episode_index"].tolist(), meta["length"].tolist(), strict=True))
        for episode, count in zip(ids.tolist(), counts.tolist(), strict=True):
            if episode not in declared:
                raise SourceError(
                    f"episode {episode} has {count} rows in data/ but no row in the episode metadata "
                    f"of {self.folder}; the dataset is inconsistent"
                )
            if declared[episode] != count:
                raise SourceError(
                    f"episode {episode} has {count} rows in data/ but meta declares "
                    f"{declared[episode]}; the dataset is inconsistent (mismatched lengths)"
                )

    def _video_locations(self, episodes: np.ndarray) -> dict[int, tuple[Path, float]]:
        """Per episode: its video file for the chosen camera and the episode's start time in it."""
        key = self.image_key
        if self.version.startswith("v2"):
            template, chunk = self.video_path or _V2_VIDEO_PATH, self.chunks_size
            located = {
                e: (
                    self.folder / self._video_file(template, episode_chunk=e // chunk, video_key=key, episode_index=e),
                    0.0,
                )
                for e in episodes.tolist()
            }
        else:
            prefix = f"videos/{key}/"
            meta = self._episodes_meta(
                ["episode_index", f"{prefix}chunk_index", f"{prefix}file_index", f"{prefix}from_timestamp"]
            )
            if f"{prefix}file_index" not in meta:
                raise SourceError(
                    f"meta/episodes of {self.folder} has no {prefix}file_index column; "
                    "the LeRobot dataset is incomplete"
                )
            template = self.video_path or "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
            rows = zip(
                meta["episode_index"].tolist(),
                meta[f"{prefix}chunk_index"].tolist(),
                meta[f"{prefix}file_index"].tolist(),
                meta[f"{prefix}from_timestamp"].tolist(),
                strict=True,
            )
            known = {
                e: (self.folder / self._video_file(template, video_key=key, chunk_index=c, file_index=f), float(t))
                for e, c, f, t in rows
            }
            missing = [e for e in episodes.tolist() if e not in known]
            if missing:
                raise SourceError(
                    f"episode {missing[0]} is not in meta/episodes of {self.folder}; the dataset is inconsistent"
                )
            located = {e: known[e] for e in episodes.tolist()}
        for path in sorted({p for p, _ in located.values()}):
            probe(path)
        return located

    def _video_file(self, template: str, **fields: object) -> str:
        """A video's file name from ``meta/info.json``'s ``video_path`` template."""
        try:
            return template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise SourceError(
                f"{self.folder}/meta/info.json: 'video_path' {template!r} cannot be filled in "
                f"({type(exc).__name__}: {exc}); {_DAMAGED}"
            ) from None

    @property
    def paths(self) -> tuple[Path, ...]:
        """The data files and, for a video camera, its video files: an edited video counts as a change."""
        if not self.is_video:
            return self.files.paths
        videos = sorted(p for p in (self.folder / "videos").rglob("*.mp4") if self.image_key in p.parts)
        return self.files.paths + tuple(videos)

    # -- reading ----------------------------------------------------------------------------------

    def _video_recipe(self) -> VideoRecipe:
        assert self._videos is not None  # set by episodes(), which the segments come from
        return VideoRecipe(
            self._videos, self._index["episode_index"], self._index["timestamp"], self.fps, self.nvdec_gpu
        )

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]:
        if not self.is_video:
            yield from super().read_blocks(segment, max_rows)
            return
        if self._video is None:
            self._video = self._video_recipe().open()
        yield from self._video.read_blocks(segment, max_rows)

    def recipe(self) -> SourceRecipe | None:
        """How a decoding worker reads the frames again: the image column, or the videos (after ``episodes``)."""
        return self._video_recipe() if self.is_video else super().recipe()

    def column_provenance(self, name: str) -> dict | None:
        """The column's field metadata, else what ``meta/info.json`` keeps under ``features[name]["info"]``:
        LeRobot's own editors (delete, split, merge episodes) rewrite the data files without field metadata
        but carry the feature's ``info`` over."""
        from vlmlabel.destinations.base import VERSION_ATTR

        found = super().column_provenance(name)
        kept = (self.lerobot_features.get(name) or {}).get("info")
        if found == {} and isinstance(kept, dict) and VERSION_ATTR in kept:
            return dict(kept)
        return found

    def close(self) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None
        super().close()


class VideoRows:
    """A video camera's frames by row: the frame at the row's episode offset plus its timestamp."""

    def __init__(self, recipe: VideoRecipe):
        self._recipe = recipe
        # public: its counters tell how much was decoded
        self.reader = VideoReader(tolerance=0.5 / recipe.fps, nvdec_gpu=recipe.nvdec_gpu)

    def read_blocks(self, segment: Segment, max_rows: int) -> Iterator[FrameBlock]:
        episodes, times, videos = self._recipe.episode_index, self._recipe.timestamps, self._recipe.videos
        start = segment.start
        while start < segment.stop:
            stop = min(segment.stop, start + max_rows)
            other = np.flatnonzero(episodes[start:stop] != episodes[start])  # blocks end where an episode does
            stop = start + int(other[0]) if len(other) else stop
            path, offset = videos[int(episodes[start])]
            yield self.reader.frames(path, offset + times[start:stop].astype(np.float64))
            start = stop

    def close(self) -> None:
        self.reader.close()


@dataclass(frozen=True, eq=False)
class VideoRecipe:
    """Opens a LeRobot camera's videos again in a decoding worker."""

    videos: dict[int, tuple[Path, float]]  # per episode: its video file and its start time in it
    episode_index: np.ndarray  # per row
    timestamps: np.ndarray  # per row, seconds from the episode's start
    fps: float
    nvdec_gpu: int | None = None
    decodes: bool = True

    def open(self) -> VideoRows:
        return VideoRows(self)
