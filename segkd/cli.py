"""The ``segkd`` command line. Thin: each command parses its options and calls one engine function.

Exit codes: 0 success, 1 bad input or a failed run (one ``error:`` line on stderr), 2 usage error (Typer),
3 a CI gate or verification threshold not met.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from segkd import __version__
from segkd.cliopts import ParameterSource, get_current_context  # one place that knows where click lives
from segkd.errors import SegkdError
from segkd.options import IMG_SUFFIX_HELP, SEG_SUFFIX_HELP
from segkd.textout import make_console

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    import click.exceptions as _click_errors


def _finite(value: Any) -> bool:
    items = value if isinstance(value, (list, tuple)) else [value]
    return all(math.isfinite(v) for v in items if isinstance(v, float))


def _finite_floats(cmd: Any) -> Any:
    """Make every option of ``cmd`` (and of its subcommands) refuse nan/inf where it parses to a float: a usage
    error at parse time instead of an optimiser traceback at iteration 1."""
    for param in cmd.params:
        if getattr(param, "_segkd_finite", False):
            continue
        parse = param.process_value

        def process_value(ctx: Any, value: Any, _parse: Any = parse, _param: Any = param) -> Any:
            value = _parse(ctx, value)
            if not _finite(value):
                raise typer.BadParameter(f"{value!r} is not a finite number", ctx=ctx, param=_param)
            return value

        param.process_value = process_value
        param._segkd_finite = True
    for sub in getattr(cmd, "commands", {}).values():
        _finite_floats(sub)
    return cmd


class _SegkdGroup(TyperGroup):
    """The root command: finite floats everywhere, and usage errors as one plain line (exit 2), not a box."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        return None if cmd is None else _finite_floats(cmd)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """The command to run; a generated one (:data:`_GENERATED`) is built here, only when it is the one run,
        so ``segkd --version``, ``--help`` and the light commands never import torch for the others' options."""
        name, cmd, rest = super().resolve_command(ctx, args)
        if name in _GENERATED:
            cmd = _finite_floats(_build_generated(name))
        return name, cmd, rest

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except getattr(_click_errors, "NoArgsIsHelpError", ()) as e:  # the help was the answer (rich printed it)
            if e.format_message().strip():
                typer.echo(e.format_message(), err=True)
            sys.exit(e.exit_code)
        except _click_errors.UsageError as e:
            where = _command_name(e.ctx)
            typer.echo(f"error: {' '.join(e.format_message().split()).rstrip('.')}; see '{where} --help'", err=True)
            sys.exit(e.exit_code)
        except _click_errors.ClickException as e:
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="segkd",
    help="Knowledge distillation for semantic segmentation: train, distill, evaluate, export and benchmark.",
    cls=_SegkdGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = make_console(stderr=True)
out = make_console()  # never wraps when piped: scripts parse what segkd prints


@contextmanager
def option_values() -> Iterator[None]:
    """The block checks option values only (before any file is read or any work starts): a ``SegkdError`` it raises
    is a usage error, exit 2 with the ``--help`` hint, as click gives for the values it checks itself (``--device
    gpu``, ``--crop 60by80``, ``--method c2vk``; issue 23 item 11)."""
    try:
        yield
    except SegkdError as e:
        raise _click_errors.UsageError(str(e), ctx=get_current_context(silent=True)) from None


def _command_name(ctx: Any) -> str:
    """``segkd SUBCOMMAND...`` of a click context (the program's own name, however Python was started)."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["segkd", *reversed(names)])


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


def _note(text: str) -> None:
    """One ``note:`` line on stderr (what a command chose for the user, e.g. the input size it used)."""
    console.print(f"note: {text}", highlight=False, soft_wrap=True)


def _emit_json(data: object, path: Path | None) -> None:
    """``data`` as JSON: on stdout when ``path`` is None (coloured on a terminal), else atomically into ``path``."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    if path is None:
        out.print_json(text) if sys.stdout.isatty() else print(text)
    else:
        from segkd.checkpoint import atomic_write_text

        atomic_write_text(path, text + "\n")


