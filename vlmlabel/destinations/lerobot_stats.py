"""A reward's LeRobot statistics, computed as LeRobot computes them, so that its tools do not change them.

The algorithm of ``src/lerobot/datasets/compute_stats.py`` in lerobot 0.6.1 (read, not imported: vlmlabel
does not depend on LeRobot), for a float32 feature of shape [1]:

- per episode (``compute_episode_stats`` -> ``get_feature_stats(axis=0)``): with fewer than 2 values,
  numpy's min, max, mean and std, and every quantile equal to the mean; otherwise one
  ``RunningQuantileStats.update`` with the whole episode: min, max, mean in float32, std as
  sqrt(max(0, mean(x**2) - mean**2)) in float32, and quantiles read off a 5000-bin histogram over
  [min - 1e-10, max + 1e-10] (float32 edges), interpolated linearly inside the bin the target count falls in;
- across episodes (``aggregate_feature_stats``): min of the minima, max of the maxima, count-weighted mean,
  the parallel variance (count-weighted variances plus squared deviations of the means), and every quantile
  the count-weighted mean of the episodes' quantiles.

``recompute_stats`` and every LeRobot edit that rebuilds ``meta/stats.json`` from ``meta/episodes`` then
reproduce these values (tools/clients/check_lerobot.py checks it against the installed LeRobot). Exact
quantiles are not kept anywhere: anyone can compute them from the column, and in ``info.json`` they would
differ between two labelled datasets, which LeRobot's merge compares feature by feature.
"""

from __future__ import annotations

import numpy as np

# LeRobot's DEFAULT_QUANTILES, keyed as it keys them (f"q{int(q * 100):02d}").
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STAT_NAMES = ("min", "max", "mean", "std", "count", *QUANTILES)
BINS = 5000  # RunningQuantileStats(num_quantile_bins=5000)
PAD = np.float32(1e-10)  # widens the histogram's range; LeRobot subtracts it from a float32 minimum

Stats = dict[str, list]  # one feature's statistics as LeRobot stores them: lists of one value, count an int


def _edges(low: np.float32, high: np.float32) -> np.ndarray:
    """``np.linspace(low, high, BINS + 1)`` as numpy 2 evaluates it for float32 ends (in float32, last edge
    exactly ``high``), spelled out so that every numpy version gives the same bins."""
    step = np.subtract(high, low, dtype=np.float32) / np.float32(BINS)
    edges = np.arange(BINS + 1, dtype=np.float32) * step + low
    edges[-1] = high
    return edges


def _quantile(cumulative: np.ndarray, edges: np.ndarray, target: float) -> float:
    """``RunningQuantileStats._compute_single_quantile``: the target count located in the histogram."""
    index = int(np.searchsorted(cumulative, target))
    if index == 0:
        return float(edges[0])
    if index >= len(cumulative):
        return float(edges[-1])
    before = cumulative[index - 1]
    fraction = (target - before) / (cumulative[index] - before)
    return float(edges[index]) + float(fraction) * float(edges[index + 1] - edges[index])


def episode_stats(values: np.ndarray) -> Stats:
    """One episode's statistics (at least one value), as LeRobot's ``compute_episode_stats`` gives them.

    The arithmetic is LeRobot's, on the same shape-(1,) float32 arrays, so that even the last bits agree."""
    column = np.asarray(values, dtype=np.float32).reshape(-1, 1)
    count = len(column)
    low, high, mean = column.min(axis=0), column.max(axis=0), column.mean(axis=0)
    if count < 2:
        std = column.std(axis=0)
        quantiles = {key: float(mean[0]) for key in QUANTILES}
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            std = np.sqrt(np.maximum(np.float32(0), (column**2).mean(axis=0) - mean**2))
            edges = _edges(low[0] - PAD, high[0] + PAD)
            cumulative = np.cumsum(np.histogram(column[:, 0], bins=edges)[0].astype(np.float64))
        quantiles = {key: _quantile(cumulative, edges, q * count) for key, q in QUANTILES.items()}
    stats: Stats = {
        "min": [float(low[0])],
        "max": [float(high[0])],
        "mean": [float(mean[0])],
        "std": [float(std[0])],
        "count": [count],
    }
    stats.update({key: [value] for key, value in quantiles.items()})
    return stats


def aggregate(episodes: list[Stats]) -> Stats:
    """The dataset's statistics from its episodes' (at least one), as LeRobot's ``aggregate_stats`` gives them."""
    counts = np.array([s["count"][0] for s in episodes], dtype=np.int64)
    total = int(counts.sum())

    def column(name: str) -> np.ndarray:
        return np.array([s[name][0] for s in episodes], dtype=np.float64)

    means = column("mean")
    mean = float((means * counts).sum() / total)
    variances = column("std").astype(np.float32) ** 2  # squared in float32, as LeRobot squares its own stats
    variance = float(((variances + (means - mean) ** 2) * counts).sum() / total)
    stats: Stats = {
        "min": [float(column("min").min())],
        "max": [float(column("max").max())],
        "mean": [mean],
        "std": [float(np.sqrt(variance))],
        "count": [total],
    }
    stats.update({key: [float((column(key) * counts).sum() / total)] for key in QUANTILES})
    return stats
