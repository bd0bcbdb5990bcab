"""LeRobot (v3.0 datasets) reads vlmlabel's output and keeps the reward through its own editing tools.

Run with the Python >= 3.12 venv that has lerobot[dataset]; vlmlabel itself runs in the project's
interpreter (Python 3.11) through common.vlmlabel, as a user would run the command:

    /work/venvs/lerobot312/bin/python tools/clients/check_lerobot.py [image|video|vlm ...]

For each storage kind ("image": PNG frames in parquet; "video": mp4 encoded by LeRobot through PyAV):
  1. LeRobotDataset.create(...) + add_frame / save_episode / finalize: 4 episodes (6, 8, 5, 7 frames),
     camera observation.images.front 64x96, observation.state, action, fps 10.
  2. vlmlabel relabel SRC --output OUT1 (default --align next, key vlm_reward), then
     vlmlabel relabel OUT1 --output OUT2 --align frame --reward-key vlm_frame (a relabel of a relabel).
  3. LeRobotDataset(repo_id, root=OUT2): features (float32, shape [1], info provenance), the column
     values against open_clip's own scores of the frames LeRobot decodes (next: frame t+1, the episode's
     last step its own frame; frame: frame t), ds[i] and a torch DataLoader batch, meta/stats.json (min,
     max, mean, std, count, q01 q10 q50 q90 q99) against the column, meta/episodes stats/<key>/* columns;
     every statistic, per episode and in stats.json, equal within 1e-4 to what LeRobot's own
     compute_episode_stats and aggregate_stats give for the column (histogram quantiles), and LeRobot's
     aggregate_stats over the written per-episode stats equal to stats.json.
  4. LeRobot's editing tools on OUT2, each output checked the same way (column values, feature info,
     stats.json and per-episode stats those LeRobot computes for the remaining values):
     dataset_tools.delete_episodes, split_dataset, merge_datasets (of the split parts),
     modify_features(remove_features=vlm_frame), recompute_stats (its stats.json and its per-episode stats
     reproduce vlmlabel's, every statistic within 1e-4), and the lerobot-edit-dataset command line
     (delete_episodes). The source folder and OUT1 are byte-identical afterwards.
  5. vlmlabel on the delete_episodes output (re-indexed; re-encoded video): relabel --overwrite of its own
     key, relabel under a new key (compared with the oracle), evaluate without --model.

"vlm": an image dataset relabelled with --scorer vlm --context frame --normalize episode-minmax by a tiny
Qwen2-VL judge (tools/synthetic/tiny_vlm.py): NAME_raw = log P(answer) of frame t+1 by transformers' own
generate on the frames LeRobot decodes, NAME = its min-max per episode; the judge's provenance in info.json
(model_files_sha256 = the sha256 of its files computed here); steps 3-4 on both columns; after
delete_episodes, the judge relabels with --overwrite and under a new key, and evaluate reads it.

Results: tools/clients/results/lerobot.json (or $CLIENTS_RESULTS).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_LEROBOT_HOME", "/nonexistent-lerobot-home")  # every path below is explicit

import common
import numpy as np

KEY, FRAME_KEY = "vlm_reward", "vlm_frame"
CAMERA = "observation.images.front"
LENGTHS = (6, 8, 5, 7)
H, W = 64, 96
STATS = ("min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99")
TOL = {"image": 5e-3, "video": 5e-3}
STATS_TOL = 1e-4  # LeRobot's statistics of a reward against vlmlabel's, each statistic (absolute)


def frame_at(episode: int, t: int) -> np.ndarray:
    """A coloured background and a square that moves 7 px a step: neighbouring frames score apart."""
    rng = np.random.default_rng(1000 * episode + t)
    img = np.empty((H, W, 3), np.uint8)
    img[:] = rng.integers(30, 226, 3, dtype=np.uint8)
    y, x = 8 + (5 * t + 11 * episode) % (H - 24), (7 * t + 13 * episode) % (W - 24)
    img[y : y + 20, x : x + 20] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def create(kind: str, root: Path, repo_id: str):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        CAMERA: {"dtype": kind, "shape": (H, W, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["dx", "dy"]},
    }
    ds = LeRobotDataset.create(
        repo_id, fps=10, features=features, root=root, robot_type="synthetic", use_videos=kind == "video"
    )
    for episode, length in enumerate(LENGTHS):
        for t in range(length):
            ds.add_frame(
                {
                    CAMERA: frame_at(episode, t),
                    "observation.state": np.array([t, episode], np.float32),
                    "action": np.array([1.0, -1.0], np.float32),
                    "task": "move the square",
                }
            )
        ds.save_episode()
    ds.finalize()
    return ds


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load(repo_id: str, root: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(repo_id, root=root, video_backend="pyav")  # torchcodec needs a system FFmpeg


def column(ds, key: str) -> np.ndarray:
    return np.asarray(ds.hf_dataset.with_format(None)[key], dtype=np.float32).reshape(-1)


def episode_slices(ds) -> list[np.ndarray]:
    eps = np.asarray(ds.hf_dataset.with_format(None)["episode_index"]).reshape(-1)
    return [np.flatnonzero(eps == e) for e in sorted(set(eps.tolist()))]


def lerobot_episode_stats(ds, key: str) -> list[dict]:
    """LeRobot's compute_episode_stats of each episode of the column, as recompute_stats calls it."""
    from lerobot.datasets.compute_stats import compute_episode_stats

    values = column(ds, key)
    return [compute_episode_stats({key: values[s]}, {key: ds.meta.features[key]})[key] for s in episode_slices(ds)]


