"""Hugging Face `datasets` reads what vlmlabel writes into a save_to_disk folder, a CLIP and a VLM reward.

Run with the Python >= 3.12 venv (its `datasets` release is not the project's); vlmlabel runs in the project's
interpreter through common.vlmlabel, as a user would run it:

    /work/venvs/lerobot312/bin/python tools/clients/check_datasets.py

  1. datasets.Dataset.from_dict with an Image feature, episode_index and frame_index: 3 episodes (5, 7, 6
     frames), save_to_disk SRC.
  2. vlmlabel relabel SRC --output OUT1 (CLIP, key vlm_reward), then vlmlabel relabel OUT1 --output OUT2
     --scorer vlm --context frame --normalize episode-minmax --reward-key vlm_judge with a tiny Qwen2-VL judge
     (tools/synthetic/tiny_vlm.py): vlm_judge and vlm_judge_raw.
  3. datasets.load_from_disk(OUT2): Value('float32') features; each column's arrow field metadata (vlmlabel's
     provenance: scorer, prompt, readout, context, anchors, model_files_sha256 = the sha256 of the model's files
     computed here); vlm_reward = open_clip's own score of frame t+1 (the episode's last step its own frame),
     vlm_judge_raw = log P(answer) from transformers' generate on frame t+1 alone, vlm_judge = the min-max per
     episode of vlm_judge_raw (numpy); ds[i] and a torch DataLoader batch.
     --anchors 3 into vlm_anchored: its raw column = the oracle at round(linspace(0, T - 1, 3)), linear between.
  4. `datasets`' own tools on OUT2: filter + save_to_disk + load_from_disk, select, map, concatenate_datasets,
     to_parquet + load_dataset("parquet"): each output's columns equal the kept rows.
  5. vlmlabel on what `datasets` saved (filter output): the identical VLM relabel says "already written", a
     VLM relabel under a new key equals the oracle, `vlmlabel evaluate` reads the judge's reward.

Results: tools/clients/results/datasets.json (or $CLIENTS_RESULTS).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import common
import numpy as np

CLIP_KEY, VLM_KEY = "vlm_reward", "vlm_judge"
RAW_KEY = f"{VLM_KEY}_raw"
LENGTHS = (5, 7, 6)
H, W = 48, 64
CLIP_TOL, VLM_TOL, MINMAX_TOL = 5e-3, 1e-4, 1e-6


def frame_at(episode: int, t: int) -> np.ndarray:
    rng = np.random.default_rng(100 * episode + t)
    img = np.empty((H, W, 3), np.uint8)
    img[:] = rng.integers(30, 226, 3, dtype=np.uint8)
    y, x = (5 * t + 7 * episode) % (H - 16), (9 * t + 5 * episode) % (W - 16)
    img[y : y + 16, x : x + 16] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def create(root: Path) -> None:
    import datasets
    from PIL import Image

    rows = [(e, t) for e, n in enumerate(LENGTHS) for t in range(n)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "episode_index": datasets.Value("int64"),
            "frame_index": datasets.Value("int64"),
            "action": datasets.Value("float32"),
        }
    )
    data = {
        "image": [Image.fromarray(frame_at(e, t)) for e, t in rows],
        "episode_index": [e for e, _ in rows],
        "frame_index": [t for _, t in rows],
        "action": [float(t) for _, t in rows],
    }
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root))


def episodes(ds) -> list[np.ndarray]:
    eps = np.asarray(ds["episode_index"])
    return [np.flatnonzero(eps == e) for e in sorted(set(eps.tolist()))]


def frames_of(ds) -> np.ndarray:
    """The frames as `datasets` decodes them (its Image feature, PIL) as uint8 HWC."""
    return np.stack([np.asarray(image.convert("RGB")) for image in ds["image"]])


def next_aligned(scores: np.ndarray, slices: list[np.ndarray]) -> np.ndarray:
    """Row t = score of frame t+1 in its episode, the episode's last step its own frame (--align next)."""
    out = np.empty(len(scores), np.float64)
    for rows in slices:
        out[rows] = np.append(scores[rows][1:], scores[rows][-1])
    return out


def field_provenance(ds, key: str) -> dict:
    field = ds.data.schema.field(key)
    return json.loads((field.metadata or {}).get(b"vlmlabel", b"{}"))


