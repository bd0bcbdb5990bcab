"""LeRobot's reward-aligned behaviour cloning (RA-BC) trains on the progress file `vlmlabel progress` writes.

Run with the Python >= 3.12 venv that has lerobot[dataset]; vlmlabel runs in the project's interpreter:

    /work/venvs/lerobot312/bin/python tools/clients/check_lerobot_rabc.py [image|video|vlm ...]

  1. LeRobotDataset.create + add_frame / save_episode / finalize (check_lerobot.create: 4 episodes).
  2. vlmlabel relabel SRC --output OUT, then vlmlabel progress OUT --output OUT/sarm_progress.parquet (where
     LeRobot's make_sample_weighter looks when no progress_path is given), and --column progress_dense.
  3. LeRobot's own code reads it: RABCWeights (lerobot.rewards.sarm.rabc) with head_mode sparse and dense,
     and make_sample_weighter(SampleWeightingConfig(type="rabc"), dataset_root=OUT) finding the file itself.
     Its weights for DataLoader batches of LeRobotDataset(OUT) (their "index") are finite and not uniform,
     and equal to RA-BC's formula (paper Eq. 8-9) computed here from the column LeRobot loads.
  4. The file's rows: LeRobot's own index/episode_index/frame_index; progress = numpy min-max per episode of
     the reward column LeRobot loads. LeRobot main's frame-signal validator runs where the installed
     lerobot has it (lerobot.rewards.scoring; not in 0.6.1: reported as INFO).

"vlm": the same on an image dataset relabelled with --scorer vlm --context frame --normalize episode-minmax by a
tiny Qwen2-VL judge (tools/synthetic/tiny_vlm.py): RA-BC trains on the judge's progress.

Results: tools/clients/results/lerobot_rabc.json (or $CLIENTS_RESULTS).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import common
import numpy as np
from check_lerobot import CAMERA, KEY, column, create, load

CHUNK = 3  # the policy's chunk_size: RA-BC compares progress CHUNK frames apart
KAPPA, EPSILON = 0.01, 1e-6


def expected_progress(ds) -> tuple[np.ndarray, np.ndarray]:
    """LeRobot's index and the numpy min-max per episode of the reward column LeRobot loads, in index order."""
    rows = ds.hf_dataset.with_format(None)
    index = np.asarray(rows["index"]).reshape(-1)
    episode = np.asarray(rows["episode_index"]).reshape(-1)
    reward = column(ds, KEY).astype(np.float64)
    progress = np.empty_like(reward)
    for e in np.unique(episode):
        values = reward[episode == e]
        span = values.max() - values.min()
        progress[episode == e] = (values - values.min()) / span if span > 0 else 0.0
    order = np.argsort(index)
    return index[order], progress[order]


