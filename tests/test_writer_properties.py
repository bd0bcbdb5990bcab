"""Property tests of the writers, over every storage backend: random reward names, random interruptions.

- Any reward name is either refused before anything is written (the data exactly as it was), or written so
  that the backend's own reader gives back exactly the values, with everything that was there unchanged.
- An interruption at any line of the write leaves the destination as it was or completely written, never
  half; the source byte-identical; and nothing beside them once the dead run's leftovers are cleaned.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.storage_backends import BACKENDS, Case, tree_digest
from vlmlabel import destinations
from vlmlabel.destinations import RewardColumn, destination_for
from vlmlabel.destinations.base import check_names
from vlmlabel.errors import VlmlabelError
from vlmlabel.files import atomic, holders, interrupt, journal, liveness, stamp
from vlmlabel.files.provenance import VERSION_ATTR
from vlmlabel.run.shards import dest_lock, work_dir
from vlmlabel.sources import Align, open_source

# The code an interruption may hit: every line of the writers, and of the ground floor's modules they write with.
DESTINATIONS = Path(destinations.__file__).parent
WRITING = {Path(module.__file__) for module in (atomic, journal, holders, liveness, stamp)}
# Names already in the data of some backend (frames, actions, groups, columns, LeRobot features) and edge cases.
KNOWN = [
    "actions",
    "obs",
    "observations",
    "rewards",
    "infos",
    "data",
    "terminals",
    "vlm_embedding",
    "image",
    "episode_index",
    "frame_index",
    "timestamp",
    "index",
    "task_index",
    "observation.images.top",
    "next.reward",
    "vlm_reward",
    ".",
    "..",
    "a/b",
    "",
    " ",
    "x" * 300,
    "é" * 130,
    "name\nwith newline",
    "-",
    ".hidden",
    "__index_level_0__",
]
NAMES = st.one_of(st.sampled_from(KNOWN), st.text(alphabet=string.printable + "éü漢", min_size=0, max_size=40))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, tuple[Path, Case]]:
    """Each backend built once; every example works on a fresh copy."""
    built = {}
    for name, build in BACKENDS.items():
        root = tmp_path_factory.mktemp(name)
        built[name] = (root, build(root))
    return built


def _copy(pristine_root: Path, case: Case, into: Path) -> tuple[Path, Path]:
    """The backend copied into ``into``: its source and the output a run tagged 'p' would write."""
    shutil.copytree(pristine_root, into, symlinks=True)
    return into / case.source.relative_to(pristine_root), into / case.output("p").relative_to(pristine_root)


def _write(
    source: Path, image_key: str, output: Path | None, name: str, overwrite: bool = False
) -> tuple[Path, np.ndarray]:
    """What a run's commit does, with made-up rewards: open, check every name, close, write."""
    with open_source(str(source), image_key) as opened:
        episodes = opened.episodes(Align.next)
        destination = destination_for(opened, output, episodes)
        check_names(
            [name],
            [
                work_dir(destination.path, name).name,
                dest_lock(destination.path).name,
                *atomic.staging_names(destination.path),
            ],
        )
        destination.check([name], overwrite)
    rng = np.random.default_rng(len(name))
    values = [rng.random(e.steps).astype(np.float32) for e in episodes]
    attrs = {VERSION_ATTR: "test", "formula": "made up", "goal": "g"}
    return destination.write([RewardColumn(name, values, attrs)], overwrite, []), np.concatenate(values)


