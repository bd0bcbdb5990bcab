"""The hostile-input suite: every case either succeeds with rewards equal to open_clip's own pipeline, or fails
with exit code 2, one line, no traceback, the source byte-identical and nothing new beside it.

Faults during a run (signals, a file too large for the file system) keep one more promise: the source is
byte-identical, only the saved progress stays beside it, and the rerun gives the reference rewards.
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from typer.testing import CliRunner

from tests import goal_image_files as goals
from tests import hostile_fresh_builders as fresh
from tests import labels_files, layouts, open_inputs, table_layouts
from tests.conftest import build_model_dir
from tests.layouts import encode, make_frames
from vlmlabel.cli import app

runner = CliRunner()
GOAL = "the cup is on the plate"
LENGTHS = (3, 4, 2)

pytestmark = pytest.mark.usefixtures("one_thread")


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones and folders included) and its content hash."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


# -- sources ----------------------------------------------------------------------------------------------


def flat(path: Path, frames: np.ndarray | None = None, key: str = "observations", **dataset_options) -> Path:
    frames = make_frames(sum(LENGTHS), 16, 20, seed=3) if frames is None else frames
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=frames, **dataset_options)
        f.create_dataset("actions", data=np.zeros((len(frames), 2), np.float32))
        f.create_dataset("terminals", data=np.isin(np.arange(len(frames)), np.cumsum(LENGTHS) - 1))
    return path


def flat_encoded(path: Path, blobs: list[bytes]) -> Path:
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("observations", (len(blobs),), dtype=h5py.vlen_dtype(np.uint8))
        for row, blob in enumerate(blobs):
            dset[row] = np.frombuffer(blob, np.uint8)
        f.create_dataset("terminals", data=np.isin(np.arange(len(blobs)), [len(blobs) - 1]))
    return path


def png(image: PILImage.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def pictures(mode: str, count: int = 4) -> list[bytes]:
    """PNG/JPEG frames in a PIL mode that CLIP's own pipeline would convert differently from plain RGB."""
    rgb = make_frames(count, 16, 16, seed=5)
    if mode == "RGBA-transparent":
        alpha = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))[..., None]
        return [png(PILImage.fromarray(np.concatenate([f, alpha], -1), "RGBA")) for f in rgb]
    if mode == "P":
        return [png(PILImage.fromarray(f).convert("P")) for f in rgb]
    if mode == "I;16":
        return [png(PILImage.fromarray(f[..., 0].astype(np.uint16) * 257)) for f in rgb]
    if mode == "CMYK":
        buffers = []
        for f in rgb:
            buffer = io.BytesIO()
            PILImage.fromarray(f).convert("CMYK").save(buffer, format="JPEG")
            buffers.append(buffer.getvalue())
        return buffers
    if mode == "garbage":
        return [b"\xff\xd8\xff\xe0" + bytes(range(200)) for _ in rgb]
    raise ValueError(mode)


def robomimic(path: Path) -> Path:
    return layouts.build_robomimic(path).path


def labelled_robomimic(path: Path) -> Path:
    layouts.build_robomimic(path)
    with h5py.File(path, "a") as f:
        f.create_dataset("data/demo_1/vlm_reward", data=np.zeros(7, np.float32))
    return path


def ours_then_theirs(path: Path) -> Path:
    """demo_0 holds a reward vlmlabel wrote, demo_2 a dataset of the user's under the same name."""
    layouts.build_robomimic(path)
    with h5py.File(path, "a") as f:
        f["data/demo_0/vlm_reward"] = np.zeros(5, np.float32)
        f["data/demo_0/vlm_reward"].attrs["vlmlabel_version"] = "0.1.0"
        f["data/demo_2/vlm_reward"] = np.arange(6, dtype=np.float32)
    return path


