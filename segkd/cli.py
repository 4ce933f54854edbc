"""The ``segkd`` command line. Thin: each command parses its options and calls one engine function.

Exit codes: 0 success, 1 bad input or a failed run (one ``error:`` line on stderr), 2 usage error (Typer),
3 a CI gate or verification threshold not met.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from segkd import __version__
from segkd.errors import SegkdError
from segkd.textout import make_console

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as _click_errors
    from typer._click.core import ParameterSource as _ParameterSource
    from typer._click.globals import get_current_context as _click_context
except ImportError:  # pragma: no cover - older typer runs on click itself
    import click.exceptions as _click_errors
    from click.core import ParameterSource as _ParameterSource
    from click.globals import get_current_context as _click_context


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
            where = e.ctx.command_path if e.ctx is not None else "segkd"
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
    rich_markup_mode="rich",
)
console = make_console(stderr=True)
out = make_console()  # never wraps when piped: scripts parse what segkd prints


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


# on --resume these come from the new command line; every other option comes from the saved run
_RESUME_OWN = {"resume", "as_json", "out_dir", "no_progress", "device", "workers", "threads", "log_every", "keep"}
# option name -> its config field where they differ
_CONFIG_NAME = {"student": "model"}


def _print_written(summary: dict[str, Any], *extra: str) -> None:
    """The files a run left and their sizes (what ``--keep`` decides), then its small JSON files."""
    files = ", ".join(f"{path} ({size / 1e6:.1f} MB)" for path, size in summary["files"].items())
    out.print(f"wrote {files}", highlight=False)
    out.print("wrote " + ", ".join(f"{summary['out']}/{name}" for name in ("run.json", *extra)), highlight=False)


def _warn_ignored_on_resume(values: dict[str, Any], resume: Path) -> None:
    """One ``warning:`` line naming each option typed with ``--resume`` that the saved run overrides, so
    ``--resume RUN --iters 10 --lr 0.5`` does not silently train with the old values."""
    from segkd.engine.trainer import RUN_FILE, run_dir_of

    ctx = _click_context(silent=True)
    if ctx is None:
        return
    run_dir = run_dir_of(None, resume)  # type: ignore[arg-type]
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable run.json: the trainer's own checks report the run directory
    ignored = []
    for param in ctx.command.params:
        if param.name in _RESUME_OWN or ctx.get_parameter_source(param.name) != _ParameterSource.COMMANDLINE:
            continue
        flag = max(param.opts, key=len)
        field = _CONFIG_NAME.get(param.name, param.name)
        if field in saved and saved[field] == values.get(param.name):
            continue
        ignored.append(f"{flag} (the run has {saved[field]})" if field in saved else flag)
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
    src: Annotated[Path, typer.Argument(help="Foreign checkpoint: HF model.safetensors/pytorch_model.bin or its "
                                        "save_pretrained folder (class names from config.json's id2label), "
                                        "NVlabs/mmseg .pth, torchvision DeepLabV3 .pth.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model to build, e.g. segformer-b0.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="segkd checkpoint to write (.safetensors).")],
    num_classes: Annotated[int | None, typer.Option(help="Classes (default: read from the source head).")] = None,
    classes: Annotated[Path | None, typer.Option(help="Class names: a text file (one per line) or a JSON file with "
                                                 "'classes' and optional 'palette' (e.g. a dataset's stats.json).")]
    = None,
    ignore_index: Annotated[int, typer.Option(help="Label value ignored by losses and metrics.")] = 255,
    as_json: Annotated[bool, typer.Option("--json", help="Print the conversion report as JSON.")] = False,
) -> None:
    """Import a checkpoint you already have into a self-describing segkd checkpoint."""
    from segkd.models.convert import run_convert
    from segkd.safeio import check_output

    check_output(out_path, "file", "--out")
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


# ------------------------------------------------------------------------------------------------------ train
@app.command("train")
def train_cmd(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Zoo model to train, e.g. segformer-b0.")] = None,
    data: Annotated[str, typer.Option(help="Dataset root, or 'synth' for the built-in procedural dataset.")] = "synth",
    data_format: Annotated[str | None, typer.Option(help="Dataset format (default: detected from the root).")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classes, for the 'folder' format.")] = None,
    ignore_index: Annotated[int, typer.Option(help="Label value ignored by the loss and the metrics.")] = 255,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory for checkpoints and logs.")] = Path(
        "runs/train"),
    iters: Annotated[int, typer.Option(help="Optimiser steps.")] = 2000,
    batch: Annotated[int, typer.Option(help="Images per forward pass, summed over all processes.")] = 8,
    accum: Annotated[int, typer.Option(help="Micro-batches accumulated per optimiser step.")] = 1,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr: Annotated[float | None, typer.Option(help="Peak LR (default 2e-4 adamw, 0.01 sgd).")] = None,
    wd: Annotated[float | None, typer.Option(help="Weight decay (default 0.01 adamw, 5e-4 sgd).")] = None,
    head_lr_mult: Annotated[float | None, typer.Option(help="LR multiplier of the decode head "
                                                        "(default 10 adamw, 1 sgd).")] = None,
    warmup: Annotated[int, typer.Option(help="Linear warm-up iterations.")] = 0,
    poly_power: Annotated[float, typer.Option(help="Power of the poly LR decay.")] = 1.0,
    crop: Annotated[str | None, typer.Option(help="Random crop HxW (padded with the ignore index).")] = None,
    resize: Annotated[str | None, typer.Option(help="Resize images to HxW before augmenting and for validation.")
                      ] = None,
    scale: Annotated[str, typer.Option(help="Random rescale range MIN,MAX ('1' disables).")] = "0.5,2.0",
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flip.")] = True,
    jitter: Annotated[bool, typer.Option("--jitter/--no-jitter", help="Photometric jitter.")] = True,
    val_every: Annotated[int, typer.Option(help="Validate and checkpoint every N iterations (and at the end).")
                         ] = 500,
    val_labels: Annotated[str, typer.Option(help="Score validation against labels 'resized' with --resize, or at "
                                            "their 'native' size (logits upsampled).")] = "resized",
    aux_weight: Annotated[float, typer.Option(help="Weight of DeepLabV3's auxiliary head loss (0 = no aux head).")
                          ] = 0.4,
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision: bf16 on CPU, fp16 + grad scaler on CUDA.")
                   ] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="channels_last memory format.")] = False,
    clip_grad: Annotated[float | None, typer.Option(help="Clip the gradient norm of each part to X.")] = None,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", help="SyncBatchNorm across processes under torchrun.")
                       ] = False,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 2,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's).")] = None,
    log_every: Annotated[int, typer.Option(help="Log the training loss (metrics.jsonl, and a plain line when "
                                           "there is no progress bar) every N iterations.")] = 10,
    keep: Annotated[str, typer.Option(help="What a finished run keeps: best, last, resume (comma-separated); all "
                                      "are written while it runs. resume.pt is about 3x a checkpoint.")]
    = "best,last,resume",
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order and augmentation.")] = 0,
    pretrained: Annotated[str | None, typer.Option(help="Local backbone weights file (never downloaded).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[Path | None, typer.Option(help="Continue a run exactly: its directory or resume.pt.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Plain log lines instead of a progress bar.")
                           ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False,
) -> None:
    """Train a zoo model supervised (teachers, and the no-KD student baseline); resumable, DDP under torchrun."""
    from segkd.engine.trainer import TrainConfig, run_train

    if model is None and resume is None:
        raise SegkdError("--model is required (or --resume RUN_DIR to continue a run)")
    if resume is not None:
        _warn_ignored_on_resume(locals(), resume)
    cfg = TrainConfig(
        model=model or "", data=data, data_format=data_format, num_classes=num_classes, ignore_index=ignore_index,
        out=str(out_dir), iters=iters, batch=batch, accum=accum, optimizer=optimizer, lr=lr, wd=wd,
        head_lr_mult=head_lr_mult, warmup=warmup, poly_power=poly_power, crop=crop, resize=resize, scale=scale,
        flip=flip, jitter=jitter, val_every=val_every, val_labels=val_labels, aux_weight=aux_weight, amp=amp,
        channels_last=channels_last,
        clip_grad=clip_grad, sync_bn=sync_bn, workers=workers, seed=seed, pretrained=pretrained, device=device,
        progress=not no_progress, threads=threads, log_every=log_every, keep=keep,
    )
    summary = run_train(cfg, resume=resume)
    if summary.get("rank", 0) != 0:
        return
    if as_json:
        _emit_json(summary, None)
        return
    for name, best in summary["best"].items():  # a supervised run trains one model: name it, not its role
        out.print(f"model {summary['models'].get(name, name)}: best val mIoU {100 * best['miou']:.2f} at iteration "
                  f"{best['iteration']}")
    out.print(f"{summary['iterations']} iterations in {summary['wall_time_s']:.1f} s ({summary['img_s']:.1f} img/s)")
    _print_written(summary)


# ------------------------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(
    source: Annotated[Path, typer.Argument(help="segkd checkpoint (.safetensors) or exported model (.onnx).")],
    data: Annotated[str | None, typer.Option(help="Dataset root, or 'synth' for the built-in procedural dataset "
                                             "(the default, with a note saying so).")] = None,
    data_format: Annotated[str | None, typer.Option(help="Dataset format (default: detected from the root).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val",
    resize: Annotated[str | None, typer.Option(help="Resize images to HxW before inference.")] = None,
    mode: Annotated[str, typer.Option(help="Inference mode: whole or slide (sliding window).")] = "whole",
    crop: Annotated[str | None, typer.Option(help="Sliding-window size HxW (--mode slide).")] = None,
    stride: Annotated[str | None, typer.Option(help="Sliding-window stride HxW (default 2/3 of --crop).")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Horizontal-flip test-time augmentation.")] = False,
    scales: Annotated[str | None, typer.Option(help="Multi-scale TTA, e.g. 0.75,1.0,1.25.")] = None,
    batch: Annotated[int, typer.Option(help="Images per forward pass (per process).")] = 1,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch and ONNX Runtime (default: theirs).")
                       ] = None,
    log_every: Annotated[int, typer.Option(help="A plain progress line every N batches when there is no progress "
                                           "bar (not a terminal, or --no-progress); 0 = none.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    amp: Annotated[bool, typer.Option("--amp", help="Autocast inference: bf16 on CPU, fp16 on CUDA.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON instead of a table.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Also write the metrics JSON to this file.")
                        ] = None,
    save_preds: Annotated[Path | None, typer.Option(help="Write colourised masks and overlays (PNG) here.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Evaluate a checkpoint or ONNX model: mIoU, per-class IoU/Acc, aAcc, mAcc, fwIoU (DDP under torchrun)."""
    from segkd.engine.evaluate import render_eval, run_eval
    from segkd.safeio import check_output

    if json_out is not None:
        check_output(json_out, "file", "--json-out")
    if save_preds is not None:
        check_output(save_preds, "dir", "--save-preds")
    if data is None:
        data = "synth"
        console.print("note: no --data given: scoring the built-in synthetic set (synth)", highlight=False)
    result = run_eval(source, data=data, data_format=data_format, split=split, resize=resize, mode=mode, crop=crop,
                      stride=stride, flip=flip, scales=scales, batch=batch, workers=workers, device=device,
                      save_preds=save_preds, amp=amp, progress=not no_progress, threads=threads,
                      log_every=log_every)
    if result.rank != 0:
        return
    if json_out is not None:
        _emit_json(result.to_dict(), json_out)
    if as_json:
        _emit_json(result.to_dict(), None)
        return
    render_eval(result, out)
    if json_out is not None:
        out.print(f"wrote {json_out}")
    if save_preds is not None:
        out.print(f"wrote predictions to {save_preds}")


