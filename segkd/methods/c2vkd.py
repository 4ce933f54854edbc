"""C2VKD (Zheng et al., "Distilling Efficient Vision Transformers from CNNs for Semantic Segmentation").

CNN teacher -> transformer student. Objective (the released code's defaults; no CE unless ``add_ce``)::

    L = PDD(zS, zT, y) + 0.1 L_global + 0.1 L_patch + 0.5 L_ling

Wiring (methods.md §1.4.4, the SegFormer path of the official code): teacher feature ``F^T`` = ResNet ``layer4``;
student stage-4 feature -> training-only ``Conv1x1(C4 -> C_T, no bias)`` -> bilinear resize to the teacher's
layer4 grid = ``F^S``; student linguistic embedding = ``GAP -> Conv1x1(C4 -> 512, no bias)`` (``ling_student=
"head"``) or the frozen pool applied to ``F^S`` (``"pool"``, what the released ``train.py`` does); teacher
linguistic embedding = frozen CLIP-style ``AttentionPool2d`` on ``F^T``.

* VLFD global: channel softmax per position, ``KLDivLoss(reduction='mean')`` i.e. divided by ``B*C*H*W`` (kept so
  the 0.1 weight means what it did); direction ``kl="teacher_student"`` = KL(T||S) as in the code (the paper's
  Eq. 3 writes KL(S||T): ``kl="student_teacher"``).
* VLFD patch: rows = all positions of all images, L2-normalised then centred, ``G = X X^T / (C-1)``,
  ``MSE(G_T, G_S)`` over all ``N^2`` entries. Default ``gram_method="auto"``: with ``D = Xs - Xt``, ``P = Xs + Xt``
  the loss is ``(||D P^T||^2 + <D P^T, P D^T>) / 2`` (scaled), computed either through the ``N x N`` matrix
  ``D P^T`` (``rows``, ``2 N^2 C`` multiply-adds) or the ``C x C`` products ``D^T D``, ``P^T P``, ``P^T D``
  (``channels``, ``5 N C^2``), whichever is cheaper and fits; no large terms cancel when student ~ teacher.
  ``gram_method="chunked"`` is the previous implementation (row chunks of ``gram_chunk``, ``5 N^2 C``,
  ``O(chunk * N)`` memory), kept as the reference. In :class:`C2VKD` the student's rows are ``normalise(W u)``
  with the ``C x r`` visual head ``W``: ``auto`` then takes ``lowrank`` (:class:`_LowRankGramMSE`: ``N r C``
  products and the teacher-only ``||Xt^T Xt||^2``, the teacher rows split at their mean, the residual's products
  in float32 under error guards that fall back to float64) when that costs less (:func:`pick_patch_method`; at
  SegFormer-B0 <- ResNet-50 ``layer4``, r = 256 < C = 2048).
* VLFD linguistic: ``0.5 * KLDivLoss(log_softmax(lS), log_softmax(lT), log_target=True, reduction='mean')``.
* PDD ``pdd_mode="paper"``: per labelled pixel ``b = [p_y, sum_{c!=y} p_c]`` (T = 1),
  ``q = normalise((b^T + [1, 0]) / 2)``, ``L = alpha b^S_t log(b^S_t / q_t) + beta b^S_nt log(b^S_nt / q_nt)``
  (student-first, as the audit reads Eq. 9), mean over labelled pixels, logs clamped at 1e-8; alpha = beta = 0.5.
  ``pdd_kl="forward"`` swaps to ``KL(q || b^S)`` (no vanishing gradient when p_y -> 0, papers-extra §2.2);
  ``pdd_nckd > 0`` adds that weight times DKD's NCKD. ``pdd_mode="dkd"``: pixel-wise DKD (TCKD + NCKD) with
  alpha = beta = 0.5, T = 1, teacher only (the name of the official call, ``get_dkd_loss``). ``paper`` is
  computed on the maps from log-sum-exps (:func:`pdd_paper_maps`; :func:`pdd_paper_rows` is the row form it
  replaced, the reference).

Attention-pool weights (``pool_weights``): a state dict with CLIP's ``visual.attnpool.*`` keys (a CLIP RN101
state dict), or the pool's own keys (optionally prefixed ``attnpool.``/``encoder.``), in .safetensors or .pt/.pth.
Its spatial positional embedding is interpolated bilinearly to the teacher's grid (DenseCLIP). **Fallback without
a file**: a frozen pool with CLIP's initialisation drawn from a fixed seed (``pool_seed``), sized to the
teacher's layer4 channels. Why: segkd never downloads weights, and a frozen random attention pool keeps the term's
form and scale (a fixed non-linear 512-d projection of the teacher feature that the student's head must match),
is reproducible across runs and resumes, and does not let the term collapse as a trainable pool would. It is not
CLIP's language-aligned space; the run records which pool was used (``pool_source``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd.checkpoint import file_sha256, read_safetensors, torch_load_weights
from segkd.engine.losses import seg_cross_entropy
from segkd.errors import SegkdError
from segkd.methods.base import (
    Method,
    align_logits,
    check_positive,
    check_temperature,
    distill_labels,
    register_method,
    resize_to,
    resolve_tap,
    valid_mask,
)
from segkd.methods.dkd import EPS, LOG_EPS, binary_probs, dkd_maps, dkd_rows, nckd_rows, valid_pixels, without_target
from segkd.models import SegModel, SegOutput

POOL_KEYS = ("positional_embedding", "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
             "v_proj.weight", "v_proj.bias", "c_proj.weight", "c_proj.bias")


# ------------------------------------------------------------------------------------------------ VLFD terms
def vlfd_global_loss(fs: Tensor, ft: Tensor, kl: str = "teacher_student") -> Tensor:
    """Channel-softmax KL per position, mean over all ``B*C*H*W`` elements (``KLDivLoss(reduction='mean')``).
    The channels are dim 1: ``B x C x H x W`` maps, or ``N x C`` position rows (:func:`feature_rows`, the faster
    layout: the softmax then runs over contiguous memory)."""
    if kl == "teacher_student" and fs.dim() == 2:
        return _RowKL.apply(fs, ft.detach())
    log_s, log_t = F.log_softmax(fs.float(), dim=1), F.log_softmax(ft.float(), dim=1)
    if kl == "teacher_student":
        return (log_t.exp() * (log_t - log_s)).mean()
    return (log_s.exp() * (log_s - log_t)).mean()


class _RowKL(torch.autograd.Function):
    """``mean(p_t (log p_t - log p_s))`` over ``N x C`` rows, the value and gradient autograd gives the plain form
    (the gradient keeps its ``softmax(fs) * sum_c p_t`` factor), with four ``N x C`` buffers instead of ~nine."""

    @staticmethod
    def forward(ctx, fs: Tensor, ft: Tensor) -> Tensor:  # type: ignore[override]
        with torch.autocast(fs.device.type, enabled=False):
            log_s, log_t = F.log_softmax(fs.float(), dim=1), F.log_softmax(ft.float(), dim=1)
            p_t = log_t.exp()
            total = log_t.sub_(log_s).mul_(p_t).sum()
        ctx.save_for_backward(log_s, p_t)
        ctx.in_dtype = fs.dtype
        return total / fs.numel()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        log_s, p_t = ctx.saved_tensors
        g = log_s.exp().mul_(p_t.sum(1, keepdim=True)).sub_(p_t).mul_(grad / log_s.numel())
        return g.to(ctx.in_dtype), None


def feature_rows(f: Tensor) -> Tensor:
    """``B x C x H x W`` -> ``(B*H*W) x C``: one row per position, channels contiguous."""
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def resize_rows(rows: Tensor, shape: tuple[int, ...] | torch.Size, size: tuple[int, int]) -> Tensor:
    """:func:`resize_to` of a ``B x C x H x W`` map (``shape``) held as its :func:`feature_rows`, to ``size``: the
    bilinear resize runs in channels-last and its output is read as rows without a copy."""
    b, _, h, w = shape
    x = rows.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    return feature_rows(resize_to(x, size))


def relation_rows(f: Tensor, rows: bool = False) -> Tensor:
    """``B x C x H x W`` (or, with ``rows``, already ``(B*H*W) x C``) -> rows, L2-normalised, then centred (the
    code's order)."""
    x = f if rows else feature_rows(f)
    x = x if x.dtype == torch.float64 else x.float()  # fp32 under AMP too: the Gram differences are small
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x - x.mean(dim=1, keepdim=True)


GramMethod = Literal["auto", "rows", "channels", "chunked", "lowrank"]
ROWS_MAX_ELEMENTS = 2**25  # the rows path keeps one N x N fp32 matrix (128 MB) for its backward


class _ChunkedGramMSE(torch.autograd.Function):
    """``mean((Xs Xs^T - Xt Xt^T)^2) / (C-1)^2`` row-chunk by row-chunk, forward and backward (the reference:
    ``5 N^2 C`` multiply-adds, ``O(chunk * N)`` memory)."""

    @staticmethod
    def forward(ctx, xs: Tensor, xt: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        n, c = xs.shape
        scale = 1.0 / (c - 1)
        total = xs.new_zeros((), dtype=torch.float64)
        with torch.autocast(xs.device.type, enabled=False):  # the differences are small: no bf16/fp16 matmuls
            for i in range(0, n, chunk):
                d = (xs[i:i + chunk] @ xs.T - xt[i:i + chunk] @ xt.T) * scale
                total += d.double().pow(2).sum()
        ctx.save_for_backward(xs, xt)
        ctx.chunk = chunk
        return (total / (n * n)).to(xs.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        xs, xt = ctx.saved_tensors
        n, c = xs.shape
        scale = 1.0 / (c - 1)
        gx = torch.empty_like(xs)
        # L = sum(D^2)/n^2 with D = (Xs Xs^T - Xt Xt^T)/(c-1) symmetric  =>  dL/dXs = 4/(n^2 (c-1)) D Xs
        with torch.autocast(xs.device.type, enabled=False):
            for i in range(0, n, ctx.chunk):
                d = (xs[i:i + ctx.chunk] @ xs.T - xt[i:i + ctx.chunk] @ xt.T) * scale
                gx[i:i + ctx.chunk] = d @ xs
        return gx * (4.0 * scale / (n * n)) * grad, None, None


# Both fast paths use D = Xs - Xt and P = Xs + Xt: Xs Xs^T - Xt Xt^T = (D P^T + P D^T) / 2, so
# ||Xs Xs^T - Xt Xt^T||^2 = (||Q||^2 + <Q, Q^T>) / 2 with Q = D P^T (N x N), and ||Q||^2 = <D^T D, P^T P>,
# <Q, Q^T> = <K, K^T> with K = P^T D (C x C). Every term is O(|D|^2): when Xs ~ Xt nothing large cancels, which
# the textbook identity ||Xs^T Xs||^2 - 2 ||Xs^T Xt||^2 + ||Xt^T Xt||^2 does not give in fp32 (three terms of size
# |X|^4 whose difference is |D|^2 |X|^2). D is exact in fp32 when the rows are close (Sterbenz); the final
# reductions run in float64.
class _RowGramMSE(torch.autograd.Function):
    """Gram MSE through ``Q = D P^T`` (``2 N^2 C`` multiply-adds, one ``N x N`` matrix kept for the backward)."""

    @staticmethod
    def forward(ctx, xs: Tensor, xt: Tensor) -> Tensor:  # type: ignore[override]
        n, c = xs.shape
        with torch.autocast(xs.device.type, enabled=False):
            q = (xs - xt) @ (xs + xt).T
            total = q.pow(2).sum(dtype=torch.float64) + (q * q.T).sum(dtype=torch.float64)
        ctx.save_for_backward(xs, xt, q)
        return (total / (2.0 * n * n * (c - 1) ** 2)).to(xs.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        xs, xt, q = ctx.saved_tensors
        n, c = xs.shape
        scale = 2.0 / (n * n * (c - 1) ** 2)
        with torch.autocast(xs.device.type, enabled=False):
            e2 = q + q.T  # = 2 (Xs Xs^T - Xt Xt^T);  dL/dXs = 4 s E Xs = 2 s (Q + Q^T) Xs
            gs = (e2 @ xs) * (scale * grad) if ctx.needs_input_grad[0] else None
            gt = (e2 @ xt) * (-scale * grad) if ctx.needs_input_grad[1] else None
        return gs, gt


class _ChannelGramMSE(torch.autograd.Function):
    """Gram MSE through the ``C x C`` products ``D^T D``, ``P^T P``, ``P^T D`` (``5 N C^2`` multiply-adds,
    ``O(C^2 + N C)`` memory)."""

    @staticmethod
    def forward(ctx, xs: Tensor, xt: Tensor) -> Tensor:  # type: ignore[override]
        n, c = xs.shape
        with torch.autocast(xs.device.type, enabled=False):
            d, p = xs - xt, xs + xt
            a, b, k = d.T @ d, p.T @ p, p.T @ d
            total = (a.double() * b.double()).sum() + (k.double() * k.T.double()).sum()
        ctx.save_for_backward(d, p, a, b, k)
        return (total / (2.0 * n * n * (c - 1) ** 2)).to(xs.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        d, p, a, b, k = ctx.saved_tensors
        n, c = d.shape
        scale = 1.0 / (n * n * (c - 1) ** 2)
        # 4 E Xs with Xs = (P + D)/2: P^T Xs = (B + K)/2, D^T Xs = (K^T + A)/2
        # => dL/dXs = s (D (B + K) + P (K^T + A))
        with torch.autocast(d.device.type, enabled=False):
            dp = torch.cat([d, p], dim=1)
            gs = gt = None
            if ctx.needs_input_grad[0]:
                gs = (dp @ torch.cat([b + k, k.T + a], dim=0)) * (scale * grad)
            if ctx.needs_input_grad[1]:  # P^T Xt = (B - K)/2, D^T Xt = (K^T - A)/2, and a minus sign
                gt = (dp @ torch.cat([b - k, k.T - a], dim=0)) * (-scale * grad)
        return gs, gt



# The student's relation rows are ``Xs = A B``: ``A = diag(1 / ||W u_i||) U`` (``N x r``, the resized stage-4 rows
# scaled by the normalisation) and ``B = Wc^T`` (``r x C``, the 1x1 head with each column centred over its ``C``
# entries), because normalising then centring a row ``W u`` gives ``Wc u / ||W u||``. Then, with ``M = A^T A``,
# ``Gb = B B^T`` (``r x r``) and ``K = A^T Xt`` (``r x C``):
#     ||Xs Xs^T - Xt Xt^T||^2 = tr(M Gb M Gb) - 2 <K K^T, Gb> + ||Xt^T Xt||^2,
#     dL/dXs = 4 s (Xs Xs^T - Xt Xt^T) Xs = 4 s H B,   H = A Gb M - Xt K^T   (N x r),
# so the student side costs ``N r C`` (``K``) + ``N r C`` (``Xt K^T``) + ``O(N r^2)`` instead of ``2 N^2 C``, and the
# teacher-only ``||Xt^T Xt||^2`` (``min(N C^2, N^2 C)``, no gradient) is the one large product left. The three terms
# cancel when the student's Gram approaches the teacher's (the loss ignores rotations of the teacher's channels, so
# that needs no ``Xs ~ Xt``; a random ResNet-50's relation rows are nearly rank one, and a rank-256 student can get
# within ~1e-8 of ``||Xt^T Xt||^2`` there): every error that survives the cancellation is amplified by
# ``||Xt^T Xt||^2 / L``. So the ``r x r`` pieces and the normalisation run in float64, and the teacher rows are split
# at their mean ``m`` (``Xt = 1 m^T + R``, ``R^T 1 = 0``; ``R`` formed in float64):
#     ||Xt^T Xt||^2 = N^2 |m|^4 + 2 N |R m|^2 + ||R^T R||^2,     K = (A^T 1) m^T + A^T R,
# the mean's parts in float64 (``O(N C)``), ``||R^T R||^2`` (upper block triangle, squares summed in float64) and
# ``A^T R`` from float32 products. Their errors are estimated per call: ``eps``, the relative error of one float32
# product over the ``N`` rows, is the larger of :data:`FP32_PRODUCT_ERROR` (measured <= 7e-8 over N x C from 64 x 512
# to 4096 x 2048, normal, ReLU, offset, heavy-tailed and near-low-rank rows) and 4x the worst relative error of the
# float32 Gram's own diagonal against float64 sums of squares at 64 evenly spaced entries (one sign, where the
# rounding errors of a product add up instead of cancelling; it catches rows of equal magnitude, where the float32
# sum is off by ~1e-5, and reduced-precision matmuls such as TF32). Then ``|d G_jk| <= eps sqrt(G_jj G_kk)`` for
# ``G = R^T R``, so ``|d ||G||^2| <= 2 eps ||G|| tr(G)``, and ``||dK|| <= eps ||A|| ||R||``,
# ``|d total| <= 4 ||Gb K|| ||dK||``; each part is kept only while its bound is below :data:`GRAM_GUARD` of the
# estimated loss, else it is recomputed in float64 (``K`` with the gradient's ``R K^T``; the float32 part was
# already paid for: a fallback adds the float64 product). ``eps`` is an estimate from the data, not a proof. With
# both parts in float64 the value carries ~1e-16 x ``||Xt^T Xt||^2 / L`` relative error: within 1e-5 while ``L`` is
# above ~1e-11 of ``||Xt^T Xt||^2`` (the old dense float32 paths were off by 1e-3 to 1e-2 there); the value is
# clamped at 0. Relation rows share a large mean (``||R^T R||^2`` was 1e-4 of ``||Xt^T Xt||^2`` on a random
# ResNet-50's ``layer4``), so the float32 Gram holds until ``L`` comes within a small multiple of ``||R^T R||^2``.
FP32_PRODUCT_ERROR = 1e-6
GRAM_GUARD = 2e-6


class _LowRankGramMSE(torch.autograd.Function):
    """Gram MSE of ``Xs = a b^T`` against the teacher's relation rows ``x64`` (``a``: ``N x r``, ``b``: ``C x r``,
    all float64; the value in float64). ``x64`` is centred over its rows in place (it is the caller's copy).
    ``record``: a dict the call fills with which float32 parts it recomputed in float64 (``K``,
    ``residual_gram``)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, x64: Tensor,  # type: ignore[override]
                record: dict[str, bool] | None = None) -> Tensor:
        n, c = x64.shape
        with torch.autocast(x64.device.type, enabled=False):
            mean = x64.mean(0)
            rows = x64.sub_(mean)  # R
            rm = rows @ mean
            teacher = n * n * (mean @ mean) ** 2 + 2 * n * (rm @ rm)
            gb, m = b.T @ b, a.T @ a  # r x r
            gm = gb @ m
            tr_m = (gm * gm.T).sum()
            r32, a_sum = rows.to(torch.float32), a.sum(0)
            k = torch.addr((a.to(torch.float32).T @ r32).double(), a_sum, mean)  # K = A^T (1 m^T + R), r x C
            residual, diag32 = _gram_sq_norm(r32, with_diag=True)
            # that diagonal in float64 at 64 evenly spaced entries (a reduction over all of them would cost a pass
            # across the rows' strides as long as the check saves), and tr(G) = ||R||^2
            pick = torch.arange(0, diag32.numel(), max(1, diag32.numel() // 64), device=rows.device)
            diag64 = rows[pick].square().sum(1) if n < c else rows[:, pick].square().sum(0)
            trace = rows.norm().square()
            diag_err = ((diag32[pick] - diag64).abs() / diag64.clamp_min(torch.finfo(torch.float64).tiny)).max()
            eps = max(FP32_PRODUCT_ERROR, 4 * float(diag_err))  # see the comment above: an estimate per call
            cross = ((k @ k.T) * gb).sum()
            total = tr_m - 2 * cross + teacher + residual
            # each float32 part is kept while its error bound is below GRAM_GUARD of the value
            k_error = 4 * eps * (gb @ k).norm() * a.norm() * trace.sqrt()
            ctx.exact = bool(k_error > GRAM_GUARD * total)
            if ctx.exact:  # K (and the gradient's R K^T) in float64
                k = torch.addr(a.T @ rows, a_sum, mean)
                cross = ((k @ k.T) * gb).sum()
                total = tr_m - 2 * cross + teacher + residual
            gram_exact = bool(2 * eps * residual.sqrt() * trace > GRAM_GUARD * total)
            if gram_exact:
                total = tr_m - 2 * cross + teacher + _gram_sq_norm(rows)
        if record is not None:
            record.update(K=ctx.exact, residual_gram=gram_exact)
        ctx.save_for_backward(a, b, rows if ctx.exact else r32, mean, k, gb, gm)
        return total.clamp_min(0) / (n * n * (c - 1) ** 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        a, b, rows, mean, k, gb, gm = ctx.saved_tensors
        n, c = rows.shape
        scale = 4.0 / (n * n * (c - 1) ** 2) * grad.double()
        with torch.autocast(rows.device.type, enabled=False):
            # 4 s (A Gb M - Xt K^T), Xt K^T = R K^T + 1 (K m)^T (R K^T in float32 where the value kept float32)
            rk = rows @ k.T.to(rows.dtype)
            h = (a @ gm).sub_(rk).sub_(k @ mean).mul_(scale)
            ga = h @ gb if ctx.needs_input_grad[0] else None  # dL/dA = dL/dXs B^T
            gb_ = b @ (h.T @ a) if ctx.needs_input_grad[1] else None  # dL/dWc = (A^T dL/dXs)^T = Wc H^T A
        return ga, gb_, None, None


def _gram_sq_norm(x: Tensor, blocks: int = 4, with_diag: bool = False) -> Any:
    """``||x^T x||^2`` (= ``||x x^T||^2``) in float64 from the smaller side's Gram, its upper block triangle only
    (``(blocks + 1) / (2 blocks)`` of the multiply-adds; the products stay in ``x``'s dtype). ``with_diag``: also
    that Gram's diagonal as the products gave it (float64), for an error check."""
    if x.shape[0] < x.shape[1]:
        x = x.T
    cols = x.shape[1]
    step = -(-cols // blocks)
    total = x.new_zeros((), dtype=torch.float64)
    diags = []
    for i in range(0, cols, step):
        for j in range(i, cols, step):
            block = x[:, i:i + step].T @ x[:, j:j + step]
            part = block.pow(2).sum(dtype=torch.float64)
            total = total + (part if i == j else 2 * part)
            if with_diag and i == j:
                diags.append(block.diagonal().double())
    return (total, torch.cat(diags)) if with_diag else total


def pick_gram_method(n: int, c: int) -> str:
    """The cheaper exact path for ``N`` rows of ``C`` channels: ``rows`` (``2 N^2 C``) when its ``N x N`` matrix
    fits :data:`ROWS_MAX_ELEMENTS`, else ``channels`` (``5 N C^2``); ``chunked`` when neither fits in memory."""
    rows_ok, channels_ok = n * n <= ROWS_MAX_ELEMENTS, c * c <= ROWS_MAX_ELEMENTS
    if rows_ok and (not channels_ok or 2 * n * n * c <= 5 * n * c * c):
        return "rows"
    return "channels" if channels_ok else "chunked"


def lowrank_cost(n: int, c: int, r: int) -> float:
    """Multiply-adds of the ``lowrank`` path (float64 ones counted twice, as they run at about half the speed):
    ``K`` and ``Xt K^T`` (float32 while the guard keeps them), the block-triangular float32 teacher Gram, seven
    ``N r^2`` products in float64, and ~10 float64 passes over the ``N x C`` rows."""
    return 2.0 * n * c * r + 0.625 * min(n * c * c, n * n * c) + 14.0 * n * r * r + 20.0 * n * c


def pick_patch_method(n: int, c: int, r: int) -> str:
    """``auto`` for student rows given as ``normalise(W u)`` with a ``C x r`` head: ``lowrank`` when it is cheaper
    than the dense path :func:`pick_gram_method` would take, else that path."""
    dense = pick_gram_method(n, c)
    cost = {"rows": 2.0 * n * n * c, "channels": 5.0 * n * c * c, "chunked": 5.0 * n * n * c}[dense]
    return "lowrank" if lowrank_cost(n, c, r) < cost else dense


def gram_mse(xs: Tensor, xt: Tensor, method: GramMethod = "auto", chunk: int | None = 1024) -> Tensor:
    """``mean over N^2 of ((Xs Xs^T - Xt Xt^T) / (C-1))^2`` for ``N x C`` rows; ``method`` picks the path (all
    exact; ``chunk=None`` with ``chunked`` builds both full Grams, the plain-autograd reference)."""
    n, c = xs.shape
    if method == "auto":
        method = pick_gram_method(n, c)  # type: ignore[assignment]
    if method == "rows":
        return _RowGramMSE.apply(xs, xt)
    if method == "channels":
        return _ChannelGramMSE.apply(xs, xt)
    if method == "lowrank":
        raise SegkdError("gram method lowrank needs the student's rows as a head and its input "
                         "(vlfd_patch_loss_factored), not the rows themselves")
    if method != "chunked":
        raise SegkdError(f"gram method must be auto, rows, channels, chunked or lowrank, got {method!r}")
    if chunk is None:
        return F.mse_loss(xs @ xs.T / (c - 1), xt @ xt.T / (c - 1))
    return _ChunkedGramMSE.apply(xs, xt, int(chunk))


def vlfd_patch_loss(fs: Tensor, ft: Tensor, chunk: int | None = 1024, method: GramMethod = "auto") -> Tensor:
    """Patch-relation loss: MSE between the batch-wide token Gram matrices of student and teacher features.

    ``method="auto"`` takes the cheaper exact path (:func:`pick_gram_method`); ``chunk`` only matters for
    ``method="chunked"``, where ``chunk=None`` builds the full ``N x N`` matrices (the tests' reference)."""
    xs, xt = relation_rows(fs), relation_rows(ft.detach())
    if xs.shape[1] < 2:
        raise SegkdError("the patch-relation loss needs features with at least 2 channels")
    if chunk is None and method == "auto":
        method = "chunked"
    return gram_mse(xs, xt, method, chunk)


def vlfd_patch_loss_factored(u: Tensor, weight: Tensor, ft: Tensor, chunk: int | None = 1024,
                             method: GramMethod = "auto", record: dict[str, bool] | None = None) -> Tensor:
    """:func:`vlfd_patch_loss` of ``fs = u W^T`` for student rows ``u`` (``N x r``) through a bias-free 1x1 head
    ``W`` (``C x r``, or the conv's ``C x r x 1 x 1``) against teacher rows ``ft`` (``N x C``, as
    :func:`feature_rows` gives them); ``method="auto"`` picks :func:`pick_patch_method`, ``lowrank`` the
    decomposition of :class:`_LowRankGramMSE` (``a``, ``b`` and the normalisation in float64 whatever autocast
    says; ``record`` gets which of its float32 parts fell back to float64), the others build ``fs`` and take that
    dense path."""
    weight = weight.reshape(weight.shape[0], -1)
    (n, r), c = u.shape, weight.shape[0]
    if c < 2:
        raise SegkdError("the patch-relation loss needs features with at least 2 channels")
    if method == "auto":
        method = pick_patch_method(n, c, r)  # type: ignore[assignment]
    if method != "lowrank":
        dt = torch.promote_types(u.dtype, weight.dtype)
        return gram_mse(relation_rows(u.to(dt) @ weight.to(dt).T, rows=True), relation_rows(ft.detach(), rows=True),
                        method, chunk)
    with torch.autocast(u.device.type, enabled=False):
        x64 = ft.detach().to(torch.float64, copy=True)  # relation_rows in float64, in place
        x64.div_(x64.norm(dim=1, keepdim=True).clamp_min_(1e-12)).sub_(x64.mean(dim=1, keepdim=True))
        u64, w64 = u.double(), weight.double()
        # ||W u_i|| from the r x r Gram, clamped as relation_rows clamps the norm (sqrt's gradient is then 0 too)
        sq = ((u64 @ (w64.T @ w64)) * u64).sum(1, keepdim=True)
        a = u64 / sq.clamp_min(1e-24).sqrt()
        out = torch.float64 if u.dtype == weight.dtype == torch.float64 else torch.float32
        return _LowRankGramMSE.apply(a, w64 - w64.mean(0, keepdim=True), x64, record).to(out)


def vlfd_ling_loss(ls: Tensor, lt: Tensor) -> Tensor:
    """KL(softmax(lT) || softmax(lS)) over the embedding dims, mean over ``B * D`` elements (the code's 'mean')."""
    log_s, log_t = F.log_softmax(ls.float(), dim=1), F.log_softmax(lt.float(), dim=1)
    return (log_t.exp() * (log_t - log_s)).mean()


# ------------------------------------------------------------------------------------------------------- PDD
def pdd_loss(student: Tensor, teacher: Tensor, labels: Tensor, mode: str = "paper", alpha: float = 0.5,
             beta: float = 0.5, temperature: float = 1.0, nckd: float = 0.0, kl: str = "reverse",
             ignore_index: int = 255) -> Tensor:
    """Pixel-wise decoupled distillation over labelled pixels; see the module docstring for both modes.

    ``paper`` runs on the ``B x K x H x W`` maps (:func:`pdd_paper_maps`; void pixels weighted 0), ``dkd`` on the
    rows of the labelled pixels."""
    if mode == "paper":
        return pdd_paper_maps(student, teacher, labels, alpha, beta, temperature, nckd, kl, ignore_index)
    s, t, y = valid_pixels(student, teacher, labels, ignore_index)
    if y.numel() == 0:
        return student.sum() * 0.0
    tckd, nk = dkd_rows(s, t, y, alpha, beta, temperature)
    return (alpha * tckd + beta * nk).mean()


def pdd_paper_maps(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float = 0.5, beta: float = 0.5,
                   temperature: float = 1.0, nckd: float = 0.0, kl: str = "reverse",
                   ignore_index: int = 255) -> Tensor:
    """PDD ``paper`` on the maps: ``log b = [z_y - l, n - l]`` from one log-sum-exp per network (``n`` over the
    non-target classes, the target taken out by :func:`~segkd.methods.dkd.without_target`, as
    :func:`~segkd.methods.dkd.dkd_maps` does), logs clamped at ``log EPS`` as the row form clamps ``b`` at ``EPS``;
    the teacher side without autograd. The value and gradient of the row form (:func:`pdd_paper_rows`, kept as the
    reference) within float32 rounding, without gathering the labelled pixels into rows (the row softmax over K
    classes and the gathers cost more than the maps' reductions, which vectorise across pixels)."""
    valid = valid_mask(labels, ignore_index)
    count = valid.sum()
    if int(count) == 0:
        return student.sum() * 0.0
    k = student.shape[1]
    low, top = (int(v) for v in torch.aminmax(labels[valid]))
    if top >= k or low < 0:
        raise SegkdError(f"PDD: label {top if top >= k else low} is outside the {k} classes "
                         f"(ignore_index {ignore_index})")
    idx = labels.clamp(0, k - 1).long().unsqueeze(1)  # void pixels: any class, weighted 0 below
    zs, zt = student.float(), teacher.float()
    if temperature != 1.0:
        zs, zt = zs / temperature, zt / temperature

    def log_binary(z: Tensor) -> tuple[Tensor, Tensor]:
        n = torch.logsumexp(without_target(z, idx), 1)
        z_y = z.gather(1, idx).squeeze(1)
        lse = torch.logaddexp(z_y, n)
        return z_y - lse, n - lse

    with torch.no_grad():
        bt_y, bt_n = (x.exp() for x in log_binary(zt))
        q_y, q_n = (bt_y + 1) / 2, bt_n / 2
        total = q_y + q_n
        q_y, q_n = q_y / total, q_n / total
        log_qy, log_qn = q_y.clamp_min(EPS).log(), q_n.clamp_min(EPS).log()
    ls_y, ls_n = log_binary(zs)
    log_sy, log_sn = ls_y.clamp_min(LOG_EPS), ls_n.clamp_min(LOG_EPS)
    if kl == "reverse":
        rows = alpha * ls_y.exp() * (log_sy - log_qy) + beta * ls_n.exp() * (log_sn - log_qn)
    else:
        rows = alpha * q_y * (log_qy - log_sy) + beta * q_n * (log_qn - log_sn)
    if nckd > 0:
        rows = rows + nckd * dkd_maps(student.float(), teacher.float(), idx.squeeze(1), temperature)[1]
    return (rows * valid).sum() / count


def pdd_paper_rows(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float = 0.5, beta: float = 0.5,
                   temperature: float = 1.0, nckd: float = 0.0, kl: str = "reverse",
                   ignore_index: int = 255) -> Tensor:
    """PDD ``paper`` on the rows of the labelled pixels, through the probabilities (what :func:`pdd_loss` ran
    before :func:`pdd_paper_maps`): the reference."""
    s, t, y = valid_pixels(student, teacher, labels, ignore_index)
    if y.numel() == 0:
        return student.sum() * 0.0
    bs, _ = binary_probs(s, y, temperature)
    bt, _ = binary_probs(t, y, temperature)
    q = (bt + torch.tensor([1.0, 0.0], device=bt.device, dtype=bt.dtype)) / 2
    q = q / q.sum(1, keepdim=True)
    log_bs, log_q = bs.clamp_min(EPS).log(), q.clamp_min(EPS).log()
    w = torch.tensor([alpha, beta], device=bs.device, dtype=bs.dtype)
    if kl == "reverse":
        rows = (w * bs * (log_bs - log_q)).sum(1)
    else:
        rows = (w * q * (log_q - log_bs)).sum(1)
    if nckd > 0:
        rows = rows + nckd * nckd_rows(s, t, y, temperature)
    return rows.mean()


# ------------------------------------------------------------------------------------------ attention pool
class AttentionPool2d(nn.Module):
    """CLIP/DenseCLIP attention pooling: the mean token attends over ``[mean; tokens]`` (+ positional embedding,
    its spatial part interpolated bilinearly to the input grid); returns the ``output_dim`` global embedding.

    Computed with the key and value projections folded (same function as projecting every token, as CLIP does):
    with one query, head ``h``'s scores are ``tokens (Wk_h^T q_h) + bk_h . q_h`` and its output is
    ``(attn_h tokens) Wv_h^T + bv_h`` (attention weights sum to 1), so the cost is ``O(heads * L * C + C^2)``
    instead of ``O(L * C^2)`` for ``L`` tokens — at a ResNet-50 layer4 grid of 32x64 that is 0.6 instead of 17
    GMACs per image, on every distillation step. The positional embedding is added through the products too (the
    token tensor with it added is never materialised)."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.spacial_dim, self.num_heads = spacial_dim, num_heads
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        feats = x.flatten(2)  # B x C x HW: the tokens, transposed (no copy for a contiguous map)
        pos = self.positional_embedding.to(x.dtype)
        sd = self.spacial_dim
        spatial = pos[1:].reshape(1, sd, sd, c).permute(0, 3, 1, 2)
        if (h, w) != (sd, sd):
            spatial = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=False)
        spatial = spatial.reshape(c, h * w)  # C x HW
        # the tokens are [mean + pos_0; x_l + pos_l]: each product with them is taken as a product with x plus one
        # with the positional embedding, so the B x (1 + HW) x C token tensor is never built
        first = feats.mean(2) + pos[0]  # B x C
        nh = self.num_heads
        d = c // nh
        q = self.q_proj(first).reshape(b, nh, d) * d**-0.5  # SDPA's default scale
        wk = self.k_proj.weight.reshape(nh, d, c)
        u = torch.einsum("bhd,hdc->bhc", q, wk)  # B x heads x C
        rest = u @ feats + u @ spatial  # B x heads x HW
        scores = torch.cat([(u * first[:, None]).sum(-1, True), rest], -1)
        attn = (scores + (q * self.k_proj.bias.reshape(nh, d)).sum(-1, True)).softmax(-1)
        rest = attn[..., 1:]
        pooled = attn[..., :1] * first[:, None] + rest @ feats.transpose(1, 2) + rest @ spatial.T  # B x heads x C
        out = torch.einsum("bhc,hdc->bhd", pooled, self.v_proj.weight.reshape(nh, d, c)).reshape(b, c)
        return self.c_proj(out + self.v_proj.bias)


def load_pool(path: str | Path, channels: int, heads: int = 32) -> tuple[AttentionPool2d, str]:
    """A frozen pool from a weights file (CLIP ``visual.attnpool.*`` or plain keys); the source string has the
    file's sha256. One-line errors for missing keys or a channel count that does not fit the teacher."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, _ = read_safetensors(path)
    else:
        state = torch_load_weights(path)
        state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
    picked: dict[str, Tensor] = {}
    for prefix in ("visual.attnpool.", "module.visual.attnpool.", "attnpool.", "encoder.", "module.encoder.", ""):
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in POOL_KEYS}
        if len(picked) == len(POOL_KEYS):
            break
    if len(picked) != len(POOL_KEYS):
        missing = [k for k in POOL_KEYS if k not in picked]
        raise SegkdError(f"--c2vkd-pool-weights {path}: no attention-pool weights (missing {missing[0]!r}; expected "
                         "CLIP 'visual.attnpool.*' keys or the pool's own keys)")
    pos = picked["positional_embedding"]
    embed, out_dim = int(pos.shape[1]), int(picked["c_proj.weight"].shape[0])
    sd = int(round(math.sqrt(pos.shape[0] - 1)))
    if sd * sd + 1 != pos.shape[0]:
        raise SegkdError(f"--c2vkd-pool-weights {path}: positional embedding has {pos.shape[0]} rows, not n*n+1")
    if embed != channels:
        raise SegkdError(f"--c2vkd-pool-weights {path}: the pool takes {embed} channels but the teacher's layer4 has "
                         f"{channels} (CLIP RN101's pool needs a ResNet-50/101 teacher)")
    if embed % heads:
        raise SegkdError(f"--c2vkd-pool-weights {path}: {embed} channels are not divisible by {heads} heads")
    pool = AttentionPool2d(sd, embed, heads, out_dim)
    pool.load_state_dict({k: v.float() for k, v in picked.items()})
    return pool, f"{path.name} sha256:{file_sha256(path)}"


def random_pool(channels: int, out_dim: int = 512, heads: int = 32, spacial_dim: int = 16,
                seed: int = 0) -> AttentionPool2d:
    """The documented fallback: CLIP-initialised pool drawn from a fixed seed (independent of the global RNG)."""
    while channels % heads:
        heads //= 2
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        pool = AttentionPool2d(spacial_dim, channels, heads, out_dim)
    finally:
        torch.random.set_rng_state(state)
    return pool


# ----------------------------------------------------------------------------------------------------- method
@dataclass
class C2VKDOptions:
    vlfd_global: bool = field(default=True, metadata={"flag": "--no-vlfd-global", "help": "drop the global term."})
    vlfd_patch: bool = field(default=True, metadata={"flag": "--no-vlfd-patch", "help": "drop the patch term."})
    vlfd_ling: bool = field(default=True, metadata={"flag": "--no-vlfd-ling", "help": "drop the linguistic term."})
    global_weight: float = 0.1
    patch_weight: float = 0.1
    ling_weight: float = 0.5
    pdd_weight: float = 1.0
    kl: Literal["teacher_student", "student_teacher"] = "teacher_student"
    gram_chunk: int = 1024
    gram_method: GramMethod = "auto"
    pdd_mode: Literal["paper", "dkd"] = field(default="paper", metadata={"flag": "--pdd-mode",
                                                                          "help": "PDD form, paper or dkd."})
    pdd_alpha: float = 0.5
    pdd_beta: float = 0.5
    pdd_temperature: float = 1.0
    pdd_nckd: float = 0.0
    pdd_kl: Literal["reverse", "forward"] = "reverse"
    add_ce: bool = field(default=False, metadata={"flag": "--c2vkd-add-ce",
                                                  "help": "add the student's CE (the published objective has none)."})
    ce_weight: float = 1.0
    pool_weights: str | None = field(default=None, metadata={
        "flag": "--c2vkd-pool-weights", "help": "attention-pool weights (CLIP RN101 visual.attnpool.* or plain keys); "
        "default: seeded frozen random pool."})
    pool_seed: int = 0
    pool_heads: int = 32
    ling_dim: int = 512
    ling_student: Literal["head", "pool"] = "head"
    align: Literal["label", "student"] = "label"

    def check(self) -> None:
        check_positive(self, "global_weight", "patch_weight", "ling_weight", "pdd_weight", "pdd_alpha", "pdd_beta",
                       "pdd_nckd", "ce_weight")
        check_temperature(self, "pdd_temperature")
        for name in ("gram_chunk", "pool_heads", "ling_dim"):
            if getattr(self, name) < 1:
                raise SegkdError(f"option {name} must be >= 1, got {getattr(self, name)}")
        if self.pool_weights is not None and not Path(self.pool_weights).is_file():
            raise SegkdError(f"--c2vkd-pool-weights {self.pool_weights}: file not found")


class C2VKD(Method):
    def __init__(self, opts: C2VKDOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> None:
        super().__init__(opts, ignore_index)
        self.s_tap, self.t_tap = resolve_tap(student, "deep"), "layer4"
        cs, ct = student.feature_spec(self.s_tap).channels, teacher.feature_spec(self.t_tap).channels
        self.vis_head = nn.Conv2d(cs, ct, 1, bias=False)
        self.pool: AttentionPool2d | None = None
        self.pool_source = "none"
        # which float32 parts of the low-rank patch term the last step recomputed in float64 (see _LowRankGramMSE)
        self.patch_float64: dict[str, bool] = {}
        if opts.vlfd_ling:
            if opts.pool_weights:
                self.pool, self.pool_source = load_pool(opts.pool_weights, ct, opts.pool_heads)
            else:
                self.pool = random_pool(ct, opts.ling_dim, opts.pool_heads, seed=opts.pool_seed)
                self.pool_source = f"random (seed {opts.pool_seed}, frozen; no --c2vkd-pool-weights)"
            self.pool.requires_grad_(False).eval()
            if opts.ling_student == "head":
                out_dim = self.pool.c_proj.out_features
                self.ling_head = nn.Conv2d(cs, out_dim, 1, bias=False)

    def train(self, mode: bool = True) -> C2VKD:
        super().train(mode)
        if self.pool is not None:
            self.pool.eval()
        return self

    def report(self) -> dict[str, Any]:
        """Which pool the linguistic term used (a CLIP checkpoint, or a random frozen one): distill.json says it."""
        return {"pool_source": self.pool_source}

    def forward(self, images: Tensor, labels: Tensor, outs: dict[str, SegOutput],
                kd_labels: Tensor | None = None) -> dict[str, Tensor]:
        o = self.opts
        s_out, t_out = outs["student"], outs["teacher"]
        zs, zt, lab = align_logits(s_out.logits, t_out.logits, distill_labels(labels, kd_labels), o.align)
        terms: dict[str, tuple[float, Tensor]] = {}
        if o.add_ce:
            terms["ce"] = (o.ce_weight, seg_cross_entropy(s_out.logits, labels, self.ignore_index))
        terms["pdd"] = (o.pdd_weight, pdd_loss(zs, zt.detach(), lab, o.pdd_mode, o.pdd_alpha, o.pdd_beta,
                                               o.pdd_temperature, o.pdd_nckd, o.pdd_kl, self.ignore_index))
        s4 = s_out.tap(self.s_tap)
        ft = t_out.tap(self.t_tap).detach()
        b, c, h, w = ft.shape
        # Everything runs on position rows (channels contiguous: the channel softmax and the relation rows read
        # them so). F^S = resize(head(s4)): the head on the student's own grid, the resize in channels-last.
        # The patch term reads the head's input resized instead, U = resize(s4) (N x r): F^S = U W^T exactly, as
        # the head is a bias-free 1x1 conv and the bilinear resize is linear per channel.
        small = feature_rows(s4)
        weight = self.vis_head.weight.reshape(c, -1)
        rows_t = feature_rows(ft)  # N x C
        patch = pick_patch_method(b * h * w, c, small.shape[1]) if o.gram_method == "auto" else o.gram_method
        fs = None
        if o.vlfd_global or (o.vlfd_patch and patch != "lowrank") or (o.vlfd_ling and o.ling_student == "pool"):
            fs = resize_rows(small @ weight.T, s4.shape, (h, w))  # N x C rows of F^S
        if o.vlfd_global:
            terms["vlfd_global"] = (o.global_weight, vlfd_global_loss(fs, rows_t, o.kl))
        if o.vlfd_patch:
            if patch == "lowrank":
                with torch.autocast(s4.device.type, enabled=False):  # U in float64 from the start (N x r: cheap)
                    u = resize_rows(small.double(), s4.shape, (h, w))
                loss = vlfd_patch_loss_factored(u, weight, rows_t, o.gram_chunk, "lowrank", self.patch_float64)
            else:
                loss = vlfd_patch_loss(fs.reshape(b, h, w, c).permute(0, 3, 1, 2), ft, o.gram_chunk, patch)
            terms["vlfd_patch"] = (o.patch_weight, loss)
        if o.vlfd_ling and self.pool is not None:
            with torch.no_grad():
                lt = self.pool(ft.float())
            if o.ling_student == "head":
                ls = self.ling_head(F.adaptive_avg_pool2d(s4, 1)).flatten(1)
            else:
                ls = self.pool(fs.float().reshape(b, h, w, c).permute(0, 3, 1, 2))
            terms["vlfd_ling"] = (o.ling_weight, vlfd_ling_loss(ls, lt))
        return self.record(terms, student=zs, teacher=zt)


def _idle(o: C2VKDOptions) -> bool:
    """Whether a step leaves a parameter out of the graph: the student's head when neither PDD nor CE is weighted,
    the visual head when no VLFD term that reads it is, the linguistic head when its term is weighted 0."""
    head = o.pdd_weight > 0 or (o.add_ce and o.ce_weight > 0)
    ling = o.vlfd_ling and o.ling_weight > 0
    vis = (o.vlfd_global and o.global_weight > 0) or (o.vlfd_patch and o.patch_weight > 0) or (
        ling and o.ling_student == "pool")
    return not head or not vis or (o.vlfd_ling and o.ling_student == "head" and o.ling_weight == 0)


@register_method("c2vkd", "CNN -> ViT: VLFD (global, patch-relation, linguistic) + PDD; no CE by default",
                 C2VKDOptions, student_family="transformer", other_family="cnn",
                 taps={"student": ("deep",), "teacher": ("layer4",)}, unused_params=lambda o, b: _idle(o))
def _build(opts: C2VKDOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> C2VKD:
    return C2VKD(opts, student, teacher, ignore_index)