def stat_diffs(got: dict, want: dict) -> dict[str, float]:
    """|got - want| for every statistic (NaN when one is missing or NaN: never within a tolerance)."""
    return {
        s: abs(float(np.ravel(got[s])[0]) - float(np.ravel(want[s])[0])) if s in got and s in want else float("nan")
        for s in STATS
    }


def within(diffs: dict[str, float]) -> bool:
    return all(d <= STATS_TOL for d in diffs.values())


def worst(diffs: list[dict[str, float]]) -> str:
    """The largest difference of each statistic over episodes."""
    return ", ".join(f"{s} {max(d[s] for d in diffs):.1e}" for s in STATS) if diffs else "no episodes"


def episodes_stats(root: Path, key: str) -> list[dict]:
    """The stats/<key>/* columns of meta/episodes, one dict per episode in episode_index order."""
    import pandas as pd

    meta = pd.concat([pd.read_parquet(p) for p in sorted((root / "meta" / "episodes").rglob("*.parquet"))])
    return [
        {s: np.asarray(r[f"stats/{key}/{s}"]) for s in STATS}
        for r in meta.sort_values("episode_index").to_dict("records")
    ]


def verify(rep: common.Report, label: str, ds, expected: dict[str, list[np.ndarray]], provenance: dict) -> None:
    """Column values per episode, feature declaration + provenance, stats.json and meta/episodes stats."""
    import pandas as pd
    import pyarrow.parquet as pq
    from lerobot.datasets.compute_stats import aggregate_stats

    root = Path(ds.root)
    info = json.loads((root / "meta" / "info.json").read_text())
    stats = json.loads((root / "meta" / "stats.json").read_text())
    episodes_meta = pd.concat([pd.read_parquet(p) for p in sorted((root / "meta" / "episodes").rglob("*.parquet"))])
    slices = episode_slices(ds)
    first_file = sorted((root / "data").rglob("*.parquet"))[0]
    schema = pq.read_schema(first_file)
    for key, per_episode in expected.items():
        field_meta = schema.field(key).metadata or {} if key in schema.names else {}
        rep.note(
            f"{label}: parquet field metadata of {key}",
            "has b'vlmlabel' provenance" if b"vlmlabel" in field_meta else "no b'vlmlabel' entry (dropped)",
        )
        feature = ds.meta.features.get(key)
        rep.check(
            f"{label}: feature {key} declared float32 shape [1]",
            feature is not None and feature.get("dtype") == "float32" and list(feature.get("shape", [])) == [1],
            f"{feature and {k: v for k, v in feature.items() if k != 'info'}}",
        )
        feat_info = (info["features"].get(key) or {}).get("info") or {}
        want = provenance[key]
        missing = {k: v for k, v in want.items() if str(feat_info.get(k)) != str(v)}
        rep.check(
            f"{label}: info.json features[{key}]['info'] keeps the provenance",
            not missing,
            f"keys {sorted(feat_info)}" + (f"; differing/missing {missing}" if missing else ""),
        )
        values = column(ds, key)
        got = [values[s] for s in slices]
        same = len(got) == len(per_episode) and all(np.array_equal(a, b) for a, b in zip(got, per_episode, strict=True))
        rep.check(
            f"{label}: {key} column equals the expected episodes' values",
            same,
            f"{len(got)} episodes, lengths {[len(g) for g in got]}",
        )
        flat = np.concatenate(per_episode)
        entry = stats.get(key)
        if not rep.check(
            f"{label}: stats.json has {key} with {', '.join(STATS)}",
            entry is not None and all(s in entry for s in STATS),
            f"stats keys {sorted(entry) if entry else None}",
        ):
            continue
        exact = {"min": flat.min(), "max": flat.max(), "count": len(flat)}
        close = {"mean": flat.mean(dtype=np.float64), "std": flat.std(dtype=np.float64)}
        bad = {
            s: (entry[s], v) for s, v in exact.items() if not np.isclose(np.ravel(entry[s])[0], v, rtol=0, atol=1e-7)
        }
        bad.update(
            {
                s: (entry[s], v)
                for s, v in close.items()
                if not np.isclose(np.ravel(entry[s])[0], v, rtol=1e-5, atol=1e-6)
            }
        )
        theirs = lerobot_episode_stats(ds, key)
        lerobot_std = float(np.ravel(aggregate_stats([{key: t} for t in theirs])[key]["std"])[0])
        if "std" in bad and np.isclose(lerobot_std, np.ravel(entry["std"])[0], rtol=1e-5, atol=1e-6):
            # LeRobot's own stats give the same std: its float32 sqrt(E[x^2] - mean^2) (RunningQuantileStats),
            # which a column far from 0 with a tiny spread (a random judge's log-probs) loses to cancellation.
            rep.note(
                f"{label}: stats.json[{key}] std is LeRobot's, not numpy's",
                f"written {bad.pop('std')[0]}, numpy {close['std']:.3g}, LeRobot's own {lerobot_std:.3g}",
            )
        rep.check(f"{label}: stats.json[{key}] min/max/count/mean/std match the column", not bad, f"differing: {bad}")
        diffs = stat_diffs(entry, aggregate_stats([{key: t} for t in theirs])[key])
        rep.check(
            f"{label}: stats.json[{key}] = LeRobot's aggregate_stats(compute_episode_stats per episode), "
            f"every statistic within {STATS_TOL:g}",
            within(diffs),
            ", ".join(f"{s} {d:.1e}" for s, d in diffs.items()),
        )
        cols = [f"stats/{key}/{s}" for s in STATS]
        missing_cols = [c for c in cols if c not in episodes_meta.columns]
        ok = not missing_cols
        if ok:
            rows = episodes_meta.sort_values("episode_index")[cols].to_dict("records")
            for ep, (r, ep_vals) in enumerate(zip(rows, per_episode, strict=True)):
                if not (
                    np.isclose(np.ravel(r[f"stats/{key}/min"])[0], ep_vals.min())
                    and np.isclose(np.ravel(r[f"stats/{key}/max"])[0], ep_vals.max())
                    and int(np.ravel(r[f"stats/{key}/count"])[0]) == len(ep_vals)
                    and np.isclose(np.ravel(r[f"stats/{key}/mean"])[0], ep_vals.mean(), atol=1e-6)
                ):
                    ok = False
                    missing_cols.append(f"episode {ep} stats differ: {r}")
        rep.check(f"{label}: meta/episodes stats/{key}/* per episode match", ok, f"{missing_cols[:3]}")
        if not missing_cols:
            written = episodes_stats(root, key)
            same_count = len(written) == len(theirs)
            diffs = [stat_diffs(w, t) for w, t in zip(written, theirs, strict=True)] if same_count else []
            rep.check(
                f"{label}: meta/episodes stats/{key}/* = LeRobot's compute_episode_stats of each episode, "
                f"every statistic within {STATS_TOL:g}",
                same_count and all(within(d) for d in diffs),
                f"{len(written)} episodes, largest: {worst(diffs)}",
            )


