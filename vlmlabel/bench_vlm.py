"""`vlmlabel bench --scorer vlm`: a VLM judge's queries/s end to end, next to the model alone and a naive loop.

Three paths over the same queries (the run's own: its --context, --anchors, goal and batch size), the same model
and precision; model loading is excluded from all three:

  end-to-end  -- ``run.lifecycle.relabel_file`` with ``--scorer vlm`` into a temporary output: the seconds of the
                 scoring phase as the run's summary reports them (reading and decoding frames, building queries,
                 chat template and processor, the batched forwards, saved progress); the final write excluded;
  model-only  -- ``Judge.readouts`` on the same batches of queries, their frames already decoded in memory: chat
                 template, processor and one forward per batch, one batch after another (no reading, no decoding);
  naive       -- one query per forward, as LeRobot's labelling scripts do: the processor on that query alone, then
                 ``generate(max_new_tokens=1, output_logits=True, return_dict_in_generate=True)`` and the readout
                 from that step's logits.

Also timed, for the record: forward-only (``Judge.readouts_of`` on processor outputs made beforehand). Each path is
warmed up once, then timed ``repeats`` times, interleaved so a busy shared machine slows all alike; the median is
reported, and the ``paired_`` ratios are the medians of each repetition's own ratio. Queries/s counts queries;
frames/s counts the dataset's steps labelled (with --anchors all, one query per step and goal).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmlabel.bench import BENCH_GOAL, PathTimes, _environment, _peak_rss_mb, write_synthetic
from vlmlabel.device import resolve_device, resolve_precision
from vlmlabel.errors import VlmlabelError
from vlmlabel.formulation import RewardConfig
from vlmlabel.queries import JudgeSpec, QueryPlan
from vlmlabel.reader.decode_workers import resolve_workers
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest, RelabelSummary
from vlmlabel.run.setup import Machine
from vlmlabel.scorers.vlm import QueryRows, VlmScorer, frame_rate, load_judge
from vlmlabel.sources import Align, open_source
from vlmlabel.sources.base import VideoDecoder

VLM_EPISODE_STEPS = 64  # steps per episode of the synthetic file
DEFAULT_QUERIES = {"cuda": 1024, "mps": 256, "cpu": 256}  # synthetic steps per timed run, per device
TINY_MODULE = "tools.synthetic.tiny_vlm"

PATHS = {
    "end_to_end": "relabel_file --scorer vlm into a temporary output; the scoring phase's seconds from the run's "
    "summary (reading, decoding, queries, processor, batched forwards, saved progress; model load and final "
    "write excluded)",
    "model_only": "Judge.readouts per batch of the same queries, frames already in memory: chat template, "
    "processor and one forward per batch, one batch after another",
    "forward_only": "Judge.readouts_of per batch on processor outputs made beforehand: the forwards alone",
    "naive": "one query per forward: the processor on that query alone, then generate(max_new_tokens=1, "
    "output_logits=True, return_dict_in_generate=True), as LeRobot's labelling scripts do",
}


@dataclass
class VlmBenchConfig:
    model: str | None = None  # a judge's folder or Hub id; None with ``tiny``
    tiny: str | None = None  # build a tiny random judge of this family (tools/synthetic/tiny_vlm.py)
    precision: str = "auto"
    batch_size: int | None = None  # queries per batch; None: the judge's default (its token budget)
    device: str = "auto"
    frames: int | None = None  # synthetic steps; None: a default per device
    episode_steps: int = VLM_EPISODE_STEPS
    frame_size: tuple[int, int] = (84, 84)
    encoding: str = "raw"
    source: Path | None = None  # a dataset to bench on (whole), instead of the synthetic file
    image_key: str | None = None
    repeats: int = 3
    goal: str = BENCH_GOAL
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    workers: int | None = None  # as relabel's --workers


def tiny_judge(family: str, out: Path) -> Path:
    """A tiny random judge of ``family`` built in ``out`` by the source tree's ``tools/synthetic/tiny_vlm.py``."""
    try:
        tiny = importlib.import_module(TINY_MODULE)
    except ImportError:
        raise VlmlabelError(
            f"--tiny needs vlmlabel's source tree ({TINY_MODULE.replace('.', '/')}.py, run from the checkout) and "
            "pip install 'vlmlabel[vlm]'; or give a judge's folder as --model"
        ) from None
    if family not in tiny.FAMILIES:
        raise VlmlabelError(f"--tiny {family!r}: use one of {', '.join(tiny.FAMILIES)}")
    return Path(tiny.build_tiny_vlm(family, out))


