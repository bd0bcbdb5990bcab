"""Command line: parse options, call the library, render with rich.

Library errors become exit code 2 and one line here, and only here.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Callable, List, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from vlmlabel import __version__
from vlmlabel.device import Precision
from vlmlabel.errors import VlmlabelError
from vlmlabel.model import DEFAULT_MODEL
from vlmlabel.pipeline import DEFAULT_REWARD_KEY, RelabelRequest, RelabelSummary, relabel_file
from vlmlabel.sources import Align, HDF5Source, open_source

app = typer.Typer(
    help="Label offline RL datasets with rewards from a vision-language model: R(o, l) = cos(CLIP(o), CLIP(l)).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
stdout = Console()

F = TypeVar("F", bound=Callable)

# Shared option definitions.
SourceArg = Annotated[Path, typer.Argument(
    help="Dataset to read: an HDF5 file (.h5/.hdf5); a datasets save_to_disk folder; a parquet file, folder or "
         "quoted glob; a LeRobot dataset folder (meta/info.json); or a Hugging Face Hub dataset id ORG/NAME.",
    show_default=False)]
ImageKeyOpt = Annotated[Optional[str], typer.Option(
    "--image-key", help="Frames: HDF5 dataset path, table column, or LeRobot camera (observation.images.NAME); "
                        "auto-detected when omitted.")]
SplitOpt = Annotated[str, typer.Option(help="Split of a Hub dataset or DatasetDict folder.")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    help="Hub dataset revision (branch, tag or commit).", show_default=False)]
StreamingOpt = Annotated[bool, typer.Option(
    "--streaming", help="Hub datasets: stream rows instead of downloading first; rewards go to a parquet sidecar.")]


def _exit_on_error(func: F) -> F:
    """Turn library errors into exit code 2 and one line; Ctrl-C into 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except VlmlabelError as exc:
            console.print(Text(f"error: {exc}", style="bold red"), soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            console.print(Text(f"error: {exc}", style="bold red"), soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print(Text("interrupted: nothing was written, the source is unchanged", style="yellow"))
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class FramesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} frames/s" if speed else "-- frames/s", style="progress.data.speed")


@app.command()
@_exit_on_error
def relabel(
    source: SourceArg,
    goal: Annotated[List[str], typer.Option(
        "--goal", "-g", help="Goal in words; repeat for several goals (one reward dataset each).",
        show_default=False)],
    model: Annotated[str, typer.Option(
        help="open_clip architecture (e.g. ViT-B-32), hf-hub:ORG/REPO, local-dir:PATH or a folder with "
             "open_clip_config.json + weights.")] = DEFAULT_MODEL,
    pretrained: Annotated[Optional[str], typer.Option(
        help="open_clip pretrained tag (default laion2b_s34b_b79k for ViT-B-32, else the model's first tag) "
             "or a local checkpoint file (.safetensors, .bin, .pt).", show_default=False)] = None,
    image_key: ImageKeyOpt = None,
    reward_key: Annotated[str, typer.Option(
        help="Name of the written dataset (HDF5) or column (tables, LeRobot); with several goals "
             "NAME_0, NAME_1, ...")] = DEFAULT_REWARD_KEY,
    output: Annotated[Optional[Path], typer.Option(
        help="HDF5: write a copy with the rewards added here instead of adding them to SOURCE. Hugging Face / "
             "LeRobot: where the new dataset goes (default NAME-vlmlabel beside SOURCE).",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace reward datasets or columns (and an --output dataset) that already exist.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Frames per batch; default chosen for the device.", show_default=False)] = None,
    precision: Annotated[Precision, typer.Option(
        help="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.")] = Precision.auto,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:N|mps")] = "auto",
    align: Annotated[Align, typer.Option(
        help="frame: step t scores its own frame o_t; next: step t scores o_{t+1} (D4RL/robomimic convention).")]
    = Align.frame,
    split: SplitOpt = "train",
    revision: RevisionOpt = None,
    streaming: StreamingOpt = False,
    push_to_hub: Annotated[Optional[str], typer.Option(
        "--push-to-hub", help="Also upload the written dataset to this Hub dataset repo (ORG/NAME).",
        show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
) -> None:
    """Score every step against each goal and write the rewards next to the data.

    HDF5: datasets added to the file (or to an --output copy). Hugging Face and LeRobot datasets: a new
    dataset beside the input (NAME-vlmlabel) with float32 reward columns; the source is never modified.
    """
    request = RelabelRequest(
        source=source, goals=goal, model=model, pretrained=pretrained, image_key=image_key,
        reward_key=reward_key, output=output, overwrite=overwrite, batch_size=batch_size,
        precision=precision.value, device=device, align=align, split=split, revision=revision,
        streaming=streaming, push_to_hub=push_to_hub,
    )
    if quiet:
        relabel_file(request)
        return
    progress = Progress(
        TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
        FramesPerSecond(), TimeRemainingColumn(), console=console, transient=True,
    )
    task = progress.add_task("scoring", total=None)

    def start(total: int) -> None:  # only once the source and model are ready: errors before stay one line
        progress.update(task, total=total)
        progress.start()

    try:
        summary = relabel_file(request, on_start=start, on_progress=lambda n: progress.advance(task, n))
    finally:
        if progress.live.is_started:
            progress.stop()
    _print_summary(summary)


def _print_summary(summary: RelabelSummary) -> None:
    result = summary.result
    table = Table(title=f"vlmlabel {__version__}: rewards written to {summary.written_to}", title_justify="left")
    table.add_column("dataset")
    table.add_column("goal")
    table.add_column("min", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("max", justify="right")
    values = result.all_rewards()
    for index, (name, goal) in enumerate(zip(summary.reward_names, summary.goals)):
        column = values[:, index]
        table.add_row(name, goal, f"{column.min():.4f}", f"{column.mean():.4f}", f"{column.max():.4f}")
    stdout.print(table)
    stdout.print(
        f"{len(result.episodes)} episodes, {result.frames:,} frames, {result.frames_per_second:,.1f} frames/s "
        f"({summary.layout} layout, frames from {summary.image_key!r}; model {summary.model.name} "
        f"{summary.model.pretrained}, {summary.model.precision} on {summary.model.device})"
    )


@app.command()
@_exit_on_error
def inspect(source: SourceArg, image_key: ImageKeyOpt = None, split: SplitOpt = "train",
            revision: RevisionOpt = None, streaming: StreamingOpt = False) -> None:
    """Show the detected layout, image key, frame format, episodes and frames."""
    with open_source(str(source), image_key, split, revision, streaming) as opened:
        episodes = opened.episodes(Align.frame)
        steps = [e.steps for e in episodes]
        table = Table(title=str(source), show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value")
        table.add_row("layout", opened.layout)
        table.add_row("image key", opened.image_key)
        table.add_row("frames", opened.frame_format.describe())
        table.add_row("episodes", f"{len(episodes):,}")
        table.add_row("steps", f"{sum(steps):,} (per episode: min {min(steps):,}, max {max(steps):,})")
        table.add_row("rewards written to", _reward_destination(opened, episodes))
        stdout.print(table)


def _reward_destination(source, episodes) -> str:
    if isinstance(source, HDF5Source):
        targets = sorted({e.target or "/" for e in episodes})
        return ", ".join(targets[:3]) + (f", ... ({len(targets)} groups)" if len(targets) > 3 else "")
    from vlmlabel.writers.tables import default_output

    what = "a parquet sidecar" if source.kind == "stream" else "new float32 column(s) of a new dataset"
    return f"{what}: {default_output(source)} (or --output)"


@app.command()
@_exit_on_error
def models(
    filter: Annotated[Optional[str], typer.Argument(help="Only architectures whose name contains this.")] = None,
) -> None:
    """List open_clip architectures and their pretrained tags."""
    from vlmlabel.model import list_architectures

    table = Table(title="open_clip architectures (use with --model NAME --pretrained TAG)", title_justify="left")
    table.add_column("model")
    table.add_column("pretrained tags")
    for name, tags in list_architectures():
        if filter is None or filter.lower() in name.lower():
            table.add_row(name, ", ".join(tags) if tags else "[dim](none: give --pretrained FILE)[/dim]")
    stdout.print(table)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"vlmlabel {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Label offline RL datasets with rewards from a vision-language model."""


def main() -> None:
    app(prog_name="vlmlabel")


if __name__ == "__main__":
    sys.exit(main())
