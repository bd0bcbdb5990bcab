"""`--output FILE --link` on HDF5: a labels file with the rewards, the source's groups and attributes, and
every other dataset reached through an external link. No copy of the frames; the same rewards; the source
untouched; the two files may move together."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tests import layouts
from tests.storage_backends import tree_digest
from vlmlabel.cli import app
from vlmlabel.files.provenance import LINKED_ATTR

runner = CliRunner()


def _everything(path) -> dict[str, object]:
    """What a reader sees walking the file by name, links followed: every dataset's bytes, every group's attrs."""
    found: dict[str, object] = {}

    def walk(group: h5py.Group) -> None:  # a labels file's record of the file it links to aside
        found[group.name] = repr(sorted((k, v) for k, v in group.attrs.items() if k != LINKED_ATTR))
        for name in group:
            item = group[name]
            if isinstance(item, h5py.Group):
                walk(item)
            else:
                found[f"{group.name}/{name}"] = (np.asarray(item[()]).tobytes(), repr(sorted(dict(item.attrs))))

    with h5py.File(path, "r") as handle:
        walk(handle)
    return found


@pytest.mark.parametrize("builder", [layouts.build_robomimic, layouts.build_minari, layouts.build_flat_d4rl])
def test_labels_file_holds_the_rewards_and_links_to_everything_else(builder, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    truth = builder(data / "d.h5")
    with h5py.File(truth.path, "a") as f:
        f.attrs["env_args"] = "{}"
    before = tree_digest(data)
    args = ["relabel", str(truth.path), "--goal", "a red cube", "--model", str(tiny_model_dir), "--device", "cpu", "-q"]
    copied = runner.invoke(app, args + ["--output", str(tmp_path / "copy.h5")])
    (tmp_path / "labels").mkdir()
    labels = tmp_path / "labels" / "d-labels.h5"
    linked = runner.invoke(app, args + ["--output", str(labels), "--link"])
    assert copied.exit_code == 0 and linked.exit_code == 0, (copied.output, linked.output)
    assert tree_digest(data) == before
    assert labels.stat().st_size < truth.path.stat().st_size / 2  # the frames were not copied
    assert _everything(labels) == _everything(tmp_path / "copy.h5")  # what a reader sees, rewards included
    again = runner.invoke(app, args + ["--output", str(labels), "--link"])
    assert again.exit_code == 0 and "already written" in again.output
    report = runner.invoke(app, ["evaluate", str(labels), "--against", "rewards", "--no-blank", "--json"])
    assert report.exit_code == 0, report.output
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(data, moved / "data")
    shutil.move(tmp_path / "labels", moved / "labels")
    assert _everything(moved / "labels" / "d-labels.h5") == _everything(tmp_path / "copy.h5")