@dataclass
class Workload:
    """The run's queries, batched as the run batches them, and what they cost in tokens."""

    batch_size: int
    batches: list[list[Any]]  # lists of judge Query
    episodes: int
    steps: int
    queries_per_episode: list[int]

    @property
    def queries(self) -> int:
        return sum(len(b) for b in self.batches)


def _workload(path: Path, config: VlmBenchConfig, judge: Any, spec: JudgeSpec) -> Workload:
    """The queries a relabel of ``path`` asks, in its batches, built through the scorer's own ``QueryRows``."""
    with open_source(str(path), config.image_key) as source:
        episodes = source.episodes(Align.next)  # relabel's default alignment
        steps = [e.steps for e in episodes]
        plan = QueryPlan.of(steps, spec.anchors, 1)
        fps = frame_rate(source)
        rows = QueryRows(source, episodes, plan, judge, spec, [config.goal], resolve_workers(config.workers or 0), fps)
        batch_size = config.batch_size or rows.default_batch_size()
        with contextlib.closing(rows.batches(0, plan.total, batch_size)) as batches:
            held = list(batches)
    counts = np.diff(plan.bounds).tolist()
    return Workload(batch_size, held, len(episodes), sum(steps), [int(c) for c in counts])


def _relabel(request: RelabelRequest, output: Path) -> float:
    summary = relabel_file(_with_output(request, output))
    assert isinstance(summary, RelabelSummary)  # a whole run into a fresh output
    return float(summary.result.seconds)


def _with_output(request: RelabelRequest, output: Path) -> RelabelRequest:
    return replace(request, output=output)


def run_model_only(judge: Any, batches: list[list[Any]]) -> np.ndarray:
    return np.concatenate([judge.readouts(batch) for batch in batches])


def run_forward_only(judge: Any, prepared: list[Any]) -> np.ndarray:
    out = np.concatenate([judge.readouts_of(inputs) for inputs in prepared])
    if judge.device.type == "cuda":
        torch.cuda.synchronize(judge.device)
    return out


