"""Command line: parse options, call the library, render with rich.

Library errors become exit code 2 and one line here, and only here.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import io
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from vlmlabel import __version__, cache, goal_images
from vlmlabel.destinations import destination_path, family_of
from vlmlabel.device import Precision
from vlmlabel.errors import Interrupted, SeveralCameras, VlmlabelError
from vlmlabel.events import Events
from vlmlabel.files.interrupt import stoppable
from vlmlabel.formulation import RewardConfig
from vlmlabel.model import DEFAULT_MODEL, list_architectures
from vlmlabel.progress import ProgressHead, ProgressRequest, ProgressScale, write_progress
from vlmlabel.queries import DEFAULT_ANSWER, DEFAULT_CONTEXT, DEFAULT_CONTEXT_FRAMES, Context, JudgeSpec
from vlmlabel.rewards import CameraReduce, Normalize, RewardMode, Shaping
from vlmlabel.run.embed import EmbedRequest, embed_file
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.merge import MergeSummary, merge_shards
from vlmlabel.run.request import DEFAULT_REWARD_KEY, FinishedSummary, RelabelRequest, RelabelSummary, ShardSummary
from vlmlabel.run.resumable import DEFAULT_CHECKPOINT_EVERY
from vlmlabel.run.shards import SlurmArrayTask, shard_from_options
from vlmlabel.scorers.registry import DEFAULT_SCORER, SCORERS, scorer_for
from vlmlabel.sources import Align, open_source
from vlmlabel.sources.base import VideoDecoder, describe_frames, is_utf8

if TYPE_CHECKING:  # mypy sees one UsageError (the two imports below give unrelated classes)
    from typer._click.exceptions import UsageError
    from typer._click.globals import get_current_context

    from vlmlabel.bench_vlm import VlmBenchConfig
else:
    try:  # recent Typer vendors click as typer._click
        from typer._click.exceptions import UsageError
        from typer._click.globals import get_current_context
    except ImportError:  # older Typer runs on click
        from click.exceptions import UsageError
        from click.globals import get_current_context


@contextlib.contextmanager
def _usage_errors_in_one_line():
    """Usage errors (unknown option, missing option, bad choice or number) become one line and exit code 2,
    in the same style as library errors, instead of Typer's usage line and boxed panel."""
    try:
        yield
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `vlmlabel`: Typer shows the help
            raise
        message = " ".join(exc.format_message().replace("Value error, ", "").split()).rstrip(".")
        ctx = exc.ctx
        if ctx is not None and ctx.command.get_help_option(ctx) is not None:
            message += f" (see {ctx.command_path} {ctx.help_option_names[0]})"
        console.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


