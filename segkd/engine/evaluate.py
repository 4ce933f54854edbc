"""Evaluation: one confusion matrix over a loader, the metrics of :mod:`segkd.engine.metrics`, and ``segkd eval``.

:func:`evaluate` is what the trainer calls for periodic validation and what ``segkd eval`` calls on a checkpoint
or an exported ONNX model. Predictions are compared with the labels at the *label* resolution: scores are
upsampled bilinearly to the label size before the argmax (mmseg's convention), so a model evaluated with
``--resize`` is still scored against whatever labels the dataset yields.

Under ``torchrun`` every rank evaluates a disjoint shard (``dataset[rank::world]``, no padding, unlike
``DistributedSampler`` which repeats samples to even out the shards and would count them twice), then the
confusion matrices and image counts are summed with ``all_reduce``; the result equals a single-process run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from segkd.data import build_dataset, build_eval_transform, resolve_data_root
from segkd.data.datasets import check_name_suffixes
from segkd.engine.config import check_machine_values
from segkd.engine.distributed import init_distributed
from segkd.engine.inference import make_predictor, parse_resize, parse_scales, resolve_input_size
from segkd.engine.metrics import (
    CONVENTION,
    ConfusionMeter,
    Scores,
    all_reduce_sum,
    nan_to_none,
    scores_from_confusion,
)
from segkd.engine.visualize import save_prediction
from segkd.errors import SegkdError
from segkd.models import zoo_stride
from segkd.models.base import upsample_logits
from segkd.models.loading import load_model
from segkd.options import IMG_SUFFIX_HELP, SEG_SUFFIX_HELP, option
from segkd.provenance import provenance
from segkd.shapes import check_min_size, model_stride, parse_hw
from segkd.textout import print_table

BatchHook = Callable[[int, Tensor, Tensor, Tensor], None]


@dataclass
class EvalResult(Scores):
    """Dataset-level metrics (fractions in [0, 1]; NaN where undefined, see :mod:`segkd.engine.metrics`), plus the
    confusion matrix and run facts they came from."""

    confusion: Tensor
    n_images: int
    ignore_index: int | None = 255
    class_names: list[str] | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    rank: int = 0  # this process's rank (not serialised): only rank 0 prints or writes shared files

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    def names(self) -> list[str]:
        if self.class_names and len(self.class_names) == self.num_classes:
            return list(self.class_names)
        return [f"class{i}" for i in range(self.num_classes)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: summary metrics, a per-class block keyed by class name, the raw confusion matrix."""
        per_class = {
            name: {
                "iou": nan_to_none(self.per_class_iou[i]),
                "acc": nan_to_none(self.per_class_acc[i]),
                "dice": nan_to_none(self.per_class_dice[i]),
                "gt_pixels": self.gt_pixels[i],
                "pred_pixels": self.pred_pixels[i],
            }
            for i, name in enumerate(self.names())
        }
        return {
            "miou": nan_to_none(self.miou),
            "aacc": nan_to_none(self.aacc),
            "macc": nan_to_none(self.macc),
            "fwiou": nan_to_none(self.fwiou),
            "mdice": nan_to_none(self.mdice),
            "n_images": self.n_images,
            "n_pixels": int(self.confusion.sum()),
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "class_names": self.names(),
            "per_class": per_class,
            "per_class_iou": [nan_to_none(v) for v in self.per_class_iou],
            "per_class_acc": [nan_to_none(v) for v in self.per_class_acc],
            "convention": CONVENTION,
            "confusion": self.confusion.tolist(),
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


def _dist_info() -> tuple[int, int]:

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_dataset(dataset: Dataset, rank: int, world: int) -> Dataset:
    """This rank's disjoint share of ``dataset`` (``rank::world``), without the padding ``DistributedSampler`` adds."""
    if world <= 1:
        return dataset
    return Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]


def progress_bar(enabled: bool, total: int | None, label: str = "eval"):

    console = Console(stderr=True)
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not enabled or not console.is_terminal)