def check_kind(rep: common.Report, kind: str, model: Path) -> None:
    import torch
    from lerobot.datasets.compute_stats import aggregate_stats

    work = rep.work / kind
    work.mkdir()
    src, out1, out2 = work / "src", work / "src-vlmlabel", work / "src-vlmlabel-frame"
    repo = f"local/vlmlabel_{kind}"
    create(kind, src, repo)
    rep.check(
        f"{kind}: LeRobotDataset.create + add_frame/save_episode/finalize",
        True,
        f"{len(LENGTHS)} episodes, {sum(LENGTHS)} frames at {src}",
    )
    proc = common.vlmlabel("inspect", str(src), check=False)
    rep.check(f"{kind}: vlmlabel inspect", proc.returncode == 0, f"exit {proc.returncode} {proc.stderr.strip()[-300:]}")
    proc = common.vlmlabel(
        "relabel",
        str(src),
        "--goal",
        common.GOAL,
        "--model",
        str(model),
        "--device",
        "cpu",
        "--output",
        str(out1),
        "--quiet",
        check=False,
    )
    if not rep.check(
        f"{kind}: vlmlabel relabel SRC --output OUT1 (align next, {KEY})",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-600:]}",
    ):
        return
    proc = common.vlmlabel(
        "relabel",
        str(out1),
        "--goal",
        common.GOAL,
        "--model",
        str(model),
        "--device",
        "cpu",
        "--align",
        "frame",
        "--reward-key",
        FRAME_KEY,
        "--output",
        str(out2),
        "--quiet",
        check=False,
    )
    if not rep.check(
        f"{kind}: vlmlabel relabel OUT1 --output OUT2 --align frame --reward-key {FRAME_KEY}",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-600:]}",
    ):
        return
    src_digest, out1_digest = tree_digest(src), tree_digest(out1)

    ds = load(repo, out2)
    rep.check(
        f"{kind}: LeRobotDataset(repo_id, root=OUT2) loads",
        True,
        f"{ds.num_episodes} episodes, {ds.num_frames} frames, features {sorted(ds.meta.features)}",
    )
    # The frames as LeRobot decodes them (float CHW in [0, 1]) back to uint8 HWC, scored by the oracle.
    frames = np.stack([(ds[i][CAMERA].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for i in range(len(ds))])
    scores = common.oracle_scores(model, frames, common.GOAL, work / "oracle")
    slices = episode_slices(ds)
    reward, frame_reward = column(ds, KEY), column(ds, FRAME_KEY)
    exp_next = np.concatenate([np.append(scores[s][1:], scores[s][-1]) for s in slices])
    exp_frame = np.concatenate([scores[s] for s in slices])
    order = np.concatenate(slices)
    err_next = float(np.max(np.abs(reward[order] - exp_next)))
    err_other = float(np.max(np.abs(reward[order] - exp_frame)))
    rep.check(
        f"{kind}: {KEY} (align next) = score of frame t+1, the episode's last step its own frame",
        err_next <= TOL[kind],
        f"max|diff|={err_next:.2e} (vs own-frame hypothesis {err_other:.2e})",
    )
    err_frame = float(np.max(np.abs(frame_reward[order] - exp_frame)))
    rep.check(
        f"{kind}: {FRAME_KEY} (align frame) = score of frame t", err_frame <= TOL[kind], f"max|diff|={err_frame:.2e}"
    )
    item = ds[3]
    rep.check(
        f"{kind}: ds[i][{KEY}] is the column value",
        float(item[KEY].reshape(-1)[0]) == float(reward[3]),
        f"ds[3][{KEY}] = {item[KEY]!r}",
    )
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    rep.check(
        f"{kind}: torch DataLoader batch carries {KEY}",
        KEY in batch and batch[KEY].shape[0] == 4 and np.allclose(batch[KEY].reshape(-1).numpy(), reward[:4]),
        f"shape {tuple(batch[KEY].shape)}",
    )

    info = json.loads((out2 / "meta" / "info.json").read_text())
    provenance = {
        k: {p: (info["features"][k].get("info") or {}).get(p) for p in ("goal", "align", "model")}
        for k in (KEY, FRAME_KEY)
    }
    rep.note(f"{kind}: info.json features[{KEY}]", json.dumps(info["features"][KEY])[:600])
    rep.check(
        f"{kind}: provenance goal/align recorded",
        provenance[KEY]["goal"] == common.GOAL
        and provenance[KEY]["align"] == "next"
        and provenance[FRAME_KEY]["align"] == "frame",
        str(provenance),
    )
    per_ep = {k: [column(ds, k)[s] for s in slices] for k in (KEY, FRAME_KEY)}
    verify(rep, f"{kind} OUT2", ds, per_ep, provenance)
    stats = json.loads((out2 / "meta" / "stats.json").read_text())

    def lerobot_aggregate():
        for key in (KEY, FRAME_KEY):
            agg = aggregate_stats([{key: e} for e in episodes_stats(out2, key)])[key]
            diffs = stat_diffs(agg, stats[key])
            rep.check(
                f"{kind}: LeRobot aggregate_stats(meta/episodes stats/{key}) = stats.json[{key}], "
                f"every statistic within {STATS_TOL:g}",
                within(diffs),
                ", ".join(f"{s} {d:.1e}" for s, d in diffs.items()),
            )

    rep.guarded(f"{kind}: aggregate_stats", lerobot_aggregate)
    for name, fn in edits(rep, kind, work, ds, per_ep, provenance):
        rep.guarded(f"{kind}: {name}", fn)
    rep.check(
        f"{kind}: source and OUT1 unchanged after all edits",
        tree_digest(src) == src_digest and tree_digest(out1) == out1_digest,
        "",
    )


VLM_KEY = "vlm_judge"
VLM_RAW = f"{VLM_KEY}_raw"
VLM_TOL, MINMAX_TOL = 1e-4, 1e-6  # the judge's readout vs generate on the same frames; min-max of the raw column


def decoded_frames(ds) -> np.ndarray:
    """The frames as LeRobot decodes them (float CHW in [0, 1]) back to uint8 HWC."""
    return np.stack([(ds[i][CAMERA].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for i in range(len(ds))])


def check_judged(rep: common.Report, label: str, ds, judge: Path, prompt: str, answer: str, key: str) -> None:
    """``key``_raw = the oracle's log P(answer) of frame t+1 (generate on the frames LeRobot decodes) and ``key`` =
    its min-max per episode, as LeRobot loads both columns."""
    slices = episode_slices(ds)
    scores = common.vlm_oracle(judge, decoded_frames(ds), common.GOAL, prompt, answer, Path(ds.root).parent / "oracle")
    order = np.concatenate(slices)
    expected = np.concatenate([np.append(scores[s][1:], scores[s][-1]) for s in slices])
    raw = column(ds, f"{key}_raw")
    err = float(np.max(np.abs(raw[order] - expected)))
    own = float(np.max(np.abs(raw[order] - scores[order])))
    rep.check(
        f"{label}: {key}_raw (align next) = the judge's log P({answer!r}) of frame t+1 by transformers' generate",
        err <= VLM_TOL,
        f"max|diff|={err:.2e} (vs own-frame hypothesis {own:.2e})",
    )
    err = float(np.max(np.abs(column(ds, key) - common.minmax_per_episode(raw, slices))))
    rep.check(f"{label}: {key} = min-max per episode of {key}_raw", err <= MINMAX_TOL, f"max|diff|={err:.2e}")


def check_vlm(rep: common.Report, judge: Path) -> None:
    """A LeRobot image dataset relabelled with --scorer vlm: LeRobot loads the reward and NAME_raw, the provenance
    survives in info.json, and LeRobot's editing tools keep both columns and their statistics."""
    import torch

    kind = "vlm"
    work = rep.work / kind
    work.mkdir()
    src, out = work / "src", work / "src-vlmlabel"
    repo = "local/vlmlabel_vlm"
    create("image", src, repo)
    args = [*common.VLM_ARGS, "--reward-key", VLM_KEY]
    proc = common.vlmlabel(
        "relabel", str(src), "--goal", common.GOAL, "--model", str(judge), "--device", "cpu", *args,
        "--output", str(out), "--quiet", check=False,
    )  # fmt: skip
    if not rep.check(
        f"{kind}: vlmlabel relabel SRC {' '.join(args)} --output OUT",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-600:]}",
    ):
        return
    src_digest = tree_digest(src)
    ds = load(repo, out)
    rep.check(f"{kind}: LeRobotDataset(repo_id, root=OUT) loads", True, f"features {sorted(ds.meta.features)}")
    info = json.loads((out / "meta" / "info.json").read_text())
    feat = {k: (info["features"].get(k) or {}).get("info") or {} for k in (VLM_KEY, VLM_RAW)}
    rep.note(f"{kind}: info.json features[{VLM_KEY}]", json.dumps(info["features"].get(VLM_KEY))[:800])
    names = (*common.VLM_PROVENANCE, "goal", "align", "model")
    missing = [k for k in names if k not in feat[VLM_KEY]]
    rep.check(
        f"{kind}: info.json features[{VLM_KEY}]['info'] holds the judge's provenance",
        not missing and feat[VLM_KEY].get("scorer") == "vlm" and feat[VLM_KEY].get("context") == "frame",
        f"missing {missing}",
    )
    hashes = feat[VLM_KEY].get("model_files_sha256")
    hashes = json.loads(hashes) if isinstance(hashes, str) else hashes
    rep.check(
        f"{kind}: model_files_sha256 = sha256 of the judge's files computed here",
        hashes == common.model_hashes(judge),
        f"{type(feat[VLM_KEY].get('model_files_sha256')).__name__}: {sorted(hashes or {})}",
    )
    rep.check(
        f"{kind}: {VLM_RAW} declared with provenance naming its reward",
        feat[VLM_RAW].get("raw_of") == VLM_KEY and feat[VLM_KEY].get("raw_key") == VLM_RAW,
        f"raw_of={feat[VLM_RAW].get('raw_of')} raw_key={feat[VLM_KEY].get('raw_key')}",
    )
    prompt, answer = str(feat[VLM_KEY].get("prompt")), str(feat[VLM_KEY].get("answer"))
    check_judged(rep, kind, ds, judge, prompt, answer, VLM_KEY)
    raw = column(ds, VLM_RAW)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    rep.check(
        f"{kind}: torch DataLoader batch carries {VLM_KEY} and {VLM_RAW}",
        VLM_KEY in batch and np.array_equal(batch[VLM_RAW].reshape(-1).numpy(), raw[:4]),
        f"shapes {tuple(batch[VLM_KEY].shape)} {tuple(batch[VLM_RAW].shape)}",
    )
    slices = episode_slices(ds)
    provenance = {k: {p: feat[k].get(p) for p in names if p in feat[k]} for k in (VLM_KEY, VLM_RAW)}
    per_ep = {k: [column(ds, k)[s] for s in slices] for k in (VLM_KEY, VLM_RAW)}
    verify(rep, f"{kind} OUT", ds, per_ep, provenance)

    def after_delete(new) -> None:
        relabel_edited_vlm(rep, work, new, judge, prompt, answer)

    for name, fn in edits(rep, kind, work, ds, per_ep, provenance, after_delete):
        rep.guarded(f"{kind}: {name}", fn)
    rep.check(f"{kind}: source unchanged after all edits", tree_digest(src) == src_digest, "")


