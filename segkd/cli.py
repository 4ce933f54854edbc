"""The ``segkd`` command line. Thin: each command parses its options and calls one engine function.

Exit codes: 0 success, 1 bad input or a failed run (one ``error:`` line on stderr), 2 usage error (Typer),
3 a CI gate or verification threshold not met.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from segkd import __version__
from segkd.errors import SegkdError

app = typer.Typer(
    name="segkd",
    help="Knowledge distillation for semantic segmentation: train, distill, evaluate, export and benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"segkd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """segkd: compress segmentation models by knowledge distillation, then export and benchmark them."""


def _emit_json(data: object, path: Path | None) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    if path is None or str(path) == "-":
        out.print_json(text) if sys.stdout.isatty() else print(text)
    else:
        from segkd.checkpoint import atomic_write_text

        atomic_write_text(path, text + "\n")


# ----------------------------------------------------------------------------------------------------- models
@app.command("models")
def models_cmd(
    name: Annotated[str | None, typer.Argument(help="Show one model (name or alias); all when omitted.")] = None,
    num_classes: Annotated[int, typer.Option(help="Classes of the head used for the counts.")] = 19,
    size: Annotated[str, typer.Option(help="Input HxW at which FLOPs are counted.")] = "512x1024",
    flops: Annotated[bool, typer.Option("--flops/--no-flops", help="Count FLOPs (slower for big models).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the model zoo: parameters, GMACs at a stated size, feature taps (name/channels/stride)."""
    from segkd.models.zoo_info import describe_models, render_models

    rows = describe_models(name, num_classes=num_classes, size=size, flops=flops)
    if as_json:
        _emit_json(rows, None)
    else:
        render_models(rows, out, size=size, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------------- convert
@app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="Foreign checkpoint: HF model.safetensors/pytorch_model.bin, "
                                        "NVlabs/mmseg .pth, torchvision DeepLabV3 .pth.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model to build, e.g. segformer-b0.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="segkd checkpoint to write (.safetensors).")],
    num_classes: Annotated[int | None, typer.Option(help="Classes (default: read from the source head).")] = None,
    classes: Annotated[Path | None, typer.Option(help="Text file with one class name per line.")] = None,
    ignore_index: Annotated[int, typer.Option(help="Label value ignored by losses and metrics.")] = 255,
    as_json: Annotated[bool, typer.Option("--json", help="Print the conversion report as JSON.")] = False,
) -> None:
    """Import a checkpoint you already have into a self-describing segkd checkpoint."""
    from segkd.models.convert import run_convert

    report = run_convert(src, model, out_path, num_classes=num_classes, classes_file=classes,
                         ignore_index=ignore_index)
    if as_json:
        _emit_json(report, None)
        return
    out.print(f"[bold]{report['source_format']}[/] checkpoint -> {report['model']} "
              f"({report['num_classes']} classes): {report['placed']} tensors placed")
    for label in ("unplaced", "skipped", "missing"):
        keys = report[label]
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            out.print(f"  {label}: {shown}")
    out.print(f"wrote {report['out']}")


def main() -> None:
    """Console-script entry point: one ``error:`` line and a non-zero exit for every expected failure."""
    try:
        app()
    except SegkdError as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
