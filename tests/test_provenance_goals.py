"""Goals longer than the model's context, the frame resolution `inspect` shows, and the model identity rewards
record (absolute path and sha256 of local weights; an embedding cache from other weights is ignored)."""

from __future__ import annotations

import hashlib
import json
import shutil

import h5py
import pytest
from typer.testing import CliRunner

from tests import layouts, table_layouts
from tests.conftest import build_model_dir
from vlmlabel.api import RewardModel
from vlmlabel.cli import app
from vlmlabel.errors import VlmlabelError
from vlmlabel.run.embed import EmbedRequest, embed_file
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest

runner = CliRunner()
# 'red' is one token: the tiny model (context 77) reads 75 of them between its start and end tokens.
LONG = " ".join(["red"] * 80)
CUT_A = LONG + " apples on the left"
CUT_B = LONG + " pears on the right"


def _run(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_a_goal_longer_than_the_context_is_relabelled_with_a_note_showing_the_dropped_words(
    tiny_model_dir, tmp_path, one_thread
):
    truth = layouts.build_episodes_gray(tmp_path / "g.h5")
    result = _run(
        "relabel",
        str(truth.path),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "-g",
        CUT_A,
        "-g",
        "a short goal",
        "--no-cache",
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "86 tokens, longer than the model's context of 77" in text
    assert "drops 'red red red red red apples on the left'" in text
    assert "a short goal" not in text.split("context")[0]  # only the long goal is noted


def test_two_goals_identical_after_the_cut_are_refused_in_one_line(tiny_model_dir, tmp_path, one_thread):
    truth = layouts.build_episodes_gray(tmp_path / "g.h5")
    result = _run(
        "relabel",
        str(truth.path),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "-g",
        CUT_A,
        "-g",
        CUT_B,
        "--no-cache",
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "goals 0" in result.stderr and "and 1" in result.stderr
    assert "share the first 77 tokens" in result.stderr and "shorten them" in result.stderr
    with h5py.File(truth.path) as f:  # nothing written
        assert not any("vlm_reward" in name for name in _names(f))


def test_the_python_api_warns_and_refuses_the_same_way(tiny_model_dir, one_thread):
    with pytest.warns(UserWarning, match="drops 'red red red red red apples on the left'"):
        RewardModel(model=str(tiny_model_dir), goals=[CUT_A], device="cpu")
    with pytest.raises(VlmlabelError, match="share the first 77 tokens"):
        RewardModel(model=str(tiny_model_dir), goals=[CUT_A, CUT_B], device="cpu")


def _names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visit(names.append)
    return names


def test_inspect_shows_the_resolution_of_a_save_to_disk_image_column(tmp_path):
    case = table_layouts.build_disk_image(tmp_path)
    result = _run("inspect", str(case.path))
    assert result.exit_code == 0, result.output
    assert "encoded PNG, first frame 24x32 RGB" in result.stdout, result.stdout


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_inspect_shows_the_resolution_of_a_lerobot_camera(tmp_path, video):
    case = table_layouts.build_lerobot(tmp_path, video=video)
    result = _run("inspect", str(case.path), "--image-key", case.image_key)
    assert result.exit_code == 0, result.output
    wanted = "first frame 24x32 RGB" if video else "encoded PNG, first frame 24x32 RGB"
    assert wanted in result.stdout, result.stdout


def test_written_rewards_record_the_model_folder_and_the_sha256_of_its_weights(tiny_model_dir, tmp_path, one_thread):
    truth = layouts.build_episodes_gray(tmp_path / "g.h5")
    relabel_file(
        RelabelRequest(
            source=truth.path, goals=["x"], model=f"local-dir:{tiny_model_dir}", device="cpu", use_cache=False
        )
    )
    with h5py.File(truth.path) as f:
        attrs = dict(f[truth.reward_paths[0]].attrs)
    identity = json.loads(attrs["model_identity"])
    assert identity["path"] == str(tiny_model_dir.resolve())
    weights = tiny_model_dir / "open_clip_model.safetensors"
    assert identity["sha256"]["open_clip_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert attrs["model"] == f"local-dir:{tiny_model_dir}"  # the name as the user gave it, unchanged
    assert attrs["pretrained"] == "bundled"


def test_an_embedding_cache_made_with_other_weights_at_the_same_path_is_ignored(tiny_model_dir, tmp_path, one_thread):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    truth = layouts.build_episodes_gray(tmp_path / "g.h5")
    embed_file(EmbedRequest(source=truth.path, model=str(folder), device="cpu"))
    request = RelabelRequest(source=truth.path, goals=["x"], model=str(folder), device="cpu", overwrite=True)
    assert relabel_file(request).used_cache  # the same weights: the cache serves
    build_model_dir(folder, seed=11)  # new weights, same path
    summary = relabel_file(request)
    assert not summary.used_cache
    assert "other model weights" in summary.cache_note