# ----------------------------------------------------------------------------------------------------- export
@app.command("export")
def export_cmd(
    ckpt: Annotated[Path, typer.Argument(help="segkd checkpoint (.safetensors) of the model to deploy.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write (only after verification).")],
    opset: Annotated[int, typer.Option(help="ONNX opset (17 or newer: native LayerNormalization).")] = 17,
    static: Annotated[str | None, typer.Option(help="Fixed input shape BxCxHxW (trtexec syntax), e.g. "
                                               "1x3x512x1024; dynamic batch/H/W when omitted.")] = None,
    output: Annotated[str, typer.Option(help="Graph output: logits (model stride), probs or labels (input size).")
                      ] = "logits",
    fold_normalize: Annotated[bool, typer.Option("--fold-normalize", help="Put mean/std into the graph; the "
                                                 "model then takes 0..255 RGB.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="fp16 weights/activations; LayerNorm, softmax, reductions "
                                       "and normalisation stay fp32.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check ORT against PyTorch before writing.")
                      ] = True,
    data: Annotated[str | None, typer.Option(help="Dataset root whose first images join verification, or 'synth'.")
                    ] = None,
    size: Annotated[str | None, typer.Option(help="Export/verification size HxW (dynamic exports; default "
                                             "512x1024).")] = None,
    atol: Annotated[float | None, typer.Option(help="Max abs output difference allowed (default 1e-4 fp32, "
                                               "none for fp16).")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Min label agreement (default 0.999 fp32, 0.99 fp16).")
                             ] = None,
    providers: Annotated[str, typer.Option(help="ONNX Runtime providers for verification: cpu, cuda, tensorrt "
                                           "(comma-separated); never a silent fallback.")] = "cpu",
    num_images: Annotated[int, typer.Option(help="Real images used from --data.")] = 4,
    trt_min: Annotated[str | None, typer.Option(help="TensorRT profile min shape (default 1x3xH/2xW/2).")] = None,
    trt_max: Annotated[str | None, typer.Option(help="TensorRT profile max shape (default 4x3xHxW).")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = its default).")] = 0,
    int8: Annotated[bool, typer.Option("--int8", help="Static INT8 (QDQ) quantisation calibrated on --data, "
                                       "written only if the mIoU drop on --eval-split is within --max-miou-drop.")
                    ] = False,
    int8_target: Annotated[str, typer.Option(help="--int8: tensorrt (symmetric int8 activations) or cpu (uint8 "
                                             "activations, ONNX Runtime's fast x86 kernels).")] = "tensorrt",
    calib_split: Annotated[str, typer.Option(help="--int8: split whose images calibrate.")] = "train",
    calib_images: Annotated[int, typer.Option(help="--int8: calibration images (a seeded random subset).")] = 64,
    calib_method: Annotated[str, typer.Option(help="--int8: minmax, entropy or percentile.")] = "minmax",
    eval_split: Annotated[str, typer.Option(help="--int8: split on which fp32 and INT8 mIoU are compared.")
                          ] = "val",
    max_miou_drop: Annotated[float, typer.Option(help="--int8: largest allowed mIoU drop in points (exit 3 "
                                                 "beyond).")] = 1.0,
    resize: Annotated[str | None, typer.Option(help="--int8: resize calibration and evaluation images to HxW "
                                               "(default: as stored).")] = None,
    data_format: Annotated[str | None, typer.Option(help="--int8: dataset format (default: detected).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Export the deployable model to verified ONNX, with a TensorRT readiness report and trtexec line."""
    from segkd.export.onnx_export import ExportConfig, export_checkpoint
    from segkd.export.render import render_export_report
    from segkd.safeio import check_output

    check_output(out_path, "file", "--out")
    if int8 and data is None:
        raise typer.BadParameter("--int8 needs --data ROOT (real training images to calibrate on)",
                                 param_hint="'--data'")
    cfg = ExportConfig(opset=opset, static=static, output=output, fold_normalize=fold_normalize, fp16=fp16,
                       verify=verify, data=data, size=size, atol=atol, min_agreement=min_agreement,
                       providers=providers, num_images=num_images, trt_min=trt_min, trt_max=trt_max, threads=threads,
                       int8=int8, int8_target=int8_target, calib_split=calib_split, calib_images=calib_images,
                       calib_method=calib_method,
                       eval_split=eval_split, max_miou_drop=max_miou_drop, resize=resize, data_format=data_format,
                       progress=not no_progress)
    report = export_checkpoint(ckpt, out_path, cfg)
    if as_json:
        _emit_json(report, None)
    else:
        render_export_report(report, out)


# ------------------------------------------------------------------------------------------------------ bench
@app.command("bench")
def bench_cmd(
    models: Annotated[list[str] | None, typer.Argument(help="Zoo names, segkd checkpoints (.safetensors) or .onnx "
                                                       "files; the first is the reference for ratios.")] = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", help="Input shape BxCxHxW or HxW (repeatable); "
                                                     "default 1x3x512x1024.")] = None,
    batch: Annotated[str | None, typer.Option(help="Batch sizes replacing each input's batch, e.g. 1,8.")] = None,
    device: Annotated[str, typer.Option(help="Device for torch backends: cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch and ONNX Runtime (default: torch's).")
                       ] = None,
    backend: Annotated[list[str] | None, typer.Option("--backend", help="torch, torch-compile or onnxruntime "
                                                      "(repeatable); default torch.")] = None,
    providers: Annotated[str | None, typer.Option(help="ONNX Runtime provider: cpu, cuda or tensorrt (default "
                                                  "follows --device); never a silent fallback.")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 3,
    iters: Annotated[int, typer.Option(help="Minimum timed calls.")] = 10,
    min_time: Annotated[float, typer.Option(help="Keep timing until this many seconds have passed.")] = 0.0,
    num_classes: Annotated[int | None, typer.Option(help="Classes of zoo models (default 19).")] = None,
    detail: Annotated[bool, typer.Option("--detail", help="Per-module FLOPs table and the ops counted as 0.")
                      ] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="channels_last memory format (torch).")
                             ] = False,
    flops: Annotated[bool, typer.Option("--flops/--no-flops", help="Count FLOPs.")] = True,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Time the models.")] = True,
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report as JSON to PATH, or '-' for "
                                                  "stdout (the table then goes to stderr).")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="Gate: p50 latency of every run (ms).")] = None,
    max_gflops: Annotated[float | None, typer.Option(help="Gate: GFLOPs per image (2 x GMACs) at every input.")
                          ] = None,
    max_params: Annotated[str | None, typer.Option(help="Gate: deploy parameters, e.g. 3.8M or 3800000.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="Previous `segkd bench --json` report to compare with.")
                        ] = None,
    max_regression: Annotated[str, typer.Option(help="Gate with --baseline: allowed increase of p50 latency, GMACs "
                                                "and params, e.g. 10%.")] = "10%",
    train_step: Annotated[bool, typer.Option("--train-step", help="Time one distillation step of --method against "
                                             "its lower bound (batch 2 unless --batch).")] = False,
    method: Annotated[str | None, typer.Option(help="With --train-step: the distillation method, e.g. kd.")] = None,
    teacher: Annotated[str | None, typer.Option(help="With --train-step: teacher zoo model (the peer for online "
                                                "methods such as dml).")] = None,
    student: Annotated[str | None, typer.Option(help="With --train-step: student zoo model.")] = None,
    teacher_cache: Annotated[bool, typer.Option("--teacher-cache", help="With --train-step: time the step as "
                                                "`distill --teacher-cache` runs it (teacher targets from the batch, "
                                                "no teacher forward) against the student alone.")] = False,
) -> None:
    """Parameters, FLOPs (GMACs), latency percentiles, throughput and memory; JSON report and CI gates (exit 3)."""
    from segkd.bench.gates import Gates, enforce, parse_count
    from segkd.bench.report import render
    from segkd.bench.run import BenchConfig, run_bench_command
    from segkd.bench.specs import parse_percent

    cfg = BenchConfig(models=list(models or []), inputs=list(inputs or ["1x3x512x1024"]), batch=batch,
                      device=device, threads=threads, backends=list(backend or ["torch"]), providers=providers,
                      warmup=warmup, iters=iters, min_time=min_time, num_classes=num_classes, detail=detail,
                      channels_last=channels_last, flops=flops, latency=latency, train_step=train_step,
                      method=method, teacher=teacher, student=student, teacher_cache=teacher_cache)
    gates = Gates(max_latency_ms=max_latency_ms, max_gflops=max_gflops,
                  max_params=None if max_params is None else parse_count(max_params), baseline=baseline,
                  max_regression=parse_percent(max_regression))
    to_stdout = json_path == "-"
    if json_path is not None and not to_stdout:
        from segkd.safeio import check_output

        check_output(json_path, "file", "--json")
    view = console if to_stdout else out
    with view.status("benchmarking") as status:
        report = run_bench_command(cfg, gates, progress=lambda label: status.update(f"benchmarking {label}"))
    render(report, view)
    if json_path is not None:
        _emit_json(report, None if to_stdout else Path(json_path))
    enforce(report)


