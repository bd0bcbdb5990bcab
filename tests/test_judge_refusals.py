"""What the judge refuses, each in one line that says what to do: bad readouts and prompts, multi-token answers,
models that need remote code or have no vision tower, a model that is not there, and transformers missing.
Also what it accepts in their place: a Hub id from the local cache, and a card that names the model's files."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys

import pytest
import torch

import vlmlabel
from vlmlabel import judge as J
from vlmlabel.errors import VlmlabelError

pytest.importorskip("transformers")


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# --- readouts and prompts -------------------------------------------------------------------------------------


def test_the_options_name_the_readout():
    assert J.parse_readout(None, None, None) == J.LogProb("True")
    assert J.parse_readout("Yes", None, None) == J.LogProb("Yes")
    assert J.parse_readout(None, " False", None) == J.Ratio("True", " False")
    assert J.parse_readout(" 5", " 1", None) == J.Ratio(" 5", " 1")
    assert J.parse_readout(None, None, "1=0,2=0.25, 3=1") == J.Expected((("1", 0.0), ("2", 0.25), (" 3", 1.0)))
    for readout in (J.LogProb(" True"), J.Ratio(" True", " False"), J.Expected((("1", 0.0), ("5", 1.0)))):
        assert J.check_prompt(J.default_prompt(readout)) == J.default_prompt(readout)
    assert "1, 5" in J.default_prompt(J.Expected((("1", 0.0), ("5", 1.0))))


@pytest.mark.parametrize(
    "values, says",
    [
        ("1=0", "names one answer"),
        ("1=0,2", "is not ANSWER=VALUE"),
        ("1=0,,2=1", "is not ANSWER=VALUE"),
        ("=0,2=1", "is not ANSWER=VALUE"),
        ("1=0,2=high", "'high' is not a number"),
        ("1=0,2=nan", "not a finite number"),
        ("1=0,2=inf", "not a finite number"),
        ("1=0,1=1", "given twice"),
        ("", "is not ANSWER=VALUE"),
    ],
)
def test_bad_answer_values_are_refused(values, says):
    with pytest.raises(VlmlabelError) as excinfo:
        J.parse_readout(None, None, values)
    message = one_line(excinfo)
    assert message.startswith(f"--answer-values {values!r}") and says in message


@pytest.mark.parametrize(
    "answer, versus, values, says",
    [
        (" True", None, "1=0,2=1", "cannot be combined"),
        (None, " False", "1=0,2=1", "cannot be combined"),
        ("", None, None, "--answer is empty"),
        (" True", " True", None, "must be another answer"),
        (" True", "", None, "must be another answer"),
    ],
)
def test_readouts_that_contradict_themselves_are_refused(answer, versus, values, says):
    with pytest.raises(VlmlabelError) as excinfo:
        J.parse_readout(answer, versus, values)
    assert says in one_line(excinfo)


def test_a_prompt_without_the_goal_is_refused():
    with pytest.raises(VlmlabelError) as excinfo:
        J.check_prompt("Is the task complete? Answer True or False.")
    assert "no {goal} placeholder" in one_line(excinfo)
    assert J.check_prompt("Goal: {goal}. Done?") == "Goal: {goal}. Done?"


# --- the model ------------------------------------------------------------------------------------------------


def test_a_multi_token_answer_is_refused_naming_its_tokens(tiny_vlm, monkeypatch):
    card = J.describe_judge(str(tiny_vlm("qwen2_vl")))
    monkeypatch.setattr(J, "_load_model", lambda *a, **k: pytest.fail("weights loaded before the answers were checked"))
    readout = J.Ratio(" True", " Truthfully")
    with pytest.raises(VlmlabelError) as excinfo:
        J.load_judge(card, readout, J.default_prompt(readout), torch.device("cpu"), "fp32")
    message = one_line(excinfo)
    assert message.startswith('answer " Truthfully" is ') and "use an answer that is one token" in message
    pieces = json.loads("[" + message.split("(", 1)[1].split(")", 1)[0] + "]")
    assert len(pieces) > 1 and "".join(pieces) == " Truthfully"


def test_load_judge_refuses_a_prompt_without_the_goal(tiny_vlm):
    card = J.describe_judge(str(tiny_vlm("idefics3")))
    with pytest.raises(VlmlabelError) as excinfo:
        J.load_judge(card, J.LogProb(" True"), "Done?", torch.device("cpu"), "fp32")
    assert "no {goal} placeholder" in one_line(excinfo)


def test_weights_that_cannot_be_read_are_refused_in_one_line(tiny_vlm, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_vlm("idefics3"), folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    card = J.describe_judge(str(folder))
    with pytest.raises(VlmlabelError) as excinfo:
        J.load_judge(card, J.LogProb(" True"), "{goal}", torch.device("cpu"), "fp32")
    assert one_line(excinfo).startswith(f"model {str(folder)!r}: cannot load its weights: ")


def test_a_model_without_a_chat_template_is_refused(tiny_vlm, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny_vlm("idefics3"), folder)
    (folder / "chat_template.jinja").unlink()
    monkeypatch.setattr(J, "_load_model", lambda *a, **k: pytest.fail("weights loaded for a model it refuses"))
    with pytest.raises(VlmlabelError) as excinfo:
        J.load_judge(J.describe_judge(str(folder)), J.LogProb(" True"), "{goal}", torch.device("cpu"), "fp32")
    assert "has no chat template" in one_line(excinfo)


def test_a_model_that_needs_remote_code_is_refused_without_running_it(tmp_path):
    from tools.synthetic.tiny_vlm import build_remote_code_vlm

    folder = build_remote_code_vlm(tmp_path / "remote")
    with pytest.raises(VlmlabelError) as excinfo:
        J.describe_judge(str(folder))
    assert "needs remote code" in one_line(excinfo) and "never runs a model's own code" in str(excinfo.value)


@pytest.mark.parametrize("change", ["auto_map", "model_type"])
def test_remote_code_is_refused_by_either_sign(tiny_vlm, tmp_path, change):
    """A known model type whose config maps its classes to its own code, or a model type transformers does not
    know: either needs trust_remote_code."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_vlm("qwen2_vl"), folder)
    config = json.loads((folder / "config.json").read_text())
    if change == "auto_map":
        config["auto_map"] = {"AutoModelForImageTextToText": "modeling_mine.Mine"}
    else:
        config["model_type"] = "qwen2_vl_of_my_own"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VlmlabelError) as excinfo:
        J.describe_judge(str(folder))
    assert "needs remote code" in one_line(excinfo)
    assert ("config.json maps its classes" if change == "auto_map" else "'qwen2_vl_of_my_own'") in str(excinfo.value)