# the JSON convention of every command (docs/cli.md): `--json` = the JSON alone on stdout, `--json-out PATH` = the
# JSON in a file as well as the human output
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout instead of the human "
                                        "output (progress, notes and errors stay on stderr).")]
JsonOutOption = Annotated[Path | None, typer.Option("--json-out", help="Also write the result as JSON to "
                                                    "this file (atomically); the human output stays.")]


@dataclass(frozen=True)
class JsonOutput:
    """What ``--json`` and ``--json-out PATH`` ask of a command; built before any work (a bad path fails first)."""

    to_stdout: bool
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.path is None:
            return
        if str(self.path) == "-":
            raise typer.BadParameter("'-' is not a file; --json prints the JSON on stdout", param_hint="'--json-out'")
        from segkd.safeio import check_output

        check_output(self.path, "file", "--json-out")

    def emit(self, data: object, render: Callable[[Console], None]) -> None:
        """Write ``--json-out``, then print the JSON alone (``--json``) or ``render(out)`` and a ``wrote`` line."""
        if self.path is not None:
            _emit_json(data, self.path)
        if self.to_stdout:
            _emit_json(data, None)
            return
        render(out)
        if self.path is not None:
            out.print(f"wrote {self.path}", highlight=False, soft_wrap=True)


# on --resume these come from the new command line (with the machine options and --iters, which extends the
# schedule); the rest from the saved run
_RESUME_OWN = {"resume", "as_json", "json_out", "config", "method_opt", "iters"}


def _print_run(summary: dict[str, Any], view: Console, *extra: str) -> None:
    """A run's speed, the files it left and their sizes (what ``--keep`` decides), then its small files."""
    view.print(f"{run_span(summary)} in {summary['wall_time_s']:.1f} s ({summary['img_s']:.1f} img/s)")
    from segkd.textout import human_size

    files = ", ".join(f"{path} ({human_size(size)})" for path, size in summary["files"].items())
    view.print(f"wrote {files}", highlight=False)
    view.print("wrote " + ", ".join(f"{summary['out']}/{name}" for name in ("run.json", *extra)), highlight=False)


def run_span(summary: dict[str, Any]) -> str:
    """What the throughput line's time covers: ``N iterations``, or after a resume the iterations run since it
    (``iterations 5-6 of 6 (2 since the resume at 4)``), so the img/s reads against the right count."""
    start, end = int(summary.get("resumed_from", 0)), int(summary["iterations"])
    if not start:
        return f"{end} iterations"
    return f"iterations {start + 1}-{end} of {end} ({end - start} since the resume at {start})"


def _warn_ignored_on_resume(values: dict[str, Any], resume: Path) -> None:
    """One ``warning:`` line naming each option typed with ``--resume`` that the saved run overrides, so
    ``--resume RUN --iters 10 --lr 0.5`` does not silently train with the old values."""
    from segkd.engine.config import machine_options
    from segkd.runs.rundir import RUN_FILE, run_dir_of

    own = _RESUME_OWN | set(machine_options())
    ctx = get_current_context(silent=True)
    if ctx is None:
        return
    run_dir = run_dir_of(None, resume)  # type: ignore[arg-type]
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable run.json: the trainer's own checks report the run directory
    ignored = []
    for param in ctx.command.params:
        name = param.name
        if name in own or ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            continue
        if name in saved and saved[name] == values.get(name):
            continue
        flag = max(param.opts, key=len)
        ignored.append(f"{flag} (the run has {saved[name]})" if name in saved else flag)
    if ignored:
        console.print(f"warning: --resume continues {run_dir} with its saved settings; ignored: {', '.join(ignored)}",
                      highlight=False)


