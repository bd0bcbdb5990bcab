"""Read-side commands are as strict as relabel: `evaluate` and `plot` on a labelled dataset that was edited or
damaged exit 2 with one line, never a traceback, never a silent number or drawing, and write no picture.

Each storage format is labelled once (a normalised reward, so its raw scores are written too); each case edits
a copy the way a user's tool or a damaged file could, then runs both commands on it. `--split` selects the split
of a labelled DatasetDict (and reaches a Hub dataset) as in relabel.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests import table_layouts
from tests.storage_backends import BACKENDS, Case
from vlmlabel.cli import app
from vlmlabel.files.provenance import PROVENANCE_KEY
from vlmlabel.formulation import RewardConfig
from vlmlabel.rewards import Normalize
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest

runner = CliRunner()
GOAL = "a red cube on the table"
REWARD, RAW = "vlm_reward", "vlm_reward_raw"

pytestmark = pytest.mark.usefixtures("one_thread")

# format tags: every HDF5 layout, the flat one, those with one group per episode, and the tables
FORMATS = {
    "flat_d4rl": {"hdf5", "flat"},
    "robomimic": {"hdf5", "groups"},
    "minari": {"hdf5", "groups"},
    "parquet": {"table"},
    "save_to_disk": {"table"},
    "lerobot_image": {"table"},
}


# -- a labelled copy and how to edit what it stores ---------------------------------------------------------


@dataclass
class Labelled:
    path: Path
    reference_key: str
    hdf5: bool

    def edit_values(self, name: str, edit: Callable[[np.ndarray, bool], np.ndarray]) -> None:
        """Each stored array of ``name`` (an episode's dataset, a table file's column) replaced by ``edit(values,
        first)``; ``first`` is true for one of them only."""
        if self.hdf5:
            with h5py.File(self.path, "r+") as handle:
                for index, where in enumerate(_datasets(handle, name)):
                    attrs = dict(handle[where].attrs)
                    values = edit(handle[where][()], index == 0)
                    del handle[where]
                    handle[where] = values
                    handle[where].attrs.update(attrs)
            return
        for index, (path, table) in enumerate(_tables_with(self.path, name)):
            column = table.schema.get_field_index(name)
            values = edit(table.column(name).to_numpy().astype(np.float32), index == 0)
            array = pa.array(
                list(values) if values.ndim > 1 else values, type=pa.list_(pa.float32()) if values.ndim > 1 else None
            )
            kept = table.schema.field(name)
            _write_table(path, table.set_column(column, kept.with_type(array.type), array))

    def edit_attrs(self, name: str, edit: Callable[[dict, bool], dict]) -> None:
        """The provenance of ``name`` replaced by ``edit(attrs, first)`` wherever it is stored."""
        if self.hdf5:
            with h5py.File(self.path, "r+") as handle:
                for index, where in enumerate(_datasets(handle, name)):
                    attrs = edit(dict(handle[where].attrs), index == 0)
                    handle[where].attrs.clear()
                    for key, value in attrs.items():  # text that is not UTF-8 is stored as the bytes it escapes
                        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
                        handle[where].attrs.create(
                            key, raw, dtype=h5py.string_dtype() if isinstance(value, str) else None
                        )
            return
        for index, (path, table) in enumerate(_tables_with(self.path, name)):
            column = table.schema.get_field_index(name)
            kept = table.schema.field(name)
            attrs = edit(json.loads(kept.metadata[PROVENANCE_KEY]), index == 0)
            recorded = kept.with_metadata({**kept.metadata, PROVENANCE_KEY: json.dumps(attrs).encode()})
            _write_table(path, table.set_column(column, recorded, table.column(name)))


def _datasets(handle: h5py.File, name: str) -> list[str]:
    found: list[str] = []
    handle.visititems(
        lambda path, item: (
            found.append(path) if isinstance(item, h5py.Dataset) and path.split("/")[-1] == name else None
        )
    )
    return sorted(found)


def _tables_with(root: Path, name: str) -> list[tuple[Path, pa.Table]]:
    """The data files under ``root`` whose tables have the column ``name`` (not LeRobot's meta/ files)."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow"))
    tables = [(path, _read_table(path)) for path in files]
    return [(path, table) for path, table in tables if name in table.column_names]


def _read_table(path: Path) -> pa.Table:
    if path.suffix == ".arrow":
        return pa.ipc.open_stream(pa.py_buffer(path.read_bytes())).read_all()
    return pq.read_table(path)


def _write_table(path: Path, table: pa.Table) -> None:
    if path.suffix == ".arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        pq.write_table(table, path)


@pytest.fixture(scope="module")
def labelled_templates(tmp_path_factory, tiny_model_dir) -> dict[str, Labelled]:
    """Each format labelled once: the normalised reward and its raw scores."""
    made = {}
    for name in FORMATS:
        root = tmp_path_factory.mktemp(name)
        case: Case = BACKENDS[name](root)
        out = case.output("labelled")
        relabel_file(
            RelabelRequest(
                source=case.source,
                goals=[GOAL],
                model=str(tiny_model_dir),
                device="cpu",
                image_key=case.image_key,
                output=out,
                workers=0,
                formulation=RewardConfig(goals=[GOAL], normalize=Normalize.dataset),
            )
        )
        made[name] = Labelled(out, case.reference_key, "hdf5" in FORMATS[name])
    return made


@pytest.fixture()
def labelled(request, labelled_templates, tmp_path) -> tuple[str, Labelled]:
    name = request.param
    template = labelled_templates[name]
    copy = tmp_path / "labelled" / template.path.name
    copy.parent.mkdir()
    if template.path.is_dir():
        shutil.copytree(template.path, copy)
    else:
        shutil.copy2(template.path, copy)
    return name, Labelled(copy, template.reference_key, template.hdf5)


def _evaluate(data: Labelled, tmp_path: Path):
    return runner.invoke(
        app, ["evaluate", str(data.path), "--against", data.reference_key, "--no-blank"], terminal_width=400
    )


def _plot(data: Labelled, tmp_path: Path):
    return runner.invoke(app, ["plot", str(data.path), "--output", str(tmp_path / "picture.png")], terminal_width=400)


COMMANDS = {"evaluate": _evaluate, "plot": _plot}


# -- the cases ----------------------------------------------------------------------------------------------


def _set(values: dict) -> Callable[[dict, bool], dict]:
    return lambda attrs, first: {**attrs, **values}


def _spec(edit: Callable[[dict], object]) -> Callable[[dict, bool], dict]:
    return lambda attrs, first: {**attrs, "reward_spec": json.dumps(edit(json.loads(attrs["reward_spec"])))}


def _first(edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, bool], np.ndarray]:
    return lambda values, first: edit(values.copy()) if first else values