def test_a_model_without_a_vision_tower_is_refused(tmp_path):
    from tools.synthetic.tiny_vlm import build_text_only_lm

    folder = build_text_only_lm(tmp_path / "text-only")
    with pytest.raises(VlmlabelError) as excinfo:
        J.describe_judge(str(folder))
    assert "(qwen2) has no vision tower" in one_line(excinfo)


@pytest.mark.parametrize("name", ["no/such-model-in-the-cache", "not a repo id", "{tmp}/missing"])
def test_a_model_that_is_not_there_is_refused(tmp_path, monkeypatch, name):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(VlmlabelError) as excinfo:
        J.describe_judge(name.format(tmp=tmp_path))
    assert "neither a folder nor a Hub id in the local Hugging Face cache" in one_line(excinfo)


def test_a_folder_without_a_config_is_refused(tmp_path):
    with pytest.raises(VlmlabelError) as excinfo:
        J.describe_judge(str(tmp_path))
    assert "has no config.json" in one_line(excinfo)


def test_a_hub_id_is_read_from_the_local_cache(tiny_vlm, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--judge"
    shutil.copytree(tiny_vlm("qwen3_vl"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    card = J.describe_judge("tiny/judge")
    assert card.path == repo / "snapshots" / commit and card.family == "qwen3_vl" and card.takes_video
    assert card.describe() == {**J.describe_judge(str(tiny_vlm("qwen3_vl"))).describe(), "model": "tiny/judge"}


def test_the_card_names_every_file_of_the_model_by_its_hash(tiny_vlm, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_vlm("idefics3"), folder)
    (folder / "README.md").write_text("not part of the model")
    (folder / "model.safetensors.index.json").write_text("{}")  # as sharded weights have
    card = J.describe_judge(str(folder))
    files = dict(card.files)
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "chat_template.jinja"} <= set(files)
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= set(files)
    assert "README.md" not in files
    for name, digest in files.items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    json.dumps(card.describe())
    (folder / "chat_template.jinja").write_text((folder / "chat_template.jinja").read_text() + " ")
    assert J.describe_judge(str(folder)).describe() != card.describe()  # another template: another model


def test_without_transformers_the_judge_says_how_to_install_it(monkeypatch, tiny_vlm):
    folder = str(tiny_vlm("qwen2_vl"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    # both restored afterwards, so later tests (and `from vlmlabel import judge`) keep the working module
    monkeypatch.delitem(sys.modules, "vlmlabel.judge")
    monkeypatch.setattr(vlmlabel, "judge", J)
    fresh = importlib.import_module("vlmlabel.judge")
    assert fresh is not J
    with pytest.raises(VlmlabelError) as excinfo:
        fresh.describe_judge(folder)
    assert one_line(excinfo) == "--scorer vlm needs transformers: pip install 'vlmlabel[vlm]'"
    with pytest.raises(VlmlabelError):
        fresh.load_judge(J.describe_judge(folder), J.LogProb(" True"), "{goal}", torch.device("cpu"), "fp32")


def test_after_the_missing_transformers_test_the_judge_module_is_the_working_one():
    from vlmlabel import judge

    assert judge is J and sys.modules["vlmlabel.judge"] is J
