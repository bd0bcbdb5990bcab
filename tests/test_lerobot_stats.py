"""A reward's LeRobot statistics are the numbers LeRobot's own tools compute (issue 23, item 9).

LeRobot (``lerobot/datasets/compute_stats.py``, 0.6.1) estimates each episode's quantiles from a 5000-bin
histogram over [min - 1e-10, max + 1e-10] and averages them across episodes weighted by counts; its
``recompute_stats`` and its edits rebuild ``meta/stats.json`` that way. Exact quantiles (what vlmlabel wrote
before) change there by up to a twentieth of the range. The expected values below follow LeRobot's algorithm
by hand, on rewards chosen so that they differ from exact quantiles by far more than the tolerance.
tools/clients/check_lerobot.py checks the same against the installed LeRobot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests import table_layouts
from vlmlabel.destinations import RewardColumn, destination_for
from vlmlabel.files.provenance import VERSION_ATTR
from vlmlabel.sources import Align, open_source

KEY = "vlm_reward"
# Three episodes: four values far apart (given out of order), a single value, three equal values.
REWARDS = [
    np.array([0.7001, 0.0, 1.0, 0.3001], np.float32),
    np.array([0.25], np.float32),
    np.array([0.5, 0.5, 0.5], np.float32),
]
WIDTH = 1.0 / 5000  # episode 0's histogram: 5000 bins over [0, 1] (the 1e-10 padding is far below 1e-6)

# Episode 0, cumulative counts 1 from bin 0 (0.0), 2 from bin 1500 (0.3001 = 1500.5 bins), 3 from bin 3500,
# 4 in bin 4999 (1.0, the last edge belongs to the last bin). A quantile q looks for the first bin whose
# cumulative count reaches q * 4: q01 (0.04) and q10 (0.4) stop in bin 0, whose lower edge LeRobot returns;
# q50 (2) stops in bin 1500, entered at count 1 with 1 value: its upper edge; q90 (3.6) and q99 (3.96) stop in
# bin 4999, entered at count 3 with 1 value: 0.6 and 0.96 of the way through it.
EPISODE_0 = {
    "min": 0.0,
    "max": 1.0,
    "mean": 2.0002 / 4,
    "std": float(np.std(REWARDS[0].astype(np.float64))),
    "count": 4,
    "q01": 0.0,
    "q10": 0.0,
    "q50": 1501 * WIDTH,
    "q90": 1.0 - 0.4 * WIDTH,
    "q99": 1.0 - 0.04 * WIDTH,
}
# Fewer than 2 values: numpy's statistics, every quantile the mean.
EPISODE_1 = {
    "min": 0.25,
    "max": 0.25,
    "mean": 0.25,
    "std": 0.0,
    "count": 1,
    "q01": 0.25,
    "q10": 0.25,
    "q50": 0.25,
    "q90": 0.25,
    "q99": 0.25,
}
# One value three times: every bin edge is 0.5 (the padding vanishes in float32), so is every quantile.
EPISODE_2 = {
    "min": 0.5,
    "max": 0.5,
    "mean": 0.5,
    "std": 0.0,
    "count": 3,
    "q01": 0.5,
    "q10": 0.5,
    "q50": 0.5,
    "q90": 0.5,
    "q99": 0.5,
}
EPISODES = [EPISODE_0, EPISODE_1, EPISODE_2]
# Across episodes: min of minima, max of maxima, count-weighted means (8 values in all); the count-weighted
# variance of the episodes plus that of their means is the variance of all 8 values.
DATASET = {
    "min": 0.0,
    "max": 1.0,
    "mean": (2.0002 + 0.25 + 1.5) / 8,
    "std": float(np.std(np.concatenate(REWARDS).astype(np.float64))),
    "count": 8,
    **{q: (4 * EPISODE_0[q] + 0.25 + 3 * 0.5) / 8 for q in ("q01", "q10", "q50", "q90", "q99")},
}
STATS = list(EPISODE_0)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A LeRobot folder (episodes 0 and 1 in one data file, 2 in another) given REWARDS by its writer."""
    root = tmp_path_factory.mktemp("lerobot_stats")
    case = table_layouts.build_lerobot(root, video=False, lengths=tuple(len(r) for r in REWARDS), files=(2, 1))
    with open_source(str(case.path), case.image_key) as source:
        episodes = source.episodes(Align.frame)
        destination = destination_for(source, root / "out", episodes)
        destination.check([KEY], overwrite=False)
    assert [e.steps for e in episodes] == [len(r) for r in REWARDS]
    column = RewardColumn(KEY, [r.copy() for r in REWARDS], {VERSION_ATTR: "test", "goal": "g"})
    return destination.write([column], overwrite=False, dropped=[])


def _close(got: dict, expected: dict) -> None:
    assert list(got) == STATS
    assert got["count"] == [expected["count"]] and isinstance(got["count"][0], int)
    for name in STATS:
        assert len(got[name]) == 1
        np.testing.assert_allclose(got[name][0], expected[name], rtol=0, atol=1e-6, err_msg=name)


def test_episode_stats_are_lerobots_histogram_estimates(written):
    table = pq.read_table(written / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    assert table.column("episode_index").to_pylist() == [0, 1, 2]
    for row, expected in enumerate(EPISODES):
        _close({name: table.column(f"stats/{KEY}/{name}")[row].as_py() for name in STATS}, expected)


def test_stats_json_aggregates_the_episodes_as_lerobot_does(written):
    stats = json.loads((written / "meta" / "stats.json").read_text())
    _close(stats[KEY], DATASET)
    # Not the exact quantiles of the 8 values (what recompute_stats would have moved): the median is 0.5.
    assert abs(stats[KEY]["q50"][0] - float(np.quantile(np.concatenate(REWARDS), 0.5))) > 0.1
