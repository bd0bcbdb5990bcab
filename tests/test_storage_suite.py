"""One storage suite, every backend: each case runs on every entry of ``tests.storage_backends.BACKENDS``, and
the lifecycle cases with every scorer of ``tests.scorer_cases.SCORER_CASES`` (CLIP and the VLM judge).

Cases: rewards equal the scorer's own reference (open_clip's pipeline; transformers' generate, one query at a
time, with the anchors interpolated); kill -9 then rerun equals an uninterrupted run bit for bit; 3 shards +
merge equal a single run (and merge refuses a missing shard); torchrun with 2 CPU ranks equals a single run;
rerunning a finished job exits 0 and changes nothing; evaluate and plot on the output; --overwrite replaces a
whole result. CLIP only: the embedding cache; goal images (a file and a frame of the dataset), scored and from
the cache; --reward sigmoid with a tiny SigLIP-shaped model, scored, through 2 shards + merge and from the
cache. The VLM judge only: every step queried, and two cameras. And the source byte-identical afterwards, with
nothing left beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.cluster_files import ROOT, env
from tests.goal_image_files import open_clip_image_cosines, opened, write_goal_image
from tests.scorer_cases import SCORER_CASES, VLM_JUDGE, Scoring, check_judged
from tests.storage_backends import BACKENDS, Case, tree_digest
from tests.tiny_siglip import build_siglip_dir, open_clip_sigmoid
from vlmlabel import goal_images
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import RewardConfig
from vlmlabel.rewards import Normalize, RewardMode
from vlmlabel.run.cameras import short_name
from vlmlabel.run.embed import EmbedRequest, embed_file
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.merge import merge_shards
from vlmlabel.run.request import FinishedSummary, RelabelRequest, RelabelSummary
from vlmlabel.run.shards import ShardSpec, shard_result, work_dir
from vlmlabel.sources import Align

GOALS = ["a red cube on the table", "an empty table"]
NAMES = ["vlm_reward_0", "vlm_reward_1"]
BATCH = 4
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=sorted(BACKENDS))
def case(request, tmp_path) -> Case:
    root = tmp_path / request.param
    root.mkdir()
    return BACKENDS[request.param](root)


@pytest.fixture(params=sorted(SCORER_CASES))
def scoring(request) -> Scoring:
    return SCORER_CASES[request.param].bind(request)


def _lifecycle(subprocesses: bool = False) -> pytest.MarkDecorator:
    """Every backend with every scorer (``subprocesses``: the scorer's ``subprocess_backends`` only, marked slow
    where the scorer limits them: each child process imports its model's library)."""
    pairs = [
        pytest.param(backend, scorer, marks=[pytest.mark.slow] if subprocesses and entry.subprocess_backends else [])
        for scorer, entry in sorted(SCORER_CASES.items())
        for backend in sorted(BACKENDS)
        if not subprocesses or entry.subprocess_backends is None or backend in entry.subprocess_backends
    ]
    return pytest.mark.parametrize(("case", "scoring"), pairs, indirect=True)


def request_for(case: Case, scoring: Scoring | Path | str, tag: str, **overrides) -> RelabelRequest:
    """A request of the suite's goals (``scoring``: a scorer case, or a CLIP model)."""
    fields = dict(
        source=case.source,
        goals=GOALS,
        model=str(scoring),
        image_key=case.image_key,
        device="cpu",
        batch_size=BATCH,
        output=case.output(tag),
    )
    if isinstance(scoring, Scoring):
        fields.update(scoring.request_fields(GOALS))
    fields.update(overrides)
    return RelabelRequest(**fields)


def read_all(case: Case, dest: Path) -> np.ndarray:
    return np.stack([case.read(dest, name) for name in NAMES], axis=1)


def cli_args(case: Case, scoring: Scoring, tag: str, *extra: str) -> list[str]:
    return [
        "relabel",
        str(case.source),
        "--goal",
        GOALS[0],
        "--goal",
        GOALS[1],
        "--model",
        str(scoring.model),
        *scoring.options,
        "--image-key",
        case.image_key,
        "--device",
        "cpu",
        "--batch-size",
        str(scoring.batch),
        "--output",
        str(case.output(tag)),
        *extra,
    ]


def neighbours(case: Case) -> set[str]:
    return {p.name for p in case.source.parent.iterdir()}


@_lifecycle()
def test_rewards_equal_the_scorers_reference_and_source_untouched(case, scoring):
    before, beside = tree_digest(case.source), neighbours(case)
    summary = relabel_file(request_for(case, scoring, "single", align=Align.frame))
    assert isinstance(summary, RelabelSummary)
    got = read_all(case, summary.written_to)
    assert got.dtype == np.float32 and len(got) == sum(case.steps)
    scoring.check_reference(case, summary.written_to, GOALS, functools.partial(case.read, summary.written_to))
    assert tree_digest(case.source) == before
    assert neighbours(case) == beside | {summary.written_to.name}  # no progress, lock or staging left


def _state(dest: Path) -> dict | None:
    try:
        return json.loads((work_dir(dest, "vlm_reward") / "progress" / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _subprocess(case: Case, scoring: Scoring, tag: str, *extra: str, delay: str = "") -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "vlmlabel",
        *cli_args(case, scoring, tag, "--checkpoint-every", "4", "--quiet", *extra),
    ]
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env(VLMLABEL_TEST_BATCH_DELAY=delay),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.subprocess
@_lifecycle(subprocesses=True)
def test_kill9_then_rerun_equals_an_uninterrupted_run(case, scoring):
    before = tree_digest(case.source)
    uninterrupted = relabel_file(request_for(case, scoring, "whole"))
    dest = case.output("killed")
    proc = _subprocess(case, scoring, "killed", delay="0.1")
    deadline = time.monotonic() + 90
    while (_state(dest) or {}).get("done", 0) < scoring.batch * 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run saved no progress in time"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not dest.exists()
    assert tree_digest(case.source) == before
    rerun = _subprocess(case, scoring, "killed")
    assert rerun.wait(timeout=120) == 0, rerun.stderr.read()
    np.testing.assert_array_equal(read_all(case, dest), read_all(case, uninterrupted.written_to))
    assert not work_dir(dest, "vlm_reward").exists()
    assert tree_digest(case.source) == before


@_lifecycle()
def test_three_shards_and_merge_equal_a_single_run(case, scoring):
    before = tree_digest(case.source)
    single = relabel_file(request_for(case, scoring, "single"))
    dest = case.output("sharded")
    for index in range(3):
        relabel_file(request_for(case, scoring, "sharded", shard=ShardSpec(index, 3)))
    part = shard_result(work_dir(dest, "vlm_reward"), ShardSpec(1, 3))
    kept = part.read_bytes()
    part.unlink()
    with pytest.raises(VlmlabelError, match="missing shard"):
        merge_shards(case.source, "vlm_reward", dest, image_key=case.image_key)
    part.write_bytes(kept)
    merged = merge_shards(case.source, "vlm_reward", dest, image_key=case.image_key)
    assert merged.shards == 3 and merged.written_to == dest
    np.testing.assert_array_equal(read_all(case, dest), read_all(case, single.written_to))
    assert not work_dir(dest, "vlm_reward").exists()
    assert tree_digest(case.source) == before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.subprocess
@_lifecycle(subprocesses=True)
def test_torchrun_two_cpu_ranks_equal_a_single_run(case, scoring):
    before = tree_digest(case.source)
    single = relabel_file(request_for(case, scoring, "single"))
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "vlmlabel",
        *cli_args(case, scoring, "torchrun"),
    ]
    done = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 shards merged" in done.stdout
    np.testing.assert_array_equal(read_all(case, case.output("torchrun")), read_all(case, single.written_to))
    assert tree_digest(case.source) == before


@_lifecycle()
def test_rerun_of_a_finished_job_exits_0_and_changes_nothing(case, scoring):
    first = runner.invoke(app, cli_args(case, scoring, "out", "--quiet"))
    assert first.exit_code == 0, first.output
    written = tree_digest(case.output("out"))
    again = runner.invoke(app, cli_args(case, scoring, "out"), terminal_width=300)
    assert again.exit_code == 0, again.output
    assert "already written" in again.output
    assert tree_digest(case.output("out")) == written
    summary = relabel_file(request_for(case, scoring, "out"))
    assert isinstance(summary, FinishedSummary)
    other = runner.invoke(
        app,
        [*cli_args(case, scoring, "out", "--quiet"), *scoring.other_options],
        terminal_width=300,
    )
    assert other.exit_code == 2 and "--overwrite" in other.output  # rewards made differently are not replaced
    assert tree_digest(case.output("out")) == written


def test_embedding_cache_serves_relabel(case, tiny_model_dir):
    before = tree_digest(case.source)
    frames = relabel_file(request_for(case, tiny_model_dir, "frames", use_cache=False))
    embedded = embed_file(
        EmbedRequest(
            source=case.source, model=str(tiny_model_dir), image_key=case.image_key, device="cpu", batch_size=BATCH
        )
    )
    assert embedded.frames >= sum(case.steps)
    cached = relabel_file(request_for(case, tiny_model_dir, "cached"))
    assert isinstance(cached, RelabelSummary) and cached.used_cache, getattr(cached, "cache_note", "")
    # float16 embeddings: rewards equal to float16 rounding.
    np.testing.assert_allclose(read_all(case, cached.written_to), read_all(case, frames.written_to), atol=2e-3)
    if case.source.suffix == ".h5":
        return  # an HDF5 file keeps its cache inside itself: embed changes it by design
    assert tree_digest(case.source) == before


@_lifecycle()
def test_evaluate_and_plot_read_the_output(case, scoring, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn_values: dict[str, np.ndarray] = {}
    original_hist = Axes.hist

    def hist(self, values, *args, **kwargs):  # the histogram of every step's reward, per reward
        drawn_values[kwargs["label"]] = np.asarray(values)
        return original_hist(self, values, *args, **kwargs)

    monkeypatch.setattr(Axes, "hist", hist)
    summary = relabel_file(request_for(case, scoring, "out"))
    dest = str(summary.written_to)
    report = runner.invoke(
        app,
        [
            "evaluate",
            dest,
            "--reward-key",
            "vlm_reward_0",
            "--against",
            case.reference_key,
            "--image-key",
            case.image_key,
            "--no-blank",
            "--json",
        ],
    )
    assert report.exit_code == 0, report.output
    parsed = json.loads(report.output)
    assert parsed["steps"] == sum(case.transitions) and parsed["episodes"] == len(case.steps)
    assert parsed["against"] == case.reference_key
    alone = runner.invoke(  # VOC needs no reference: the same figures without --against
        app, ["evaluate", dest, "--reward-key", "vlm_reward_0", "--image-key", case.image_key, "--no-blank", "--json"]
    )
    assert alone.exit_code == 0, alone.output
    vocs = [row["voc"] for row in json.loads(alone.output)["per_episode"]]
    assert vocs == [row["voc"] for row in parsed["per_episode"]] and all(v is not None for v in vocs)
    picture = tmp_path / "rewards.png"
    drawn = runner.invoke(
        app, ["plot", dest, "--reward-key", "vlm_reward", "--image-key", case.image_key, "--output", str(picture)]
    )
    assert drawn.exit_code == 0, drawn.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(drawn_values) == NAMES
    for name in NAMES:  # the plot shows each episode's own rewards: all of them, once
        np.testing.assert_array_equal(np.sort(drawn_values[name]), np.sort(case.read(summary.written_to, name)))


def _has(case: Case, dest: Path, name: str) -> bool:
    try:
        case.read(dest, name)
    except (KeyError, ValueError):  # h5py, pyarrow (ArrowInvalid), datasets: no such dataset or column
        return False
    return True


@_lifecycle()
def test_overwrite_replaces_a_whole_result(case, scoring):
    """A result of two goals, normalised (NAME_0, NAME_1 and their NAME_i_raw), replaced with --overwrite by one
    plain goal under the same --reward-key, relabelling the labelled data (HDF5: in place): nothing of the first
    result stays beside the new NAME, in the data or in any metadata that declares columns."""
    first = relabel_file(
        request_for(case, scoring, "first", formulation=scoring.formulation(GOALS, normalize=Normalize.episode))
    )
    assert isinstance(first, RelabelSummary)
    stale = [*NAMES, *(f"{n}_raw" for n in NAMES)]
    assert all(_has(case, first.written_to, name) for name in stale)
    refused = runner.invoke(
        app,
        [
            "relabel",
            str(first.written_to),
            "--goal",
            GOALS[0],
            "--model",
            str(scoring.model),
            *scoring.options,
            "--image-key",
            case.image_key,
            "--device",
            "cpu",
        ],
        terminal_width=300,
    )
    assert refused.exit_code == 2 and "--overwrite" in refused.output, refused.output  # the earlier result is there
    second = relabel_file(
        RelabelRequest(
            source=first.written_to,
            goals=GOALS[:1],
            image_key=case.image_key,
            device="cpu",
            overwrite=True,
            **scoring.request_fields(GOALS[:1]),
        )
    )
    assert isinstance(second, RelabelSummary)
    assert len(case.read(second.written_to, "vlm_reward")) == sum(case.steps)
    assert [name for name in stale if _has(case, second.written_to, name)] == []
    declared = json.dumps([_declared(second.written_to)])
    assert not any(f'"{name}' in declared for name in stale), declared


def _declared(dest: Path) -> object:
    """What a dataset's metadata says about its columns: LeRobot's features and statistics, the save_to_disk
    features, the columns of LeRobot's episode statistics."""
    found: list[object] = []
    for meta in ("meta/info.json", "meta/stats.json", "dataset_info.json"):
        found += [json.loads(p.read_text()) for p in ([dest / meta] if dest.is_dir() else []) if p.is_file()]
    if dest.is_dir():
        found += [pq.read_schema(p).names for p in sorted((dest / "meta" / "episodes").rglob("*.parquet"))]
    return found


def test_goal_images_equal_open_clip_and_the_cache_serves_them(case, tiny_model_dir, tmp_path):
    """A goal image file and a goal frame (episode 1's last frame) beside a text goal: cosines with open_clip's
    own image embeddings, frames scored or taken from the embedding cache; the source untouched."""
    before, beside = tree_digest(case.source), neighbours(case)
    goal_file = write_goal_image(tmp_path / "goal.png")
    images = [goal_images.file_goal(str(goal_file)), goal_images.frame_goal("1:-1")]
    config = RewardConfig(goals=[GOALS[0], *images], goal_images=images).validate()
    request = functools.partial(request_for, case, tiny_model_dir, align=Align.frame, formulation=config)
    scored = relabel_file(request("goal-frames", use_cache=False))
    assert isinstance(scored, RelabelSummary)
    names = ["vlm_reward_1", "vlm_reward_2"]
    got = np.stack([case.read(scored.written_to, name) for name in names], axis=1)
    goal_frame = case.frames[int(np.cumsum(case.steps)[1]) - 1]
    want = open_clip_image_cosines(tiny_model_dir, case.frames, [opened(goal_file), goal_frame])
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert tree_digest(case.source) == before
    assert neighbours(case) == beside | {scored.written_to.name}
    embed_file(
        EmbedRequest(
            source=case.source, model=str(tiny_model_dir), image_key=case.image_key, device="cpu", batch_size=BATCH
        )
    )
    cached = relabel_file(request("goal-cached"))
    assert isinstance(cached, RelabelSummary) and cached.used_cache, getattr(cached, "cache_note", "")
    from_cache = np.stack([case.read(cached.written_to, name) for name in names], axis=1)
    np.testing.assert_allclose(from_cache, got, atol=2e-3)  # float16 embeddings


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    return build_siglip_dir(tmp_path_factory.mktemp("models") / "tiny-siglip")


def test_sigmoid_equals_open_clip_through_shards_and_the_cache(case, siglip_dir):
    """--reward sigmoid: open_clip's own sigmoid(model(image, text) logits) per frame; 2 shards + merge equal the
    single run bit for bit; the embedding cache serves it; the source untouched, nothing left beside it."""
    before, beside = tree_digest(case.source), neighbours(case)
    model = f"local-dir:{siglip_dir}"
    config = RewardConfig(goals=GOALS, mode=RewardMode.sigmoid).validate()
    request = functools.partial(request_for, case, model, align=Align.frame, formulation=config)
    single = relabel_file(request("sigmoid", use_cache=False))
    assert isinstance(single, RelabelSummary)
    got = read_all(case, single.written_to)
    np.testing.assert_allclose(got, open_clip_sigmoid(siglip_dir)(case.frames, GOALS), atol=2e-3)
    dest = case.output("sigmoid-sharded")
    for index in range(2):
        relabel_file(request("sigmoid-sharded", use_cache=False, shard=ShardSpec(index, 2)))
    merge_shards(case.source, "vlm_reward", dest, image_key=case.image_key)
    np.testing.assert_array_equal(read_all(case, dest), got)
    assert tree_digest(case.source) == before
    assert neighbours(case) == beside | {single.written_to.name, dest.name}
    embed_file(EmbedRequest(source=case.source, model=model, image_key=case.image_key, device="cpu", batch_size=BATCH))
    cached = relabel_file(request("sigmoid-cached"))
    assert isinstance(cached, RelabelSummary) and cached.used_cache, getattr(cached, "cache_note", "")
    np.testing.assert_allclose(read_all(case, cached.written_to), got, atol=2e-3)  # float16 embeddings


# -- the VLM judge only ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "scoring"), [("lerobot_image", "vlm")], indirect=True)
def test_vlm_every_step_over_two_cameras(case, scoring):
    """--anchors all over two --image-key: every step of the first camera equals transformers' generate on its
    query alone; each camera's NAME_cam_SHORT column equals that camera's run alone, bit for bit, and the written
    reward is their mean; the source untouched, nothing left beside it."""
    cameras = list(case.cameras[:2])
    assert len(cameras) == 2, "this backend has two cameras"
    before, beside = tree_digest(case.source), neighbours(case)
    config = RewardConfig(goals=GOALS, judge=dataclasses.replace(VLM_JUDGE, anchors=None)).validate()
    request = functools.partial(request_for, case, scoring, align=Align.frame, formulation=config)
    both = relabel_file(request("cameras", image_key=cameras))
    assert isinstance(both, RelabelSummary)
    shorts = [short_name(key) for key in cameras]
    assert both.camera_names == [f"{name}_cam_{short}" for name in NAMES for short in shorts]
    for key, short in zip(cameras, shorts, strict=True):
        alone = relabel_file(request(f"camera-{short}", image_key=key))
        for name in NAMES:
            want = case.read(alone.written_to, f"{name}_raw")
            np.testing.assert_array_equal(case.read(both.written_to, f"{name}_cam_{short}"), want)
    for name in NAMES:
        per_camera = np.stack([case.read(both.written_to, f"{name}_cam_{short}") for short in shorts])
        np.testing.assert_allclose(case.read(both.written_to, name), per_camera.mean(axis=0), rtol=0, atol=1e-6)
    first = functools.partial(case.read, both.written_to)
    check_judged(scoring.model, config.judge, case, GOALS, lambda g: first(f"vlm_reward_{g}_cam_{shorts[0]}"))
    assert tree_digest(case.source) == before
    assert neighbours(case) == beside | {both.written_to.name, *(case.output(f"camera-{s}").name for s in shorts)}