class _OneLineUsageErrors(TyperGroup):
    """Root command: parsing happens in make_context (the app's own options) and invoke (the command name and
    the command's options), so both report usage errors in one line, for the console script and CliRunner."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _usage_errors_in_one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _usage_errors_in_one_line():
            return super().invoke(ctx)


app = typer.Typer(
    help="Label offline RL datasets with rewards from a vision-language model: R(o, l) = cos(CLIP(o), CLIP(l)).",
    cls=_OneLineUsageErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
stdout = Console()

F = TypeVar("F", bound=Callable)
T = TypeVar("T")

# Help panels of relabel's options (and of the same options elsewhere).
MODEL_PANEL, REWARD_PANEL, OUTPUT_PANEL = "Model", "Reward", "Output"
JUDGE_PANEL = "VLM judge (--scorer vlm)"
HUB_PANEL, CLUSTER_PANEL = "Hugging Face", "Cluster"

# Shared option definitions.
SourceArg = Annotated[
    Path,
    typer.Argument(
        help="Dataset to read: an HDF5 file (.h5/.hdf5); a datasets save_to_disk folder; a parquet file, folder or "
        "quoted glob; a LeRobot dataset folder (meta/info.json); or a Hugging Face Hub dataset id ORG/NAME.",
        metavar="SOURCE",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    str,
    typer.Option(
        help="open_clip architecture (e.g. ViT-B-32), hf-hub:ORG/REPO, local-dir:PATH or a folder with "
        "open_clip_config.json + weights.",
        rich_help_panel=MODEL_PANEL,
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        help="open_clip pretrained tag (default laion2b_s34b_b79k for ViT-B-32, else the model's first tag) "
        "or a local checkpoint file (.safetensors, .bin, .pt).",
        show_default=False,
        rich_help_panel=MODEL_PANEL,
    ),
]
RelabelModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="clip: open_clip architecture (e.g. ViT-B-32, the default), hf-hub:ORG/REPO, local-dir:PATH or a folder "
        "with open_clip_config.json + weights. vlm: a transformers image-text-to-text model folder, or its Hub id "
        "read from the local cache (needed).",
        show_default=False,
        rich_help_panel=MODEL_PANEL,
    ),
]
ScorerOpt = Annotated[
    str,
    typer.Option(
        "--scorer",
        help=f"One of {', '.join(SCORERS)}. clip: cosine of CLIP embeddings (--reward formulations, the "
        "embedding cache). vlm: a generative VLM judges each step from its --context frames, and its answer's "
        "probability is the reward (needs pip install 'vlmlabel[vlm]').",
        rich_help_panel=MODEL_PANEL,
    ),
]
ContextOpt = Annotated[
    Context,
    typer.Option(
        help="vlm: what a query shows: the scored frame; a window of the --context-frames frames ending at it; or "
        "a prefix: --context-frames frames spaced evenly from the episode's first frame to it (TOPReward).",
        rich_help_panel=JUDGE_PANEL,
    ),
]
ContextFramesOpt = Annotated[
    int, typer.Option(help="vlm: frames per query for --context window or prefix.", rich_help_panel=JUDGE_PANEL)
]
AnchorsOpt = Annotated[
    str,
    typer.Option(
        help="vlm: 'all' queries every step; N queries N steps evenly spaced in each episode (the first and the "
        "last included) and interpolates linearly between them.",
        rich_help_panel=JUDGE_PANEL,
    ),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        help="Frames per batch; default chosen for the device.", show_default=False, rich_help_panel=MODEL_PANEL
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Processes decoding frames in parallel (encoded images, compressed HDF5, Arrow lists, video); "
        "0 decodes in this process. Default: usable cores minus one, at most 8.",
        show_default=False,
        rich_help_panel=MODEL_PANEL,
    ),
]
VideoDecoderOpt = Annotated[
    VideoDecoder,
    typer.Option(
        help="LeRobot video: cpu decodes with FFmpeg on the CPU (in the --workers); nvdec decodes on the run's CUDA "
        "GPU's video engine (H.264, HEVC, AV1), with the same pixels. Other sources have no video.",
        rich_help_panel=MODEL_PANEL,
    ),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        help="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.", rich_help_panel=MODEL_PANEL
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:N|mps", rich_help_panel=MODEL_PANEL)]
MergeSourceArg = Annotated[
    Path, typer.Argument(metavar="SOURCE", help="The dataset the shards were computed from.", show_default=False)
]
ImageKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--image-key",
        help="Frames: HDF5 dataset path, table column, or LeRobot camera (observation.images.NAME); "
        "auto-detected when omitted.",
        rich_help_panel=MODEL_PANEL,
    ),
]
SplitOpt = Annotated[str, typer.Option(help="Split of a Hub dataset or DatasetDict folder.", rich_help_panel=HUB_PANEL)]
RevisionOpt = Annotated[
    str | None,
    typer.Option(help="Hub dataset revision (branch, tag or commit).", show_default=False, rich_help_panel=HUB_PANEL),
]
StreamingOpt = Annotated[
    bool,
    typer.Option(
        "--streaming",
        help="Hub datasets: stream rows instead of downloading first; rewards go to a parquet sidecar.",
        rich_help_panel=HUB_PANEL,
    ),
]


def _refuse_text_not_utf8() -> None:
    """Every text option and argument of the command running is UTF-8, checked before anything is opened.

    A shell hands bytes that are not UTF-8 (a Latin-1 terminal, a script in another encoding) to Python as lone
    surrogates, which cannot be stored: goals, reward keys, image keys, model names and splits all end up in
    datasets' names or metadata, or in messages. Paths (typed ``Path``) are file names, not text: any bytes are
    accepted there, and each format says whether it can open them."""
    ctx = get_current_context(silent=True)
    if ctx is None:
        return
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        for text in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(text, str) and not is_utf8(text):
                flag = next((o for o in param.opts if o.startswith("--")), (param.name or "").upper())
                raise VlmlabelError(
                    f"{flag} is not UTF-8 text ({_shown_bytes(text)}); goals, names and keys are "
                    "stored as UTF-8: give it in UTF-8 (a script or terminal in another encoding? "
                    "convert it, e.g. with iconv -t UTF-8)"
                )


def _shown_bytes(text: str) -> str:
    """The bytes the user gave (the shell's surrogate escapes undone), as a Python bytes literal."""
    try:
        return repr(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a lone surrogate that no byte escapes (from Python, not from a shell)
        return ascii(text)


def _exit_on_error(func: F) -> F:
    """Refuse text that is not UTF-8; turn library errors into exit code 2 and one line; SIGINT and SIGTERM, in
    any phase, into one line and exit code 130 and 143 (``files.interrupt.stoppable``)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            _refuse_text_not_utf8()
            with stoppable():
                return func(*args, **kwargs)
        except VlmlabelError as exc:
            console.print(Text(f"error: {exc}", style="bold red"), soft_wrap=True)
            raise typer.Exit(2) from None
        except PermissionError as exc:
            console.print(
                Text(
                    f"error: {exc}; check that you may write there, or write elsewhere with --output", style="bold red"
                ),
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except OSError as exc:
            console.print(Text(f"error: {exc}", style="bold red"), soft_wrap=True)
            raise typer.Exit(2) from None
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not _out_of_memory(exc):
                raise
            console.print(
                Text(
                    "error: not enough memory for this run; use smaller --batch-size (or bench --frames/--frame-size)",
                    style="bold red",
                ),
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except Interrupted as exc:
            console.print(Text(f"interrupted: {exc}", style="yellow"), soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print(Text("interrupted: nothing was written, the source is unchanged", style="yellow"))
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _out_of_memory(exc: RuntimeError) -> bool:
    """torch reports failed allocations (host or device) as RuntimeError subclasses with these words."""
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text


class FramesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} frames/s" if speed else "-- frames/s", style="progress.data.speed")


def _anchors(text: str) -> int | None:
    """--anchors: 'all' (None) or a whole number."""
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise VlmlabelError(f"--anchors must be 'all' or a whole number of steps per episode, not {text!r}") from None


@app.command()
@_exit_on_error
def relabel(
    source: SourceArg,
    goal: Annotated[
        list[str] | None,
        typer.Option(
            "--goal",
            "-g",
            help="Goal in words; repeat for several goals (one reward dataset each).",
            show_default=False,
        ),
    ] = None,
    goal_image: Annotated[
        list[str] | None,
        typer.Option(
            "--goal-image",
            help="Goal as an image of the finished task (PNG/JPEG; repeatable, one reward each, after the --goal "
            "texts): the reward is the cosine between each frame's embedding and the image's (--reward cosine).",
            show_default=False,
            rich_help_panel=REWARD_PANEL,
        ),
    ] = None,
    goal_frame: Annotated[
        list[str] | None,
        typer.Option(
            "--goal-frame",
            help="Goal image taken from the dataset: EPISODE:STEP (episode name, or number: demo_5, episode_index 5; "
            "STEP among the frames --align scores, -1 the last), e.g. demo_0:-1. Repeatable; after the --goal-image "
            "ones.",
            show_default=False,
            rich_help_panel=REWARD_PANEL,
        ),
    ] = None,
    model: RelabelModelOpt = None,
    pretrained: PretrainedOpt = None,
    scorer: ScorerOpt = DEFAULT_SCORER,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="vlm: the question, with {goal} where the goal goes (default: the readout's own prompt, see README).",
            show_default=False,
            rich_help_panel=JUDGE_PANEL,
        ),
    ] = None,
    answer: Annotated[
        str | None,
        typer.Option(
            help=f"vlm: the one-token answer whose log-probability at the next token is the raw score (default "
            f"{DEFAULT_ANSWER!r}; TOPReward).",
            show_default=False,
            rich_help_panel=JUDGE_PANEL,
        ),
    ] = None,
    versus: Annotated[
        str | None,
        typer.Option(
            help="vlm: with --answer A, the raw score is P(A) / (P(A) + P(VERSUS)), e.g. --answer True --versus False.",
            show_default=False,
            rich_help_panel=JUDGE_PANEL,
        ),
    ] = None,
    answer_values: Annotated[
        str | None,
        typer.Option(
            help='vlm: one-token answers and their values, e.g. "1=0,2=0.25,3=0.5,4=0.75,5=1": the raw score is the '
            "expected value over their renormalised probabilities (RoboReward-style scores).",
            show_default=False,
            rich_help_panel=JUDGE_PANEL,
        ),
    ] = None,
    context: ContextOpt = DEFAULT_CONTEXT,
    context_frames: ContextFramesOpt = DEFAULT_CONTEXT_FRAMES,
    anchors: AnchorsOpt = "all",
    image_key: Annotated[
        list[str] | None,
        typer.Option(
            "--image-key",
            help="Frames: HDF5 dataset path, table column, or LeRobot camera (observation.images.NAME); "
            "auto-detected when omitted. Repeat for several cameras: each is scored, "
            "--camera-reduce combines them, and each camera's scores are kept as NAME_cam_CAMERA.",
            show_default=False,
            rich_help_panel=MODEL_PANEL,
        ),
    ] = None,
    camera_reduce: Annotated[
        CameraReduce,
        typer.Option(
            help="With several --image-key: how the cameras' scores make the reward.", rich_help_panel=MODEL_PANEL
        ),
    ] = CameraReduce.mean,
    reward: Annotated[
        RewardMode,
        typer.Option(
            help="cosine: x.g | projection: 1 - 0.5|(x-g)P|^2 towards d = g - b (needs --baseline, --alpha; "
            "Rocamonde et al. 2023) | softmax: p(goal) against --negative prompts with the model's logit "
            "scale | contrastive: x.g - mean x.n | sigmoid: sigmoid(s x.g + b) with the model's logit scale s and "
            "bias b, each goal's match probability (SigLIP/SigLIP2 models, which have a logit bias).",
            rich_help_panel=REWARD_PANEL,
        ),
    ] = RewardMode.cosine,
    goal_template: Annotated[
        list[str] | None,
        typer.Option(
            help="Prompt ensemble: each goal (and baseline/negative) is embedded once per template, '{}' "
            "replaced by the text; the embeddings are averaged, then normalised. Repeatable, e.g. "
            '--goal-template "a photo of {}" --goal-template "a picture of {}". Include "{}" to keep '
            "the bare text.",
            show_default=False,
            rich_help_panel=REWARD_PANEL,
        ),
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            help="projection: baseline text b (repeatable; embeddings averaged).",
            show_default=False,
            rich_help_panel=REWARD_PANEL,
        ),
    ] = None,
    alpha: Annotated[
        float,
        typer.Option(
            help="projection: strength in [0, 1]; 0 is cosine up to an affine map, 1 keeps only the "
            "goal-baseline direction.",
            rich_help_panel=REWARD_PANEL,
        ),
    ] = 1.0,
    negative: Annotated[
        list[str] | None,
        typer.Option(
            help="softmax/contrastive: what the goal is not (repeatable).",
            show_default=False,
            rich_help_panel=REWARD_PANEL,
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="softmax, sigmoid: write the binary success reward 1\\[p >= T] (p kept as NAME_raw).",
            show_default=False,
            rich_help_panel=REWARD_PANEL,
        ),
    ] = None,
    shaping: Annotated[
        Shaping,
        typer.Option(
            help="delta: potential-based gamma*phi(o_{t+1}) - phi(o_t) within each episode (the last step "
            "uses its own potential as the next one). Raw scores kept as NAME_raw.",
            rich_help_panel=REWARD_PANEL,
        ),
    ] = Shaping.none,
    gamma: Annotated[
        float, typer.Option(help="Discount for --shaping delta, in [0, 1].", rich_help_panel=REWARD_PANEL)
    ] = 0.99,
    normalize: Annotated[
        Normalize,
        typer.Option(
            help="z-score per episode or over the dataset, or minmax to [0, 1] over the dataset or within each "
            "episode (episode-minmax: TOPReward's progress); applied before shaping. Raw scores kept as NAME_raw.",
            rich_help_panel=REWARD_PANEL,
        ),
    ] = Normalize.none,
    use_cache: Annotated[
        bool | None,
        typer.Option(
            "--cache/--no-cache",
            help="Use embeddings stored by `vlmlabel embed` when they match the model, "
            "weights, preprocessing and image key (clip, the default there; vlm has no embeddings).",
            show_default=False,
            rich_help_panel=REWARD_PANEL,
        ),
    ] = None,
    reward_key: Annotated[
        str,
        typer.Option(
            help="Name of the written dataset (HDF5) or column (tables, LeRobot); with several goals "
            "NAME_0, NAME_1, ...",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = DEFAULT_REWARD_KEY,
    output: Annotated[
        Path | None,
        typer.Option(
            help="HDF5: write a copy with the rewards added here instead of adding them to SOURCE. Hugging Face / "
            "LeRobot: where the new dataset goes (default NAME-vlmlabel beside SOURCE).",
            show_default=False,
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace reward datasets or columns (and an --output dataset) that already exist.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    video_decoder: VideoDecoderOpt = VideoDecoder.cpu,
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    align: Annotated[
        Align,
        typer.Option(
            help="next (default): step t scores o_{t+1}, the result of action a_t, as offline RL rewards are defined "
            "(D4RL, robomimic, d3rlpy, LeRobot next.reward): use it to train on the rewards. Needs ordered "
            "episodes: table rows grouped by episode_index and in frame_index order, else refused. frame: step "
            "t scores its own frame o_t: use it to score or inspect frames themselves, for per-frame analysis, "
            "or for datasets without ordered episodes (rows are scored one by one). Minari: every observation "
            "is scored, T+1 values in infos/ like Minari's other infos; step t reads row t+1 (next) or t (frame).",
            rich_help_panel=REWARD_PANEL,
        ),
    ] = Align.next,
    split: SplitOpt = "train",
    revision: RevisionOpt = None,
    streaming: StreamingOpt = False,
    link: Annotated[
        bool,
        typer.Option(
            "--link",
            help="New datasets (tables, LeRobot): hard-link files carried over unchanged (videos, metadata, "
            "other splits) instead of copying them (copy-on-write clones where the file system has "
            "them). HDF5 with --output: write a labels file holding the rewards and reaching every "
            "other dataset of SOURCE through external links, instead of a full copy. Saves space and "
            "time, but the output then shares that data with the source: editing it in place through "
            "the output (e.g. LeRobot's tools re-encoding videos) changes the source too, and an HDF5 "
            "labels file needs SOURCE where the link says.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            help="Also upload the written dataset to this Hub dataset repo (ORG/NAME).",
            show_default=False,
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No progress bar and no summary (notes and errors still show).",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            help="Discard progress saved by an interrupted run instead of resuming it.",
            rich_help_panel=CLUSTER_PANEL,
        ),
    ] = False,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            help="Save progress beside the output every this many frames (and on SIGINT/SIGTERM).",
            rich_help_panel=CLUSTER_PANEL,
        ),
    ] = DEFAULT_CHECKPOINT_EVERY,
    num_shards: Annotated[
        int | None,
        typer.Option(
            help="Split the dataset into N shards of whole episodes and score only one (default: from a SLURM "
            "job array); combine them with `vlmlabel merge`. 1: the whole dataset in this run, which writes "
            "the rewards itself (also inside a SLURM array).",
            show_default=False,
            rich_help_panel=CLUSTER_PANEL,
        ),
    ] = None,
    shard_index: Annotated[
        int | None,
        typer.Option(
            help="Which shard this run scores, 0..N-1 (default: from SLURM_ARRAY_TASK_ID).",
            show_default=False,
            rich_help_panel=CLUSTER_PANEL,
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the image tower: slower start, faster batches (worth it on long GPU runs).",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = False,
) -> None:
    """Score every step against each goal and write the rewards next to the data.

    HDF5: datasets added to the file (or to an --output copy). Hugging Face and LeRobot datasets: a new
    dataset beside the input (NAME-vlmlabel) with float32 reward columns; the source is never modified.
    """
    # Here, not at the top: torch.distributed loads only for the command that may need it.
    from vlmlabel.run.distributed import relabel_torchrun, torchrun_env

    dist_env = torchrun_env()
    if not (goal or goal_image or goal_frame):  # the goal given in words or as an image: one of them is needed
        raise UsageError("Missing option '--goal' / '-g' (or --goal-image, --goal-frame)", get_current_context())
    images = [goal_images.file_goal(path) for path in goal_image or []]
    images += [goal_images.frame_goal(spec) for spec in goal_frame or []]
    judge = JudgeSpec(prompt, answer, versus, answer_values, context, context_frames, _anchors(anchors))
    formulation = RewardConfig(
        goals=(goal or []) + images,
        goal_images=images,
        mode=reward,
        templates=goal_template or [],
        baselines=baseline or [],
        alpha=alpha,
        negatives=negative or [],
        threshold=threshold,
        shaping=shaping,
        gamma=gamma,
        normalize=normalize,
        judge=judge if judge != JudgeSpec() else None,  # the vlm scorer's defaults when None
    )
    chosen = scorer_for(scorer)
    request = RelabelRequest(
        source=source,
        goals=formulation.goals,
        model=chosen.default_model(model),
        scorer=scorer,
        pretrained=pretrained,
        image_key=image_key,
        camera_reduce=camera_reduce,
        link=link,
        reward_key=reward_key,
        output=output,
        overwrite=overwrite,
        batch_size=batch_size,
        precision=precision.value,
        device=device,
        align=align,
        formulation=formulation,
        use_cache=use_cache,
        split=split,
        revision=revision,
        streaming=streaming,
        push_to_hub=push_to_hub,
        restart=restart,
        checkpoint_every=checkpoint_every,
        shard=shard_from_options(num_shards, shard_index),
        compile=compile,
        array=SlurmArrayTask.from_env() if num_shards is None else None,
        workers=workers,
        video_decoder=video_decoder,
    )
    request = chosen.checked(request)  # the formulation validated as this scorer scores it, before anything opens
    other_rank = dist_env is not None and dist_env.rank != 0
    quiet = quiet or other_rank
    run: Callable[..., RelabelSummary | ShardSummary | FinishedSummary | MergeSummary | None]
    if dist_env is not None:  # every rank tells how joining the others goes, even those that are quiet
        run = functools.partial(relabel_torchrun, env=dist_env, waits=Events(on_note=_note))
    else:
        run = relabel_file
    notes = None if other_rank else _note  # notes (resume, stale lock, ...) show even with --quiet
    if quiet:
        summary = run(request, events=Events(on_note=notes))
    else:
        progress = _progress("scoring")
        task = progress.add_task("scoring", total=None)

        def note(message: str) -> None:
            progress.console.print(Text(message, style="yellow"), soft_wrap=True)

        summary = _with_progress(
            progress, task, lambda start, advance: run(request, events=Events(start, advance, note))
        )
    if quiet or summary is None:
        return
    if isinstance(summary, FinishedSummary):
        return  # its note said so
    if isinstance(summary, ShardSummary):
        _print_shard_summary(summary, request)
    elif isinstance(summary, RelabelSummary):
        _print_summary(summary)
    else:
        _print_merge_summary(summary)


def _note(message: str) -> None:
    console.print(Text(message, style="yellow"), soft_wrap=True)


def _print_shard_summary(summary: ShardSummary, request: RelabelRequest) -> None:
    shard = summary.shard
    how = "already done" if summary.already_done else f"scored in {summary.seconds:,.1f} s"
    command = f"vlmlabel merge {request.source} --reward-key {request.reward_key}"
    if request.output is not None:
        command += f" --output {request.output}"
    stdout.print(
        f"shard {shard.index} of {shard.count}: {summary.episodes} episodes, {summary.frames:,} frames "
        f"{how}; result in {summary.path}"
    )
    stdout.print(f"when all {shard.count} shards are done, write the rewards with: {command}")


def _print_merge_summary(summary) -> None:
    table = Table(
        title=f"vlmlabel {__version__}: {summary.shards} shards merged, rewards written to {summary.written_to}",
        title_justify="left",
    )
    for column in ("dataset", "goal", "min", "mean", "max"):
        table.add_column(column, justify="left" if column in ("dataset", "goal") else "right")
    for index, (name, goal) in enumerate(zip(summary.reward_names, summary.goals, strict=True)):
        values = summary.rewards[:, index]
        table.add_row(name, goal, f"{values.min():.4f}", f"{values.mean():.4f}", f"{values.max():.4f}")
    stdout.print(table)
    stdout.print(f"{summary.episodes} episodes, {summary.frames:,} frames")


@app.command()
@_exit_on_error
def merge(
    source: MergeSourceArg,
    reward_key: Annotated[str, typer.Option(help="The --reward-key the shards were run with.")] = DEFAULT_REWARD_KEY,
    output: Annotated[
        Path | None,
        typer.Option(
            help="The --output the shards were run with (default: as relabel: SOURCE itself for HDF5, NAME-vlmlabel "
            "beside other datasets).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace reward datasets (and an --output file) that already exist.")
    ] = False,
    image_key: ImageKeyOpt = None,
    split: SplitOpt = "train",
    revision: RevisionOpt = None,
    link: Annotated[
        bool,
        typer.Option(
            "--link",
            help="As for relabel: hard-link files a new dataset carries over unchanged (they are then "
            "shared with the source).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary (notes and errors still show).")] = False,
) -> None:
    """Write the rewards of shards run with --num-shards (same SOURCE, --image-key, --split, --reward-key and
    --output as the shards)."""
    summary = merge_shards(
        source,
        reward_key,
        output,
        overwrite,
        Events(on_note=_note),
        image_key=image_key,
        split=split,
        revision=revision,
        link=link,
    )
    if not quiet and not isinstance(summary, FinishedSummary):  # a finished merge said so in its note
        _print_merge_summary(summary)


def _print_summary(summary: RelabelSummary) -> None:
    result = summary.result
    table = Table(title=f"vlmlabel {__version__}: rewards written to {summary.written_to}", title_justify="left")
    table.add_column("dataset")
    table.add_column("goal")
    table.add_column("min", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("max", justify="right")
    values = result.all_rewards()
    for index, (name, goal) in enumerate(zip(summary.reward_names, summary.goals, strict=True)):
        column = values[:, index]
        table.add_row(name, goal, f"{column.min():.4f}", f"{column.mean():.4f}", f"{column.max():.4f}")
    stdout.print(table)
    if summary.raw_names:
        stdout.print(f"raw scores kept in {', '.join(summary.raw_names)}")
    stdout.print(summary.cache_note if summary.used_cache else f"scored frames: {summary.cache_note}")
    stdout.print(
        f"{len(result.episodes)} episodes, {result.frames:,} frames, {result.frames_per_second:,.1f} frames/s "
        f"({summary.layout} layout, frames from {summary.image_key!r}; model {summary.model.name} "
        f"{summary.model.pretrained}, {summary.model.precision} on {summary.model.device})"
    )


def _progress(label: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames"),
        FramesPerSecond(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _with_progress(progress: Progress, task: TaskID, run: Callable[..., T]) -> T:
    """Run ``run(on_start, on_progress)``, showing the bar only once work starts: earlier errors stay one line."""

    def start(total: int) -> None:
        progress.update(task, total=total)
        progress.start()

    try:
        return run(start, lambda n: progress.advance(task, n))
    finally:
        if progress.live.is_started:
            progress.stop()


@app.command()
@_exit_on_error
def embed(
    source: SourceArg,
    model: ModelOpt = DEFAULT_MODEL,
    pretrained: PretrainedOpt = None,
    scorer: ScorerOpt = DEFAULT_SCORER,
    image_key: ImageKeyOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Write a copy with the embeddings added here instead of adding them to SOURCE.",
            show_default=False,
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an --output file that already exists (a cache in SOURCE is always replaced).",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    video_decoder: VideoDecoderOpt = VideoDecoder.cpu,
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    split: SplitOpt = "train",
    revision: RevisionOpt = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.", rich_help_panel=OUTPUT_PANEL)
    ] = False,
) -> None:
    """Store every frame's unit image embedding (float16) in the dataset's cache, so relabel needs no model pass.

    HDF5: inside the file (or an --output copy). Table and LeRobot datasets: NAME.vlmlabel-cache.h5 beside them."""
    if not scorer_for(scorer).embeddings:
        raise VlmlabelError(
            f"vlmlabel embed stores image embeddings for the cache; the {scorer} scorer reads none: "
            f"relabel with --scorer {scorer} directly"
        )
    request = EmbedRequest(
        source=source,
        model=model,
        pretrained=pretrained,
        image_key=image_key,
        output=output,
        overwrite=overwrite,
        batch_size=batch_size,
        precision=precision.value,
        device=device,
        split=split,
        revision=revision,
        workers=workers,
        video_decoder=video_decoder,
    )
    if quiet:
        embed_file(request)
        return
    progress = _progress("embedding")
    task = progress.add_task("embedding", total=None)
    summary = _with_progress(progress, task, lambda start, advance: embed_file(request, Events(start, advance)))
    rate = summary.frames / summary.seconds if summary.seconds > 0 else float("inf")
    shown = ", ".join(summary.locations[:3]) + (" ..." if len(summary.locations) > 3 else "")
    stdout.print(
        f"{summary.frames:,} embeddings of dim {summary.dim} written to {summary.written_to} ({shown}); "
        f"{rate:,.1f} frames/s, model {summary.model.name} {summary.model.pretrained}, "
        f"frames from {summary.image_key!r}"
    )


@app.command()
@_exit_on_error
def evaluate(
    source: SourceArg,
    reward_key: Annotated[str, typer.Option(help="The written reward to judge.")] = DEFAULT_REWARD_KEY,
    against: Annotated[
        str | None,
        typer.Option(
            help="Reference signal: rewards (the environment's), success (success/is_success flags) or any "
            "per-step dataset name. Default: the environment's rewards where the data holds them, else none "
            "(VOC and success AUROC need no reference).",
            show_default=False,
        ),
    ] = None,
    image_key: ImageKeyOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model for the blank-frame baseline; default: the one the reward's attributes record.",
            show_default=False,
            rich_help_panel=MODEL_PANEL,
        ),
    ] = None,
    pretrained: PretrainedOpt = None,
    blank: Annotated[
        bool,
        typer.Option(
            "--blank/--no-blank",
            help="Score constant (black/gray/white) frames with the reward's own formula (loads the model).",
        ),
    ] = True,
    device: DeviceOpt = "auto",
    split: SplitOpt = "train",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Judge a written reward. VOC (value-order correlation: Spearman of the reward with the step index in
    each episode, as in GVL and TOPReward), mean and median over episodes, and over successful episodes where
    the data flags success; then success AUROC (final-step and maximum reward separating successful from failed
    episodes). With a reference (--against, or the environment's rewards): Pearson, Spearman, per episode,
    and for binary references the EPIC-style distance sqrt((1-r)/2) (Rocamonde et al. 2023). Baselines: frames
    shuffled across episodes, blank frames. Undefined values (one-step or constant episodes, one class only)
    print n/a and are left out of means and medians; --json names them voc_mean, voc_median,
    voc_episodes_undefined, voc_successful_mean, voc_successful_median, success_auroc_final, success_auroc_max."""
    from vlmlabel.evaluate import EvaluateRequest, evaluate_file  # each command's own module loads with it

    report = evaluate_file(
        EvaluateRequest(
            source=source,
            reward_key=reward_key,
            against=against,
            image_key=image_key,
            model=model,
            pretrained=pretrained,
            blank=blank,
            device=device,
            split=split,
        )
    )
    if as_json:
        stdout.print_json(json.dumps(report.as_json()))
        return
    compared = f"against {report.against}" if report.against else "(no reference)"
    table = Table(
        title=f"{reward_key} {compared}: {report.steps:,} steps, {report.episodes:,} episodes",
        title_justify="left",
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    for measure, value in report.rows():
        table.add_row(measure, value)
    stdout.print(table)
    for note in report.notes:
        stdout.print(f"note: {note}")


@app.command()
@_exit_on_error
def progress(
    source: SourceArg,
    output: Annotated[
        Path,
        typer.Option(
            help="The progress parquet to write. LeRobot's RA-BC finds DATASET_ROOT/sarm_progress.parquet by "
            "itself; elsewhere, give it as --sample_weighting.progress_path.",
            show_default=False,
        ),
    ],
    reward_key: Annotated[str, typer.Option(help="The written reward to turn into progress.")] = DEFAULT_REWARD_KEY,
    column: Annotated[
        ProgressHead,
        typer.Option(
            help="The progress column: LeRobot reads progress_{head_mode}, head_mode sparse unless "
            "--sample_weighting.head_mode=dense."
        ),
    ] = ProgressHead.sparse,
    normalize: Annotated[
        ProgressScale,
        typer.Option(
            help="episode-minmax: each episode from 0 (its lowest reward) to 1 (its highest), a constant "
            "episode 0 throughout; dataset-minmax: one range over all episodes; none: the reward as written, "
            "which must lie in [0, 1]."
        ),
    ] = ProgressScale.episode_minmax,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an --output that already exists.")] = False,
    image_key: ImageKeyOpt = None,
    split: SplitOpt = "train",
) -> None:
    """Write a written reward as the per-frame progress file LeRobot's reward-aligned behaviour cloning (RA-BC)
    trains on: columns index, episode_index, frame_index (int64) and the progress (float32, in [0, 1]), with
    LeRobot's frame-signal metadata. index is the dataset's own where it has index and episode_index (LeRobot),
    else the running row number, and episode_index the episode's position."""
    summary = write_progress(
        ProgressRequest(
            source=source,
            output=output,
            reward_key=reward_key,
            column=column,
            scale=normalize,
            overwrite=overwrite,
            image_key=image_key,
            split=split,
        )
    )
    flat = f"; {summary.constant_episodes} with a constant reward" if summary.constant_episodes else ""
    index = "the dataset's own index" if summary.index_from == "dataset" else "index = running row number"
    stdout.print(
        f"wrote {summary.output}: {summary.column} for {summary.frames:,} frames of {summary.episodes:,} "
        f"episodes ({normalize.value}{flat}; {index})"
    )


@app.command()
@_exit_on_error
def plot(
    source: SourceArg,
    reward_key: Annotated[
        str, typer.Option(help="The written reward; with several goals NAME_0, NAME_1, ... are overlaid.")
    ] = DEFAULT_REWARD_KEY,
    episodes: Annotated[
        str | None,
        typer.Option(help="Episode numbers to draw, e.g. 0,3,7; default the first three.", show_default=False),
    ] = None,
    output: Annotated[Path, typer.Option(help="Picture to write: .png, .svg or .pdf.")] = Path("rewards.png"),
    out: Annotated[Path | None, typer.Option("--out", hidden=True, help="Old name of --output.")] = None,
    image_key: ImageKeyOpt = None,
    dpi: Annotated[int, typer.Option(min=30, max=600, help="Resolution of the PNG.")] = 100,
    split: SplitOpt = "train",
) -> None:
    """Draw each chosen episode's reward curve over a strip of its frames, and a histogram of all rewards."""
    from vlmlabel.plot import PlotRequest, parse_episodes, plot_file  # each command's own module loads with it

    picked = parse_episodes(episodes) if episodes is not None else None
    result = plot_file(
        PlotRequest(
            source=source,
            reward_key=reward_key,
            out=out or output,
            episodes=picked,
            image_key=image_key,
            dpi=dpi,
            split=split,
        )
    )
    stdout.print(f"wrote {result.out} ({', '.join(result.keys)}; episodes {', '.join(map(str, result.episodes))})")


@app.command()
@_exit_on_error
def inspect(
    source: SourceArg,
    image_key: ImageKeyOpt = None,
    split: SplitOpt = "train",
    revision: RevisionOpt = None,
    streaming: StreamingOpt = False,
) -> None:
    """Show the detected layout, cameras, frame format, episodes and frames."""
    try:
        opened = open_source(str(source), image_key, split, revision, streaming)
    except SeveralCameras as several:
        _note(
            f"{len(several.cameras)} cameras; showing {several.cameras[0]} (choose with --image-key; relabel "
            "scores several with --image-key A --image-key B)"
        )
        opened = open_source(str(source), several.cameras[0], split, revision, streaming)
    with opened:
        episodes = opened.episodes(Align.frame)
        steps = [e.steps for e in episodes]
        table = Table(title=str(source), show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value")
        table.add_row("layout", opened.layout)
        table.add_row("image key", opened.image_key)
        table.add_row("cameras", ", ".join(opened.cameras) or opened.image_key)
        table.add_row(
            "frames", describe_frames(opened, episodes[0].frames[0]) if episodes else opened.frame_format.describe()
        )
        table.add_row("episodes", f"{len(episodes):,}")
        table.add_row("steps", f"{sum(steps):,} (per episode: min {min(steps):,}, max {max(steps):,})")
        table.add_row("rewards written to", f"{family_of(opened).what}: {destination_path(opened, None)} (or --output)")
        written = opened.reward_keys(episodes[0])
        table.add_row("vlmlabel rewards", ", ".join(written) if written else "none")
        stored = cache.first_stored(opened, episodes)
        table.add_row(
            "embedding cache",
            f"{stored.attrs.get('model')} {stored.attrs.get('pretrained')} in {opened.cache_file}"
            if stored
            else "none (make one with `vlmlabel embed`)",
        )
        stdout.print(table)


@app.command()
@_exit_on_error
def models(
    filter: Annotated[str | None, typer.Argument(help="Only architectures whose name contains this.")] = None,
) -> None:
    """List open_clip architectures and their pretrained tags."""
    table = Table(title="open_clip architectures (use with --model NAME --pretrained TAG)", title_justify="left")
    table.add_column("model")
    table.add_column("pretrained tags")
    for name, tags in list_architectures():
        if filter is None or filter.lower() in name.lower():
            table.add_row(name, ", ".join(tags) if tags else "[dim](none: give --pretrained FILE)[/dim]")
    stdout.print(table)


class Encoding(str, enum.Enum):
    raw = "raw"
    jpeg = "jpeg"


@app.command()
@_exit_on_error
def bench(
    source: Annotated[
        Path | None,
        typer.Argument(
            help="HDF5 file to benchmark on (read only); default: a synthetic file "
            "(--frames, --frame-size, --encoding).",
            metavar="SOURCE",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help=f"open_clip architecture, hf-hub:ORG/REPO or a model folder, as for relabel (default {DEFAULT_MODEL})"
            "; with --scorer vlm, the judge's folder or Hub id.",
            show_default=False,
            rich_help_panel=MODEL_PANEL,
        ),
    ] = None,
    scorer: Annotated[
        str,
        typer.Option(
            "--scorer",
            help="clip: frames/s of CLIP. vlm: queries/s of a VLM judge end to end (relabel's scoring phase), of the "
            "model alone (processor + batched forwards on decoded frames) and of a naive one-query generate loop.",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = DEFAULT_SCORER,
    tiny: Annotated[
        str | None,
        typer.Option(
            help="vlm: bench a tiny random judge of this family (qwen2_vl, qwen3_vl, idefics3), built from the "
            "source tree's tools/synthetic/tiny_vlm.py, instead of --model.",
            show_default=False,
            rich_help_panel=JUDGE_PANEL,
        ),
    ] = None,
    context: ContextOpt = DEFAULT_CONTEXT,
    context_frames: ContextFramesOpt = DEFAULT_CONTEXT_FRAMES,
    anchors: AnchorsOpt = "all",
    episode_steps: Annotated[
        int | None,
        typer.Option(
            help="vlm: steps per episode of the synthetic file (default 64).",
            show_default=False,
            rich_help_panel=JUDGE_PANEL,
        ),
    ] = None,
    workers: WorkersOpt = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Pretrained tag or checkpoint file; 'random' (random weights, reported as such) is accepted here "
            "because speed does not depend on weight values.",
            show_default=False,
            rich_help_panel=MODEL_PANEL,
        ),
    ] = None,
    precision: Annotated[
        Precision, typer.Option(help="auto: bf16 on GPUs that support it, fp32 on CPU.", rich_help_panel=MODEL_PANEL)
    ] = Precision.auto,
    batch_size: Annotated[
        str | None,
        typer.Option(
            help="Frames per batch, or a sweep such as 32,64,128; default chosen for the device.",
            show_default=False,
            rich_help_panel=MODEL_PANEL,
        ),
    ] = None,
    device: DeviceOpt = "auto",
    frames: Annotated[
        int | None,
        typer.Option(
            help="Frames per timed run; default 20000 on CUDA, 256 on CPU (the whole file with SOURCE).",
            show_default=False,
        ),
    ] = None,
    frame_size: Annotated[str, typer.Option(help="Synthetic frame size HEIGHTxWIDTH.")] = "84x84",
    encoding: Annotated[
        Encoding, typer.Option(help="Synthetic frames stored raw (uint8) or as JPEG bytes.")
    ] = Encoding.raw,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the image tower.", rich_help_panel=MODEL_PANEL)
    ] = False,
    source_option: Annotated[
        Path | None, typer.Option("--source", hidden=True, help="Old way to give SOURCE.", show_default=False)
    ] = None,
    image_key: ImageKeyOpt = None,
    video_decoder: VideoDecoderOpt = VideoDecoder.cpu,
    repeats: Annotated[int, typer.Option(help="Timed repetitions per path; the median is reported.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
) -> None:
    """Measure frames/s of the model alone, of vlmlabel end to end and of a naive PIL script (--scorer vlm: a
    VLM judge's queries/s)."""
    from vlmlabel.bench import BenchConfig, parse_batch_sizes, parse_frame_size, run_bench  # loads with its command
    from vlmlabel.bench_vlm import VLM_EPISODE_STEPS, VlmBenchConfig

    if source_option is not None:
        if source is not None and source != source_option:
            raise typer.BadParameter("give the file once, as SOURCE", param_hint="--source")
        _note(f"--source is deprecated: give the file as an argument, vlmlabel bench {source_option}")
        source = source_option
    judge = JudgeSpec(context=context, context_frames=context_frames, anchors=_anchors(anchors))
    if scorer == "vlm":
        refused = {"--pretrained": pretrained, "--compile": compile, "--video-decoder": video_decoder.value != "cpu"}
        _refuse_for_scorer(scorer, refused)
        _bench_vlm(
            VlmBenchConfig(
                model=model,
                tiny=tiny,
                precision=precision.value,
                batch_size=_one_batch_size(batch_size, parse_batch_sizes),
                device=device,
                frames=frames,
                episode_steps=episode_steps or VLM_EPISODE_STEPS,
                frame_size=parse_frame_size(frame_size),
                encoding=encoding.value,
                source=source,
                image_key=image_key,
                repeats=repeats,
                judge=judge,
                workers=workers,
            ),
            json_output,
        )
        return
    if scorer != DEFAULT_SCORER:
        raise VlmlabelError(f"--scorer {scorer!r}: bench knows {DEFAULT_SCORER} and vlm")
    vlm_only = {"--tiny": tiny, "--episode-steps": episode_steps, "--workers": workers is not None}
    _refuse_for_scorer(scorer, {**vlm_only, "--context/--context-frames/--anchors": judge != JudgeSpec()})
    config = BenchConfig(
        model=model or DEFAULT_MODEL,
        pretrained=pretrained,
        precision=precision.value,
        batch_sizes=parse_batch_sizes(batch_size) if batch_size else None,
        device=device,
        frames=frames,
        frame_size=parse_frame_size(frame_size),
        encoding=encoding.value,
        compile=compile,
        source=source,
        image_key=image_key,
        repeats=repeats,
        video_decoder=video_decoder,
    )
    if json_output:  # stdout holds the JSON object alone; progress goes to stderr
        result = run_bench(config, status=lambda message: console.print(f"bench: {message}", highlight=False))
        print(json.dumps(result))
        return
    with console.status("benchmarking") as spinner:
        result = run_bench(config, status=lambda message: spinner.update(f"benchmarking: {message}"))
    _print_bench(result)


def _refuse_for_scorer(scorer: str, options: Mapping[str, object]) -> None:
    given = [name for name, value in options.items() if value]
    if given:
        raise VlmlabelError(f"{given[0]} does not apply to bench --scorer {scorer}; leave it out")


def _one_batch_size(text: str | None, parse: Callable[[str], list[int]]) -> int | None:
    if text is None:
        return None
    sizes = parse(text)
    if len(sizes) > 1:
        raise VlmlabelError(f"--batch-size {text!r}: bench --scorer vlm takes one size (queries per batch)")
    return sizes[0]


def _bench_vlm(config: VlmBenchConfig, json_output: bool) -> None:
    from vlmlabel.bench_vlm import run_vlm_bench  # loads with its command

    if json_output:  # stdout holds the JSON object alone; progress goes to stderr
        result = run_vlm_bench(config, status=lambda message: console.print(f"bench: {message}", highlight=False))
        print(json.dumps(result))
        return
    with console.status("benchmarking") as spinner:
        result = run_vlm_bench(config, status=lambda message: spinner.update(f"benchmarking: {message}"))
    _print_vlm_bench(result)


def _print_vlm_bench(result: dict) -> None:
    judge = result["judge"]
    table = Table(
        title=f"vlmlabel bench --scorer vlm: {result['model']} ({result['family']}), {result['precision']} on "
        f"{result['device']}, {result['queries']:,} queries over {result['frames']:,} steps of {result['source']}",
        title_justify="left",
    )
    for column in ("path", "queries/s", "frames/s", "end to end is"):
        table.add_column(column, justify="right")
    for name in ("end_to_end", "model_only", "forward_only", "naive"):
        ratio = result["end_to_end_qps"] / result[f"{name}_qps"]
        table.add_row(
            name.replace("_", "-"),
            f"{result[f'{name}_qps']:,.2f}",
            f"{result[f'{name}_fps']:,.2f}",
            "" if name == "end_to_end" else f"{ratio:.2f}x",
        )
    stdout.print(table)
    tokens, per_episode = result["tokens_per_query"], result["queries_per_episode"]
    stdout.print(
        f"batch {result['batch_size']} queries; {tokens['mean']:.0f} tokens per query ({tokens['min']}-"
        f"{tokens['max']}); {per_episode['mean']:.1f} queries per episode; context {judge['context']} of "
        f"{judge['context_frames']} frames, anchors {result['anchors']}; {result['environment']['cpu_threads']} "
        f"CPU threads; median of {len(result['seconds']['naive'])} timed runs, warm-up excluded (per-run "
        f"ratios' median: e2e/model {result['paired_ratio_vs_model_only']:.2f}, e2e/naive "
        f"{result['paired_ratio_vs_naive']:.2f}); max |readout "
        f"difference| model-only vs naive {result['max_abs_readout_diff_vs_naive']:.2e}"
    )
    for name, text in result["definitions"].items():
        stdout.print(f"{name.replace('_', '-')}: {text}", highlight=False)


def _print_bench(result: dict) -> None:
    weights = "RANDOM weights" if result["random_weights"] else result["pretrained"]
    table = Table(
        title=f"vlmlabel bench: {result['model']} ({weights}), {result['precision']} on "
        f"{result['device']}, {result['frames']:,} frames of {result['source']}",
        title_justify="left",
    )
    for column in (
        "batch",
        "model-only f/s",
        "end-to-end f/s",
        "naive f/s",
        "e2e/model",
        "e2e/naive",
        "e2e/model (CPU time)",
        "TFLOP/s",
        "of peak",
    ):
        table.add_column(column, justify="right")
    for run in result["sweep"] or [result]:
        fraction = f"{run['peak_fraction']:.1%}" if run["peak_fraction"] is not None else "n/a"
        table.add_row(
            str(run["batch_size"]),
            f"{run['model_only_fps']:,.1f}",
            f"{run['end_to_end_fps']:,.1f}",
            f"{run['naive_fps']:,.1f}",
            f"{run['ratio_vs_model_only']:.3f}",
            f"{run['ratio_vs_naive']:.2f}",
            f"{run['cpu_ratio_vs_model_only']:.3f}",
            f"{run['tflops']:.3f}",
            fraction,
        )
    stdout.print(table)
    device_mb = f"{result['peak_device_mb']:,.0f} MiB" if result["peak_device_mb"] is not None else "n/a"
    stdout.print(
        f"{result['flops_per_image'] / 1e9:.2f} GFLOPs per image (TFLOP/s and peak fraction of the "
        f"model-only path); {result['environment']['cpu_threads']} CPU threads; peak host RSS "
        f"{result['peak_rss_mb']:,.0f} MiB; peak device memory {device_mb}; median of the timed runs, "
        "warm-up excluded; max |reward difference| vs the naive path "
        f"{result['max_abs_reward_diff_vs_naive']:.2e}"
    )


def _version(value: bool) -> None:
    if value:
        stdout.print(f"vlmlabel {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Label offline RL datasets with rewards from a vision-language model."""


def main() -> None:
    _printable_output()
    app(prog_name="vlmlabel")


def _printable_output() -> None:
    """What vlmlabel prints never fails to encode: a file name that is not UTF-8 (legal on Linux) reaches Python as
    lone surrogates, which a strict stdout (a UTF-8 locale) cannot write; they are shown escaped instead."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


if __name__ == "__main__":
    main()
