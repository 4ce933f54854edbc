"""Segmentation metrics from one confusion matrix (dataset-level, not per-image averages).

The confusion matrix ``C`` is ``K x K`` int64 with rows = ground truth, columns = prediction: ``C[i, j]`` counts
labelled pixels of class ``i`` predicted as ``j``. Pixels equal to ``ignore_index`` are left out; any other label
outside ``[0, K)`` is an error (it means the dataset and the model disagree on the classes). It is accumulated with
``torch.bincount`` on the device of the predictions and, under ``torch.distributed``, summed over ranks with one
``all_reduce`` so every rank ends with the same matrix.

Definitions (``TP_c = C[c, c]``, ``GT_c = sum_j C[c, j]``, ``P_c = sum_i C[i, c]``, ``N = sum C``):

* ``IoU_c  = TP_c / (GT_c + P_c - TP_c)``, NaN when the class is absent from both ground truth and prediction.
* ``mIoU   = nanmean_c IoU_c``: the mean over classes that occur in the ground truth *or* the prediction (a class
  only predicted counts with IoU 0; a class absent from both is NaN and excluded). This is mmseg's convention.
* ``Acc_c  = TP_c / GT_c`` (recall), NaN when ``GT_c = 0``; ``mAcc = nanmean_c Acc_c`` over classes present in GT.
* ``aAcc   = sum_c TP_c / N`` (pixel accuracy).
* ``fwIoU  = sum_c (GT_c / N) * IoU_c`` over classes with ``GT_c > 0`` (frequency-weighted by GT pixel counts).
* ``Dice_c = 2 TP_c / (GT_c + P_c)`` (= per-class F1), NaN when absent from both; ``mDice = nanmean_c Dice_c``.

With no labelled pixel at all every summary is NaN (reported as ``null`` in JSON), never a made-up 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from segkd.errors import SegkdError

CONVENTION = (
    "dataset-level metrics from one confusion matrix (rows = ground truth, columns = prediction); "
    "ignore_index pixels excluded; mIoU and mDice = mean over classes present in ground truth or prediction "
    "(classes absent from both are null and excluded); mAcc = mean over classes present in ground truth; "
    "fwIoU weights IoU by ground-truth pixel frequency; values are fractions in [0, 1]"
)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """``K x K`` int64 confusion matrix of integer label maps of the same shape (rows = ``target``).

    ``target`` pixels equal to ``ignore_index`` are skipped; other target values outside ``[0, K)`` and any
    prediction outside ``[0, K)`` raise :class:`SegkdError` naming the offending value.
    """
    if pred.shape != target.shape:
        raise SegkdError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise SegkdError("confusion_matrix needs integer label maps (argmax the scores first)")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    k = int(num_classes)
    if target.numel():
        bad = (target < 0) | (target >= k)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise SegkdError(
                f"label value {value} is neither a class in [0, {k}) nor the ignore index {ignore_index}"
            )
        bad = (pred < 0) | (pred >= k)
        if bool(bad.any()):
            raise SegkdError(f"predicted class {int(pred[bad][0])} is outside [0, {k})")
    return torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)


def all_reduce_sum(conf: Tensor) -> Tensor:
    """Sum a tensor (a confusion matrix, a count) over all ranks when ``torch.distributed`` is initialised.

    Identity without a process group.

    NCCL only reduces CUDA tensors, so a CPU matrix is moved to this rank's GPU for the reduction and back.
    """

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return conf
    device = conf.device
    work = conf.clone()
    if dist.get_backend() == "nccl" and work.device.type != "cuda":
        work = work.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(device)


class ConfusionMeter:
    """Accumulates a confusion matrix batch by batch; :meth:`reduce` sums it over ranks."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255, device: str | torch.device = "cpu") -> None:
        if num_classes < 1:
            raise SegkdError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of predicted and ground-truth label maps (any matching shape)."""
        self.matrix += confusion_matrix(pred.to(self.matrix.device), target.to(self.matrix.device),
                                        self.num_classes, self.ignore_index)

    def reduce(self) -> Tensor:
        """The matrix summed over ranks (stored back, so call it once at the end)."""
        self.matrix = all_reduce_sum(self.matrix)
        return self.matrix


all_reduce_confusion = all_reduce_sum


def _nanmean(values: Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


@dataclass
class Scores:
    """Every metric derived from one confusion matrix (fractions; NaN where undefined, see module docstring)."""

    miou: float
    aacc: float
    macc: float
    fwiou: float
    mdice: float
    per_class_iou: list[float]
    per_class_acc: list[float]
    per_class_dice: list[float]
    gt_pixels: list[int]
    pred_pixels: list[int]


def scores_from_confusion(conf: Tensor) -> Scores:
    """IoU/Acc/Dice per class and mIoU, aAcc, mAcc, fwIoU, mDice from a ``K x K`` confusion matrix."""
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise SegkdError(f"a confusion matrix must be square, got shape {tuple(conf.shape)}")
    c = conf.detach().to("cpu", torch.float64)
    tp = c.diagonal()
    gt = c.sum(1)
    pr = c.sum(0)
    total = float(c.sum())
    nan = torch.full_like(tp, math.nan)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    dice = torch.where(gt + pr > 0, 2 * tp / (gt + pr).clamp_min(1), nan)
    if total > 0:
        present = gt > 0
        fwiou = float((gt[present] / total * iou[present]).sum())
        aacc = float(tp.sum()) / total
    else:
        fwiou = aacc = math.nan
    return Scores(
        miou=_nanmean(iou), aacc=aacc, macc=_nanmean(acc), fwiou=fwiou, mdice=_nanmean(dice),
        per_class_iou=iou.tolist(), per_class_acc=acc.tolist(), per_class_dice=dice.tolist(),
        gt_pixels=[int(v) for v in gt.tolist()], pred_pixels=[int(v) for v in pr.tolist()],
    )


def nan_to_none(value: float) -> float | None:
    """JSON has no NaN: undefined metrics become ``null``."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