def run_naive(judge: Any, queries: Iterator[Any]) -> np.ndarray:
    """One query per forward through ``generate``: the loop a labelling script writes."""
    out = []
    for query in queries:
        inputs = judge.inputs([query]).to(judge.device)
        with torch.inference_mode():
            generated = judge.model.generate(
                **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        logp = torch.log_softmax(generated.logits[0].float(), dim=-1)[:, list(judge.answer_ids)]
        out.append(judge.readout.value(logp).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' generation warnings (pad token, generation flags) off while the naive loop runs."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check(config: VlmBenchConfig) -> None:
    if config.repeats < 1:
        raise VlmlabelError(f"--repeats must be at least 1, not {config.repeats}")
    if config.frames is not None and config.frames < 1:
        raise VlmlabelError(f"--frames must be at least 1, not {config.frames}")
    if config.episode_steps < 1:
        raise VlmlabelError(f"--episode-steps must be at least 1, not {config.episode_steps}")
    if config.encoding not in ("raw", "jpeg"):
        raise VlmlabelError(f"--encoding {config.encoding!r}: use raw or jpeg")
    if config.source is not None and config.frames is not None:
        raise VlmlabelError("--frames sizes the synthetic file; with SOURCE the whole dataset is benchmarked")
    if (config.model is None) == (config.tiny is None):
        raise VlmlabelError("bench --scorer vlm needs --model FOLDER (a judge) or --tiny FAMILY, one of the two")
    config.judge.validate()


def run_vlm_bench(config: VlmBenchConfig, status: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the VLM benchmark; the result holds every key of the --json contract (see the module docstring)."""
    _check(config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="vlmlabel-bench-vlm-") as folder:
        work = Path(folder)
        model = config.model or str(tiny_judge(str(config.tiny), work / f"tiny-{config.tiny}"))
        path = config.source
        if path is None:
            frames = config.frames or DEFAULT_QUERIES.get(device.type, DEFAULT_QUERIES["cpu"])
            status(f"writing {frames:,} synthetic {config.encoding} frames")
            path = write_synthetic(
                work / "bench.h5", frames, config.frame_size, config.encoding, episode_steps=config.episode_steps
            )
        request = VlmScorer().checked(_request(config, model, path, device, precision))
        spec = VlmScorer.spec(request)
        status(f"loading {model} on {device}")
        card = VlmScorer().card(request, Machine.of(str(device), precision, None, VideoDecoder.cpu))
        judge = load_judge(spec, card.judge, device, precision)
        status("building the queries")
        load = _workload(path, config, judge, spec)
        request = replace(request, batch_size=load.batch_size)  # the run's batches are the workload's
        result = _time_paths(config, judge, load, request, work, status)
        frame_format = _frame_format(path, config.image_key)
    source = str(config.source) if config.source else f"synthetic {config.encoding} {config.frame_size[0]}x"
    if not config.source:
        source += f"{config.frame_size[1]}, episodes of {config.episode_steps} steps"
    return {
        "scorer": "vlm",
        "device": str(device),
        "model": config.model or f"tiny {config.tiny} (random weights)",
        "family": card.judge.family,
        "tiny": config.tiny,
        "precision": precision,
        "source": source,
        "frame_format": frame_format,
        "goal": config.goal,
        "judge": {**judge.describe(), "context": spec.context.value, "context_frames": spec.frames},
        "anchors": "all" if spec.anchors is None else spec.anchors,
        "frames": load.steps,
        "episodes": load.episodes,
        "queries": load.queries,
        "queries_per_episode": {
            "mean": load.queries / max(1, load.episodes),
            "min": min(load.queries_per_episode, default=0),
            "max": max(load.queries_per_episode, default=0),
        },
        "batch_size": load.batch_size,
        "batches": len(load.batches),
        **result,
        "definitions": PATHS,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "environment": {**_environment(device), "transformers": _version("transformers")},
    }


def _time_paths(
    config: VlmBenchConfig,
    judge: Any,
    load: Workload,
    request: RelabelRequest,
    work: Path,
    status: Callable[[str], None],
) -> dict[str, Any]:
    """Warm up, then time the four paths ``repeats`` times, interleaved; medians, ratios, tokens per query."""
    queries = [q for batch in load.batches for q in batch]
    suffix = Path(str(request.source)).suffix
    status("warm-up")
    prepared = [judge.inputs(batch) for batch in load.batches]
    tokens = torch.cat([p["attention_mask"].sum(dim=1) for p in prepared]).float()
    _relabel(request, work / f"warm{suffix}")
    run_model_only(judge, load.batches[:1])
    with _quiet_transformers():
        run_naive(judge, iter(queries[:2]))
    times = {name: PathTimes() for name in ("end_to_end", "model_only", "forward_only", "naive")}
    end_to_end: list[float] = []
    diff = 0.0
    for repeat in range(config.repeats):
        status(f"repetition {repeat + 1}/{config.repeats}")
        end_to_end.append(_relabel(request, work / f"out-{repeat}{suffix}"))
        batched = times["model_only"].time(lambda: run_model_only(judge, load.batches))
        times["forward_only"].time(lambda: run_forward_only(judge, prepared))
        with _quiet_transformers():
            naive = times["naive"].time(lambda: run_naive(judge, iter(queries)))
        diff = max(diff, float(np.abs(batched - naive).max()))
    times["end_to_end"].seconds = end_to_end
    seconds = {name: statistics.median(t.seconds) for name, t in times.items()}
    qps = {name: load.queries / s for name, s in seconds.items()}
    return {
        **{f"{name}_qps": value for name, value in qps.items()},
        **{f"{name}_fps": load.steps / s for name, s in seconds.items()},
        "ratio_vs_model_only": qps["end_to_end"] / qps["model_only"],
        "ratio_vs_naive": qps["end_to_end"] / qps["naive"],
        # per repetition (the paths run back to back), then the median: steadier on a shared machine
        "paired_ratio_vs_model_only": _paired(times["model_only"].seconds, end_to_end),
        "paired_ratio_vs_naive": _paired(times["naive"].seconds, end_to_end),
        "model_only_ratio_vs_naive": qps["model_only"] / qps["naive"],
        "tokens_per_query": {
            "mean": float(tokens.mean()),
            "min": int(tokens.min()),
            "max": int(tokens.max()),
        },
        "seconds": {name: t.seconds for name, t in times.items()},
        "max_abs_readout_diff_vs_naive": diff,
    }


def _paired(other: list[float], end_to_end: list[float]) -> float:
    return statistics.median(o / e for o, e in zip(other, end_to_end, strict=True))


def _request(config: VlmBenchConfig, model: str, path: Path, device: torch.device, precision: str) -> RelabelRequest:
    goals = [config.goal]
    return RelabelRequest(
        source=path,
        goals=goals,
        model=model,
        scorer=VlmScorer.name,
        image_key=config.image_key,
        batch_size=config.batch_size,
        precision=precision,
        device=str(device),
        formulation=RewardConfig(goals=goals, judge=config.judge),
        workers=config.workers,
    )


def _frame_format(path: Path, image_key: str | None) -> str:
    with open_source(str(path), image_key) as source:
        return str(source.frame_format.describe())


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
