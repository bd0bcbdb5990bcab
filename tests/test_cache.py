"""The embedding cache: embed once, relabel from it with the same rewards; never misuse another model's cache."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests import layouts, table_layouts
from tests.conftest import TINY_CFG, build_model_dir
from vlmlabel import cache
from vlmlabel.cli import app
from vlmlabel.destinations.hdf5 import H5Dataset, RowStream, write_file
from vlmlabel.errors import OutputError
from vlmlabel.events import Events
from vlmlabel.formulation import RewardConfig
from vlmlabel.model import load_model
from vlmlabel.rewards import RewardMode
from vlmlabel.run.embed import EmbedRequest, embed_file
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import FinishedSummary, RelabelRequest
from vlmlabel.sources import Align, open_source
from vlmlabel.sources.base import content_fingerprint

runner = CliRunner()
# Cached embeddings are float16: scores differ from the fp32 path by rounding only.
FP16_ATOL = 3e-3


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("other") / "other-clip", seed=7)


def _rewards(path, paths):
    with h5py.File(path) as f:
        return [f[p][:] for p in paths], dict(f[paths[0]].attrs)


def _request(truth, model_dir, align, **kwargs):
    config = RewardConfig(goals=["a red block"], mode=RewardMode.contrastive, negatives=["a blue block"])
    return RelabelRequest(
        source=truth.path,
        goals=config.goals,
        model=str(model_dir),
        device="cpu",
        align=align,
        formulation=config,
        overwrite=True,
        **kwargs,
    )


def test_cached_rewards_equal_rewards_from_frames(layout_file, tiny_model_dir):
    truth = layout_file
    from_frames = {}
    for align in Align:
        fresh = relabel_file(_request(truth, tiny_model_dir, align, use_cache=False))
        from_frames[align], attrs = _rewards(truth.path, truth.reward_paths)
        assert not fresh.used_cache and attrs["embeddings"] == "frames"
    with open_source(str(truth.path)) as source:
        before = {a: [(e.steps, e.frames) for e in source.episodes(a)] for a in Align}

    embedded = embed_file(EmbedRequest(source=truth.path, model=str(tiny_model_dir), device="cpu", batch_size=4))
    assert embedded.frames >= sum(truth.steps)
    for align in Align:  # one cache serves both alignments
        summary = relabel_file(_request(truth, tiny_model_dir, align))
        assert summary.used_cache and summary.cache_note == "using cached embeddings"
        from_cache, attrs = _rewards(truth.path, truth.reward_paths)
        assert attrs["embeddings"] == "cache" and attrs["align"] == align.value
        for cached, scored in zip(from_cache, from_frames[align]):
            np.testing.assert_allclose(cached, scored, atol=FP16_ATOL)
    with open_source(str(truth.path)) as source:  # the cache changes nothing a reader sees
        assert {a: [(e.steps, e.frames) for e in source.episodes(a)] for a in Align} == before


def test_cache_stores_unit_float16_rows_with_identity(tiny_model_dir, tmp_path):
    truth = layouts.build_minari(tmp_path / "m.h5")
    embed_file(EmbedRequest(source=truth.path, model=str(tiny_model_dir), device="cpu"))
    with h5py.File(truth.path) as f:
        cached = f["episode_0/vlm_embedding/observations"]
        assert cached.dtype == np.float16 and cached.shape == (layouts.LENGTHS[0] + 1, TINY_CFG["embed_dim"])
        norms = np.linalg.norm(cached[:].astype(np.float32), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)
        assert cached.attrs["model"] == str(tiny_model_dir) and cached.attrs["image_key"] == "observations"
        assert cached.attrs["rows"] == "all" and "mean" in cached.attrs["preprocess"]


def test_next_observation_rows_are_stored_sparsely(tiny_model_dir, tmp_path):
    truth = layouts.build_flat_d4rl(tmp_path / "d.h5")
    embed_file(EmbedRequest(source=truth.path, model=str(tiny_model_dir), device="cpu"))
    with h5py.File(truth.path) as f:
        assert f["vlm_embedding/observations"].shape[0] == sum(layouts.LENGTHS)
        rows = f["vlm_embedding/next_observations__rows"][:]
        np.testing.assert_array_equal(rows, np.cumsum(layouts.LENGTHS) - 1)  # each episode's last step
        assert f["vlm_embedding/next_observations"].shape[0] == len(layouts.LENGTHS)


def test_the_cache_lies_where_earlier_versions_put_it_and_is_found_there(tiny_model_dir, tmp_path):
    """Inside each episode group of an HDF5 file; under the split in the file beside a split dataset. ``find``
    says why nothing serves a run (``CacheMiss``) until ``embed`` has run, then matches every frame array."""
    robomimic = layouts.build_robomimic(tmp_path / "r.h5")
    split = table_layouts.build_dict_split(tmp_path)
    model = load_model(str(tiny_model_dir), None, "cpu", "fp32")
    cases = [(robomimic.path, "train", "data/demo_0/vlm_embedding/obs/agentview_image", robomimic.path)]
    cases.append((split.path, "test", "vlm_embedding/test/image", tmp_path / "dict.vlmlabel-cache.h5"))
    for path, name, first, cache_file in cases:
        with open_source(str(path), split=name) as source:
            missed = cache.find(source, source.episodes(Align.next), model, content_fingerprint(source))
        assert missed == cache.CacheMiss("no embedding cache (run `vlmlabel embed` to make one)")
        summary = embed_file(EmbedRequest(source=path, model=str(tiny_model_dir), device="cpu", split=name))
        assert summary.written_to == cache_file and summary.locations[0] == first
        with h5py.File(cache_file) as f:
            assert f[first].dtype == np.float16 and f[first].attrs["rows"] == "all"
        with open_source(str(path), split=name) as source:
            episodes = source.episodes(Align.next)
            match = cache.find(source, episodes, model, content_fingerprint(source))
            assert isinstance(match, cache.CacheMatch)
            assert {s.array for e in episodes for s in e.frames} == set(match.locations)
            assert match.locations[episodes[0].frames[0].array][0] == first


def test_cache_of_another_model_is_ignored(tiny_model_dir, other_model_dir, tmp_path):
    truth = layouts.build_robomimic(tmp_path / "r.h5")
    embed_file(EmbedRequest(source=truth.path, model=str(other_model_dir), device="cpu"))
    summary = relabel_file(_request(truth, tiny_model_dir, Align.frame))
    assert not summary.used_cache and "ignored" in summary.cache_note
    mine, _ = _rewards(truth.path, truth.reward_paths)
    relabel_file(_request(truth, other_model_dir, Align.frame))
    theirs, _ = _rewards(truth.path, truth.reward_paths)
    assert max(np.abs(a - b).max() for a, b in zip(mine, theirs)) > 10 * FP16_ATOL  # the models really differ
    relabel_file(_request(truth, tiny_model_dir, Align.frame, use_cache=False))
    again, _ = _rewards(truth.path, truth.reward_paths)
    for a, b in zip(mine, again):
        np.testing.assert_array_equal(a, b)
    embed_file(EmbedRequest(source=truth.path, model=str(tiny_model_dir), device="cpu"))  # replaces the cache
    assert relabel_file(_request(truth, tiny_model_dir, Align.frame)).used_cache
    cached, _ = _rewards(truth.path, truth.reward_paths)
    for a, b in zip(mine, cached):
        np.testing.assert_allclose(a, b, atol=FP16_ATOL)


def test_cli_embed_then_relabel_says_it_used_the_cache(tiny_model_dir, tmp_path):
    truth = layouts.build_episodes_gray(tmp_path / "g.h5")
    run = lambda *args: runner.invoke(app, list(args), env={"COLUMNS": "200"})  # noqa: E731
    embedded = run("embed", str(truth.path), "--model", str(tiny_model_dir), "--device", "cpu")
    assert embedded.exit_code == 0, embedded.output
    assert "embeddings of dim 32" in embedded.stdout
    relabelled = run("relabel", str(truth.path), "--model", str(tiny_model_dir), "--device", "cpu", "-g", "x")
    assert relabelled.exit_code == 0, relabelled.output
    assert "using cached embeddings" in relabelled.stdout
    bad = run("relabel", str(truth.path), "--model", str(tiny_model_dir), "-g", "x", "--reward", "softmax")
    assert bad.exit_code == 2 and bad.stderr.strip().count("\n") == 0 and "--negative" in bad.stderr
    alpha = run("relabel", str(truth.path), "-g", "x", "--reward", "projection", "--baseline", "b", "--alpha", "2")
    assert alpha.exit_code == 2 and "--alpha must be in [0, 1]" in alpha.stderr


def test_row_stream_fills_datasets_chunk_by_chunk_and_refuses_a_short_stream(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("keep", data=np.arange(3))
    before = path.read_bytes()
    rows = np.arange(23 * 4, dtype=np.float32).reshape(23, 4)
    targets = [
        H5Dataset("a/e", np.empty(0), {"k": 1}, dtype="float16", chunk_rows=4),
        H5Dataset("b/e", np.empty(0), {}, dtype="float16", chunk_rows=4),
    ]
    blocks = (rows[i : i + 3] for i in range(0, 23, 3))  # block edges never meet chunk edges
    stream = RowStream(targets, [10, 13], blocks)
    write_file(path, path, [], overwrite=False, stream=stream)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["a/e"][:], rows[:10])
        np.testing.assert_array_equal(f["b/e"][:], rows[10:])
        assert f["a/e"].chunks == (4, 4) and f["a/e"].attrs["k"] == 1 and stream.width == 4
    before = path.read_bytes()
    short = RowStream([H5Dataset("c", np.empty(0), {}, dtype="float16", chunk_rows=4)], [30], iter([rows]))
    with pytest.raises(OutputError, match="did not match"):
        write_file(path, path, [], overwrite=False, stream=short)
    assert path.read_bytes() == before  # nothing half-written


def test_a_relabel_served_by_the_cache_loads_the_text_tower_only(tmp_path, tiny_model_dir, other_model_dir):
    truth = layouts.build_robomimic(tmp_path / "r.h5")
    embed_file(EmbedRequest(source=truth.path, model=str(tiny_model_dir), device="cpu", batch_size=4))
    whole = relabel_file(_request(truth, tiny_model_dir, Align.next, use_cache=False))
    from_frames, _ = _rewards(truth.path, truth.reward_paths)
    served = relabel_file(_request(truth, tiny_model_dir, Align.next))
    assert served.used_cache and not served.model.has_image_tower and whole.model.has_image_tower
    from_cache, _ = _rewards(truth.path, truth.reward_paths)
    for cached, scored in zip(from_cache, from_frames):
        np.testing.assert_allclose(cached, scored, atol=FP16_ATOL)
    # Another model's cache does not serve the run: it loads whole and scores the frames.
    other = relabel_file(_request(truth, other_model_dir, Align.next))
    assert not other.used_cache and other.model.has_image_tower


def test_each_plan_loads_the_model_at_most_once(tmp_path, tiny_model_dir, other_model_dir, monkeypatch):
    """The plan is made before any model loads: frames load the whole model once, the cache its text tower once
    (also when rewards of another run are there), a rerun of written rewards loads nothing."""
    from vlmlabel.run import score

    loads: list[bool] = []
    load = score.load_model

    def counted(*args, **kwargs):
        model = load(*args, **kwargs)
        loads.append(model.has_image_tower)
        return model

    monkeypatch.setattr(score, "load_model", counted)
    truth = layouts.build_robomimic(tmp_path / "r.h5")
    embed_file(EmbedRequest(source=truth.path, model=str(tiny_model_dir), device="cpu", batch_size=4))
    loads.clear()  # embed's own load
    relabel_file(_request(truth, tiny_model_dir, Align.next, use_cache=False))
    assert loads == [True]
    served = relabel_file(_request(truth, tiny_model_dir, Align.next))  # rewards of another result there
    assert served.used_cache and loads == [True, False]
    assert isinstance(relabel_file(_request(truth, tiny_model_dir, Align.next)), FinishedSummary)
    assert loads == [True, False]
    other = relabel_file(_request(truth, other_model_dir, Align.next))  # its cache is not this model's
    assert not other.used_cache and other.cache_note.startswith("embedding cache at")
    assert loads == [True, False, True]


@pytest.mark.parametrize(
    "storage",
    ["gzip chunks, one frame edited", "lzf chunks (robomimic), one frame edited", "uncompressed, channels swapped"],
)
def test_frames_edited_in_place_after_embed_invalidate_the_cache(storage, tmp_path, tiny_model_dir):
    """Fixing frames in the file after `embed` (one bad frame, BGR to RGB) must not leave stale cached rewards."""
    frames = layouts.make_frames(60, 16, 20, seed=21)
    path = tmp_path / "d.h5"
    if storage.startswith("lzf"):
        layouts.build_robomimic(path)
        array, row = "data/demo_1/obs/agentview_image", 3  # not the first frame of any episode: never sampled
    else:
        with h5py.File(path, "w") as f:
            options = dict(chunks=(4, 16, 20, 3), compression="gzip") if storage.startswith("gzip") else {}
            f.create_dataset("observations", data=frames, **options)
            f.create_dataset("terminals", data=np.arange(60) % 10 == 9)
        array, row = "observations", 37
    embed_file(EmbedRequest(source=path, model=str(tiny_model_dir), device="cpu"))
    with h5py.File(path, "r+") as f:
        if storage.startswith("uncompressed"):
            f[array][...] = f[array][()][..., ::-1]
        else:
            f[array][row] = 255 - f[array][row]
    notes: list[str] = []
    summary = relabel_file(
        RelabelRequest(source=path, goals=["a red block"], model=str(tiny_model_dir), device="cpu"),
        events=Events(on_note=notes.append),
    )
    assert not summary.used_cache and "made from other frames" in summary.cache_note, summary.cache_note