def two_cameras(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        for cam in ("agentview_image", "robot0_eye_in_hand_image"):
            f.create_dataset(f"data/demo_0/obs/{cam}", data=make_frames(3, 16, 16, 0))
    return path


def float_frames(path: Path) -> Path:
    return flat(path, np.random.default_rng(0).random((9, 16, 16, 3), np.float32))


def nested_float_frames(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("data/demo_0/obs/agentview_image", data=np.random.rand(3, 16, 16, 3).astype(np.float32))
        f.create_dataset("data/demo_0/actions", data=np.zeros((3, 2), np.float32))
    return path


def empty_episode(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("data/demo_0/obs/agentview_image", data=make_frames(3, 16, 16, 0))
        f.create_dataset("data/demo_1/obs/agentview_image", shape=(0, 16, 16, 3), dtype=np.uint8)
    return path


def minari_without_steps(path: Path) -> Path:
    layouts.build_minari(path)
    with h5py.File(path, "a") as f:
        f.create_dataset("episode_3/observations", data=make_frames(1, 32, 40, seed=1))
    return path


def minari_infos(path: Path, how: str) -> Path:
    """Minari with episode_1's infos/ replaced: an external link into other.h5, a dataset, a link to nothing, or
    a hard link to episode_0's infos (two episodes, one group)."""
    layouts.build_minari(path)
    with h5py.File(path, "a") as f:
        f.require_group("episode_0/infos")
        f["episode_1/infos"] = {
            "external": lambda: h5py.ExternalLink("other.h5", "/infos"),
            "dataset": lambda: np.zeros(3, np.float32),
            "dangling": lambda: h5py.SoftLink("/nowhere"),
            "shared": lambda: f["episode_0/infos"],
            "soft to external": lambda: h5py.SoftLink("/elsewhere"),
        }[how]()
        if how == "soft to external":
            f["elsewhere"] = h5py.ExternalLink("other.h5", "/infos")
    if how in ("external", "soft to external"):
        with h5py.File(path.parent / "other.h5", "w") as other:
            other.create_group("infos")
    return path


def dangling_reward_link(path: Path) -> Path:
    layouts.build_robomimic(path)
    with h5py.File(path, "a") as f:
        f["data/demo_1/vlm_reward"] = h5py.SoftLink("/data/demo_1/gone")
    return path


def empty_file(path: Path) -> Path:
    h5py.File(path, "w").close()
    return path


def no_images(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=np.zeros((5, 7), np.float32))
        f.create_dataset("actions", data=np.zeros((5, 2), np.float32))
    return path


def truncated(path: Path) -> Path:
    layouts.build_robomimic(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def text_file(path: Path) -> Path:
    path.write_text("not an hdf5 file\n")
    return path


def linked_frames(path: Path, target: str = "frames.h5") -> Path:
    """The frames live in another file, reached through a relative external link."""
    flat(path.parent / "frames.h5", key="images")
    with h5py.File(path, "w") as f:
        f["observations"] = h5py.ExternalLink(target, "/images")
        f.create_dataset("terminals", data=np.isin(np.arange(sum(LENGTHS)), np.cumsum(LENGTHS) - 1))
    return path


def dangling_link(path: Path) -> Path:
    linked_frames(path, target="gone.h5")
    return path


def virtual_frames(path: Path, missing: bool) -> Path:
    flat(path.parent / "frames.h5", key="images")
    shape = (sum(LENGTHS), 16, 20, 3)
    layout = h5py.VirtualLayout(shape, np.uint8)
    layout[:] = h5py.VirtualSource("frames.h5", "/images", shape)
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("observations", layout)
        f.create_dataset("terminals", data=np.isin(np.arange(sum(LENGTHS)), np.cumsum(LENGTHS) - 1))
    if missing:
        (path.parent / "frames.h5").unlink()
    return path


def short_next_observations(path: Path) -> Path:
    flat(path)
    with h5py.File(path, "r+") as f:
        f["next_observations"] = f["observations"][:-3]
    return path


def name_not_utf8(path: Path) -> Path:
    robomimic(path)
    with h5py.File(path, "r+") as f:
        f["data"].id.move(b"demo_1", b"demo_\xe91")
    return path


def linked_from_a_sibling_folder(path: Path) -> Path:
    """SOURCE in src/, its frames in ../frames/f.h5 through a relative external link."""
    (path.parent / "frames").mkdir()
    (path.parent / "src").mkdir()
    flat(path.parent / "frames" / "f.h5", key="images")
    source = path.parent / "src" / "data.h5"
    with h5py.File(source, "w") as f:
        f["observations"] = h5py.ExternalLink("../frames/f.h5", "/images")
        f.create_dataset("terminals", data=np.isin(np.arange(sum(LENGTHS)), np.cumsum(LENGTHS) - 1))
    return source


def episode_frames_behind_a_dangling_link(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("data/demo_0/actions", data=np.zeros((3, 2), np.float32))
        f["data/demo_0/obs/agentview_image"] = h5py.ExternalLink("gone.h5", "/frames")
    return path


def linked_episode(path: Path) -> Path:
    """robomimic, one demo of which is a group in another file: rewards would land in that file."""
    with h5py.File(path.parent / "demo1.h5", "w") as f:
        f.create_dataset("obs/agentview_image", data=make_frames(4, 16, 16, 1))
    with h5py.File(path, "w") as f:
        f.create_dataset("data/demo_0/obs/agentview_image", data=make_frames(3, 16, 16, 0))
        f["data/demo_1"] = h5py.ExternalLink("demo1.h5", "/")
    return path


def parquet_images(path: Path, episode: list[int] | None = None, blobs: list[bytes] | None = None) -> Path:
    frames = make_frames(sum(LENGTHS), 16, 16, seed=7)
    episode = episode if episode is not None else np.repeat(np.arange(len(LENGTHS)), LENGTHS).tolist()
    images = blobs if blobs is not None else [encode(f, "PNG") for f in frames]
    Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "episode_index": episode},
        features=Features({"image": Image(), "episode_index": Value("int64")}),
    ).to_parquet(str(path))
    return path


def disk_without_images(path: Path) -> Path:
    Dataset.from_dict({"state": [[0.0, 1.0]] * 4, "episode_index": [0, 0, 1, 1]}).save_to_disk(str(path))
    return path


def lerobot_video_missing(path: Path) -> Path:
    case = table_layouts.build_lerobot(path, video=True)
    next(p for p in case.path.rglob("*.mp4") if "observation.images.top" in str(p)).unlink()
    return case.path


def beside_robomimic(build: str) -> Callable[[Path], Path]:
    """robomimic at the path, with ``tools.synthetic.tiny_vlm``'s ``build`` model in the folder as model/
    (transformers, the optional extra, is imported only by the cases that need it)."""

    def made(path: Path) -> Path:
        tiny_vlm = pytest.importorskip("tools.synthetic.tiny_vlm")
        getattr(tiny_vlm, build)(path.parent / "model")
        return robomimic(path)

    return made


# -- cases --------------------------------------------------------------------------------------------------


@dataclass
class Refused:
    """Input that must be refused: exit 2, one line holding ``words``, the folder exactly as it was."""

    build: Callable[[Path], Path] | None  # makes the source at the path given (None: it does not exist)
    args: list[str] = field(default_factory=list)  # {source} and {folder} are filled in
    words: list[str] = field(default_factory=list)
    name: str = "data.h5"  # the source's file name
    holder: bool = False  # another process holds the source open for writing during the run
    cwd: str = ""  # the working folder, inside the data folder ('': the folder above it)


LONG = " ".join(["a red cube"] * 40)
VLM = ["--scorer", "vlm", "--model", "{vlm}"]
NOT_UTF8, LATIN1 = open_inputs.NOT_UTF8, open_inputs.ACCENTED_LATIN1
REFUSED: dict[str, Refused] = {
    # the file itself
    "missing file": Refused(None, words=["does not exist"]),
    "a folder that is no dataset": Refused(lambda p: (p.mkdir(), p)[1], words=["not a dataset"], name="folder"),
    "not hdf5": Refused(text_file, words=["not an HDF5 file"]),
    "truncated": Refused(truncated, words=["truncated or corrupt"]),
    "empty file": Refused(empty_file, words=["empty"]),
    "no image dataset": Refused(no_images, words=["no image dataset", "observations", "--image-key"]),
    "empty episode": Refused(empty_episode, words=["data/demo_1", "empty"]),
    "minari episode without steps": Refused(minari_without_steps, words=["episode_3", "no steps"]),
    "ambiguous cameras": Refused(two_cameras, words=["several image datasets", "--image-key"]),
    "held open for writing": Refused(robomimic, words=["open for writing"], holder=True),
    # frames
    "float frames": Refused(float_frames, words=["float", "uint8"]),
    "float frames in a nested group": Refused(nested_float_frames, words=["float", "uint8", "agentview_image"]),
    "four channels": Refused(
        lambda p: flat(p, make_frames(9, 8, 8, 0, channels=4)), ["--image-key", "observations"], ["1 or 3 channels"]
    ),
    "int16 frames": Refused(
        lambda p: flat(p, np.zeros((9, 8, 8, 3), np.int16)), ["--image-key", "observations"], ["int16", "uint8"]
    ),
    "wrong rank": Refused(no_images, ["--image-key", "actions"], ["rank 2"]),
    "transparent PNG": Refused(lambda p: flat_encoded(p, pictures("RGBA-transparent")), words=["RGBA"]),
    "palette PNG": Refused(lambda p: flat_encoded(p, pictures("P")), words=["palette"]),
    "16-bit grayscale PNG": Refused(lambda p: flat_encoded(p, pictures("I;16")), words=["16-bit"]),
    "CMYK JPEG": Refused(lambda p: flat_encoded(p, pictures("CMYK")), words=["CMYK"]),
    "undecodable JPEG": Refused(
        lambda p: flat_encoded(p, pictures("garbage")),  # --align next: row 0 is unread
        words=["frame 1 of observations", "not a decodable", "truncated"],
    ),
    "dangling external link": Refused(dangling_link, words=["gone.h5", "not found"]),
    "Minari infos/ an external link into another file": Refused(
        lambda p: minari_infos(p, "external"), words=["episode_1/infos", "external link", "other.h5"]
    ),
    "Minari infos/ a soft link to an external link": Refused(
        lambda p: minari_infos(p, "soft to external"),
        ["--output", "{folder}/out.h5"],
        ["episode_1/infos", "a link into another file"],
    ),
    "Minari infos/ a dataset": Refused(lambda p: minari_infos(p, "dataset"), words=["episode_1/infos", "not a group"]),
    "Minari infos/ a link to nothing": Refused(
        lambda p: minari_infos(p, "dangling"), words=["episode_1/infos", "link to nothing"]
    ),
    "two episodes, one infos/ group": Refused(
        lambda p: minari_infos(p, "shared"), ["--overwrite"], ["episode_1/infos and episode_0/infos", "one group"]
    ),
    "reward name a link to nothing, --overwrite": Refused(
        dangling_reward_link, ["--overwrite"], ["data/demo_1/vlm_reward", "not written by vlmlabel"]
    ),
    "SOURCE a loop of symbolic links": Refused(lambda p: (p.symlink_to(p), p)[1], words=["loop of symbolic links"]),
    "--output a loop of symbolic links": Refused(
        lambda p: (robomimic(p), (p.parent / "out.h5").symlink_to(p.parent / "out.h5"))[0],
        ["--output", "{folder}/out.h5"],
        ["out.h5", "loop of symbolic links"],
    ),
    "next observations shorter than the frames": Refused(
        short_next_observations, words=["next_observations has", "rows but observations has", "--align frame"]
    ),
    "a group name that is not UTF-8": Refused(name_not_utf8, words=["not UTF-8", "rename"]),
    "virtual dataset with a missing file": Refused(
        lambda p: virtual_frames(p, missing=True), words=["frames.h5", "not found"]
    ),
    "episode behind an external link": Refused(linked_episode, words=["demo1.h5", "external link"]),
    "copy elsewhere would lose a link": Refused(
        lambda p: (linked_frames(p), (p.parent / "elsewhere").mkdir())[0],
        ["--output", "{folder}/elsewhere/out.h5"],
        ["frames.h5", "would not find"],
    ),
    "copy elsewhere would lose a virtual dataset's file": Refused(
        lambda p: (virtual_frames(p, missing=False), (p.parent / "elsewhere").mkdir())[0],
        ["--output", "{folder}/elsewhere/out.h5"],
        ["frames.h5", "would not find"],
    ),
    "copy elsewhere would lose a link, run from SOURCE's folder": Refused(
        linked_from_a_sibling_folder, ["--output", "{folder}/out.h5"], ["../frames/f.h5", "would not find"], cwd="src"
    ),
    "--image-key behind a dangling link": Refused(
        episode_frames_behind_a_dangling_link, ["--image-key", "agentview_image"], ["gone.h5", "not found"]
    ),
    # tables
    "interleaved episodes, per-episode normalisation": Refused(
        lambda p: parquet_images(p, episode=[0, 1, 0, 1, 2, 2, 2, 0, 1]),
        ["--normalize", "episode"],
        ["not consecutive"],
        name="data.parquet",
    ),
    "table without images": Refused(disk_without_images, words=["image"], name="disk"),
    "table with an undecodable image": Refused(
        lambda p: parquet_images(p, blobs=pictures("garbage", 9)),
        words=["frame 1 of image", "not a decodable"],
        name="data.parquet",
    ),
    "LeRobot video file missing": Refused(
        lerobot_video_missing, ["--image-key", "observation.images.top"], [".mp4"], name="lerobot"
    ),
    # reward names and outputs
    "reward key present": Refused(labelled_robomimic, words=["data/demo_1/vlm_reward", "--overwrite"]),
    "reward key ours in one episode, the user's in another": Refused(
        ours_then_theirs, ["--overwrite"], ["data/demo_2/vlm_reward", "not written by vlmlabel"]
    ),
    "reward key is the frames group": Refused(
        robomimic, ["--reward-key", "obs", "--overwrite"], ["obs", "not written by vlmlabel"]
    ),
    "reward key is the actions": Refused(
        robomimic, ["--reward-key", "actions", "--overwrite"], ["actions", "not written by vlmlabel"]
    ),
    "reward key is a table's image column": Refused(
        parquet_images, ["--reward-key", "image", "--overwrite"], ["image"], name="data.parquet"
    ),
    "reward key '.'": Refused(robomimic, ["--reward-key", "."], ["--reward-key"]),
    "reward key with an empty part": Refused(robomimic, ["--reward-key", "a//b"], ["--reward-key"]),
    "reward key too long for a file name": Refused(
        parquet_images, ["--reward-key", "r" * 300], ["255-byte"], name="data.parquet"
    ),
    "output is the source": Refused(robomimic, ["--output", "{source}"], ["is SOURCE itself"]),
    "output is a folder": Refused(robomimic, ["--output", "{folder}", "--overwrite"], ["is a folder"]),
    "output folder missing": Refused(
        robomimic, ["--output", "{folder}/nope/out.h5"], ["does not exist; create it first"]
    ),
    "output under a file": Refused(robomimic, ["--output", "{source}/out.h5"], ["not a folder"]),
    "output is another kind of file": Refused(
        lambda p: ((p.parent / "notes.h5").write_text("mine"), robomimic(p))[1],
        ["--output", "{folder}/notes.h5", "--overwrite"],
        ["not an HDF5 file"],
    ),
    # goals, formulation, run options
    "empty goal": Refused(robomimic, ["--goal", " "], ["--goal is empty"]),
    "goals identical once cut to the context": Refused(
        robomimic, ["--goal", LONG + " left", "--goal", LONG + " right"], ["identical"]
    ),
    "projection onto the goal itself": Refused(robomimic, ["--reward", "projection", "--baseline", GOAL], ["baseline"]),
    "bad batch size": Refused(robomimic, ["--batch-size", "0"], ["--batch-size"]),
    "huge batch size": Refused(robomimic, ["--batch-size", "100000000000"], ["--batch-size"]),
    "shard index out of range": Refused(robomimic, ["--num-shards", "2", "--shard-index", "5"], ["--shard-index"]),
    "unknown alignment": Refused(robomimic, ["--align", "sideways"], ["--align"]),
    "unknown option": Refused(robomimic, ["--gaol", "x"], ["--gaol"]),
    # the model and the device
    "unknown model": Refused(robomimic, ["--model", "ViT-B-33"], ["unknown model", "ViT-B-32"]),
    "unknown tag": Refused(
        robomimic,
        ["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b80k"],
        ["unknown pretrained tag", "laion2b_s34b_b79k"],
    ),
    "weights not cached offline": Refused(
        robomimic, ["--model", "ViT-B-32"], ["not in the local", "HF_HUB_OFFLINE", "--pretrained FILE"]
    ),
    "missing checkpoint file": Refused(
        robomimic, ["--model", "ViT-B-32", "--pretrained", "/nope/w.safetensors"], ["does not exist"]
    ),
    "checkpoint file is not weights": Refused(
        robomimic, ["--model", "ViT-B-32", "--pretrained", "{source}"], ["could not load model 'ViT-B-32'"]
    ),
    "model folder without config": Refused(robomimic, ["--model", "local-dir:/tmp"], ["open_clip_config.json"]),
    "unknown device": Refused(robomimic, ["--device", "tpu"], ["unknown device 'tpu'"]),
    "cuda absent": Refused(robomimic, ["--device", "cuda:0"], ["no CUDA GPU", "--device cpu"]),
    "NVDEC asked for on the CPU": Refused(
        lambda p: table_layouts.build_lerobot(p, video=True).path,
        ["--image-key", "observation.images.top", "--video-decoder", "nvdec"],
        ["--video-decoder nvdec", "this run is on cpu"],
        name="lerobot",
    ),
    "fp16 on cpu": Refused(robomimic, ["--device", "cpu", "--precision", "fp16"], ["fp16 is not supported on cpu"]),
    # round two: cluster launches (SLURM arrays, torchrun, merge)
    "--num-shards 3 without --shard-index": Refused(
        robomimic,
        ["--num-shards", "3"],
        ["--num-shards 3 needs --shard-index I (0..2)", "--num-shards 1 scores the whole dataset"],
    ),
    "--shard-index without --num-shards": Refused(
        robomimic, ["--shard-index", "1"], ["--shard-index 1 needs --num-shards N"]
    ),
    # round two: labels files, busy files, --overwrite of a whole result
    "labels file whose source moved, another of that name where the working folder leads": Refused(
        labels_files.labels_source_moved, words=["src/data.h5", "not found at", "never reads"], cwd="elsewhere/run"
    ),
    "labels file whose source was replaced by another dataset": Refused(
        labels_files.labels_source_replaced, words=["src/data.h5", "holds other frames", "not the file"]
    ),
    "external link's file gone, one of that name in the working folder": Refused(
        lambda p: labels_files.link_found_in_working_folder(p, virtual=False),
        words=["frames.h5", "not found at"],
        cwd="run",
    ),
    "virtual dataset's file gone, one of that name in the working folder": Refused(
        lambda p: labels_files.link_found_in_working_folder(p, virtual=True),
        words=["frames.h5", "not found at"],
        cwd="run",
    ),
    "an earlier result under the reward key, other columns, no --overwrite": Refused(
        lambda p: labels_files.earlier_result(p, ["vlm_reward_0", "vlm_reward_1"]),
        words=["data/demo_0/vlm_reward_0", "--overwrite", "replaced whole"],
    ),
    # round two: post-processing of degenerate episodes
    "a model whose weights hold NaN": Refused(
        lambda p: (build_model_dir(p.parent / "nan-clip", 0, nan_weights=True), robomimic(p))[1],
        ["--model", "{folder}/nan-clip"],
        ["NaN or infinite", "frames 0-", "--precision fp32"],
    ),
    # round two: user strings and metadata files checked at open
    "a goal that is not UTF-8": Refused(robomimic, ["--goal", NOT_UTF8], ["--goal is not UTF-8", "b'\\xff'"]),
    "a goal template that is not UTF-8": Refused(
        robomimic, ["--goal-template", NOT_UTF8 + " {{}}"], ["--goal-template is not UTF-8"]
    ),
    "a baseline that is not UTF-8": Refused(
        robomimic, ["--reward", "projection", "--baseline", NOT_UTF8], ["--baseline is not UTF-8"]
    ),
    "a negative prompt that is not UTF-8": Refused(
        robomimic, ["--reward", "softmax", "--negative", NOT_UTF8], ["--negative is not UTF-8"]
    ),
    "a reward key that is not UTF-8": Refused(
        robomimic, ["--reward-key", "r" + NOT_UTF8], ["--reward-key is not UTF-8"]
    ),
    "an image key that is not UTF-8": Refused(robomimic, ["--image-key", NOT_UTF8], ["--image-key is not UTF-8"]),
    "a split that is not UTF-8": Refused(robomimic, ["--split", NOT_UTF8], ["--split is not UTF-8"]),
    "a model that is not UTF-8": Refused(robomimic, ["--model", NOT_UTF8], ["--model is not UTF-8"]),
    "a pretrained tag that is not UTF-8": Refused(robomimic, ["--pretrained", NOT_UTF8], ["--pretrained is not UTF-8"]),
    "a Hub repo to push to that is not UTF-8": Refused(
        robomimic, ["--push-to-hub", "me/" + NOT_UTF8], ["--push-to-hub is not UTF-8"]
    ),
    "a parquet file named in Latin-1": Refused(
        lambda p: open_inputs.parquet_named(p, LATIN1 + ".parquet"),
        words=["donn\\xe9es.parquet", "not UTF-8", "rename"],
    ),
    "a save_to_disk folder named in Latin-1": Refused(
        lambda p: open_inputs.renamed(table_layouts.build_disk_image(p).path, LATIN1), words=["not UTF-8"], name="disk"
    ),
    "a parquet --output named in Latin-1": Refused(
        lambda p: open_inputs.parquet_named(p, "data.parquet"),
        ["--output", "{folder}/" + LATIN1 + ".parquet"],
        ["donn\\xe9es.parquet", "not UTF-8"],
    ),
    "LeRobot meta/info.json a list": Refused(
        lambda p: open_inputs.lerobot(p, "info.json", lambda info: [info]),
        words=["meta/info.json holds a list, not a JSON object"],
        name="lerobot",
    ),
    "LeRobot features a list": Refused(
        lambda p: open_inputs.lerobot(p, "info.json", open_inputs.set_key("features", [])),
        words=["info.json: 'features' is a list", "not an object"],
        name="lerobot",
    ),
    "LeRobot feature a string": Refused(
        lambda p: open_inputs.lerobot(p, "info.json", open_inputs.feature("action", "float32")),
        words=["['features']: 'action' is a string", "not an object"],
        name="lerobot",
    ),
    "LeRobot feature shape a string": Refused(
        lambda p: open_inputs.lerobot(
            p, "info.json", open_inputs.feature("action", {"dtype": "float32", "shape": "2"})
        ),
        words=["['action']: 'shape' is a string", "not a list"],
        name="lerobot",
    ),
    "LeRobot fps a string": Refused(
        lambda p: open_inputs.lerobot(p, "info.json", open_inputs.set_key("fps", "30")),
        words=["'fps' is a string", "not a number or null"],
        name="lerobot",
    ),
    "LeRobot meta/stats.json a list": Refused(
        lambda p: open_inputs.lerobot(p, "stats.json", lambda s: [s]),
        ["--image-key", "observation.images.top"],
        ["meta/stats.json holds a list"],
        name="lerobot",
    ),
    "LeRobot video_path that cannot be filled in": Refused(
        lambda p: open_inputs.lerobot(
            p, "info.json", open_inputs.set_key("video_path", "videos/{camera}.mp4"), video=True
        ),
        ["--image-key", "observation.images.top"],
        ["'video_path'", "cannot be filled in", "camera"],
        name="lerobot",
    ),
    "LeRobot v2.1 episodes.jsonl line a list": Refused(
        lambda p: open_inputs.lerobot_v21_episodes(p, "[3, 4]"),
        words=["episodes.jsonl line 4 holds a list"],
        name="lerobot",
    ),
    "LeRobot v2.1 episodes.jsonl line without length": Refused(
        lambda p: open_inputs.lerobot_v21_episodes(p, '{"episode_index": 3}'),
        words=["episodes.jsonl line 4: 'length' is missing"],
        name="lerobot",
    ),
    "save_to_disk state.json a list": Refused(
        lambda p: open_inputs.disk(p, "state.json", lambda s: [s]),
        words=["state.json holds a list, not a JSON object"],
        name="disk",
    ),
    "save_to_disk _data_files a string": Refused(
        lambda p: open_inputs.disk(p, "state.json", open_inputs.set_key("_data_files", "data.arrow")),
        words=["state.json: '_data_files' is a string", "not a list"],
        name="disk",
    ),
    "save_to_disk data file outside its folder": Refused(
        lambda p: open_inputs.disk(
            p, "state.json", open_inputs.set_key("_data_files", [{"filename": "../data.arrow"}])
        ),
        words=["'_data_files' names '../data.arrow'", "not a file of"],
        name="disk",
    ),
    "save_to_disk dataset_info.json a list": Refused(
        lambda p: open_inputs.disk(p, "dataset_info.json", lambda i: [i]),
        words=["dataset_info.json holds a list"],
        name="disk",
    ),
    "DatasetDict splits null": Refused(
        lambda p: open_inputs.disk(p, "dataset_dict.json", open_inputs.set_key("splits", None)),
        ["--split", "test"],
        ["dataset_dict.json: 'splits' is null", "not a list"],
        name="disk",
    ),
    "DatasetDict split '..'": Refused(
        lambda p: open_inputs.disk(p, "dataset_dict.json", open_inputs.set_key("splits", ["..", "test"])),
        ["--split", ".."],
        ["'splits' names '..'"],
        name="disk",
    ),
    "parquet 'huggingface' metadata a list": Refused(
        lambda p: open_inputs.parquet_with_metadata(p, b"huggingface", b"[]"),
        words=["'huggingface' metadata of", "holds a list"],
        name="data.parquet",
    ),
    "parquet 'huggingface' metadata not JSON": Refused(
        lambda p: open_inputs.parquet_with_metadata(p, b"huggingface", b"{"),
        words=["'huggingface' metadata of", "not valid JSON"],
        name="data.parquet",
    ),
    "parquet 'vlmlabel' metadata a list": Refused(
        lambda p: open_inputs.parquet_with_metadata(p, b"vlmlabel", b"[]"),
        words=["'vlmlabel' metadata of", "holds a list"],
        name="data.parquet",
    ),
    "model config a number": Refused(
        lambda p: (open_inputs.model_config(p.parent / "model", 7), robomimic(p))[1],
        ["--model", "{folder}/model"],
        ["open_clip_config.json holds an integer (7), not a JSON object"],
    ),
    "model config's model_cfg a list": Refused(
        lambda p: (open_inputs.model_config(p.parent / "model", {"model_cfg": []}), robomimic(p))[1],
        ["--model", "{folder}/model"],
        ["open_clip_config.json: 'model_cfg' is a list"],
    ),
    "HDF5 written under a parquet name": Refused(
        robomimic, ["--output", "{folder}/out.parquet"], ["out.parquet is written as HDF5", "out.h5"]
    ),
    "HDF5 written under a name without a suffix": Refused(
        robomimic, ["--output", "{folder}/labelled"], ["labelled is written as HDF5", "labelled.h5", "no suffix"]
    ),
    "HDF5 labels file under a parquet name": Refused(
        robomimic, ["--output", "{folder}/out.parquet", "--link"], ["out.parquet is written as HDF5"]
    ),
    "parquet written under an HDF5 name": Refused(
        lambda p: open_inputs.parquet_named(p, "data.parquet"),
        ["--output", "{folder}/out.h5"],
        ["out.h5 is written as parquet, a file", "out.parquet"],
    ),
    "parquet folder written under a parquet name": Refused(
        lambda p: table_layouts.build_parquet_folder(p).path,
        ["--output", "{folder}/out.parquet"],
        ["out.parquet is written as parquet, a folder", "must not end in .parquet"],
        name="pq",
    ),
    "save_to_disk written under a parquet name": Refused(
        lambda p: table_layouts.build_disk_image(p).path,
        ["--output", "{folder}/out.parquet"],
        ["out.parquet is written as a save_to_disk dataset, a folder"],
        name="disk",
    ),
    "LeRobot written under an HDF5 name": Refused(
        lambda p: table_layouts.build_lerobot(p, video=False).path,
        ["--output", "{folder}/out.h5", "--image-key", "observation.images.top"],
        ["out.h5 is written as a LeRobot dataset, a folder"],
        name="lerobot",
    ),
    # round two: LeRobot statistics
    # round two: a fresh hostile pass
    "cameras with different steps": Refused(
        lambda p: fresh.two_cameras(p, lengths_b=(3, 5)),
        ["--image-key", "obs/agentview_image", "--image-key", "obs/wrist_image"],
        ["do not have the same episodes and steps"],
    ),
    "one camera under two spellings": Refused(
        fresh.two_cameras, ["--image-key", "obs/agentview_image", "--image-key", "agentview_image"], ["same name"]
    ),
    "bool frames": Refused(lambda p: flat(p, RGB > 128), ["--image-key", "observations"], ["bool", "uint8"]),
    "int8 frames": Refused(lambda p: flat(p, RGB.astype(np.int8)), ["--image-key", "observations"], ["int8", "uint8"]),
    "frames of two channels": Refused(
        lambda p: flat(p, make_frames(9, 8, 8, 0, channels=2)), ["--image-key", "observations"], ["1 or 3 channels"]
    ),
    "a frames dataset of length 0": Refused(fresh.zero_frames, words=["observations", "0 frames"]),
    "LeRobot episode listed twice in meta/episodes": Refused(
        lambda p: fresh.lerobot_meta(p, "twice"),
        ["--image-key", "observation.images.top"],
        ["lists episode 0 2 times", "one row per episode"],
        name="lerobot",
    ),
    "LeRobot episode missing from meta/episodes": Refused(
        lambda p: fresh.lerobot_meta(p, "missing"),
        ["--image-key", "observation.images.top"],
        ["episode 1 has 6 rows", "no row in the episode metadata"],
        name="lerobot",
    ),
    "LeRobot episode starting past its video's end": Refused(
        lambda p: fresh.lerobot_meta(p, "past the video"),
        ["--image-key", "observation.images.top"],
        ["no frame at 50.000 s"],
        name="lerobot",
    ),
    "LeRobot v2.1 episodes.jsonl lacking an episode": Refused(
        fresh.lerobot_v21_missing_episode, words=["episode 2 has 3 rows", "no row"], name="lerobot"
    ),
    "parquet folder of two schemas": Refused(
        fresh.parquet_two_schemas, words=["b.parquet", "other columns or types"], name="pq"
    ),
    "parquet files of two frame sizes": Refused(fresh.parquet_two_frame_sizes, words=["different shapes"], name="pq"),
    "a parquet glob matching nothing": Refused(None, words=["no parquet file matches"], name="x-*.parquet"),
    "a text file named .parquet": Refused(text_file, words=["cannot be read as parquet"], name="data.parquet"),
    "a parquet file of no rows": Refused(fresh.parquet_no_rows, words=["has no rows"], name="data.parquet"),
    "--output a symbolic link to SOURCE": Refused(
        lambda p: (robomimic(p), fresh.symlink_to(p.parent / "alias.h5", p))[0],
        ["--output", "{folder}/alias.h5", "--overwrite"],
        ["is SOURCE itself"],
    ),
    # issue 22: sigmoid
    "--reward sigmoid with a model that has no logit_bias": Refused(
        robomimic, ["--reward", "sigmoid"], ["--reward sigmoid", "logit_bias", "SigLIP", "this model has none"]
    ),
    "--reward sigmoid with --negative": Refused(
        robomimic, ["--reward", "sigmoid", "--negative", "the drawer is closed"], ["--negative only applies"]
    ),
    # issue 22: goal images
    "a 16-bit grayscale goal image": Refused(
        lambda p: (robomimic(p), goals.sixteen_bit_gray(p.parent / "goal.png"))[0],
        ["--goal-image", "{folder}/goal.png"],
        ["--goal-image", "goal.png", "16-bit grayscale PNG", "cannot score it exactly"],
    ),
    "a CMYK JPEG goal image": Refused(
        lambda p: (robomimic(p), goals.cmyk_jpeg(p.parent / "goal.jpg"))[0],
        ["--goal-image", "{folder}/goal.jpg"],
        ["--goal-image", "goal.jpg", "CMYK JPEG", "save it as RGB first"],
    ),
    "a goal image that is no image": Refused(
        lambda p: (robomimic(p), goals.not_an_image(p.parent / "goal.png"))[0],
        ["--goal-image", "{folder}/goal.png"],
        ["--goal-image", "goal.png", "not a decodable JPEG/PNG image", "save the goal image as a PNG or JPEG again"],
    ),
    "a missing goal image": Refused(robomimic, ["--goal-image", "{folder}/nope.png"], ["nope.png", "does not exist"]),
    "--goal-frame without a step": Refused(robomimic, ["--goal-frame", "demo_1"], ["names no frame", "EPISODE:STEP"]),
    "--goal-frame of no episode": Refused(robomimic, ["--goal-frame", "demo_9:0"], ["no episode 'demo_9'"]),
    "--goal-frame past the episode's end": Refused(
        robomimic, ["--goal-frame", "demo_1:99"], ["demo_1 has 7 frames", "STEP must be in -7..6"]
    ),
    "--goal-frame with --reward softmax": Refused(
        robomimic,
        ["--goal-frame", "demo_1:-1", "--reward", "softmax", "--negative", "an empty table"],
        ["--reward softmax does not apply to goal images"],
    ),
    "--goal-frame with several cameras": Refused(
        fresh.two_cameras,
        ["--image-key", "obs/agentview_image", "--image-key", "obs/wrist_image", "--goal-frame", "0:-1"],
        ["one camera's view", "one --image-key"],
    ),
    # issue 22 hostile pass
    "--goal-frame of a superscript digit": Refused(robomimic, ["--goal-frame", "\u00b2:0"], ["no episode '\u00b2'"]),
    "--goal-frame with a digit separator in STEP": Refused(robomimic, ["--goal-frame", "0:1_0"], ["names no frame"]),
    "a goal image that is a pipe (bash's <(...))": Refused(
        lambda p: (robomimic(p), os.mkfifo(p.parent / "goal.png"))[0],
        ["--goal-image", "{folder}/goal.png"],
        ["--goal-image", "goal.png", "not a regular file", "save the image as a file"],
    ),
    "a goal image that never ends": Refused(
        robomimic, ["--goal-image", "/dev/zero"], ["/dev/zero", "not a regular file"]
    ),
    "--goal-frame of an episode number a table lacks": Refused(
        lambda p: fresh.parquet_episodes(p, [3, 3, 5, 5, 7]),
        ["--goal-frame", "1:-1", "--align", "frame"],
        ["no episode '1' (by name or number)", "episode 3 (rows 0-1)"],
        name="data.parquet",
    ),
    # issue 21: the VLM scorer ({vlm}: a tiny Qwen2-VL; VLM: --scorer vlm with it)
    "--answer of several tokens": Refused(
        robomimic, [*VLM, "--answer", " Truthfully"], ['answer " Truthfully" is', 'tokens (" ', "one token"]
    ),
    "--versus of several tokens": Refused(
        robomimic, [*VLM, "--versus", " Truthfully"], ['answer " Truthfully" is', "use an answer that is one token"]
    ),
    "--answer-values naming an answer of several tokens": Refused(
        robomimic, [*VLM, "--answer-values", "1=0, Truthfully=1"], ['answer " Truthfully" is', "one token"]
    ),
    "--prompt without {goal}": Refused(
        robomimic, [*VLM, "--prompt", "Done?"], ["--prompt 'Done?'", "no {goal} placeholder", "Task: {goal}"]
    ),
    "a judge that needs remote code": Refused(
        beside_robomimic("build_remote_code_vlm"),
        ["--scorer", "vlm", "--model", "{folder}/model"],
        ["needs remote code", "config.json maps its classes", "never runs a model's own code"],
    ),
    "a judge without a vision tower (a text-only LM)": Refused(
        beside_robomimic("build_text_only_lm"),
        ["--scorer", "vlm", "--model", "{folder}/model"],
        ["(qwen2) has no vision tower", "give a vision-language model"],
    ),
    "an open_clip folder as the judge": Refused(
        robomimic, ["--scorer", "vlm", "--model", "{clip}"], ["has no config.json", "--scorer clip"]
    ),
    "a VLM folder without --scorer vlm": Refused(
        robomimic, ["--model", "{vlm}"], ["no open_clip_config.json", "pass --scorer vlm"]
    ),
    "a judge that is neither a folder nor in the Hub cache": Refused(
        robomimic, ["--scorer", "vlm", "--model", "nobody/nothing"], ["neither a folder nor a Hub id", "hf download"]
    ),
    "--scorer nope": Refused(robomimic, ["--scorer", "nope"], ["unknown scorer 'nope'", "clip, vlm"]),
    "--cache with --scorer vlm": Refused(robomimic, [*VLM, "--cache"], ["--cache", "no image embeddings"]),
    "--compile with --scorer vlm": Refused(robomimic, [*VLM, "--compile"], ["--compile applies to CLIP"]),
    "--pretrained with --scorer vlm": Refused(
        robomimic, [*VLM, "--pretrained", "openai"], ["--pretrained applies to --scorer clip"]
    ),
    "--anchors 1": Refused(robomimic, [*VLM, "--anchors", "1"], ["--anchors must be 'all' or at least 2", "not 1"]),
    "--anchors 0": Refused(robomimic, [*VLM, "--anchors", "0"], ["--anchors must be 'all' or at least 2", "not 0"]),
    "--anchors -3": Refused(robomimic, [*VLM, "--anchors", "-3"], ["at least 2", "not -3"]),
    "--anchors x": Refused(robomimic, [*VLM, "--anchors", "x"], ["--anchors must be 'all' or a whole number", "'x'"]),
    "--anchors 2.5": Refused(robomimic, [*VLM, "--anchors", "2.5"], ["a whole number", "'2.5'"]),
    "--context-frames 0": Refused(robomimic, [*VLM, "--context-frames", "0"], ["--context-frames must be at least 1"]),
    "--context frame with --context-frames 5": Refused(
        robomimic, [*VLM, "--context", "frame", "--context-frames", "5"], ["--context frame shows one"]
    ),
    "--context of no kind": Refused(robomimic, [*VLM, "--context", "video"], ["'frame', 'window', 'prefix'"]),
    "--answer with --scorer clip": Refused(robomimic, ["--answer", " True"], ["only apply to --scorer vlm"]),
    "--anchors 4 with --scorer clip": Refused(
        robomimic, ["--anchors", "4"], ["--anchors", "only apply to --scorer vlm"]
    ),
    "--context window with --scorer clip": Refused(
        robomimic, ["--context", "window"], ["--context", "only apply to --scorer vlm"]
    ),
    "--prompt with --scorer clip": Refused(
        robomimic, ["--prompt", "Is {{goal}} done?"], ["only apply to --scorer vlm"]
    ),
    "--reward softmax --negative with --scorer vlm": Refused(
        robomimic,
        [*VLM, "--reward", "softmax", "--negative", "x"],
        ["--reward, --negative only apply to --scorer clip"],
    ),
    "--reward projection with --scorer vlm": Refused(
        robomimic, [*VLM, "--reward", "projection"], ["--reward only applies to --scorer clip"]
    ),
    "--goal-template with --scorer vlm": Refused(
        robomimic, [*VLM, "--goal-template", "a photo of {{}}"], ["--goal-template only applies to --scorer clip"]
    ),
    "--threshold with --scorer vlm": Refused(
        robomimic, [*VLM, "--threshold", "0.5"], ["--threshold only applies to --scorer clip", "--answer"]
    ),
    "--goal-image with --scorer vlm": Refused(
        lambda p: (robomimic(p), goals.write_goal_image(p.parent / "goal.png"))[0],
        [*VLM, "--goal-image", "{folder}/goal.png"],
        ["--goal-image/--goal-frame only applies to --scorer clip"],
    ),
    "--goal-frame with --scorer vlm": Refused(
        robomimic, [*VLM, "--goal-frame", "demo_0:-1"], ["--goal-image/--goal-frame only applies to --scorer clip"]
    ),
    "--answer-values without a value": Refused(
        robomimic, [*VLM, "--answer-values", "1=0,2"], ["--answer-values '1=0,2'", "'2' is not ANSWER=VALUE"]
    ),
    "--answer-values of a word": Refused(
        robomimic, [*VLM, "--answer-values", "1=0,2=high"], ["'high' is not a number"]
    ),
    "--answer-values of one answer": Refused(robomimic, [*VLM, "--answer-values", "5=1"], ["names one answer"]),
    "--answer-values with --answer": Refused(
        robomimic, [*VLM, "--answer", "5", "--answer-values", "1=0,5=1"], ["cannot be combined with --answer"]
    ),
    "--versus equal to --answer": Refused(
        robomimic, [*VLM, "--answer", " True", "--versus", " True"], ["--versus ' True' must be another answer"]
    ),
    "an empty --answer": Refused(robomimic, [*VLM, "--answer", ""], ["--answer is empty"]),
    "an episode of no frames with --scorer vlm": Refused(empty_episode, VLM, ["data/demo_1", "empty"]),
}


def _hold_open_for_writing(path: Path) -> subprocess.Popen:
    """Another program writing the file, with HDF5 file locking off (as on NFS/Lustre)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; f = open(sys.argv[1], 'r+b'); print('open', flush=True); time.sleep(120)",
            str(path),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"open"
    return holder


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_exit_2_one_line_and_nothing_changed(case, tmp_path, tiny_model_dir, monkeypatch, request):
    spec = REFUSED[case]
    vlm = request.getfixturevalue("tiny_vlm")("qwen2_vl") if any("{vlm}" in a for a in spec.args) else None
    folder = tmp_path / "data"
    folder.mkdir()
    source = folder / spec.name
    if spec.build is not None:
        source = spec.build(source)
    monkeypatch.chdir(folder / spec.cwd if spec.cwd else tmp_path)  # where a relative link may be found by chance
    before = tree_digest(folder)
    args = ["relabel", str(source)]
    args += [] if "--goal" in spec.args else ["--goal", GOAL]
    args += [] if "--model" in spec.args else ["--model", str(tiny_model_dir)]
    args += [a.format(source=source, folder=folder, vlm=vlm, clip=tiny_model_dir) for a in spec.args]
    holder = _hold_open_for_writing(source) if spec.holder else None
    try:
        result = runner.invoke(app, args + ["--device", "cpu"] * ("--device" not in spec.args), terminal_width=400)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert_refused(result, spec.words, folder, before)


def assert_refused(result, words: list[str], folder: Path, before: dict[str, str]) -> None:
    """Exit 2, one line "error: ..." holding ``words``, no traceback; ``folder`` as it was (``before``) and
    nothing new beside it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert tree_digest(folder) == before  # the source byte-identical, nothing new beside it
    assert sorted(p.name for p in folder.parent.iterdir()) == ["data"]


# Refusals of the VLM scorer the table cannot hold: another command, no --model at all, transformers missing.
VLM_REFUSED = {
    "vlmlabel embed --scorer vlm": (
        ["embed", "{source}", "--scorer", "vlm"],
        ["the vlm scorer reads none", "relabel with --scorer vlm directly"],
    ),
    "--scorer vlm without --model": (
        ["relabel", "{source}", "--goal", GOAL, "--scorer", "vlm"],
        ["--scorer vlm needs --model", "a local folder or a Hub id"],
    ),
    "--scorer vlm without transformers installed": (
        ["relabel", "{source}", "--goal", GOAL, "--scorer", "vlm", "--model", "{folder}/model"],
        ["--scorer vlm needs transformers", "pip install 'vlmlabel[vlm]'"],
    ),
}


@pytest.mark.parametrize("case", sorted(VLM_REFUSED))
def test_vlm_refused_outside_the_table(case, tmp_path, monkeypatch):
    args, words = VLM_REFUSED[case]
    folder = tmp_path / "data"
    folder.mkdir()
    source = robomimic(folder / "data.h5")
    (folder / "model").mkdir()  # a folder only: without transformers nothing reads it
    (folder / "model" / "config.json").write_text('{"model_type": "qwen2_vl", "vision_config": {}}')
    if "transformers" in case:  # as where the optional extra is not installed (vlmlabel.judge imports it)
        monkeypatch.setattr("vlmlabel.judge._TRANSFORMERS", False)
    monkeypatch.chdir(tmp_path)
    before = tree_digest(folder)
    filled = [a.format(source=source, folder=folder) for a in args]
    result = runner.invoke(app, [*filled, "--device", "cpu"], terminal_width=400)
    assert_refused(result, words, folder, before)


# -- inputs that must be scored exactly -------------------------------------------------------------------


@dataclass
class Scored:
    """Input that must succeed: the rewards at ``--output`` equal open_clip's reference on ``truth``."""

    build: Callable[[Path], Path]
    truth: Callable[[], np.ndarray]  # RGB frames scoring each step, --align frame
    args: list[str] = field(default_factory=list)
    output: str = "{tmp}/out/labelled.h5"  # where the rewards are read back from (an HDF5 file)


GRAY = make_frames(sum(LENGTHS), 16, 20, seed=11, channels=1)
RGB = make_frames(sum(LENGTHS), 16, 20, seed=3)


def _opaque(mode: str) -> tuple[Callable[[Path], Path], Callable[[], np.ndarray]]:
    frames = make_frames(4, 16, 16, seed=5)
    if mode == "RGBA":
        blobs = [
            png(PILImage.fromarray(np.concatenate([f, np.full((16, 16, 1), 255, np.uint8)], -1), "RGBA"))
            for f in frames
        ]
        return (lambda p: flat_encoded(p, blobs)), (lambda: frames)
    gray = frames[..., :1]
    blobs = [png(PILImage.fromarray(np.concatenate([g, np.full((16, 16, 1), 255, np.uint8)], -1), "LA")) for g in gray]
    return (lambda p: flat_encoded(p, blobs)), (lambda: np.repeat(gray, 3, -1))


def _symlinked(path: Path) -> Path:
    real = path.parent / "real" / "data.h5"
    real.parent.mkdir()
    flat(real)
    path.symlink_to(real)
    return path


SCORED: dict[str, Scored] = {
    "grayscale (N, H, W)": Scored(lambda p: flat(p, GRAY[..., 0]), lambda: np.repeat(GRAY, 3, -1)),
    "grayscale (N, H, W, 1)": Scored(lambda p: flat(p, GRAY), lambda: np.repeat(GRAY, 3, -1)),
    "channels first": Scored(lambda p: flat(p, RGB.transpose(0, 3, 1, 2).copy()), lambda: RGB),
    "gzip-compressed chunks": Scored(lambda p: flat(p, RGB, chunks=(2, 16, 20, 3), compression="gzip"), lambda: RGB),
    "opaque RGBA PNG": Scored(*_opaque("RGBA")),
    "opaque LA PNG": Scored(*_opaque("LA")),
    "external link read in place, copy beside it": Scored(linked_frames, lambda: RGB, output="{folder}/labelled.h5"),
    "virtual dataset, copy beside it": Scored(
        lambda p: virtual_frames(p, missing=False), lambda: RGB, output="{folder}/labelled.h5"
    ),
    "a name with spaces and accents": Scored(lambda p: flat(p.parent / "données de test.h5"), lambda: RGB),
    "symlinked source relabelled in place": Scored(_symlinked, lambda: RGB, output="{source}"),
    "reward key that only vlmlabel wrote, --overwrite": Scored(
        lambda p: _relabelled(flat(p)), lambda: RGB, ["--overwrite"], output="{source}"
    ),
    # round two: a fresh hostile pass
    "1x1 frames": Scored(lambda p: flat(p, fresh.noise(9, 1, 1)), lambda: fresh.noise(9, 1, 1)),
    "1xW frames": Scored(lambda p: flat(p, fresh.noise(9, 1, 40)), lambda: fresh.noise(9, 1, 40)),
    "very wide frames (4x2000)": Scored(lambda p: flat(p, fresh.noise(9, 4, 2000)), lambda: fresh.noise(9, 4, 2000)),
    "very tall frames (3000x8)": Scored(lambda p: flat(p, fresh.noise(9, 3000, 8)), lambda: fresh.noise(9, 3000, 8)),
    "fletcher32 + shuffle + gzip chunks": Scored(
        lambda p: flat(p, RGB, chunks=(1, 16, 20, 3), fletcher32=True, shuffle=True, compression="gzip"), lambda: RGB
    ),
    "lzf chunks": Scored(lambda p: flat(p, RGB, chunks=(2, 16, 20, 3), compression="lzf"), lambda: RGB),
    "scale-offset chunks": Scored(lambda p: flat(p, RGB, chunks=(2, 16, 20, 3), scaleoffset=0), lambda: RGB),
    "big-endian uint8 frames": Scored(lambda p: flat(p, RGB.astype(">u1")), lambda: RGB),
    "one camera named twice": Scored(
        lambda p: flat(p), lambda: RGB, ["--image-key", "observations", "--image-key", "observations"]
    ),
    "--output in a folder that is a symbolic link": Scored(
        lambda p: (fresh.symlink_to(p.parent.parent / "outlink", p.parent.parent / "out"), flat(p))[1],
        lambda: RGB,
        output="{tmp}/outlink/labelled.h5",
    ),
}


def _relabelled(path: Path) -> Path:
    with h5py.File(path, "a") as f:
        f["vlm_reward"] = np.zeros(sum(LENGTHS), np.float32)
        f["vlm_reward"].attrs.update({"formula": "cos", "vlmlabel_version": "0.1.0"})
    return path


@pytest.mark.parametrize("case", sorted(SCORED))
def test_scored_exactly_as_open_clip_scores_them(case, tmp_path, tiny_model_dir, reference):
    spec = SCORED[case]
    folder = tmp_path / "data"
    folder.mkdir()
    (tmp_path / "out").mkdir()
    source = spec.build(folder / "data.h5")
    output = Path(spec.output.format(tmp=tmp_path, folder=folder, source=source))
    in_place = output == source
    before = tree_digest(folder)
    args = [
        "relabel",
        str(source),
        "--goal",
        GOAL,
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--align",
        "frame",
        "-q",
        *spec.args,
    ] + ([] if in_place else ["--output", str(output)])
    result = runner.invoke(app, args, terminal_width=400)
    assert result.exit_code == 0, result.output
    with h5py.File(output, "r") as f:
        got = f["vlm_reward"][()]
    np.testing.assert_allclose(got, reference(spec.truth(), [GOAL])[:, 0], atol=2e-3)
    after = tree_digest(folder)
    if in_place:
        assert source.is_symlink() == (case.startswith("symlinked"))
        assert sorted(after) == sorted(before)  # nothing beside it: no temp copy, no lock, no progress
    elif output.parent == folder:
        assert {k: v for k, v in after.items() if k != output.name} == before
    else:
        assert after == before


# -- faults during a run ---------------------------------------------------------------------------------


def _vlmlabel(args: list[str], **options) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vlmlabel", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
    )


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGTERM", "SIGINT", "file too large for the file system"])
def test_fault_mid_run_keeps_the_source_and_the_rerun_equals_the_reference(fault, tmp_path, tiny_model_dir, reference):
    folder = tmp_path / "data"
    folder.mkdir()
    frames = make_frames(400, 16, 20, seed=13)
    source = flat(folder / "data.h5", frames, chunks=(8, 16, 20, 3), compression="gzip")
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    args = [
        "relabel",
        str(source),
        "--goal",
        GOAL,
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--align",
        "frame",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "16",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if fault.startswith("SIG"):
        run = _vlmlabel(args, env=env)
        progress = folder / "data.h5.vlmlabel-vlm_reward" / "progress"
        deadline = time.monotonic() + 120
        while not progress.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        run.send_signal(getattr(signal, fault))
        run.communicate(timeout=120)
        assert run.returncode != 0
    else:
        run = _vlmlabel(args, env=env, preexec_fn=_limit_file_size(source.stat().st_size // 2))
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 2, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    kept = {"data.h5", "data.h5.vlmlabel-vlm_reward"} | ({"data.h5.vlmlabel.lock"} if fault == "SIGKILL" else set())
    assert {p.name for p in folder.iterdir()} <= kept  # progress (and a dead lock) only: the rerun takes them
    rerun = _vlmlabel(args + ["-q"], env=env)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    with h5py.File(source, "r") as f:
        np.testing.assert_allclose(f["vlm_reward"][()], reference(frames, [GOAL])[:, 0], atol=2e-3)
    assert sorted(p.name for p in folder.iterdir()) == ["data.h5"]