# ----------------------------------------------------------------------------------------------------- models
@app.command("models")
def models_cmd(
    name: Annotated[str | None, typer.Argument(help="Show one model (name or alias); all when omitted.")] = None,
    num_classes: Annotated[int, typer.Option(help="Classes of the head used for the counts.")] = 19,
    size: Annotated[str, typer.Option(help="Input HxW at which FLOPs are counted.")] = "512x1024",
    flops: Annotated[bool, typer.Option("--flops/--no-flops", help="Count FLOPs (slower for big models).")] = True,
    as_json: JsonFlag = False,
    json_out: JsonOutOption = None,
) -> None:
    """List the model zoo: parameters, GMACs at a stated size, feature taps (name/channels/stride)."""
    from segkd.models.zoo_info import describe_models, render_models

    json_output = JsonOutput(as_json, json_out)
    rows = describe_models(name, num_classes=num_classes, size=size, flops=flops)
    json_output.emit(rows, lambda view: render_models(rows, view, size=size, num_classes=num_classes))


# ---------------------------------------------------------------------------------------------------- convert
@app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="Foreign checkpoint: HF model.safetensors/pytorch_model.bin or its "
                                        "save_pretrained folder (class names from config.json's id2label), "
                                        "NVlabs/mmseg .pth, torchvision DeepLabV3 .pth.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="segkd checkpoint to write (.safetensors).")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Zoo model to build, e.g. segformer-b0 "
                                              "(default: detected from the checkpoint's layout and shapes).")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classes (default: read from the source head).")] = None,
    classes: Annotated[Path | None, typer.Option(help="Class names: a text file (one per line) or a JSON file with "
                                                 "'classes' and optional 'palette' (e.g. a dataset's stats.json).")]
    = None,
    ignore_index: Annotated[int, typer.Option(help="Label value ignored by losses and metrics.")] = 255,
    as_json: JsonFlag = False,
    json_out: JsonOutOption = None,
) -> None:
    """Import a checkpoint you already have into a self-describing segkd checkpoint."""
    from segkd.models.convert import run_convert
    from segkd.safeio import check_output

    check_output(out_path, "file", "--out")
    json_output = JsonOutput(as_json, json_out)
    report = run_convert(src, model, out_path, num_classes=num_classes, classes_file=classes,
                         ignore_index=ignore_index)

    def render(view: Console) -> None:
        how = " (detected from its keys and shapes)" if report["model_detected"] else ""
        view.print(f"[bold]{report['source_format']}[/] checkpoint -> {report['model']}{how} "
                   f"({report['num_classes']} classes): {report['placed']} tensors placed")
        for label in ("unplaced", "skipped", "missing"):
            keys = report[label]
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                view.print(f"  {label}: {shown}")
        view.print(f"wrote {report['out']}", highlight=False, soft_wrap=True)

    json_output.emit(report, render)


# ------------------------------------------------------------------------------------------------------ train
def _run_options(
    config: Annotated[Path | None, typer.Option(help="Experiment config file (YAML, TOML or JSON: option: value, "
                                                "method_opts as a mapping); flags typed here override it. Every run "
                                                "writes RUN_DIR/config.yaml, which repeats it.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue a run exactly: its directory or resume.pt.")] = None,
    as_json: JsonFlag = False,
    json_out: JsonOutOption = None,
) -> None:
    """(signature only: the options every run command adds to its config's)"""