def formula_weights(index: np.ndarray, progress: np.ndarray, episode: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """RA-BC's weights (Eq. 8-9 of arXiv 2509.25358) written out from the paper, for ``batch`` indices."""
    where = {int(i): k for k, i in enumerate(index)}
    ends = {int(e): int(index[episode == e].max()) for e in np.unique(episode)}

    def delta(i: int) -> float:
        future = min(i + CHUNK, ends[int(episode[where[i]])])
        return float(progress[where[future]] - progress[where[i]])

    deltas = np.array([delta(int(i)) for i in index])
    mean, std = max(deltas.mean(), 0.0), max(deltas.std(), EPSILON)
    r = np.array([delta(int(i)) for i in batch])
    soft = np.clip((r - (mean - 2 * std)) / (4 * std + EPSILON), 0.0, 1.0)
    weights = np.where(r > KAPPA, 1.0, np.where(r >= 0, soft, 0.0))
    return weights * len(weights) / (weights.sum() + EPSILON)


def check_file(rep: common.Report, kind: str, ds, path: Path, name: str) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    types = {f.name: str(f.type) for f in table.schema}
    want = {"index": "int64", "episode_index": "int64", "frame_index": "int64", name: "float"}
    rep.check(f"{kind} {path.name}: columns and types", types == want, str(types))
    index, progress = expected_progress(ds)
    got_index = table["index"].to_numpy()
    rep.check(
        f"{kind} {path.name}: index = LeRobot's index", np.array_equal(got_index, index), f"{len(got_index)} rows"
    )
    diff = float(np.abs(table[name].to_numpy() - progress).max()) if len(got_index) == len(index) else float("nan")
    rep.check(f"{kind} {path.name}: {name} = min-max per episode of {KEY}", diff <= 1e-6, f"max |diff| {diff:.1e}")
    try:
        from lerobot.rewards.scoring.schema import validate_frame_signal_table  # LeRobot main, not 0.6.1
    except ImportError:
        rep.note(f"{kind} frame-signal validator", "lerobot.rewards.scoring is not in this lerobot release")
    else:
        validate_frame_signal_table(table)
        rep.check(f"{kind} {path.name}: LeRobot's validate_frame_signal_table accepts it", True)


def check_weights(rep: common.Report, kind: str, ds, weighter, label: str) -> None:
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    index, progress = expected_progress(ds)
    episode = np.asarray(ds.hf_dataset.with_format(None)["episode_index"]).reshape(-1)[np.argsort(index)]
    everything, worst = [], 0.0
    for batch in loader:
        weights, _ = weighter.compute_batch_weights({"index": batch["index"], "action": batch["action"]})
        weights = weights.cpu().numpy()
        everything.append(weights)
        mine = formula_weights(index, progress, episode, batch["index"].numpy())
        worst = max(worst, float(np.abs(weights - mine).max()))
    weights = np.concatenate(everything)
    rep.check(f"{kind} {label}: weights of every frame finite", bool(np.isfinite(weights).all()), f"{len(weights)}")
    rep.check(
        f"{kind} {label}: weights not uniform",
        float(weights.std()) > 1e-3,
        f"min {weights.min():.3f} max {weights.max():.3f} std {weights.std():.3f}, {int((weights == 0).sum())} zero",
    )
    rep.check(f"{kind} {label}: weights = RA-BC's formula on the file's progress", worst <= 1e-5, f"{worst:.1e}")


def check_kind(rep: common.Report, kind: str, model: Path, scorer_args: tuple[str, ...] = ()) -> None:
    import torch
    from lerobot.rewards.sarm.rabc import RABCWeights
    from lerobot.utils.sample_weighting import SampleWeightingConfig, make_sample_weighter

    work = rep.work / kind
    create("image" if kind == "vlm" else kind, work / "src", f"local/rabc_{kind}")
    out = work / "labelled"
    common.vlmlabel(
        "relabel",
        str(work / "src"),
        "--goal",
        common.GOAL,
        "--model",
        str(model),
        "--device",
        "cpu",
        "--image-key",
        CAMERA,
        *scorer_args,
        "--output",
        str(out),
    )
    sparse, dense = out / "sarm_progress.parquet", work / "dense.parquet"
    common.vlmlabel("progress", str(out), "--reward-key", KEY, "--output", str(sparse))
    common.vlmlabel("progress", str(out), "--output", str(dense), "--column", "progress_dense")
    ds = load(f"local/rabc_{kind}", out)
    check_file(rep, kind, ds, sparse, "progress_sparse")
    check_file(rep, kind, ds, dense, "progress_dense")
    cpu = torch.device("cpu")
    for path, head in ((sparse, "sparse"), (dense, "dense")):
        weighter = RABCWeights(path, chunk_size=CHUNK, head_mode=head, kappa=KAPPA, epsilon=EPSILON, device=cpu)
        rep.check(
            f"{kind} RABCWeights({path.name}, head_mode={head}) reads every frame",
            len(weighter.progress_lookup) == len(ds),
            f"{len(weighter.progress_lookup)} of {len(ds)}; stats {weighter.get_stats()}",
        )
        check_weights(rep, kind, ds, weighter, f"RABCWeights head_mode={head}")
    policy = SimpleNamespace(config=SimpleNamespace(chunk_size=CHUNK))
    config = SampleWeightingConfig(type="rabc", head_mode="sparse", kappa=KAPPA, epsilon=EPSILON)
    found = make_sample_weighter(config, policy, cpu, dataset_root=str(out))
    rep.check(
        f"{kind} make_sample_weighter finds DATASET_ROOT/sarm_progress.parquet",
        Path(found.progress_path) == sparse,
        str(found.progress_path),
    )
    check_weights(rep, kind, ds, found, "make_sample_weighter")
    reloaded = load(f"local/rabc_{kind}", out)  # the progress file at the root is no part of the data
    rep.check(f"{kind} LeRobotDataset still loads with the file at its root", len(reloaded) == len(ds), str(len(ds)))


def main() -> int:
    kinds = sys.argv[1:] or ["image", "vlm"]
    rep = common.Report("lerobot_rabc")
    import lerobot
    import torch

    rep.info.update(lerobot=getattr(lerobot, "__version__", "?"), vlmlabel_version=common.vlmlabel_version())
    torch.set_num_threads(1)
    model = common.make_tiny_model(rep.work / "tiny-clip")
    for kind in kinds:
        if kind == "vlm":  # the judge's reward (an image dataset): progress from it, RA-BC's weights
            judge = common.make_tiny_vlm(rep.work / "tiny-vlm")
            rep.guarded("vlm: check", check_kind, rep, kind, judge, common.VLM_ARGS)
        else:
            rep.guarded(f"{kind}: check", check_kind, rep, kind, model)
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
