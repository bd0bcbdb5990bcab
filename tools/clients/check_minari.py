"""Minari reads what vlmlabel writes: a real Minari dataset with image observations, relabelled in place.

Run in a venv that has minari (and sees vlmlabel's dependencies for the oracle through the project
interpreter; see README.md):

    /work/venvs/clients311/bin/python tools/clients/check_minari.py

Steps:
  1. Record two Minari datasets with Minari's own DataCollector around CartPole-v1 whose observation is
     its rgb_array render (gymnasium AddRenderObservation(render_only=True), downsampled 4x), random
     actions, 3 episodes each, the cart position in every info: "cartpole/pixels-infos-v0" with
     record_infos=True (an `infos` group with Minari's own T+1 rows is already there) and
     "cartpole/pixels-v0" with record_infos=False (no infos recorded). Same env spec, so they combine.
  2. `vlmlabel inspect` and `vlmlabel relabel <main_data.hdf5> --goal ... --model <tiny dir>` in place
     (default --align next, key vlm_reward) and again with --align frame into vlm_frame.
  3. minari.load_dataset: every episode's infos hold the keys; their length is compared with
     len(observations) (T+1) and len(rewards) (T); the values are compared with open_clip's own scores
     of the decoded observations (the oracle), under each row convention; the written attributes.
     And `vlmlabel relabel --scorer vlm --context frame --normalize episode-minmax --reward-key vlm_judge` in
     place with a tiny Qwen2-VL judge (tools/synthetic/tiny_vlm.py): vlm_judge_raw (log P(answer)) against
     transformers' own generate on each observation Minari decodes, vlm_judge = its min-max per episode, the
     judge's attributes (model_files_sha256 = the sha256 of its files), an identical rerun "already written".
  4. Minari's own tools on the labelled data: iterate_episodes, sample_episodes, filter_episodes,
     `minari show`, `minari list local`, combine_datasets (and that the combined episodes keep the key),
     recover_environment; frames/actions/rewards byte-identical before and after the relabel; a second
     identical relabel says "already written".

Exit status 1 if any check failed. Results: tools/clients/results/minari.json (or $CLIENTS_RESULTS).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import common
import numpy as np
from minari_env import make_env

KEY, FRAME_KEY = "vlm_reward", "vlm_frame"
VLM_KEY = "vlm_judge"  # --scorer vlm (common.VLM_ARGS): VLM_KEY and VLM_KEY_raw
VLM_RAW = f"{VLM_KEY}_raw"
VLM_TOL, MINMAX_TOL = 1e-4, 1e-6
EPISODES, MAX_STEPS, STRIDE = 3, 30, 4
TOL = 5e-3  # vlmlabel's on-device preprocessing vs open_clip's PIL pipeline: uint8 rounding (tests use 2e-3)


def record(dataset_id: str, with_info: bool, seed: int):
    import minari

    env = minari.DataCollector(make_env(MAX_STEPS, STRIDE), record_infos=with_info)
    rng = np.random.default_rng(seed)
    for episode in range(EPISODES):
        env.reset(seed=seed + episode)
        while True:
            _, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
            if terminated or truncated:
                break
    dataset = env.create_dataset(
        dataset_id=dataset_id,
        algorithm_name="random",
        author="vlmlabel client check",
        description="CartPole pixels, random actions",
    )
    env.close()
    return dataset


def main_file(dataset_id: str) -> Path:
    from minari.storage import get_dataset_path

    path = Path(get_dataset_path(dataset_id)) / "data" / "main_data.hdf5"
    assert path.exists(), f"{path} missing"
    return path


def fingerprint(path: Path) -> dict[str, str]:
    """sha256 of every dataset in the file (values), to show nothing but the new keys changed."""
    import h5py

    digests: dict[str, str] = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                h = hashlib.sha256()
                if obj.dtype.kind == "O":
                    for row in data:
                        h.update(np.asarray(row).tobytes())
                else:
                    h.update(np.ascontiguousarray(data).tobytes())
                digests[name] = h.hexdigest()

        f.visititems(visit)
    return digests


def attrs_of(path: Path, dataset: str) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f[dataset].attrs.items()}


def compare(
    rep: common.Report, label: str, values: np.ndarray, obs_scores: np.ndarray, align: str, tol: float = TOL
) -> str:
    """Which row convention the values follow, judged against the oracle scores of the T+1 observations."""
    n, t1 = len(values), len(obs_scores)
    hypotheses = {}
    if n == t1:
        hypotheses["per observation: row i = score(o_i), i=0..T"] = obs_scores
    if n == t1 - 1:
        hypotheses["per step, next: row t = score(o_{t+1})"] = obs_scores[1:]
        hypotheses["per step, frame: row t = score(o_t)"] = obs_scores[:-1]
    if not hypotheses:
        rep.check(f"{label}: length fits a convention", False, f"{n} values for {t1} observations")
        return "none"
    errs = {h: float(np.max(np.abs(values - ref))) for h, ref in hypotheses.items()}
    best = min(errs, key=errs.get)
    wanted_step = "next" if align == "next" else "frame"
    ok = errs[best] <= tol and ("per observation" in best or wanted_step in best)
    rep.check(
        f"{label}: values match open_clip oracle",
        ok,
        "; ".join(f"{h}: max|diff|={e:.2e}" for h, e in errs.items()) + f" -> best: {best}",
    )
    return best


def main() -> int:
    rep = common.Report("minari")
    work = rep.work
    os.environ["MINARI_DATASETS_PATH"] = str(work / "minari_datasets")
    import gymnasium
    import h5py
    import minari

    rep.info.update(
        minari=minari.__version__,
        gymnasium=gymnasium.__version__,
        h5py=h5py.__version__,
        numpy=np.__version__,
        vlmlabel_version=common.vlmlabel_version(),
        MINARI_DATASETS_PATH=os.environ["MINARI_DATASETS_PATH"],
    )
    print(rep.info, flush=True)
    model = common.make_tiny_model(work / "tiny-clip")
    judge = common.make_tiny_vlm(work / "tiny-vlm")

    datasets = {"cartpole/pixels-infos-v0": True, "cartpole/pixels-v0": False}
    for seed, (dataset_id, with_info) in enumerate(datasets.items()):
        if (
            rep.guarded(f"{dataset_id}: record with minari.DataCollector", record, dataset_id, with_info, 10 * seed)
            is None
        ):
            return rep.finish()
        path = main_file(dataset_id)
        with h5py.File(path, "r") as f:
            ep0 = f["episode_0"]
            obs = ep0["observations"]
            rep.note(
                f"{dataset_id}: file layout",
                f"{path}; episode_0/observations {obs.shape} {obs.dtype} "
                f"(vlen={h5py.check_vlen_dtype(obs.dtype)}); infos group: {'infos' in ep0}"
                + (f" keys {list(ep0['infos'])}" if "infos" in ep0 else ""),
            )
        before = fingerprint(path)
        proc = common.vlmlabel("inspect", str(path), check=False)
        rep.check(
            f"{dataset_id}: vlmlabel inspect",
            proc.returncode == 0 and "minari" in proc.stdout.lower(),
            f"exit {proc.returncode}; " + " / ".join(proc.stdout.strip().splitlines()[:3])[:400],
        )
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
            rep.check(
                f"{dataset_id}: vlmlabel relabel --align {align} --reward-key {key} in place",
                proc.returncode == 0,
                f"exit {proc.returncode} {proc.stderr.strip()[-500:]}",
            )
        proc = vlm_relabel(path, judge)
        rep.check(
            f"{dataset_id}: vlmlabel relabel {' '.join(common.VLM_ARGS)} --reward-key {VLM_KEY} in place",
            proc.returncode == 0,
            f"exit {proc.returncode} {proc.stderr.strip()[-500:]}",
        )
        after = fingerprint(path)
        changed = sorted(k for k in before if before[k] != after.get(k))
        added = sorted(set(after) - set(before))
        rep.check(f"{dataset_id}: existing datasets unchanged by relabel", not changed, f"changed: {changed}")
        rep.note(f"{dataset_id}: datasets added by relabel", ", ".join(added))
        rep.check(
            f"{dataset_id}: nothing added outside episode_K/infos",
            all(a.split("/")[1:2] == ["infos"] for a in added),
            ", ".join(added),
        )
        attrs = attrs_of(path, f"episode_0/infos/{KEY}")
        rep.note(
            f"{dataset_id}: attributes of episode_0/infos/{KEY}",
            ", ".join(f"{k}={str(v)[:60]}" for k, v in sorted(attrs.items()) if k != "preprocess"),
        )
        proc = common.vlmlabel(
            "relabel", str(path), "--goal", common.GOAL, "--model", str(model), "--device", "cpu", check=False
        )
        rep.check(
            f"{dataset_id}: identical second relabel exits 0 'already written'",
            proc.returncode == 0 and "already" in (proc.stdout + proc.stderr).lower(),
            f"exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-300:]}",
        )

        proc = vlm_relabel(path, judge)
        rep.check(
            f"{dataset_id}: identical second VLM relabel exits 0 'already written'",
            proc.returncode == 0 and "already" in (proc.stdout + proc.stderr).lower(),
            f"exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-300:]}",
        )
        rep.guarded(f"{dataset_id}: VLM attributes", check_vlm_attrs, rep, dataset_id, path, judge)

        rep.guarded(f"{dataset_id}: minari.load_dataset", check_loaded, rep, dataset_id, model, with_info, attrs)
        rep.guarded(f"{dataset_id}: minari.load_dataset (judge)", check_judged, rep, dataset_id, path, judge)
        if with_info:  # vlmlabel's own reader of the labelled file: evaluate against Minari's T+1 info
            proc = common.vlmlabel(
                "evaluate", str(path), "--reward-key", KEY, "--against", "cart_x", "--json", check=False
            )
            rep.check(
                f"{dataset_id}: vlmlabel evaluate --reward-key {KEY} --against cart_x (a Minari info)",
                proc.returncode == 0,
                f"exit {proc.returncode} {(proc.stderr or proc.stdout).strip()[-300:]}",
            )

    check_tools(rep, list(datasets))
    return rep.finish()


def vlm_relabel(path: Path, judge: Path):
    return common.vlmlabel(
        "relabel", str(path), "--goal", common.GOAL, "--model", str(judge), "--device", "cpu", *common.VLM_ARGS,
        "--reward-key", VLM_KEY, "--quiet", check=False,
    )  # fmt: skip


def check_vlm_attrs(rep: common.Report, dataset_id: str, path: Path, judge: Path) -> None:
    """The judge's provenance as h5py reads it back: names, JSON text of the model's file hashes, raw link."""
    attrs, raw = attrs_of(path, f"episode_0/infos/{VLM_KEY}"), attrs_of(path, f"episode_0/infos/{VLM_RAW}")
    missing = [k for k in common.VLM_PROVENANCE if k not in attrs]
    rep.check(
        f"{dataset_id}: attributes of episode_0/infos/{VLM_KEY} hold the judge's provenance",
        not missing and attrs.get("scorer") == "vlm" and attrs.get("context") == "frame",
        f"missing {missing}; " + ", ".join(f"{k}={str(attrs.get(k))[:40]}" for k in common.VLM_PROVENANCE),
    )
    hashes = json.loads(attrs.get("model_files_sha256", "{}"))
    rep.check(
        f"{dataset_id}: model_files_sha256 (JSON text) = sha256 of the judge's files computed here",
        hashes == common.model_hashes(judge),
        f"{sorted(hashes)}",
    )
    rep.check(
        f"{dataset_id}: {VLM_RAW} names its reward, {VLM_KEY} its raw column",
        raw.get("raw_of") == VLM_KEY and attrs.get("raw_key") == VLM_RAW,
        f"raw_of={raw.get('raw_of')} raw_key={attrs.get('raw_key')}",
    )


def check_judged(rep: common.Report, dataset_id: str, path: Path, judge: Path) -> None:
    """infos[VLM_RAW] as Minari loads it = the judge's log P(answer) of each observation by transformers' generate
    (on the observations Minari decodes), under the row convention of the CLIP keys; infos[VLM_KEY] = its min-max
    per episode."""
    import minari

    attrs = attrs_of(path, f"episode_0/infos/{VLM_KEY}")
    prompt, answer = str(attrs["prompt"]), str(attrs["answer"])
    conventions = set()
    for episode in minari.load_dataset(dataset_id).iterate_episodes():
        infos = episode.infos or {}
        label = f"{dataset_id} episode {episode.id}"
        if not rep.check(
            f"{label}: infos['{VLM_KEY}'] and infos['{VLM_RAW}'] present",
            VLM_KEY in infos and VLM_RAW in infos,
            f"infos keys: {sorted(infos)}",
        ):
            continue
        reward, raw = np.asarray(infos[VLM_KEY]), np.asarray(infos[VLM_RAW])
        rep.check(
            f"{label}: judge columns float32, finite, {len(raw)} rows each",
            reward.dtype == raw.dtype == np.float32 and len(reward) == len(raw) and bool(np.isfinite(raw).all()),
            f"{reward.dtype} {raw.dtype} {len(reward)} {len(raw)}",
        )
        obs = np.asarray(episode.observations)
        scores = common.vlm_oracle(judge, obs, common.GOAL, prompt, answer, rep.work / "oracle")
        conventions.add(compare(rep, f"{label} infos['{VLM_RAW}'] (judge)", raw, scores, "next", VLM_TOL))
        err = float(np.max(np.abs(reward - common.minmax_per_episode(raw, [np.arange(len(raw))]))))
        rep.check(f"{label}: infos['{VLM_KEY}'] = min-max of infos['{VLM_RAW}']", err <= MINMAX_TOL, f"{err:.1e}")
    rep.check(
        f"{dataset_id}: the judge's infos have T+1 values (one per observation), as CLIP's",
        conventions == {"per observation: row i = score(o_i), i=0..T"},
        f"conventions seen: {sorted(conventions)}",
    )


def check_loaded(rep: common.Report, dataset_id: str, model: Path, with_info: bool, attrs: dict) -> None:
    import minari

    dataset = minari.load_dataset(dataset_id)
    rep.check(
        f"{dataset_id}: minari.load_dataset", True, f"{dataset.total_episodes} episodes, {dataset.total_steps} steps"
    )
    conventions = set()
    for episode in dataset.iterate_episodes():
        t = len(episode.rewards)
        n_obs = len(episode.observations)
        infos = episode.infos or {}
        label = f"{dataset_id} episode {episode.id}"
        if not rep.check(
            f"{label}: infos['{KEY}'] and infos['{FRAME_KEY}'] present",
            KEY in infos and FRAME_KEY in infos,
            f"infos keys: {sorted(infos)}",
        ):
            continue
        r, rf = np.asarray(infos[KEY]), np.asarray(infos[FRAME_KEY])
        lengths = (
            f"len(infos['{KEY}'])={len(r)}, len(infos['{FRAME_KEY}'])={len(rf)}, "
            f"len(observations)={n_obs}, len(rewards)={t}"
        )
        if with_info:
            lengths += f", len(infos['cart_x'])={len(infos['cart_x'])} (Minari's own info)"
        rep.note(f"{label}: lengths", lengths)
        rep.check(f"{label}: dtype float32, finite", r.dtype == np.float32 and bool(np.isfinite(r).all()), str(r.dtype))
        obs_scores = common.oracle_scores(model, np.asarray(episode.observations), common.GOAL, rep.work / "oracle")
        conventions.add(compare(rep, f"{label} infos['{KEY}'] (align next)", r, obs_scores, "next"))
        conventions.add(compare(rep, f"{label} infos['{FRAME_KEY}'] (align frame)", rf, obs_scores, "frame"))
        if len(r) == t:  # per step: next reward t is frame score t+1
            rep.check(
                f"{label}: next[t] == frame[t+1] (same code path, per-step rows)",
                bool(np.allclose(r[:-1], rf[1:], atol=1e-5)),
                f"max|diff|={np.max(np.abs(r[:-1] - rf[1:])):.2e}",
            )
        elif len(r) == t + 1:
            rep.check(
                f"{label}: per-observation rows equal for both alignments",
                bool(np.allclose(r, rf, atol=1e-5)),
                f"max|diff|={np.max(np.abs(r - rf)):.2e}",
            )
            rep.check(
                f"{label}: T+1 rows line up with Minari's own T+1 infos",
                not with_info or len(r) == len(infos["cart_x"]),
                "",
            )
    rep.check(
        f"{dataset_id}: contract infos[key] has T+1 values (one per observation)",
        conventions == {"per observation: row i = score(o_i), i=0..T"},
        f"conventions seen: {sorted(conventions)}; attrs align={attrs.get('align')} rows={attrs.get('rows', '(none)')}",
    )


def check_tools(rep: common.Report, ids: list[str]) -> None:
    import minari

    first = minari.load_dataset(ids[0])

    def sample():
        sampled = first.sample_episodes(2)
        rep.check(
            "sample_episodes(2) returns episodes with the CLIP and judge keys",
            all(k in e.infos for e in sampled for k in (KEY, VLM_KEY, VLM_RAW)),
            f"ids {[int(e.id) for e in sampled]}",
        )

    def filtered():
        kept = first.filter_episodes(lambda e: float(np.mean(e.infos[KEY])) > -2.0)
        rep.check(
            "filter_episodes on the reward in infos",
            len(kept) == first.total_episodes,
            f"{len(kept)} of {first.total_episodes}",
        )

    def recover():
        try:
            env = first.recover_environment()
        except TypeError as exc:
            if "pixels_only" in str(exc):  # gymnasium 1.0.0: AddRenderObservation records a wrong argument name
                rep.note(
                    "recover_environment",
                    f"not checkable with this gymnasium: {exc} (the env spec Minari "
                    "stored at recording time, before vlmlabel ran; unrelated to the rewards)",
                )
                return
            raise
        rep.check("recover_environment", env.observation_space == first.observation_space, str(env.observation_space))
        env.close()

    def cli():
        minari_cli = str(Path(sys.executable).with_name("minari"))
        for args in (["show", ids[0]], ["list", "local"]):
            env = {**os.environ, "PYTHONPATH": str(common.HERE)}  # the env spec names minari_env's wrappers
            proc = common.run([minari_cli, *args], check=False, env=env)
            rep.check(
                f"minari {' '.join(args)}", proc.returncode == 0, f"exit {proc.returncode} {proc.stderr.strip()[-300:]}"
            )

    def combine():
        combined_id = "cartpole/pixels-combined-v0"
        combined = minari.combine_datasets([minari.load_dataset(i) for i in ids], combined_id)
        episodes = list(combined.iterate_episodes())
        have = [KEY in (e.infos or {}) for e in episodes]
        rep.check(
            "combine_datasets keeps infos[key] in every episode",
            all(have),
            f"{sum(have)}/{len(have)} episodes; lengths "
            f"{[len(e.infos[KEY]) for e in episodes if KEY in (e.infos or {})]}"
            f" vs observations {[len(e.observations) for e in episodes]}",
        )
        originals = [e for i in ids for e in minari.load_dataset(i).iterate_episodes()]
        same = len(originals) == len(episodes) and all(
            np.array_equal(a.infos[KEY], b.infos[KEY]) for a, b in zip(originals, episodes, strict=True)
        )
        rep.check("combined rewards equal the originals", same, "")
        same = len(originals) == len(episodes) and all(
            np.array_equal(a.infos[k], b.infos[k])
            for a, b in zip(originals, episodes, strict=True)
            for k in (VLM_KEY, VLM_RAW)
        )
        rep.check(f"combined {VLM_KEY} and {VLM_RAW} equal the originals", same, "")
        path = main_file(combined_id)
        attrs = attrs_of(path, f"episode_0/infos/{KEY}")
        rep.note(
            "combine_datasets and vlmlabel's provenance attributes",
            "kept" if "goal" in attrs else f"dropped (Minari copies values only); attrs now {sorted(attrs)}",
        )
        # vlmlabel on the file Minari wrote: the same key (now without provenance) and a new key.
        proc = common.vlmlabel(
            "relabel",
            str(path),
            "--goal",
            common.GOAL,
            "--model",
            str(rep.work / "tiny-clip"),
            "--device",
            "cpu",
            "--overwrite",
            "--quiet",
            check=False,
        )
        rep.note(
            f"vlmlabel relabel --overwrite {KEY} on the combined dataset",
            f"exit {proc.returncode} {proc.stderr.strip()[-300:]}",
        )
        new_key = "vlm_reward_combined"
        proc = common.vlmlabel(
            "relabel",
            str(path),
            "--goal",
            common.GOAL,
            "--model",
            str(rep.work / "tiny-clip"),
            "--device",
            "cpu",
            "--reward-key",
            new_key,
            "--quiet",
            check=False,
        )
        if rep.check(
            f"vlmlabel relabel --reward-key {new_key} on the combined dataset",
            proc.returncode == 0,
            f"exit {proc.returncode} {proc.stderr.strip()[-300:]}",
        ):
            reloaded = list(minari.load_dataset(combined_id).iterate_episodes())
            conventions, copied_diff = set(), 0.0
            for e in reloaded:
                values = np.asarray(e.infos[new_key])
                scores = common.oracle_scores(
                    rep.work / "tiny-clip", np.asarray(e.observations), common.GOAL, rep.work / "oracle"
                )
                conventions.add(compare(rep, f"combined episode {e.id} infos['{new_key}']", values, scores, "next"))
                if len(values) == len(e.infos[KEY]):
                    copied_diff = max(copied_diff, float(np.max(np.abs(values - e.infos[KEY]))))
            rep.note(
                f"combined dataset: infos[{new_key}] minus the copied infos[{KEY}]",
                f"max|diff|={copied_diff:.2e} (Minari's combine decodes and re-encodes the JPEG frames, so "
                f"the frames themselves changed); conventions {sorted(conventions)}",
            )

    for name, step in (
        ("sample_episodes", sample),
        ("filter_episodes", filtered),
        ("recover_environment", recover),
        ("minari CLI", cli),
        ("combine_datasets", combine),
    ):
        rep.guarded(name, step)


if __name__ == "__main__":
    sys.exit(main())
