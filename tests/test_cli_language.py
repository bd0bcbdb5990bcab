"""The CLI speaks one language: usage errors in one line, relabel's options in panels, --output and SOURCE."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from vlmlabel.cli import app

runner = CliRunner()
PANELS = {
    "Model": [
        "--model",
        "--pretrained",
        "--scorer",
        "--image-key",
        "--camera-reduce",
        "--device",
        "--precision",
        "--batch-size",
        "--workers",
        "--video-decoder",
        "--compile",
    ],
    "Reward": [
        "--reward",
        "--goal-image",
        "--goal-frame",
        "--goal-template",
        "--baseline",
        "--alpha",
        "--negative",
        "--threshold",
        "--shaping",
        "--gamma",
        "--normalize",
        "--align",
        "--cache",
        "--no-cache",
    ],
    "Output": ["--reward-key", "--output", "--overwrite", "--link", "--push-to-hub", "--quiet"],
    "Hugging Face": ["--split", "--revision", "--streaming"],
    "Cluster": ["--restart", "--checkpoint-every", "--num-shards", "--shard-index"],
    "VLM judge (--scorer vlm)": [
        "--prompt",
        "--answer",
        "--versus",
        "--answer-values",
        "--context",
        "--context-frames",
        "--anchors",
    ],
}


def _cli(*args: str):
    return runner.invoke(app, list(args), prog_name="vlmlabel", env={"COLUMNS": "200"})


def _panels(help_text: str) -> dict[str, list[str]]:
    """Option names per rich help panel, read from the boxes of a --help screen."""
    panels: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        title = re.match(r"\s*╭─ (.+?) ─", line)
        if title:
            current = panels.setdefault(title.group(1), [])
        elif line.lstrip().startswith("╰"):
            current = None
        elif current is not None:
            row = re.match(r"│ [ *]{0,4}(--[^<]*)<", line)  # an option's first row, not wrapped help text
            if row:
                current.extend(re.findall(r"--[a-z][a-z-]*", row.group(1)))
    return panels


USAGE_ERRORS = {
    "unknown option": (["relabel", "data.h5", "--goal", "a cup", "--foo"], ["No such option: --foo"]),
    "missing --goal": (["relabel", "data.h5"], ["Missing option", "--goal"]),
    "bad --reward choice": (
        ["relabel", "data.h5", "--goal", "a cup", "--reward", "nope"],
        ["Invalid value for '--reward'", "'nope'", "cosine"],
    ),
    "non-integer --batch-size": (
        ["relabel", "data.h5", "--goal", "a cup", "--batch-size", "many"],
        ["Invalid value for '--batch-size'"],
    ),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line_and_exit_2(case):
    args, expected = USAGE_ERRORS[case]
    result = _cli(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith("(see vlmlabel relabel --help)"), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    assert "╭" not in result.output and "Usage:" not in result.output and result.stdout == ""


def test_usage_errors_of_the_app_itself_are_one_line():
    for args, expected in ((["relabel-all"], "No such command 'relabel-all'"), (["--bogus"], "--bogus")):
        result = _cli(*args)
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
        assert expected in result.stderr and result.stderr.strip().endswith("(see vlmlabel --help)")


def test_help_version_and_bare_command_keep_their_exit_codes():
    assert _cli("--version").exit_code == 0 and "vlmlabel" in _cli("--version").stdout
    assert _cli("relabel", "--help").exit_code == 0
    bare = _cli()
    assert bare.exit_code in (0, 2) and "relabel" in bare.output and "error:" not in bare.output


def test_relabel_help_groups_options_in_panels():
    result = _cli("relabel", "--help")
    assert result.exit_code == 0
    panels = _panels(result.stdout)
    for title, options in PANELS.items():
        assert title in panels, (title, sorted(panels))
        assert sorted(panels[title]) == sorted(options), (title, panels[title])
    assert "--goal" in panels["Options"]


def test_plot_writes_to_output_and_still_takes_out(monkeypatch, tmp_path):
    help_text = _cli("plot", "--help").stdout
    assert re.search(r"--output\b", help_text)
    assert not re.search(r"--out\b(?!put)", help_text), help_text
    import vlmlabel.plot

    seen = []

    def fake_plot_file(request):
        seen.append(request.out)
        return SimpleNamespace(out=request.out, keys=["vlm_reward"], episodes=[0])

    monkeypatch.setattr(vlmlabel.plot, "plot_file", fake_plot_file)
    for name in ("--output", "--out"):
        picture = tmp_path / f"{name.strip('-')}.png"
        result = _cli("plot", str(tmp_path / "data.h5"), name, str(picture))
        assert result.exit_code == 0, result.output
        assert seen[-1] == picture
    assert _cli("plot", str(tmp_path / "data.h5")).exit_code == 0 and seen[-1] == Path("rewards.png")


def test_bench_takes_the_dataset_as_an_argument(monkeypatch, tmp_path):
    help_text = _cli("bench", "--help").stdout
    assert re.search(r"Usage: vlmlabel bench \[OPTIONS\] \[SOURCE\]", help_text), help_text
    assert not re.search(r"--source\b", help_text)
    import vlmlabel.bench

    seen = []

    def fake_run_bench(config, status):
        seen.append(config.source)
        return {"fake": True}

    monkeypatch.setattr(vlmlabel.bench, "run_bench", fake_run_bench)
    data = tmp_path / "data.h5"
    positional = _cli("bench", str(data), "--json")
    assert positional.exit_code == 0 and seen[-1] == data, positional.output
    assert positional.stdout.strip() == '{"fake": true}' and positional.stderr == ""
    old = _cli("bench", "--source", str(data), "--json")
    assert old.exit_code == 0 and seen[-1] == data, old.output
    assert "--source is deprecated" in old.stderr and old.stdout.strip() == '{"fake": true}'
    synthetic = _cli("bench", "--json")
    assert synthetic.exit_code == 0 and seen[-1] is None
    both = _cli("bench", str(data), "--source", str(tmp_path / "other.h5"))
    assert both.exit_code == 2 and len(both.stderr.strip().splitlines()) == 1, both.output


def test_console_script_usage_error_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlmlabel", "relabel", str(tmp_path / "data.h5"), "--goal", "a", "--batch-size", "many"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Invalid value for '--batch-size'"), proc.stderr
    assert lines[0].endswith("(see vlmlabel relabel --help)")