def _run_config(cls: type, values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The config of a ``train``/``distill`` command line: defaults < ``--config`` file < typed flags; one-line
    errors for a missing required option or ``--config`` with ``--resume``. With ``--resume``, also the options
    typed that change the resumed run (machine options, ``--iters``): everything else is the run's own."""
    from dataclasses import fields

    from segkd.cliopts import resolve_config
    from segkd.engine.config import machine_options

    if values["config"] is not None and values["resume"] is not None:
        raise SegkdError("--config cannot be combined with --resume: a resumed run keeps its saved settings")
    cfg, given = resolve_config(cls, values, values["config"])
    if values["resume"] is not None:
        _warn_ignored_on_resume(values, values["resume"])
        return cfg, {k: getattr(cfg, k) for k in (*machine_options(cls), "iters") if k in given}
    missing = [max(f.metadata["flags"], key=len) if f.metadata.get("flags") else f"--{f.name.replace('_', '-')}"
               for f in fields(cls) if f.metadata.get("required") and f.name not in given]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise SegkdError(f"{' and '.join(missing)} {verb} required (in --config or as flags; or --resume RUN_DIR to "
                         "continue a run)")
    with option_values():
        _check_run_values(cfg)
    return cfg, {}


def _run_options_of(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """What ``run_train``/``run_distill`` get from the command line besides the config."""
    return {"config_file": values["config"], "overrides": overrides if values["resume"] is not None else None}


def _check_run_values(cfg: Any) -> None:
    """The option values of a train/distill command line: the shared range checks and the zoo and method names (the
    command's own checks of the files it names follow in the run)."""
    from segkd.engine.config import TrainConfig
    from segkd.models import MODELS

    TrainConfig.check(cfg)
    for name in ("model", "teacher", "peer"):
        if getattr(cfg, name, None):
            MODELS.canonical(getattr(cfg, name))
    if getattr(cfg, "method", None):
        from segkd.methods import METHODS

        METHODS.canonical(cfg.method)


def train_cmd(**values: Any) -> None:
    """Train a zoo model supervised (teachers, and the no-KD student baseline); resumable, DDP under torchrun."""
    from segkd.engine.config import TrainConfig
    from segkd.runs.train import run_train

    json_out = JsonOutput(values["as_json"], values["json_out"])
    cfg, overrides = _run_config(TrainConfig, values)
    summary = run_train(cfg, resume=values["resume"], **_run_options_of(values, overrides))
    if summary.get("rank", 0) == 0:
        json_out.emit(summary, lambda view: _render_train(summary, view))


def _render_train(summary: dict[str, Any], view: Console) -> None:
    for name, best in summary["best"].items():  # a supervised run trains one model: name it, not its role
        view.print(f"model {summary['models'].get(name, name)}: best val mIoU {100 * best['miou']:.2f} at iteration "
                   f"{best['iteration']}")
    _print_run(summary, view, "config.yaml")


def _train_parameters() -> list[inspect.Parameter]:
    from segkd.cliopts import command_parameters
    from segkd.engine.config import TrainConfig

    return command_parameters(TrainConfig, _run_options)


# ------------------------------------------------------------------------------------------------------- eval
def _eval_options(
    source: Annotated[Path, typer.Argument(help="segkd checkpoint (.safetensors) or exported model (.onnx).")],
    as_json: JsonFlag = False,
    json_out: JsonOutOption = None,
) -> None:
    """(signature only: eval's argument and output options beside EvalConfig's)"""


def eval_cmd(**values: Any) -> None:
    """Evaluate a checkpoint or ONNX model: mIoU, per-class IoU/Acc, aAcc, mAcc, fwIoU (DDP under torchrun)."""
    from segkd.cliopts import resolve_config
    from segkd.engine.evaluate import EvalConfig, render_eval, run_eval
    from segkd.safeio import check_output

    json_output = JsonOutput(values["as_json"], values["json_out"])
    cfg, _ = resolve_config(EvalConfig, values, None)
    with option_values():
        cfg.check()
    if cfg.save_preds is not None:
        check_output(Path(cfg.save_preds), "dir", "--save-preds")
    if cfg.data is None:
        cfg.data = "synth"
        console.print("note: no --data given: scoring the built-in synthetic set (synth)", highlight=False)
    result = run_eval(values["source"], cfg, note=_note)
    if result.rank != 0:
        return

    def render(view: Console) -> None:
        render_eval(result, view)
        if cfg.save_preds is not None:
            view.print(f"wrote predictions to {cfg.save_preds}", highlight=False, soft_wrap=True)

    json_output.emit(result.to_dict(), render)


def _eval_parameters() -> list[inspect.Parameter]:
    from segkd.cliopts import command_parameters
    from segkd.engine.evaluate import EvalConfig

    return command_parameters(EvalConfig, _eval_options)


# ---------------------------------------------------------------------------------------------------- predict
def _predict_options(
    source: Annotated[Path, typer.Argument(help="segkd checkpoint (.safetensors) or exported model (.onnx).")],
    inputs: Annotated[list[Path], typer.Argument(help="Images, or folders of images (not recursive).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for NAME.png (class indices, the checkpoint's "
                                          "palette) and NAME_overlay.png.")],
    as_json: JsonFlag = False,
    json_out: JsonOutOption = None,
) -> None:
    """(signature only: predict's arguments, --out and output options beside PredictConfig's)"""


def predict_cmd(**values: Any) -> None:
    """Predict label maps and colour overlays for images without labels, at the checkpoint's trained size."""
    from segkd.cliopts import resolve_config
    from segkd.engine.predict import PredictConfig, run_predict
    from segkd.safeio import check_output

    check_output(values["out_dir"], "dir", "--out")
    json_output = JsonOutput(values["as_json"], values["json_out"])
    cfg, _ = resolve_config(PredictConfig, values, None)
    report = run_predict(values["source"], values["inputs"], values["out_dir"], cfg, note=_note)

    def render(view: Console) -> None:
        per = 2 if cfg.overlay else 1
        view.print(f"wrote {len(report['written']) * per} files for {len(report['written'])} of {report['images']} "
                   f"images to {report['out']}", highlight=False, soft_wrap=True)

    json_output.emit(report, render)
    if report["failed"]:
        first = next(iter(report["failed"].values()))
        raise SegkdError(f"{len(report['failed'])} of {report['images']} images could not be read (skipped), "
                         f"first: {first}")


def _predict_parameters() -> list[inspect.Parameter]:
    from segkd.cliopts import command_parameters
    from segkd.engine.predict import PredictConfig

    return command_parameters(PredictConfig, _predict_options)


# ----------------------------------------------------------------------------------------------------- export
def _export_options(
    ckpt: Annotated[Path, typer.Argument(help="segkd checkpoint (.safetensors) of the model to deploy.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write (only after verification).")],
    as_json: JsonFlag = False,
    json_out: JsonOutOption = None,
) -> None:
    """(signature only: export's argument, --out and output options beside ExportConfig's)"""


def export_cmd(**values: Any) -> None:
    """Export the deployable model to verified ONNX, with a TensorRT readiness report and trtexec line."""
    from segkd.cliopts import resolve_config
    from segkd.export.onnx_export import ExportConfig, export_checkpoint
    from segkd.export.render import render_export_report
    from segkd.safeio import check_output

    check_output(values["out_path"], "file", "--out")
    json_output = JsonOutput(values["as_json"], values["json_out"])
    cfg, _ = resolve_config(ExportConfig, values, None)
    if cfg.int8 and cfg.data is None:
        raise typer.BadParameter("--int8 needs --data ROOT (real training images to calibrate on)",
                                 param_hint="'--data'")
    with option_values():
        cfg.check()
    report = export_checkpoint(values["ckpt"], values["out_path"], cfg)
    json_output.emit(report, lambda view: render_export_report(report, view))


def _export_parameters() -> list[inspect.Parameter]:
    from segkd.cliopts import command_parameters
    from segkd.export.onnx_export import ExportConfig

    return command_parameters(ExportConfig, _export_options)


# ------------------------------------------------------------------------------------------------------ bench
def _bench_options(
    as_json: JsonFlag = False,
    json_out: JsonOutOption = None,
    max_latency_ms: Annotated[str | None, typer.Option(help="Gate: p50 latency of every run (ms); X@MODEL[,MODEL] "
                                                       "gates only those MODELs (as typed, file name or position), "
                                                       "e.g. 40@2.")] = None,
    max_gflops: Annotated[str | None, typer.Option(help="Gate: GFLOPs per image (2 x GMACs) at every input; "
                                                   "X@MODEL[,MODEL] as for --max-latency-ms.")] = None,
    max_params: Annotated[str | None, typer.Option(help="Gate: deploy parameters, e.g. 3.8M or 3800000; "
                                                   "3.8M@MODEL[,MODEL] as for --max-latency-ms.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="Previous bench report (`--json-out` file) to compare with.")
                        ] = None,
    max_regression: Annotated[str, typer.Option(help="Gate with --baseline: allowed increase of p50 latency, GMACs "
                                                "and params, e.g. 10% (10%@MODEL[,MODEL] compares only those).")
                              ] = "10%",
) -> None:
    """(signature only: bench's output and gate options beside BenchConfig's)"""


def bench_cmd(**values: Any) -> None:
    """Parameters, FLOPs (GMACs), latency percentiles, throughput and memory; JSON report and CI gates (exit 3)."""
    from segkd.bench.gates import enforce, parse_gates
    from segkd.bench.report import render
    from segkd.bench.run import BenchConfig, run_bench_command
    from segkd.cliopts import resolve_config

    _refuse_json_paths(values["models"] or [], values["as_json"])
    json_output = JsonOutput(values["as_json"], values["json_out"])
    cfg, _ = resolve_config(BenchConfig, values, None)
    with option_values():
        gates = parse_gates(values["max_latency_ms"], values["max_gflops"], values["max_params"], values["baseline"],
                            values["max_regression"])
        cfg.check()
        gates.check_scope(cfg.models)
    with console.status("benchmarking") as status:
        report = run_bench_command(cfg, gates, progress=lambda label: status.update(f"benchmarking {label}"))
    json_output.emit(report, lambda view: render(report, view))
    enforce(report)


def _bench_parameters() -> list[inspect.Parameter]:
    from segkd.bench.run import BenchConfig
    from segkd.cliopts import command_parameters

    return command_parameters(BenchConfig, _bench_options, exclude=("detail_depth",))


def _refuse_json_paths(models: list[str], as_json: bool) -> None:
    """A usage error (one line, exit 2) for a MODEL that is a JSON file or '-': what the old `bench --json PATH`
    and `--json -` leave among the MODELs now that --json takes no value."""
    for arg in models:
        if arg != "-" and not arg.lower().endswith(".json"):
            continue
        if not as_json:
            message = f"MODEL {arg}: not a zoo name, a .safetensors checkpoint or an .onnx file"
        else:
            message = "--json takes no value: it prints the report on stdout" + (
                "" if arg == "-" else f" (to write {arg}, use --json-out {arg})")
        raise _click_errors.UsageError(message, ctx=get_current_context(silent=True))


# ---------------------------------------------------------------------------------------------------- distill
def _distill_extra(
    method_opt: Annotated[list[str] | None, typer.Option(metavar="KEY=VALUE", help="Any method option as KEY=VALUE "
                                                         "(repeatable), e.g. "
                                                         "temperature=2; see docs/methods.md.")] = None,
) -> None:
    """(signature only: distill's options beyond its config's and the method flags)"""


def distill_cmd(**values: Any) -> None:
    """Distil a teacher into a student or train two students together (online methods) on the shared engine; the
    checkpoints hold the students alone (the methods: ``segkd distill --help``, generated from the registry)."""
    from segkd.cliopts import method_opts_from_flags
    from segkd.methods.base import parse_method_opts
    from segkd.runs.distill import DistillConfig, run_distill

    json_out = JsonOutput(values["as_json"], values["json_out"])
    cfg, overrides = _run_config(DistillConfig, values)
    if values["resume"] is None:
        cfg.method_opts = {**cfg.method_opts, **method_opts_from_flags(cfg.method, values),
                           **parse_method_opts(values["method_opt"])}
    summary = run_distill(cfg, resume=values["resume"], **_run_options_of(values, overrides))
    if summary.get("rank", 0) == 0:
        json_out.emit(summary, lambda view: _render_distill(summary, view))


def _distill_doc() -> str:
    """distill's help text, generated from the method registry (a method registered later is named too)."""
    from segkd.methods import METHODS

    teacher = [n for n in METHODS.names() if METHODS.get(n).teacher]
    online = [n for n in METHODS.names() if not METHODS.get(n).teacher]
    return (f"Distil a teacher into a student ({', '.join(teacher)}) or train two students together "
            f"({', '.join(online)}) on the shared engine; the checkpoints hold the students alone.")


def _render_distill(summary: dict[str, Any], view: Console) -> None:
    rep = summary["distill"]
    for name, best in summary["best"].items():
        view.print(f"{name}: best val mIoU {100 * best['miou']:.2f} at iteration {best['iteration']}; deploy "
                   f"{rep['deploy_params'][name] / 1e6:.2f} M params, {rep['deploy_gmacs'][name]:.2f} GMACs "
                   f"({rep['gmacs_input']}); training-only adapters {rep['adapter_params'][name] / 1e6:.3f} M")
    _print_run(summary, view, "config.yaml", "distill.json")


def _distill_parameters() -> list[inspect.Parameter]:
    from segkd.cliopts import command_parameters, method_flag_parameters
    from segkd.runs.distill import DistillConfig

    distill_cmd.__doc__ = _distill_doc()
    return command_parameters(DistillConfig, _distill_extra, _run_options, between=method_flag_parameters(),
                              first=("method", "teacher", "teacher_weights", "model", "peer", "data"))


# commands whose options are generated from config dataclasses (segkd.cliopts): name -> (function, signature)
_GENERATED: dict[str, tuple[Callable[..., None], Callable[[], list[inspect.Parameter]]]] = {
    "train": (train_cmd, _train_parameters), "distill": (distill_cmd, _distill_parameters),
    "eval": (eval_cmd, _eval_parameters), "predict": (predict_cmd, _predict_parameters),
    "export": (export_cmd, _export_parameters),
    "bench": (bench_cmd, _bench_parameters),
}


def _build_generated(name: str) -> Any:
    """The click command of a generated command, with its full signature (this imports the config modules)."""
    from segkd.cliopts import with_signature

    fn, parameters = _GENERATED[name]
    single = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False)
    single.command(name)(with_signature(fn, parameters()))
    cmd = typer.main.get_command(single)
    cmd.name = name
    return cmd


def _register_generated() -> None:
    """Each generated command is listed in the root help by a placeholder holding only its name and docstring;
    :meth:`_SegkdGroup.resolve_command` swaps in the real command when it is run."""
    for name, (fn, _) in _GENERATED.items():
        def placeholder() -> None:  # pragma: no cover - never run: resolve_command replaces it
            raise AssertionError("a generated command was run without its options")

        placeholder.__doc__ = fn.__doc__
        app.command(name)(placeholder)


_register_generated()


# ------------------------------------------------------------------------------------------------------- data
data_app = typer.Typer(help="Datasets: generate the synthetic set, inspect a dataset folder.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (folder layout + classes.json).")],
    train: Annotated[int, typer.Option(help="Training images.")] = 160,
    val: Annotated[int, typer.Option(help="Validation images.")] = 40,
    size: Annotated[str, typer.Option(help="Image size HxW.")] = "96x128",
    classes: Annotated[int, typer.Option("--num-classes", "--classes", help="Classes, background included (2-11); "
                                         "--classes is the old name.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same files.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier synthetic set in --out.")] = False,
) -> None:
    """Write the procedural dataset (textured shapes on noisy backgrounds) in seconds."""
    from segkd.data import synthesize
    from segkd.data.synth import check_synth_options
    from segkd.shapes import parse_hw

    with option_values():
        hw = parse_hw(size, "--size")
        check_synth_options(train, val, hw, classes, seed)
    try:
        root = synthesize(out_dir, n_train=train, n_val=val, size=hw, num_classes=classes, seed=seed, progress=True,
                          replace=force)
    except OSError as e:
        e.add_note(f"the set in {out_dir} is incomplete (no classes.json): run the command again once it is writable")
        raise
    out.print(f"wrote {train} train + {val} val images ({size}, {classes} classes) to {root}")