def column(ds, key: str) -> np.ndarray:
    return np.asarray(ds[key], dtype=np.float32)


class Expected:
    """Each column's expected values for the frames of a dataset, from the oracles, computed once per frame set."""

    def __init__(self, rep: common.Report, clip: Path, judge: Path, prompt: str, answer: str):
        self.rep, self.clip, self.judge, self.prompt, self.answer = rep, clip, judge, prompt, answer

    def of(self, ds) -> dict[str, tuple[np.ndarray, float]]:
        frames, slices = frames_of(ds), episodes(ds)
        work = self.rep.work / "oracle"
        clip = next_aligned(common.oracle_scores(self.clip, frames, common.GOAL, work), slices)
        raw = next_aligned(common.vlm_oracle(self.judge, frames, common.GOAL, self.prompt, self.answer, work), slices)
        return {CLIP_KEY: (clip, CLIP_TOL), RAW_KEY: (raw, VLM_TOL)}


def check_values(rep: common.Report, label: str, ds, want: dict[str, tuple[np.ndarray, float]]) -> None:
    """Every column against its oracle, and the judge's reward against the min-max per episode of its raw column."""
    for key, (expected, tol) in want.items():
        got = column(ds, key)
        err = float(np.max(np.abs(got - expected))) if len(got) == len(expected) else float("nan")
        rep.check(f"{label}: {key} = oracle (align next)", err <= tol, f"{len(got)} rows, max|diff| {err:.1e}")
    raw, reward = column(ds, RAW_KEY), column(ds, VLM_KEY)
    err = float(np.max(np.abs(reward - common.minmax_per_episode(raw, episodes(ds)))))
    rep.check(f"{label}: {VLM_KEY} = min-max per episode of {RAW_KEY}", err <= MINMAX_TOL, f"max|diff| {err:.1e}")


def check_declared(rep: common.Report, label: str, ds, judge: Path) -> dict:
    import datasets

    for key in (CLIP_KEY, VLM_KEY, RAW_KEY):
        rep.check(
            f"{label}: feature {key} is Value('float32')",
            ds.features.get(key) == datasets.Value("float32"),
            str(ds.features.get(key)),
        )
    prov = field_provenance(ds, VLM_KEY)
    raw_prov = field_provenance(ds, RAW_KEY)
    missing = [k for k in common.VLM_PROVENANCE if k not in prov]
    rep.check(
        f"{label}: arrow field metadata of {VLM_KEY} holds the judge's provenance",
        not missing and prov.get("scorer") == "vlm" and prov.get("context") == "frame" and "{goal}" in prov["prompt"],
        f"missing {missing}; " + ", ".join(f"{k}={str(prov.get(k))[:50]}" for k in common.VLM_PROVENANCE),
    )
    hashes = json.loads(prov.get("model_files_sha256", "{}"))
    rep.check(
        f"{label}: model_files_sha256 (JSON text) = sha256 of the judge's files computed here",
        hashes == common.model_hashes(judge),
        f"{sorted(hashes)}",
    )
    rep.check(
        f"{label}: {RAW_KEY}'s provenance names its reward, {VLM_KEY}'s its raw column",
        raw_prov.get("raw_of") == VLM_KEY and prov.get("raw_key") == RAW_KEY,
        f"raw_of={raw_prov.get('raw_of')} raw_key={prov.get('raw_key')}",
    )
    return prov


def relabel(src: Path, out: Path | None, model: Path, *args: str):
    where = ("--output", str(out)) if out else ()
    return common.vlmlabel(
        "relabel", str(src), "--goal", common.GOAL, "--model", str(model), "--device", "cpu", *where, *args, "--quiet",
        check=False,
    )  # fmt: skip


