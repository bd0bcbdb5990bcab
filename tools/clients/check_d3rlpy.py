"""d3rlpy trains on what vlmlabel writes into a D4RL-style flat HDF5 file with image observations.

    /work/venvs/clients311/bin/python tools/clients/check_d3rlpy.py

Steps:
  1. Two D4RL-style flat files, 4 episodes (lengths 7, 9, 5, 11; ended by terminals or timeouts, both kinds),
     observations uint8 (N, 48, 64, 3) with a different random colour and square per frame (so that
     neighbouring frames score clearly apart), actions int64 in {0, 1}, rewards, terminals, timeouts;
     file B also has `next_observations` (as some D4RL files do).
  2. `vlmlabel relabel FILE --goal ... --model <tiny dir> --reward-key vlm_reward` (default --align next)
     and `--align frame --reward-key vlm_frame`, in place.
  3. d3rlpy.dataset.MDPDataset(observations (NCHW), actions, rewards=f['vlm_reward'], terminals, timeouts):
     episode count and lengths, episode.rewards equal the file rows, every transition's reward equals
     the file row and (align next) the open_clip oracle score of the transition's next_observation;
     at each episode end the stored next observation's score (file B) or the frame's own score (file A).
  4. DiscreteCQL fits 2 gradient steps on it (CPU); ReplayBuffer dump/load keeps the rewards.
  5. `vlmlabel relabel FILE --scorer vlm --context frame --normalize episode-minmax --reward-key vlm_judge` with a
     tiny Qwen2-VL judge (tools/synthetic/tiny_vlm.py): /vlm_judge_raw = log P(answer) of o_(t+1) by transformers'
     own generate (the episode end as in 3), /vlm_judge = its min-max per episode, the judge's attributes;
     MDPDataset on /vlm_judge, DiscreteCQL 2 steps, ReplayBuffer dump/load.

Results: tools/clients/results/d3rlpy.json (or $CLIENTS_RESULTS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common
import numpy as np

KEY, FRAME_KEY = "vlm_reward", "vlm_frame"
VLM_KEY = "vlm_judge"  # --scorer vlm (common.VLM_ARGS): VLM_KEY and VLM_KEY_raw
VLM_RAW = f"{VLM_KEY}_raw"
VLM_TOL, MINMAX_TOL = 1e-4, 1e-6
LENGTHS = (7, 9, 5, 11)
ENDS = ("terminal", "timeout", "terminal", "timeout")
H, W = 48, 64
TOL = 5e-3


def make_frames(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        frames[i] = rng.integers(0, 256, 3, dtype=np.uint8)
        y, x = rng.integers(0, H - 16), rng.integers(0, W - 16)
        frames[i, y : y + 16, x : x + 16] = rng.integers(0, 256, 3, dtype=np.uint8)
        frames[i] = np.clip(frames[i].astype(int) + rng.integers(-20, 21, (H, W, 3)), 0, 255).astype(np.uint8)
    return frames


def build(path: Path, with_next: bool, seed: int) -> dict:
    import h5py

    n = sum(LENGTHS)
    rng = np.random.default_rng(seed)
    frames = make_frames(n + len(LENGTHS), seed)  # one extra frame per episode: its final next observation
    obs, nxt = [], []
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    start, src = 0, 0
    for length, end in zip(LENGTHS, ENDS, strict=True):
        ep = frames[src : src + length + 1]
        obs.append(ep[:-1])
        nxt.append(ep[1:])
        (terminals if end == "terminal" else timeouts)[start + length - 1] = True
        start += length
        src += length + 1
    data = {
        "observations": np.concatenate(obs),
        "next_observations": np.concatenate(nxt),
        "actions": rng.integers(0, 2, n).astype(np.int64),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            if k == "next_observations" and not with_next:
                continue
            f.create_dataset(k, data=v)
    return data


def main() -> int:
    rep = common.Report("d3rlpy")
    import d3rlpy
    import h5py
    import torch

    rep.info.update(
        d3rlpy=d3rlpy.__version__,
        torch=torch.__version__,
        h5py=h5py.__version__,
        numpy=np.__version__,
        vlmlabel_version=common.vlmlabel_version(),
    )
    print(rep.info, flush=True)
    model = common.make_tiny_model(rep.work / "tiny-clip")
    judge = common.make_tiny_vlm(rep.work / "tiny-vlm")
    for name, with_next in (("A_no_next_observations", False), ("B_with_next_observations", True)):
        path = rep.work / f"{name}.hdf5"
        data = build(path, with_next, seed=1 if with_next else 0)
        ok = True
        for key, align in ((KEY, "next"), (FRAME_KEY, "frame")):
            proc = common.vlmlabel(
                "relabel",
                str(path),
                "--goal",
                common.GOAL,
                "--model",
                str(model),
                "--device",
                "cpu",
                "--align",
                align,
                "--reward-key",
                key,
                "--quiet",
                check=False,
            )
            ok &= rep.check(
                f"{name}: vlmlabel relabel --align {align} --reward-key {key}",
                proc.returncode == 0,
                f"exit {proc.returncode} {proc.stderr.strip()[-400:]}",
            )
        if ok:
            rep.guarded(f"{name}: d3rlpy", check_file, rep, name, path, data, with_next, model)
        proc = common.vlmlabel(
            "relabel", str(path), "--goal", common.GOAL, "--model", str(judge), "--device", "cpu", *common.VLM_ARGS,
            "--reward-key", VLM_KEY, "--quiet", check=False,
        )  # fmt: skip
        if rep.check(
            f"{name}: vlmlabel relabel {' '.join(common.VLM_ARGS)} --reward-key {VLM_KEY}",
            proc.returncode == 0,
            f"exit {proc.returncode} {proc.stderr.strip()[-400:]}",
        ):
            rep.guarded(f"{name}: d3rlpy (judge)", check_vlm_file, rep, name, path, data, with_next, judge)
    return rep.finish()


def check_vlm_file(rep: common.Report, name: str, path: Path, data: dict, with_next: bool, judge: Path) -> None:
    """The judge's columns: /VLM_RAW = log P(answer) of o_(t+1) by transformers' generate (the episode's last step:
    the stored next observation, else its own frame), /VLM_KEY = its min-max per episode; d3rlpy trains on it."""
    import d3rlpy
    import h5py

    with h5py.File(path, "r") as f:
        reward, raw = f[VLM_KEY][()], f[VLM_RAW][()]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f[VLM_KEY].attrs.items()}
        raw_of = f[VLM_RAW].attrs.get("raw_of")
        observations, terminals, timeouts = f["observations"][()], f["terminals"][()], f["timeouts"][()]
    n = len(observations)
    rep.check(
        f"{name}: /{VLM_KEY} and /{VLM_RAW} float32 with N rows",
        reward.dtype == raw.dtype == np.float32 and reward.shape == raw.shape == (n,),
        f"{reward.dtype} {reward.shape} {raw.dtype} {raw.shape}",
    )
    missing = [k for k in common.VLM_PROVENANCE if k not in attrs]
    hashes = json.loads(attrs.get("model_files_sha256", "{}"))
    rep.check(
        f"{name}: /{VLM_KEY} attributes: the judge's provenance, model_files_sha256 = sha256 of its files",
        not missing and attrs.get("scorer") == "vlm" and hashes == common.model_hashes(judge),
        f"missing {missing}; raw_key={attrs.get('raw_key')} raw_of={raw_of!r}",
    )
    prompt, answer = str(attrs["prompt"]), str(attrs["answer"])
    work = rep.work / "oracle"
    oracle_obs = common.vlm_oracle(judge, observations, common.GOAL, prompt, answer, work)
    oracle_next = common.vlm_oracle(judge, data["next_observations"], common.GOAL, prompt, answer, work)
    expected, slices, start = np.empty(n), [], 0
    for length in LENGTHS:
        end = start + length
        expected[start : end - 1] = oracle_obs[start + 1 : end]
        expected[end - 1] = oracle_next[end - 1] if with_next else oracle_obs[end - 1]
        slices.append(np.arange(start, end))
        start = end
    err, own = float(np.max(np.abs(raw - expected))), float(np.max(np.abs(raw - oracle_obs)))
    rep.check(
        f"{name}: /{VLM_RAW} = the judge's log P({answer!r}) of o_(t+1) by transformers' generate",
        err <= VLM_TOL,
        f"max|diff|={err:.2e} (vs own-frame hypothesis {own:.2e})",
    )
    err = float(np.max(np.abs(reward - common.minmax_per_episode(raw, slices))))
    rep.check(f"{name}: /{VLM_KEY} = min-max per episode of /{VLM_RAW}", err <= MINMAX_TOL, f"max|diff|={err:.1e}")
    dataset = d3rlpy.dataset.MDPDataset(
        observations=np.ascontiguousarray(observations.transpose(0, 3, 1, 2)),
        actions=data["actions"],
        rewards=reward,
        terminals=terminals.astype(np.float32),
        timeouts=timeouts.astype(np.float32),
        action_space=d3rlpy.ActionSpace.DISCRETE,
        action_size=2,
    )
    starts = np.cumsum((0,) + LENGTHS[:-1])
    picker = d3rlpy.dataset.BasicTransitionPicker()
    bad = [
        (int(s + i), float(np.asarray(picker(ep, i).reward).reshape(-1)[0]))
        for ep, s in zip(dataset.episodes, starts, strict=True)
        for i in range(ep.transition_count)
        if float(np.asarray(picker(ep, i).reward).reshape(-1)[0]) != float(reward[s + i])
    ]
    rep.check(
        f"{name}: MDPDataset on /{VLM_KEY}: episodes = file episodes, every transition's reward = file row",
        [ep.size() for ep in dataset.episodes] == list(LENGTHS) and not bad,
        f"sizes {[ep.size() for ep in dataset.episodes]}; bad {bad[:3]}",
    )
    rep.guarded(f"{name}: DiscreteCQL fit 2 steps (judge)", fit_cql, rep, f"{name} {VLM_KEY}", dataset)
    rep.guarded(f"{name}: ReplayBuffer dump/load (judge)", dump_load, rep, f"{name}-{VLM_KEY}", dataset, reward, starts)


def check_file(rep: common.Report, name: str, path: Path, data: dict, with_next: bool, model: Path) -> None:
    import d3rlpy
    import h5py

    with h5py.File(path, "r") as f:
        reward = f[KEY][()]
        frame = f[FRAME_KEY][()]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f[KEY].attrs.items()}
        observations = f["observations"][()]
        n = len(observations)
        rep.check(
            f"{name}: /{KEY} float32 with N rows at the root",
            f[KEY].dtype == np.float32 and reward.shape == (n,),
            f"{f[KEY].dtype} {reward.shape}, N={n}, align attr={attrs.get('align')}",
        )
        terminals, timeouts, actions = f["terminals"][()], f["timeouts"][()], f["actions"][()]
    # Oracle: every observation and, for the episode ends, the stored next observations.
    oracle_obs = common.oracle_scores(model, observations, common.GOAL, rep.work / "oracle")
    oracle_next = common.oracle_scores(model, data["next_observations"], common.GOAL, rep.work / "oracle")

    # vlmlabel's own alignment, episode by episode (README: next = score of o_{t+1}; the last step uses the
    # file's next observation when it has one, else its own frame).
    expected = np.empty(n, np.float32)
    start = 0
    for length in LENGTHS:
        end = start + length
        expected[start : end - 1] = oracle_obs[start + 1 : end]
        expected[end - 1] = oracle_next[end - 1] if with_next else oracle_obs[end - 1]
        start = end
    err_next = float(np.max(np.abs(reward - expected)))
    err_frame_hyp = float(np.max(np.abs(reward - oracle_obs)))
    rep.check(
        f"{name}: align next = score(o_(t+1)) within episodes, episode end = "
        + ("stored next_observations" if with_next else "own frame"),
        err_next <= TOL,
        f"max|diff| vs that={err_next:.2e}; vs own-frame hypothesis={err_frame_hyp:.2e}",
    )
    rep.check(
        f"{name}: align frame = score(o_t)",
        float(np.max(np.abs(frame - oracle_obs))) <= TOL,
        f"max|diff|={np.max(np.abs(frame - oracle_obs)):.2e}",
    )
    starts = np.cumsum((0,) + LENGTHS[:-1])
    inner = np.ones(n, bool)
    inner[starts + np.array(LENGTHS) - 1] = False
    idx = np.flatnonzero(inner)
    rep.check(
        f"{name}: next[t] == frame[t+1] inside episodes (exact, same code path)",
        bool(np.allclose(reward[idx], frame[idx + 1], atol=1e-6)),
        f"max|diff|={np.max(np.abs(reward[idx] - frame[idx + 1])):.2e}",
    )

    dataset = d3rlpy.dataset.MDPDataset(
        observations=np.ascontiguousarray(observations.transpose(0, 3, 1, 2)),  # d3rlpy's pixel encoders: NCHW
        actions=actions,
        rewards=reward,
        terminals=terminals.astype(np.float32),
        timeouts=timeouts.astype(np.float32),
        action_space=d3rlpy.ActionSpace.DISCRETE,
        action_size=2,
    )
    lengths = [ep.size() for ep in dataset.episodes]
    rep.check(
        f"{name}: MDPDataset episodes = file episodes",
        lengths == list(LENGTHS),
        f"d3rlpy episode sizes {lengths}, terminated {[bool(ep.terminated) for ep in dataset.episodes]}",
    )
    same = all(
        np.array_equal(ep.rewards.reshape(-1), reward[s : s + len(ep.rewards)])
        for ep, s in zip(dataset.episodes, starts, strict=True)
    )
    rep.check(f"{name}: episode.rewards equal the file's {KEY} rows", same, "")

    picker = d3rlpy.dataset.BasicTransitionPicker()
    checked, bad_file, bad_oracle, terminal_seen = 0, [], [], 0
    for ep, s in zip(dataset.episodes, starts, strict=True):
        for i in range(ep.transition_count):
            tr = picker(ep, i)
            checked += 1
            r = float(np.asarray(tr.reward).reshape(-1)[0])
            if r != float(reward[s + i]):
                bad_file.append((int(s + i), r, float(reward[s + i])))
            if tr.terminal:
                terminal_seen += 1  # d3rlpy's next_observation is zeros there; vlmlabel used its own source
                continue
            nxt = np.asarray(tr.next_observation).transpose(1, 2, 0)
            ref = common_score_lookup(nxt, observations, oracle_obs)
            if ref is None or abs(r - ref) > TOL:
                bad_oracle.append((int(s + i), r, ref))
    rep.check(
        f"{name}: every transition's reward = file row", not bad_file, f"{checked} transitions; bad {bad_file[:3]}"
    )
    rep.check(
        f"{name}: non-terminal transition reward = oracle score of d3rlpy's next_observation",
        not bad_oracle,
        f"{checked - terminal_seen} transitions; bad {bad_oracle[:3]}; terminal transitions "
        f"(next_observation zeros in d3rlpy): {terminal_seen}",
    )
    timeout_last = [int(s + ep.size() - 1) for ep, s in zip(dataset.episodes, starts, strict=True) if not ep.terminated]
    rep.note(
        f"{name}: timeout episodes' last row",
        f"rows {timeout_last}: d3rlpy makes no transition of them "
        f"(transition_count = size - 1), so their reward is never used in training",
    )

    rep.guarded(f"{name}: DiscreteCQL fit 2 steps", fit_cql, rep, name, dataset)
    rep.guarded(f"{name}: ReplayBuffer dump/load", dump_load, rep, name, dataset, reward, starts)


def common_score_lookup(frame: np.ndarray, observations: np.ndarray, scores: np.ndarray) -> float | None:
    """The oracle score of the observation row equal to this frame (frames are unique by construction)."""
    hits = np.flatnonzero((observations == frame).all(axis=(1, 2, 3)))
    return float(scores[hits[0]]) if len(hits) else None


def fit_cql(rep: common.Report, name: str, dataset) -> None:
    import d3rlpy
    import torch

    torch.set_num_threads(1)
    cql = d3rlpy.algos.DiscreteCQLConfig(
        batch_size=8, observation_scaler=d3rlpy.preprocessing.PixelObservationScaler()
    ).create(device="cpu:0")
    history = cql.fit(
        dataset,
        n_steps=2,
        n_steps_per_epoch=2,
        show_progress=False,
        save_interval=10**9,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        experiment_name=f"vlmlabel-{name}",
    )
    metrics = history[-1][1] if history else {}
    finite = bool(metrics) and all(np.isfinite(v) for v in metrics.values())
    rep.check(
        f"{name}: DiscreteCQL fits 2 gradient steps on the VLM rewards",
        finite,
        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
    )


def dump_load(rep: common.Report, name: str, dataset, reward: np.ndarray, starts) -> None:
    import d3rlpy

    path = rep.work / f"{name}-d3rlpy.h5"
    with open(path, "w+b") as f:
        dataset.dump(f)
    with open(path, "rb") as f:
        loaded = d3rlpy.dataset.ReplayBuffer.load(f, d3rlpy.dataset.InfiniteBuffer())
    same = all(
        np.array_equal(ep.rewards.reshape(-1), reward[s : s + len(ep.rewards)])
        for ep, s in zip(loaded.episodes, starts, strict=True)
    )
    rep.check(
        f"{name}: d3rlpy ReplayBuffer dump/load keeps the rewards",
        same and len(loaded.episodes) == len(LENGTHS),
        f"{len(loaded.episodes)} episodes",
    )


if __name__ == "__main__":
    sys.exit(main())