def relabel_edited_vlm(rep: common.Report, work: Path, edited, judge: Path, prompt: str, answer: str) -> None:
    """vlmlabel's judge on what LeRobot's delete_episodes wrote: --overwrite of its own key, a new key equal to
    the oracle of the frames LeRobot decodes, and evaluate without --model."""
    root = str(edited.root)
    base = ("relabel", root, "--goal", common.GOAL, "--model", str(judge), "--device", "cpu", *common.VLM_ARGS)
    proc = common.vlmlabel(
        *base, "--reward-key", VLM_KEY, "--overwrite", "--output", str(work / "edited-overwrite"), "--quiet",
        check=False,
    )  # fmt: skip
    rep.check(
        f"vlm: vlmlabel relabel --scorer vlm --overwrite {VLM_KEY} on the delete_episodes output",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-500:]}",
    )
    new_key, out = "vlm_judge_after_edit", work / "edited-newkey"
    proc = common.vlmlabel(*base, "--reward-key", new_key, "--output", str(out), "--quiet", check=False)
    if rep.check(
        f"vlm: vlmlabel relabel --scorer vlm --reward-key {new_key} on the delete_episodes output",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-500:]}",
    ):
        check_judged(
            rep, "vlm delete_episodes + relabel", load("local/edited-newkey", out), judge, prompt, answer, new_key
        )
    proc = common.vlmlabel("evaluate", root, "--reward-key", VLM_KEY, "--json", check=False)
    rep.check(
        f"vlm: vlmlabel evaluate --reward-key {VLM_KEY} on the delete_episodes output (no --model)",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-300:]}",
    )