def run_check(rep: common.Report, clip: Path, judge: Path) -> None:
    import datasets
    import torch

    src, out1, out2 = rep.work / "src", rep.work / "clip", rep.work / "clip-vlm"
    create(src)
    rep.check("datasets.Dataset.from_dict(...).save_to_disk", True, f"{len(LENGTHS)} episodes, {sum(LENGTHS)} rows")
    proc = relabel(src, out1, clip)
    if not rep.check("vlmlabel relabel SRC --output OUT1 (CLIP)", proc.returncode == 0, proc.stderr.strip()[-400:]):
        return
    vlm = [*common.VLM_ARGS, "--reward-key", VLM_KEY]
    proc = relabel(out1, out2, judge, *vlm)
    if not rep.check(
        f"vlmlabel relabel OUT1 --output OUT2 {' '.join(vlm)}", proc.returncode == 0, proc.stderr.strip()[-400:]
    ):
        return
    proc = relabel(out1, out2, judge, *vlm)
    text = (proc.stdout + proc.stderr).strip()
    rep.check(
        "the identical VLM relabel again exits 0 'already written'",
        proc.returncode == 0 and "already" in text.lower(),
        f"exit {proc.returncode}: {text[-300:]}",
    )
    ds = datasets.load_from_disk(str(out2))
    rep.check("datasets.load_from_disk(OUT2)", True, f"{len(ds)} rows, columns {ds.column_names}")
    prov = check_declared(rep, "OUT2", ds, judge)
    expected = Expected(rep, clip, judge, prov["prompt"], prov["answer"])
    check_values(rep, "OUT2", ds, expected.of(ds))
    raw = column(ds, RAW_KEY)
    rep.check(
        f"ds[i][{RAW_KEY}] is the column's value",
        float(np.float32(ds[4][RAW_KEY])) == float(raw[4]),
        str(ds[4][RAW_KEY]),
    )
    batch = next(iter(torch.utils.data.DataLoader(ds.with_format("torch", columns=[VLM_KEY, RAW_KEY]), batch_size=4)))
    rep.check(
        "torch DataLoader over with_format('torch') carries both judge columns",
        torch.equal(batch[RAW_KEY], torch.from_numpy(raw[:4])) and batch[VLM_KEY].dtype == torch.float32,
        f"{ {k: tuple(v.shape) for k, v in batch.items()} }",
    )
    rep.guarded("--anchors 3", check_anchors, rep, out2, judge, expected.of(ds)[RAW_KEY][0])
    for name, step in tools(rep, ds, expected, judge).items():
        rep.guarded(name, step)


def check_anchors(rep: common.Report, out2: Path, judge: Path, oracle_raw: np.ndarray) -> None:
    """--anchors 3: the judge reads 3 steps per episode (round(linspace(0, T - 1, 3))) and NAME_raw is the straight
    line between them; the provenance says so."""
    import datasets

    key, out = "vlm_anchored", out2.with_name("anchored")
    proc = relabel(out2, out, judge, *common.VLM_ARGS, "--anchors", "3", "--reward-key", key)
    if not rep.check("vlmlabel relabel --scorer vlm --anchors 3", proc.returncode == 0, proc.stderr.strip()[-400:]):
        return
    ds = datasets.load_from_disk(str(out))
    want = np.empty(len(ds))
    for rows in episodes(ds):
        steps = np.arange(len(rows))
        anchors = np.round(np.linspace(0, len(rows) - 1, 3)).astype(int)
        want[rows] = np.interp(steps, anchors, oracle_raw[rows][anchors])
    err = float(np.max(np.abs(column(ds, f"{key}_raw") - want)))
    rep.check(
        f"--anchors 3: {key}_raw = the oracle at 3 anchors per episode, linear between", err <= VLM_TOL, f"{err:.1e}"
    )
    prov = field_provenance(ds, key)
    rep.check(
        "--anchors 3: the provenance names the anchors and their rows",
        prov.get("anchors") == 3 and "linspace" in str(prov.get("anchor_rows")),
        f"anchors={prov.get('anchors')} anchor_rows={prov.get('anchor_rows')}",
    )