def _one_inf(values: np.ndarray) -> np.ndarray:
    values[-1] = np.inf
    return values


@dataclass
class Hostile:
    """An edit of a labelled copy, the words the one line must hold, and the formats it applies to."""

    edit: Callable[[Labelled], None]
    words: list[str]
    formats: set[str] = field(default_factory=lambda: {"hdf5", "table"})


HOSTILE: dict[str, Hostile] = {
    "align attribute edited": Hostile(
        lambda d: d.edit_attrs(REWARD, _set({"align": "sideways"})), ["align attribute", "'sideways'", "relabel"]
    ),
    "align attribute not text": Hostile(
        lambda d: d.edit_attrs(REWARD, _set({"align": 3})), ["align attribute", "3"], {"hdf5"}
    ),
    "an infinite reward": Hostile(
        lambda d: d.edit_values(REWARD, _first(_one_inf)), ["'vlm_reward'", "1 NaN or infinite"]
    ),
    "every reward NaN": Hostile(
        lambda d: d.edit_values(REWARD, lambda v, first: np.full_like(v, np.nan)), ["'vlm_reward'", "NaN or infinite"]
    ),
    "2-D rewards": Hostile(
        lambda d: d.edit_values(REWARD, lambda v, first: np.stack([v, v], axis=1)),
        ["'vlm_reward'", "not one number per step"],
    ),
    "text instead of numbers": Hostile(
        lambda d: d.edit_values(REWARD, lambda v, first: v.astype("S" if d.hdf5 else str)),
        ["'vlm_reward'", "not one number per step"],
    ),
    "an episode's reward one value short": Hostile(
        lambda d: d.edit_values(REWARD, _first(lambda v: v[:-1])), ["'vlm_reward'", "values in", "frames"], {"groups"}
    ),
    "an episode's reward one value too long": Hostile(
        lambda d: d.edit_values(REWARD, _first(lambda v: np.append(v, v[-1]))),
        ["'vlm_reward'", "values in", "frames"],
        {"groups"},
    ),
    "a flat reward one row short": Hostile(
        lambda d: d.edit_values(REWARD, _first(lambda v: v[:-1])), ["vlm_reward has", "rows but the frames"], {"flat"}
    ),
    "a flat reward one row too long": Hostile(
        lambda d: d.edit_values(REWARD, _first(lambda v: np.append(v, v[-1]))),
        ["vlm_reward has", "rows but the frames"],
        {"flat"},
    ),
    "reward_spec not JSON": Hostile(
        lambda d: d.edit_attrs(REWARD, _set({"reward_spec": "{not json"})), ["reward_spec", "damaged", "relabel"]
    ),
    "reward_spec a JSON list": Hostile(
        lambda d: d.edit_attrs(REWARD, _set({"reward_spec": "[1, 2]"})), ["reward_spec", "damaged", "not an object"]
    ),
    "reward_spec with a number as text": Hostile(
        lambda d: d.edit_attrs(REWARD, _spec(lambda s: {**s, "gamma": "x"})), ["reward_spec", "damaged", "gamma"]
    ),
    "reward_spec with an unknown formula": Hostile(
        lambda d: d.edit_attrs(REWARD, _spec(lambda s: {**s, "reward": "sine"})), ["reward_spec", "damaged", "sine"]
    ),
    "reward_spec without its goal": Hostile(
        lambda d: d.edit_attrs(REWARD, _spec(lambda s: {k: v for k, v in s.items() if k != "goal"})),
        ["reward_spec", "damaged", "goal"],
    ),
    "reward_spec out of range": Hostile(
        lambda d: d.edit_attrs(REWARD, _spec(lambda s: {**s, "gamma": 7})), ["reward_spec", "damaged", "gamma"]
    ),
    "goal attribute not UTF-8": Hostile(
        lambda d: d.edit_attrs(REWARD, _set({"goal": "\udcff\udcfe"})), ["'goal' attribute", "not UTF-8"]
    ),
    "raw_key naming nothing": Hostile(
        lambda d: d.edit_attrs(REWARD, _set({"raw_key": "gone"})), ["raw scores 'gone'", "missing"]
    ),
    "raw_key naming the reward itself": Hostile(
        lambda d: d.edit_attrs(REWARD, _set({"raw_key": REWARD})), ["raw_key", "names no other reward"]
    ),
    "raw scores infinite": Hostile(
        lambda d: d.edit_values(RAW, _first(_one_inf)), ["raw scores 'vlm_reward_raw'", "NaN or infinite"]
    ),
    "provenance differs between episodes": Hostile(
        lambda d: d.edit_attrs(REWARD, lambda attrs, first: {**attrs, "align": "frame"} if first else attrs),
        ["another provenance", "align"],
        {"groups"},
    ),
}