@data_app.command("inspect")
def data_inspect_cmd(
    root: Annotated[str, typer.Argument(help="Dataset root folder (or 'synth').")],
    data_format: Annotated[str | None, typer.Option(help="folder|mmseg|camvid|cityscapes|ade20k|voc; auto when "
                                                    "omitted.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classes of a folder dataset without a class file.")] = None,
    ignore_index: Annotated[int, typer.Option(help="Label value that marks void pixels.")] = 255,
    img_suffix: Annotated[str | None, typer.Option(help=IMG_SUFFIX_HELP)] = None,
    seg_suffix: Annotated[str | None, typer.Option(help=SEG_SUFFIX_HELP)] = None,
    as_json: JsonFlag = False,
    json_out: JsonOutOption = None,
) -> None:
    """Splits, image sizes, class pixel frequencies and every unreadable or inconsistent file (exit 1 if any)."""
    from segkd.data import inspect_dataset, resolve_data_root
    from segkd.data.datasets import check_name_suffixes
    from segkd.data.report import render_inspect

    with option_values():
        check_name_suffixes(img_suffix, seg_suffix)
    json_output = JsonOutput(as_json, json_out)
    report = inspect_dataset(resolve_data_root(root), data_format, num_classes, ignore_index, progress=True,
                             img_suffix=img_suffix, seg_suffix=seg_suffix)
    json_output.emit(report, lambda view: render_inspect(report, view))
    if report["problems"]:
        raise SegkdError(f"{root}: {len(report['problems'])} problem(s) found, first: {report['problems'][0]}")