# ---------------------------------------------------------------------------------------------------- distill
def _distill_options(
    method: Annotated[str | None, typer.Option(help="Method: kd, cwd, dkd, c2vkd, transkd, collab, dml.")] = None,
    student: Annotated[str | None, typer.Option(help="Student zoo model (what is trained and saved).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher zoo model (teacher methods; default: the model a "
                                                "segkd --teacher-weights checkpoint names).")] = None,
    teacher_weights: Annotated[str | None, typer.Option(help="Teacher weights: a segkd checkpoint, or a foreign one "
                                                        "`segkd convert` reads; must load with no key missing.")
                               ] = None,
    peer: Annotated[str | None, typer.Option(help="Second student of online methods (collab, dml).")] = None,
    peer_pretrained: Annotated[str | None, typer.Option(help="Local backbone weights for the peer.")] = None,
    peer_optimizer: Annotated[str | None, typer.Option(help="Peer optimiser, adamw or sgd (default: --optimizer).")
                              ] = None,
    peer_lr: Annotated[float | None, typer.Option(help="Peer peak LR (default: the student's, or the peer "
                                                  "optimiser's default).")] = None,
    peer_wd: Annotated[float | None, typer.Option(help="Peer weight decay.")] = None,
    peer_head_lr_mult: Annotated[float | None, typer.Option(help="Peer decode-head LR multiplier.")] = None,
    variant: Annotated[str | None, typer.Option(help="transkd: base, gl (GL-Mixer) or ea (Embedding Assistant).")
                       ] = None,
    c2vkd_add_ce: Annotated[bool, typer.Option("--c2vkd-add-ce", help="c2vkd: add the student's CE (the "
                                               "published objective has none).")] = False,
    c2vkd_pool_weights: Annotated[str | None, typer.Option(help="c2vkd: attention-pool weights (CLIP RN101 "
                                                           "visual.attnpool.* or plain keys); default: seeded "
                                                           "frozen random pool.")] = None,
    no_vlfd_global: Annotated[bool, typer.Option("--no-vlfd-global", help="c2vkd: drop the global term.")] = False,
    no_vlfd_patch: Annotated[bool, typer.Option("--no-vlfd-patch", help="c2vkd: drop the patch term.")] = False,
    no_vlfd_ling: Annotated[bool, typer.Option("--no-vlfd-ling", help="c2vkd: drop the linguistic term.")] = False,
    pdd_mode: Annotated[str | None, typer.Option(help="c2vkd: PDD form, paper or dkd.")] = None,
    method_opt: Annotated[list[str] | None, typer.Option(help="Any method option as KEY=VALUE (repeatable), e.g. "
                                                         "temperature=2; see docs/methods.md.")] = None,
    teacher_view: Annotated[str, typer.Option(help="What the teacher sees: clean = the student's crop without "
                                              "photometric jitter; same = the student's jittered input.")] = "clean",
    teacher_cache: Annotated[str | None, typer.Option(help="Folder of cached whole-image teacher outputs, built "
                                                      "(or continued) on first use and warped onto every crop: no "
                                                      "teacher forward per step.")] = None,
    unlabeled: Annotated[str | None, typer.Option(help="Folder of images without labels: they get only the "
                                                  "distillation terms.")] = None,
    unlabeled_ratio: Annotated[int, typer.Option(help="With --unlabeled: unlabeled images added to the batch per "
                                                 "labelled one (the labelled batch stays --batch).")] = 1,
) -> None:
    """(signature only: the distill options added to train's)"""