def _predict_batch(predict: Callable[[Tensor], Tensor], batch: Any, device: torch.device, num_classes: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(images, labels, predicted labels)`` of one ``(images, labels)`` (or ``{"image", "label"}``) batch: the
    scores upsampled to the label size before the argmax; a wrong score shape is a one-line error."""
    images, labels = (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    scores = predict(images)
    if scores.ndim != 4 or scores.shape[0] != images.shape[0]:
        raise SegkdError(f"predict returned shape {tuple(scores.shape)} for a batch of {images.shape[0]}")
    if scores.shape[1] != num_classes:
        raise SegkdError(f"the model predicts {scores.shape[1]} classes but the evaluation expects {num_classes}")
    return images, labels, upsample_logits(scores.float(), labels.shape[-2:]).argmax(1)


def evaluate(
    predict: Callable[[Tensor], Tensor],
    loader: Any,
    num_classes: int,
    ignore_index: int | None = 255,
    device: str | torch.device = "cpu",
    distributed: bool = False,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    on_batch: BatchHook | None = None,
    log_every: int = 0,
) -> EvalResult:
    """Run ``predict`` over ``loader`` (``(images, labels)`` batches) and score it against the labels.

    ``predict(images) -> B x K x h x w`` scores (e.g. from :func:`segkd.engine.inference.make_predictor`); they are
    upsampled to the label size before the argmax. With ``distributed=True`` and ``torch.distributed`` initialised,
    the loader must hold this rank's shard (:func:`shard_dataset`), and the confusion matrix and image count are
    summed over ranks, so every rank returns the global result. ``on_batch(index_of_first, images, labels, pred)``
    is called per batch (used by ``--save-preds``). Where no bar is shown (not a terminal, or ``progress=False``)
    ``log_every > 0`` prints a plain ``eval N/M batches`` line on stderr every ``log_every`` batches.
    """
    device = torch.device(device)
    meter = ConfusionMeter(num_classes, ignore_index, device=device)
    n_images = 0
    rank, _ = _dist_info()
    start = time.perf_counter()
    try:
        total = len(loader)
    except TypeError:
        total = None
    with progress_bar(progress and rank == 0, total) as bar:
        task = bar.add_task("eval", total=total)
        plain = log_every > 0 and rank == 0 and bar.disable
        for done, batch in enumerate(loader, 1):
            images, labels, pred = _predict_batch(predict, batch, device, num_classes)
            meter.update(pred, labels)
            if on_batch is not None:
                on_batch(n_images, images, labels, pred)
            n_images += images.shape[0]
            bar.advance(task)
            if plain and (done % log_every == 0 or done == total):
                elapsed = time.perf_counter() - start
                print(f"eval {done}/{total if total is not None else '?'} batches  {elapsed:.1f} s", file=sys.stderr,
                      flush=True)
    if distributed:
        meter.reduce()
        n_images = int(all_reduce_sum(torch.tensor([n_images], dtype=torch.int64, device=device)).item())
    s = scores_from_confusion(meter.matrix)
    return EvalResult(
        **asdict(s), confusion=meter.matrix.cpu(), n_images=n_images, ignore_index=ignore_index,
        class_names=list(class_names) if class_names else None, seconds=time.perf_counter() - start, rank=rank,
    )


# --------------------------------------------------------------------------------------------- segkd eval
def load_predictor_source(path: str | Path, device: torch.device,
                          threads: int = 0) -> tuple[Callable[[Tensor], Tensor], Any, str]:
    """``(callable, CheckpointMeta, kind)`` for a segkd checkpoint or an exported ``.onnx`` model (``threads``:
    ONNX Runtime intra-op threads, 0 = its default)."""
    path = Path(path)
    if not path.is_file():
        raise SegkdError(f"{path}: file not found")
    if path.suffix.lower() == ".onnx":
        from segkd.export.runtime import load_onnx_predictor  # the one upward import (docs/architecture.md)


        # ask for exactly the device's provider: load_onnx_predictor fails loudly instead of falling back to CPU
        fn, meta = load_onnx_predictor(path, ("cuda",) if device.type == "cuda" else ("cpu",), threads=threads)
        return fn, meta, "onnx"

    model = load_model(path, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, model.segkd_meta, "checkpoint"  # type: ignore[attr-defined]


def sample_stem(dataset: Any, index: int) -> str:
    """A file stem for sample ``index`` when the dataset knows its files, else the zero-padded index."""
    names = getattr(dataset, "names", None)
    if isinstance(names, Sequence) and index < len(names):
        return Path(str(names[index])).stem
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, Sequence) and index < len(samples):
        item = samples[index]
        first = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(first, (str, Path)):
            return Path(first).stem
    return f"{index:06d}"


def _check_sizes(fn: Any, meta: Any, kind: str, sizes: dict[str, tuple[int, int] | None], scaled: bool) -> int:
    """The model's input sizes (``--resize``, the slide ``--crop``) against its coarsest stride, before any data.
    Returns that stride (1 when unknown) for the per-image check of whole images and their ``--scales`` views."""

    given = {k: v for k, v in sizes.items() if v is not None}
    if kind == "checkpoint":
        stride = model_stride(fn)
    elif not given and not scaled:
        return 1
    else:
        try:  # an ONNX file's metadata names its zoo architecture
            stride = zoo_stride(meta.model, num_classes=meta.num_classes, **meta.model_kwargs)
        except SegkdError:
            return 1
    for flag, hw in given.items():
        check_min_size(hw, stride, flag, meta.model)
    return stride


@dataclass
class InferenceOptions:
    """How a model is run on images: the options ``segkd eval`` and ``segkd predict`` share (one definition each;
    the commands' flags are generated from these fields, :mod:`segkd.cliopts`)."""

    resize: str | None = option(None, "Resize images to HxW before inference; 'native' = as stored (default: the "
                                "size the checkpoint was validated at, else as stored).")
    mode: str = option("whole", "Inference mode: whole or slide (sliding window).")
    crop: str | None = option(None, "Sliding-window size HxW (--mode slide).")
    stride: str | None = option(None, "Sliding-window stride HxW (default 2/3 of --crop).")
    flip: bool = option(False, "Horizontal-flip test-time augmentation.")
    scales: str | None = option(None, "Multi-scale TTA, e.g. 0.75,1.0,1.25.")
    threads: int | None = option(None, "CPU threads for torch and ONNX Runtime (default: theirs).")
    device: str = option("auto", "auto, cpu or cuda.")
    amp: bool = option(False, "Autocast inference: bf16 on CPU, fp16 on CUDA.")
    progress: bool = option(True, "A progress bar on a terminal.")

    def check(self) -> None:
        """One-line errors for impossible values, before the model or the data is read."""
        check_machine_values(None, None, self.device, self.threads)
        parse_resize(self.resize)
        for opt in ("crop", "stride"):
            parse_hw(getattr(self, opt), f"--{opt}")
        parse_scales(self.scales)


@dataclass
class EvalConfig(InferenceOptions):
    """Everything ``segkd eval`` depends on besides the model file: the shared :class:`InferenceOptions` plus the
    dataset and scoring options."""

    data: str | None = option(None, "Dataset root, or 'synth' for the built-in procedural dataset (the default, with "
                              "a note saying so).")
    data_format: str | None = option(None, "Dataset format (default: detected from the root).")
    img_suffix: str | None = option(None, IMG_SUFFIX_HELP + " Without either suffix option, --data the checkpoint "
                                    "was trained on is read with its run's.")
    seg_suffix: str | None = option(None, SEG_SUFFIX_HELP)
    split: str = option("val", "Split to evaluate.")
    val_labels: str | None = option(None, "Score against labels 'resized' with the input or at their 'native' size "
                                    "(logits upsampled), like training's --val-labels (default: the checkpoint's).")
    batch: int = option(1, "Images per forward pass (per process).")
    workers: int = option(0, "DataLoader worker processes.")
    log_every: int = option(0, "A plain progress line every N batches when there is no progress bar (not a "
                            "terminal, or --no-progress); 0 = none.")
    save_preds: str | None = option(None, "Write colourised masks and overlays (PNG) to this folder.")

    def check(self) -> None:
        for name, low in (("batch", 1), ("workers", 0), ("log_every", 0)):
            if getattr(self, name) < low:
                raise SegkdError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        check_machine_values(self.workers)
        super().check()
        check_name_suffixes(self.img_suffix, self.seg_suffix)
        if self.val_labels not in (None, "resized", "native"):
            raise SegkdError(f"--val-labels must be resized or native, got {self.val_labels!r}")


@dataclass
class InferenceSetup:
    """A loaded model ready to predict (:func:`prepare_inference`)."""

    predict: Callable[[Tensor], Tensor]
    meta: Any
    kind: str
    size: Any  # segkd.engine.inference.InputSize
    device: torch.device
    info: Any  # segkd.engine.distributed.DistInfo


def prepare_inference(source: str | Path, cfg: InferenceOptions, val_labels: str | None) -> InferenceSetup:
    """Load ``source`` (checkpoint or ONNX) and wrap it in the predictor of ``cfg`` (slide, TTA) at the resolved
    input size, every size checked against the model's stride; shared by ``segkd eval`` and ``segkd predict``."""

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    scale_list = parse_scales(cfg.scales)
    info = init_distributed(cfg.device)
    fn, meta, kind = load_predictor_source(source, info.device, threads=cfg.threads or 0)
    size = resolve_input_size(cfg.resize, val_labels, meta, str(source))
    min_side = _check_sizes(fn, meta, kind, {"--resize": size.resize, "--crop": parse_hw(cfg.crop, "--crop")},
                            scaled=scale_list != (1.0,))
    predict = make_predictor(fn, mode=cfg.mode, crop=cfg.crop, stride=cfg.stride, flip=cfg.flip,  # type: ignore
                             scales=scale_list, amp=cfg.amp, min_side=min_side, model_name=meta.model)
    return InferenceSetup(predict, meta, kind, size, info.device, info)


@contextmanager
def progress_steps(enabled: bool, total: int | None, label: str) -> Iterator[Callable[[], None]]:
    """A progress bar on a terminal (rank 0); yields the function that advances it by one."""
    with progress_bar(enabled, total, label) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def run_eval(source: str | Path, cfg: EvalConfig | None = None, dataset: Dataset | None = None,
             note: Callable[[str], None] | None = None, **options: Any) -> EvalResult:
    """Everything ``segkd eval`` does: load the model alone, build the dataset from its metadata, evaluate.

    ``cfg`` (or :class:`EvalConfig` field values as keywords) says how; ``dataset`` (already transformed, yielding
    ``(image, label)``) replaces ``data``/``data_format``/``resize``/``val_labels``. Without ``--resize`` the images
    are resized to the size the checkpoint was validated at (:func:`~segkd.engine.inference.resolve_input_size`);
    ``note`` receives the line saying which size was used when the checkpoint chose it (the JSON always has it).
    """

    cfg = replace(cfg or EvalConfig(), **options)
    cfg.check()
    setup = prepare_inference(source, cfg, cfg.val_labels)
    predict, meta, kind, size, info = setup.predict, setup.meta, setup.kind, setup.size, setup.info
    given = dataset
    names = run_suffixes(cfg, meta, source) if given is None else NameSuffixes()
    dataset = _eval_dataset(source, cfg, dataset, size.resize, meta, size.val_labels, names)
    if given is None and note is not None and info.rank == 0:  # checks passed: say what the checkpoint chose
        for line in (size.note if size.from_checkpoint else None, names.note):
            if line:
                note(line)
    ds_ignore = _dataset_classes(dataset)[1]
    indices = list(range(info.rank, len(dataset), info.world_size))  # type: ignore[arg-type]
    loader = DataLoader(Subset(dataset, indices) if info.world_size > 1 else dataset, batch_size=cfg.batch,
                        shuffle=False, num_workers=cfg.workers, pin_memory=info.device.type == "cuda",
                        drop_last=False)
    hook = _save_hook(Path(cfg.save_preds), dataset, indices, meta) if cfg.save_preds is not None else None
    result = evaluate(predict, loader, meta.num_classes, ignore_index=ds_ignore if ds_ignore is not None else
                      meta.ignore_index, device=info.device, distributed=info.enabled, progress=cfg.progress,
                      class_names=report_names(meta.class_names, dataset), on_batch=hook, log_every=cfg.log_every)
    result.extra = {
        "source": str(source), "kind": kind, "model": meta.model,
        "data": str(cfg.data) if cfg.data is not None else None,
        "data_format": getattr(getattr(dataset, "info", None), "format", cfg.data_format), "split": cfg.split,
        "img_suffix": names.img, "seg_suffix": names.seg,
        "resize": list(size.resize) if size.resize and given is None else None,
        "val_labels": size.val_labels if given is None else None, "input_size": size.note if given is None else None,
        "mode": cfg.mode,
        "crop": list(parse_hw(cfg.crop, "--crop")) if cfg.crop else None,
        "stride": list(parse_hw(cfg.stride, "--stride")) if cfg.stride else None,
        "flip": cfg.flip, "scales": list(parse_scales(cfg.scales)), "device": str(info.device),
        "world_size": info.world_size,
        **provenance(info.device, cfg.threads),  # the block run.json and the bench report carry
    }
    return result


@dataclass(frozen=True)
class NameSuffixes:
    """The ``--img-suffix``/``--seg-suffix`` an evaluation reads its dataset with, and the line saying where they
    came from when the checkpoint's run chose them."""

    img: str | None = None
    seg: str | None = None
    note: str | None = None


def run_suffixes(cfg: EvalConfig, meta: Any, source: str | Path) -> NameSuffixes:
    """``cfg``'s suffix options; when neither is given and ``--data`` is the dataset the checkpoint was trained on,
    the ones its run read it with (the run arguments a checkpoint records, as its config.yaml holds them). Only
    on that dataset: another root may name its files otherwise, and a suffix wrong there would refuse it."""
    if cfg.img_suffix is not None or cfg.seg_suffix is not None or cfg.data is None:
        return NameSuffixes(cfg.img_suffix, cfg.seg_suffix)
    args = getattr(meta, "args", None)
    if not isinstance(args, dict) or not (args.get("img_suffix") or args.get("seg_suffix")):
        return NameSuffixes()
    trained_on = str(args.get("data"))
    same = trained_on == str(cfg.data) or ("synth" not in (trained_on, str(cfg.data)) and
                                           Path(trained_on).expanduser().resolve() == Path(str(cfg.data)).resolve())
    if not same:
        return NameSuffixes()
    img, seg = args.get("img_suffix"), args.get("seg_suffix")
    given = " ".join(f"{flag} {v}" for flag, v in (("--img-suffix", img), ("--seg-suffix", seg)) if v)
    return NameSuffixes(img, seg, f"file names: {given} (how the run of {Path(source).name} read this dataset)")


def _eval_dataset(source: str | Path, cfg: EvalConfig, dataset: Dataset | None, resize: tuple[int, int] | None,
                  meta: Any, val_labels: str = "resized", names: NameSuffixes = NameSuffixes()) -> Dataset:
    """The dataset to score (given, or built from ``cfg.data`` with the checkpoint's normalisation, its files
    named as ``names`` says), checked to hold samples of the model's classes."""
    if dataset is None:
        if cfg.data is None:
            raise SegkdError("--data is required (a dataset root, or 'synth')")
        dataset = build_eval_dataset(cfg.data, cfg.data_format, cfg.split, resize, meta,
                                     resize_labels=val_labels == "resized", img_suffix=names.img,
                                     seg_suffix=names.seg)
    ds_classes = _dataset_classes(dataset)[0]
    if ds_classes is not None and ds_classes != meta.num_classes:
        where = f"the dataset {cfg.data}" if cfg.data is not None else "the dataset"
        raise SegkdError(f"{source}: the model predicts {meta.num_classes} classes but {where} has {ds_classes}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise SegkdError(f"{cfg.data}: split {cfg.split!r} has no samples")
    return dataset


def _save_hook(out_dir: Path, dataset: Any, indices: list[int], meta: Any) -> BatchHook:
    """``--save-preds``: each prediction as a colourised mask and an overlay, named after its image."""

    def hook(first: int, images: Tensor, labels: Tensor, pred: Tensor) -> None:
        for j in range(pred.shape[0]):
            index = indices[first + j]
            save_prediction(out_dir, sample_stem(dataset, index), pred[j], meta.palette, image=images[j],
                            mean=meta.mean, std=meta.std)

    return hook


def build_eval_dataset(data: str | Path, data_format: str | None, split: str, resize: tuple[int, int] | None,
                       meta: Any, resize_labels: bool = True, img_suffix: str | None = None,
                       seg_suffix: str | None = None) -> Dataset:
    """The evaluation split through the data package, normalised with the checkpoint's mean/std (labels resized
    with the images unless ``resize_labels=False``: then scored at their stored size, as ``--val-labels native``).

    ``num_classes``/``ignore_index`` come from the checkpoint (they matter for the ``folder`` format, whose files
    do not name their classes); formats that know their classes report them, and a mismatch is an error.
    """

    root = resolve_data_root(str(data))
    transform = build_eval_transform(resize=resize, mean=list(meta.mean), std=list(meta.std),
                                     resize_labels=resize_labels)
    common = {"fmt": data_format, "transform": transform, "ignore_index": meta.ignore_index,
              "img_suffix": img_suffix, "seg_suffix": seg_suffix}
    try:  # the dataset's own class list first, so a mismatch with the checkpoint is reported as such
        return build_dataset(root, split, **common)
    except SegkdError:  # e.g. a folder dataset without a class file: the checkpoint's class count applies
        return build_dataset(root, split, num_classes=meta.num_classes, **common)


def report_names(model_names: Sequence[str] | None, dataset: Any) -> list[str] | None:
    """The model's class names, unless it only has placeholders (``class0``, ... as a converted foreign checkpoint
    has) and the dataset names its classes: then the dataset's, so the per-class table says "Sky", not "class0"."""
    ds_names = getattr(getattr(dataset, "info", dataset), "class_names", None)
    generic = not model_names or all(n == f"class{i}" for i, n in enumerate(model_names))
    if generic and ds_names and (not model_names or len(ds_names) == len(model_names)):
        return list(ds_names)
    return list(model_names) if model_names else None


def _dataset_classes(dataset: Any) -> tuple[int | None, int | None]:
    """``(num_classes, ignore_index)`` a dataset declares (``dataset.info`` or plain attributes), else ``None``."""
    info = getattr(dataset, "info", dataset)
    k = getattr(info, "num_classes", None)
    ignore = getattr(info, "ignore_index", None)
    return (int(k) if k is not None else None), (int(ignore) if ignore is not None else None)


def render_eval(result: EvalResult, console: Any) -> None:
    """A rich table: per-class IoU / Acc / Dice (%), GT pixel share, then the summary row."""


    def pct(v: float) -> str:
        return "-" if v != v else f"{100 * v:.2f}"

    gt = result.confusion.sum(1).double()
    total = float(gt.sum()) or 1.0
    data = result.extra.get("data")
    where = f"{data} ({result.extra['data_format']}) " if data and result.extra.get("data_format") else (
        f"{data} " if data else "")
    table = Table(title=f"{result.extra.get('model', 'model')} on {where}{result.extra.get('split', 'eval')} "
                        f"({result.n_images} images)", title_justify="left")
    for col in ("class", "IoU", "Acc", "Dice", "GT %"):
        table.add_column(col, justify="left" if col == "class" else "right", no_wrap=col == "class")
    for i, name in enumerate(result.names()):
        table.add_row(name, pct(result.per_class_iou[i]), pct(result.per_class_acc[i]),
                      pct(result.per_class_dice[i]), f"{100 * float(gt[i]) / total:.2f}")
    table.add_section()
    table.add_row("[bold]mean[/]", f"[bold]{pct(result.miou)}[/]", pct(result.macc), pct(result.mdice), "")
    print_table(console, table)
    console.print(f"mIoU {pct(result.miou)}  aAcc {pct(result.aacc)}  mAcc {pct(result.macc)}  "
                  f"fwIoU {pct(result.fwiou)}  mDice {pct(result.mdice)}  ({result.seconds:.1f} s)")
    if any(v != v for v in result.per_class_iou):
        console.print("[dim]- = class absent from both ground truth and prediction (excluded from the means)[/]")