def relabel_edited(rep: common.Report, kind: str, work: Path, edited, model: Path) -> None:
    """vlmlabel on what LeRobot's editor wrote (re-indexed episodes; for video, re-encoded files).

    1. relabel again with --overwrite under the same key: the column is vlmlabel's (info.json says so), so
       README's rule "--overwrite replaces rewards vlmlabel wrote" should let it through;
    2. relabel under a new key and compare with the oracle of the frames LeRobot decodes;
    3. vlmlabel evaluate on the edited dataset without --model (the model comes from the provenance)."""
    root = str(edited.root)
    proc = common.vlmlabel(
        "relabel",
        root,
        "--goal",
        "another goal",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--overwrite",
        "--output",
        str(work / "edited-overwrite"),
        "--quiet",
        check=False,
    )
    rep.check(
        f"{kind}: vlmlabel relabel --overwrite {KEY} on the delete_episodes output",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-500:]}",
    )
    new_key = "vlm_reward_after_edit"
    out = work / "edited-newkey"
    proc = common.vlmlabel(
        "relabel",
        root,
        "--goal",
        common.GOAL,
        "--model",
        str(model),
        "--device",
        "cpu",
        "--reward-key",
        new_key,
        "--output",
        str(out),
        "--quiet",
        check=False,
    )
    if rep.check(
        f"{kind}: vlmlabel relabel --reward-key {new_key} on the delete_episodes output",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-500:]}",
    ):
        again = load("local/edited-newkey", out)
        frames = np.stack(
            [(again[i][CAMERA].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for i in range(len(again))]
        )
        scores = common.oracle_scores(model, frames, common.GOAL, work / "oracle")
        slices = episode_slices(again)
        expected = np.concatenate([np.append(scores[s][1:], scores[s][-1]) for s in slices])
        got = column(again, new_key)[np.concatenate(slices)]
        err = float(np.max(np.abs(got - expected)))
        rep.check(
            f"{kind}: relabelled edited dataset: {new_key} = score of frame t+1 (oracle of LeRobot's frames)",
            err <= TOL[kind],
            f"max|diff|={err:.2e}",
        )
    proc = common.vlmlabel("evaluate", root, "--reward-key", KEY, "--against", FRAME_KEY, "--json", check=False)
    rep.check(
        f"{kind}: vlmlabel evaluate --reward-key {KEY} on the delete_episodes output (no --model)",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-300:]}",
    )