# ----------------------------------------------------------------------------------------------------- report
@app.command("report")
def report_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="Train/distill run directories (one page compares them).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="HTML page to write (figures inlined); the markdown "
                                           "goes beside it as .md, its figures in <stem>_figures/.")
                        ] = Path("report.html"),
    teacher: Annotated[Path | None, typer.Option(help="Teacher checkpoint to evaluate and plot next to the students "
                                                 "(default: the teacher a distill run's distill.json names).")
                       ] = None,
    data: Annotated[str | None, typer.Option(help="Dataset root for the teacher's IoU and the sample overlays "
                                             "(default: each run's own).")] = None,
    samples: Annotated[int, typer.Option(help="Validation images shown with every model's prediction.")] = 4,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Time each model's forward on CPU at "
                                          "the run's input size (median of 5 calls).")] = True,
) -> None:
    """One self-contained HTML page (and markdown) per run or comparison: curves, per-class IoU, cost, samples."""
    from segkd.report import build_report, write_report
    from segkd.safeio import check_output

    check_output(out_path, "file", "--out")
    with console.status("report") as status:
        report = build_report(run_dirs, teacher=teacher, data=data, samples=samples, latency=latency,
                              progress=lambda text: status.update(f"report: {text}"))
    page, md, figs = write_report(report, out_path)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)
    out.print(f"wrote {page} and {md} (figures in {figs}/)", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point: one ``error:`` line and a non-zero exit for every expected failure."""
    from rich.markup import escape

    from segkd.safeio import guard_broken_pipes

    guard_broken_pipes()  # a closed stdout/stderr (`| head`) must not end a run
    # the CPU onnxruntime build warns about a GPU provider it lacks; segkd's own one-line error says it instead
    warnings.filterwarnings("ignore", message="Specified provider '.*' is not in available provider names")
    try:
        app()
    except SegkdError as e:
        if not e.silent:  # under torchrun rank 0 says it for every rank
            console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # paths may hold [..]
        sys.exit(e.exit_code)
    except OSError as e:  # read-only file system, disk full, permissions: the path, the cause, what was kept
        from segkd.safeio import os_error_message

        console.print(f"[red]error:[/] {escape(os_error_message(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the Ctrl-C: one line, from rank 0
            console.print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