def tools(rep: common.Report, ds, expected: Expected, judge: Path) -> dict:
    import datasets

    work = rep.work
    keys = (CLIP_KEY, VLM_KEY, RAW_KEY)

    def same_rows(label: str, new, rows: np.ndarray) -> None:
        ok = {k: np.array_equal(column(new, k), column(ds, k)[rows]) for k in keys}
        rep.check(f"{label}: {', '.join(keys)} equal the kept rows", all(ok.values()), f"{len(new)} rows; {ok}")

    def filtered():
        new = ds.filter(lambda e: e != 1, input_columns="episode_index")
        new.save_to_disk(str(work / "filtered"))
        again = datasets.load_from_disk(str(work / "filtered"))
        same_rows("filter + save_to_disk + load_from_disk", again, np.flatnonzero(np.asarray(ds["episode_index"]) != 1))
        rep.note(
            "filter + save_to_disk: arrow field metadata of the judge's column",
            "kept" if field_provenance(again, VLM_KEY) else "dropped by datasets",
        )
        relabel_saved(rep, work / "filtered", expected, judge)

    def selected():
        rows = np.array([0, 3, 9, 17])
        same_rows("select", ds.select(rows.tolist()), rows)

    def mapped():
        new = ds.map(lambda r: {"advantage": r[VLM_KEY] - r[RAW_KEY]})
        want = column(ds, VLM_KEY) - column(ds, RAW_KEY)
        rep.check(
            "map over the judge's columns",
            np.allclose(column(new, "advantage"), want, atol=1e-6),
            f"{len(new)} rows",
        )

    def concatenated():
        new = datasets.concatenate_datasets([ds.select(range(5)), ds.select(range(5, len(ds)))])
        same_rows("concatenate_datasets of two selects", new, np.arange(len(ds)))

    def parquet():
        path = work / "out2.parquet"
        ds.to_parquet(str(path))
        new = datasets.load_dataset("parquet", data_files=str(path), split="train")
        same_rows("to_parquet + load_dataset('parquet')", new, np.arange(len(ds)))

    return {
        "filter": filtered,
        "select": selected,
        "map": mapped,
        "concatenate_datasets": concatenated,
        "to_parquet": parquet,
    }


def relabel_saved(rep: common.Report, folder: Path, expected: Expected, judge: Path) -> None:
    """vlmlabel on a folder `datasets` saved after its filter (which drops arrow field metadata, so vlmlabel's
    provenance with it): the judge's old key is foreign now and refused in one line; a new key is written and
    equals the oracle; evaluate reads it."""
    import datasets

    proc = relabel(folder, folder.with_name("filtered-again"), judge, *common.VLM_ARGS, "--reward-key", VLM_KEY)
    lines = proc.stderr.strip().splitlines()
    rep.check(
        f"vlmlabel refuses, in one line, to replace {VLM_KEY} once `datasets` dropped its provenance",
        proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"),
        f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}",
    )
    new_key = "vlm_judge_after_filter"
    out = folder.with_name("filtered-newkey")
    proc = relabel(folder, out, judge, *common.VLM_ARGS, "--reward-key", new_key)
    if not rep.check(
        f"vlmlabel relabel --scorer vlm --reward-key {new_key} on the datasets-saved filter output",
        proc.returncode == 0,
        f"exit {proc.returncode} {proc.stderr.strip()[-400:]}",
    ):
        return
    new = datasets.load_from_disk(str(out))
    want, _ = expected.of(new)[RAW_KEY]
    err = float(np.max(np.abs(column(new, f"{new_key}_raw") - want)))
    rep.check(f"{new_key}_raw = oracle of the frames `datasets` kept", err <= VLM_TOL, f"max|diff| {err:.1e}")
    same = np.array_equal(column(new, f"{new_key}_raw"), column(new, RAW_KEY))
    rep.check(f"{new_key}_raw = the filtered {RAW_KEY} (same frames, same judge)", same, "")
    proc = common.vlmlabel("evaluate", str(out), "--reward-key", new_key, "--json", check=False)
    rep.check(
        f"vlmlabel evaluate --reward-key {new_key} (a judge's reward, no --model)",
        proc.returncode == 0 and "voc" in proc.stdout.lower(),
        f"exit {proc.returncode} {(proc.stderr or proc.stdout).strip()[-300:]}",
    )


def main() -> int:
    rep = common.Report("datasets")
    import datasets
    import pyarrow
    import torch

    rep.info.update(
        datasets=datasets.__version__,
        pyarrow=pyarrow.__version__,
        numpy=np.__version__,
        vlmlabel_version=common.vlmlabel_version(),
    )
    print(rep.info, flush=True)
    torch.set_num_threads(1)
    clip = common.make_tiny_model(rep.work / "tiny-clip")
    judge = common.make_tiny_vlm(rep.work / "tiny-vlm")
    rep.guarded("datasets: check", run_check, rep, clip, judge)
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