def edits(rep: common.Report, kind: str, work: Path, ds, per_ep: dict, provenance: dict, after_delete=None):
    """LeRobot's editing tools on ``ds``, each output verified; ``after_delete(new)`` runs vlmlabel on the
    delete_episodes output (default: the CLIP relabels of ``relabel_edited``)."""
    from lerobot.datasets import dataset_tools as tools

    first, second = list(per_ep)

    def keep(indices):
        return {k: [v[i] for i in indices] for k, v in per_ep.items()}

    def delete():
        new = tools.delete_episodes(ds, episode_indices=[1], output_dir=work / "deleted", repo_id="local/deleted")
        verify(rep, f"{kind} delete_episodes([1])", new, keep([0, 2, 3]), provenance)
        if after_delete is None:
            relabel_edited(rep, kind, work, new, model=Path(provenance[KEY]["model"]))
        else:
            after_delete(new)

    parts = {}

    def split():
        parts.update(tools.split_dataset(ds, splits={"train": [0, 1, 2], "val": [3]}, output_dir=work / "split"))
        verify(rep, f"{kind} split_dataset train", parts["train"], keep([0, 1, 2]), provenance)
        verify(rep, f"{kind} split_dataset val", parts["val"], keep([3]), provenance)

    def merge():
        if not parts:
            raise RuntimeError("split failed, nothing to merge")
        new = tools.merge_datasets(
            [parts["train"], parts["val"]], output_repo_id="local/merged", output_dir=work / "merged"
        )
        verify(rep, f"{kind} merge_datasets(train, val)", new, keep([0, 1, 2, 3]), provenance)

    def remove():
        new = tools.modify_features(ds, remove_features=second, output_dir=work / "removed", repo_id="local/removed")
        rep.check(f"{kind} modify_features(remove {second}): {second} gone", second not in new.meta.features, "")
        verify(rep, f"{kind} modify_features(remove {second})", new, {first: per_ep[first]}, provenance)

    def recompute():
        """recompute_stats rebuilds stats.json from the data, episode by episode: it must give back vlmlabel's
        numbers, in stats.json and per episode (compute_episode_stats, what it aggregates)."""
        from lerobot.datasets.compute_stats import aggregate_stats

        root = work / "recomputed"
        shutil.copytree(ds.root, root)
        copy = load("local/recomputed", root)
        before = json.loads((root / "meta" / "stats.json").read_text())
        ours = {key: episodes_stats(root, key) for key in per_ep}
        tools.recompute_stats(copy)
        after = json.loads((root / "meta" / "stats.json").read_text())
        for key in per_ep:
            diffs = stat_diffs(after.get(key, {}), before[key])
            rep.check(
                f"{kind} recompute_stats: LeRobot's stats.json[{key}] reproduces vlmlabel's, "
                f"every statistic within {STATS_TOL:g}",
                within(diffs),
                ", ".join(f"{s} {d:.1e}" for s, d in diffs.items()),
            )
            theirs = lerobot_episode_stats(copy, key)
            same_count = len(theirs) == len(ours[key])
            ep_diffs = [stat_diffs(t, o) for t, o in zip(theirs, ours[key], strict=True)] if same_count else []
            rep.check(
                f"{kind} recompute_stats: its per-episode stats of {key} (compute_episode_stats) reproduce "
                f"vlmlabel's meta/episodes, every statistic within {STATS_TOL:g}",
                same_count and all(within(d) for d in ep_diffs),
                f"{len(theirs)} episodes, largest: {worst(ep_diffs)}",
            )
            agg = aggregate_stats([{key: t} for t in theirs])[key]
            diffs = stat_diffs(agg, after[key])
            rep.check(
                f"{kind} recompute_stats: aggregate_stats of those per-episode stats of {key} = its stats.json",
                within(diffs),
                ", ".join(f"{s} {d:.1e}" for s, d in diffs.items()),
            )
        verify(rep, f"{kind} recompute_stats", load("local/recomputed", root), per_ep, provenance)

    def cli():
        exe = str(Path(sys.executable).with_name("lerobot-edit-dataset"))
        proc = common.run(
            [
                exe,
                "--repo_id",
                ds.repo_id,
                "--root",
                str(ds.root),
                "--new_repo_id",
                "local/cli_deleted",
                "--new_root",
                str(work / "cli_deleted"),
                "--operation.type",
                "delete_episodes",
                "--operation.episode_indices",
                "[0, 2]",
            ],
            check=False,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if rep.check(
            f"{kind} lerobot-edit-dataset delete_episodes [0, 2]",
            proc.returncode == 0,
            f"exit {proc.returncode} {proc.stderr.strip()[-400:]}",
        ):
            verify(
                rep,
                f"{kind} lerobot-edit-dataset delete_episodes",
                load("local/cli_deleted", work / "cli_deleted"),
                keep([1, 3]),
                provenance,
            )

    return [
        ("delete_episodes", delete),
        ("split_dataset", split),
        ("merge_datasets", merge),
        ("modify_features remove", remove),
        ("recompute_stats", recompute),
        ("lerobot-edit-dataset", cli),
    ]


def main() -> int:
    kinds = sys.argv[1:] or ["image", "video", "vlm"]
    rep = common.Report("lerobot")
    import av
    import datasets
    import lerobot
    import pyarrow
    import torch

    rep.info.update(
        lerobot=getattr(lerobot, "__version__", "?"),
        torch=torch.__version__,
        datasets=datasets.__version__,
        pyarrow=pyarrow.__version__,
        av=av.__version__,
        numpy=np.__version__,
        vlmlabel_version=common.vlmlabel_version(),
    )
    print(rep.info, flush=True)
    torch.set_num_threads(1)
    model = common.make_tiny_model(rep.work / "tiny-clip")
    for kind in kinds:
        if kind == "vlm":
            rep.guarded("vlm: check", check_vlm, rep, common.make_tiny_vlm(rep.work / "tiny-vlm"))
        else:
            rep.guarded(f"{kind}: check", check_kind, rep, kind, model)
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