def _distill_signature() -> inspect.Signature:
    """distill's options = its own plus every `train` option except --model/--aux-weight (reused, not copied)."""
    own = list(inspect.signature(_distill_options, eval_str=True).parameters.values())
    reused = [p for n, p in inspect.signature(train_cmd, eval_str=True).parameters.items()
              if n not in ("model", "aux_weight")]
    reused = [p.replace(default=Path("runs/distill")) if p.name == "out_dir" else p for p in reused]
    return inspect.Signature(own + reused)


def distill_cmd(**values: Any) -> None:
    """Distil a teacher into a student (kd, cwd, dkd, c2vkd, transkd) or train two students together (collab,
    dml) on the shared engine; the checkpoints hold the students alone."""
    from segkd.methods.task import distill_config_from_cli, method_options_from_flags, run_distill

    if values["resume"] is None:
        if not values["method"] or not values["student"]:
            raise SegkdError("--method and --student are required (or --resume RUN_DIR to continue a run)")
        flags = {"--variant": values["variant"], "--c2vkd-add-ce": values["c2vkd_add_ce"],
                 "--c2vkd-pool-weights": values["c2vkd_pool_weights"], "--no-vlfd-global": values["no_vlfd_global"],
                 "--no-vlfd-patch": values["no_vlfd_patch"], "--no-vlfd-ling": values["no_vlfd_ling"],
                 "--pdd-mode": values["pdd_mode"]}
        values["method_opts"] = method_options_from_flags(values["method"], flags, values["method_opt"])
    else:
        _warn_ignored_on_resume(values, values["resume"])
        values["method"] = values["method"] or "kd"
    cfg = distill_config_from_cli(values)
    summary = run_distill(cfg, resume=values["resume"])
    if summary.get("rank", 0) != 0:
        return
    if values["as_json"]:
        _emit_json(summary, None)
        return
    rep = summary["distill"]
    for name, best in summary["best"].items():
        out.print(f"{name}: best val mIoU {100 * best['miou']:.2f} at iteration {best['iteration']}; deploy "
                  f"{rep['deploy_params'][name] / 1e6:.2f} M params, {rep['deploy_gmacs'][name]:.2f} GMACs "
                  f"({rep['gmacs_input']}); training-only adapters {rep['adapter_params'][name] / 1e6:.3f} M")
    out.print(f"{summary['iterations']} iterations in {summary['wall_time_s']:.1f} s ({summary['img_s']:.1f} img/s)")
    _print_written(summary, "distill.json")