CASES = [(case, name) for case, hostile in HOSTILE.items() for name, tags in FORMATS.items() if hostile.formats & tags]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(("case", "labelled"), CASES, indirect=["labelled"])
def test_hostile_labelled_data_is_refused_in_one_line(case, labelled, command, tmp_path):
    name, data = labelled
    HOSTILE[case].edit(data)
    result = COMMANDS[command](data, tmp_path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in HOSTILE[case].words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "picture.png").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("labelled", sorted(FORMATS), indirect=True)
def test_untouched_copy_is_evaluated_and_drawn(labelled, command, tmp_path):
    """The control: every case above fails by its edit alone."""
    _, data = labelled
    result = COMMANDS[command](data, tmp_path)
    assert result.exit_code == 0, result.output
    assert command == "evaluate" or (tmp_path / "picture.png").stat().st_size > 1000


# -- --split ------------------------------------------------------------------------------------------------


def test_split_of_a_labelled_dataset_dict(tmp_path, tiny_model_dir):
    case = table_layouts.build_dict_split(tmp_path)  # `test` holds the episodes, `train` three other frames
    out = tmp_path / "dict-vlmlabel"
    relabel_file(
        RelabelRequest(
            source=case.path, goals=[GOAL], model=str(tiny_model_dir), device="cpu", split="test", output=out, workers=0
        )
    )
    evaluated = runner.invoke(
        app,
        ["evaluate", str(out), "--split", "test", "--against", "frame_index", "--no-blank", "--json"],
        terminal_width=400,
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["steps"] == len(case.frames)
    picture = tmp_path / "test.png"
    drawn = runner.invoke(app, ["plot", str(out), "--split", "test", "--output", str(picture)])
    assert drawn.exit_code == 0, drawn.output
    with Image.open(picture) as image:
        assert image.size[0] > 0
    for command, extra in (
        ("evaluate", ["--no-blank", "--against", "frame_index"]),
        ("plot", ["--output", str(tmp_path / "train.png")]),
    ):
        train = runner.invoke(app, [command, str(out), *extra], terminal_width=400)  # default train: not labelled
        assert train.exit_code == 2 and "unknown reward key 'vlm_reward'" in train.output, train.output
        other = runner.invoke(app, [command, str(out), "--split", "validation", *extra], terminal_width=400)
        assert other.exit_code == 2 and len(other.output.strip().splitlines()) == 1, other.output
        assert "has splits train, test, not 'validation'" in other.output
    assert not (tmp_path / "train.png").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_split_reaches_a_hub_dataset(command, tmp_path, monkeypatch):
    """A Hub id is opened with the split asked for (offline here, so its loading fails and says so)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    extra = ["--no-blank"] if command == "evaluate" else ["--output", str(tmp_path / "p.png")]
    result = runner.invoke(app, [command, "lab/no-such-dataset", "--split", "test", *extra], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "(split 'test')" in result.output, result.output