def _hdf5_datasets(path: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(
            lambda key, item: (
                found.__setitem__(key, np.asarray(item[()]).tobytes()) if isinstance(item, h5py.Dataset) else None
            )
        )
    return found


def _columns(path: Path) -> dict[str, int]:
    """Column names and row counts of a table output (parquet files or a save_to_disk folder)."""
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    files = [f for f in files if "meta" not in f.relative_to(path).parts] if path.is_dir() else files
    if not files:  # save_to_disk: Arrow stream files
        import datasets

        loaded = datasets.load_from_disk(str(path))
        return {c: len(loaded) for c in loaded.column_names}
    tables = [pq.read_table(f) for f in files]
    return {c: sum(t.num_rows for t in tables) for c in tables[0].column_names}


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(name=NAMES)
def test_any_reward_name_is_refused_untouched_or_written_exactly(backend, name, pristine, tmp_path_factory):
    root, case = pristine[backend]
    work = tmp_path_factory.mktemp("example")
    source, output = _copy(root, case, work / "data")
    before = tree_digest(work)
    hdf5 = source.suffix == ".h5"
    try:
        written, values = _write(source, case.image_key, output, name)
    except VlmlabelError:
        event("refused")
        assert tree_digest(work) == before  # refused: not a byte changed, nothing added
        return
    event("written")
    np.testing.assert_array_equal(case.read(written, name), values)
    assert {k: v for k, v in tree_digest(work).items() if not k.startswith(str(written))} == before
    if hdf5:
        kept = _hdf5_datasets(written)
        assert all(kept.get(k) == v for k, v in _hdf5_datasets(source).items())
    else:
        old, new = _columns(source), _columns(written)
        assert all(new.get(c) == rows for c, rows in old.items()) and new[name] == len(values)


class Interrupted(BaseException):
    """What SIGINT raises, at a line chosen by the test."""


def _interrupt_at(line: int):
    """A tracer raising ``Interrupted`` at the ``line``-th line run inside the destination modules, as a signal
    does: one landing inside a file object h5py calls back is held (``interrupt.callback``) and raised at the
    first line run outside it."""
    seen, raised = [0], [False]

    def local(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if line and seen[0] >= line and not raised[0] and not interrupt._in_callback(frame):
                raised[0] = True
                raise Interrupted
        return local

    def tracer(frame, event, arg):
        path = Path(frame.f_code.co_filename)
        return local if path.parent == DESTINATIONS or path in WRITING else None

    return tracer, seen


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS) + ["flat_d4rl in place"])
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fraction=st.floats(0, 1))
def test_an_interruption_anywhere_in_the_write_leaves_nothing_half_written(
    backend, fraction, pristine, tmp_path_factory, monkeypatch
):
    import sys

    root, case = pristine[backend.split()[0]]
    in_place = backend.endswith("in place")
    counting = tmp_path_factory.mktemp("count")
    src, out = _copy(root, case, counting / "data")
    tracer, seen = _interrupt_at(0)
    sys.settrace(tracer)
    try:
        _write(src, case.image_key, None if in_place else out, "vlm_reward")
    finally:
        sys.settrace(None)
    lines = seen[0]  # the lines one uninterrupted write runs in the destination modules

    work = tmp_path_factory.mktemp("example")
    source, output = _copy(root, case, work / "data")
    dest = source if in_place else output
    before = tree_digest(work)
    tracer, _ = _interrupt_at(1 + int(fraction * (lines - 1)))
    sys.settrace(tracer)
    try:
        _write(source, case.image_key, None if in_place else output, "vlm_reward")
        finished = True
    except Interrupted:
        finished = False
    finally:
        sys.settrace(None)
    monkeypatch.setattr(liveness, "alive", lambda pid, start=None: False)  # the interrupted run has died
    atomic.clean_dead_leftovers(dest)
    after = tree_digest(work)
    if not in_place:
        assert {k: v for k, v in after.items() if not k.startswith(str(dest))} == before  # the source untouched
    complete = dest.exists() and _has_reward(case, dest)
    event("finished" if finished else "interrupted, then complete" if complete else "interrupted, unchanged")
    if finished or complete:
        assert complete
    elif in_place:
        assert after == before
    else:
        assert not dest.exists() and after == before


def _has_reward(case: Case, dest: Path) -> bool:
    try:
        return len(case.read(dest, "vlm_reward")) == sum(case.steps)
    except Exception:  # any failure to read it back means it is not there
        return False