distill_cmd.__signature__ = _distill_signature()  # type: ignore[attr-defined]
distill_cmd.__annotations__ = {p.name: p.annotation for p in distill_cmd.__signature__.parameters.values()}
app.command("distill")(distill_cmd)


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
    from segkd.shapes import parse_hw

    try:
        root = synthesize(out_dir, n_train=train, n_val=val, size=parse_hw(size, "--size"), num_classes=classes,
                          seed=seed, progress=True, replace=force)
    except OSError as e:
        e.add_note(f"the set in {out_dir} is incomplete (no classes.json): run the command again once it is writable")
        raise
    out.print(f"wrote {train} train + {val} val images ({size}, {classes} classes) to {root}")


@data_app.command("inspect")
def data_inspect_cmd(
    root: Annotated[str, typer.Argument(help="Dataset root folder (or 'synth').")],
    data_format: Annotated[str | None, typer.Option(help="folder|camvid|cityscapes|ade20k|voc; auto when omitted.")]
    = None,
    num_classes: Annotated[int | None, typer.Option(help="Classes of a folder dataset without a class file.")] = None,
    ignore_index: Annotated[int, typer.Option(help="Label value that marks void pixels.")] = 255,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Splits, image sizes, class pixel frequencies and every unreadable or inconsistent file (exit 1 if any)."""
    from segkd.data import inspect_dataset, resolve_data_root
    from segkd.data.report import render_inspect

    report = inspect_dataset(resolve_data_root(root), data_format, num_classes, ignore_index, progress=True)
    if as_json:
        _emit_json(report, None)
    else:
        render_inspect(report, out)
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
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # paths may hold [..]
        sys.exit(e.exit_code)
    except OSError as e:  # read-only file system, disk full, permissions: the path, the cause, what was kept
        from segkd.safeio import os_error_message

        console.print(f"[red]error:[/] {escape(os_error_message(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
