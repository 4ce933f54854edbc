"""C2VKD's exact fast forms (issue 21 item 6) against their references: the low-rank patch term against the float64
N x N Gram (random rows, and a student whose Gram is within ~1e-6 of the teacher's, where a float32 three-term
sum fails), the whole forward against the forward as it was (benchmarks/c2vkd_floor.py keeps it), PDD on maps
against its row form, the row KL against the plain formula, and the degenerate inputs."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.c2vkd_floor import BEFORE
from benchmarks.dkd_loss_cost import swapped
from segkd.errors import SegkdError
from segkd.methods import METHODS, make_options
from segkd.methods import c2vkd as c2vkd_module
from segkd.methods.base import resize_to
from segkd.methods.c2vkd import (
    feature_rows,
    gram_mse,
    pdd_paper_maps,
    pdd_paper_rows,
    pick_patch_method,
    relation_rows,
    resize_rows,
    vlfd_global_loss,
    vlfd_patch_loss,
    vlfd_patch_loss_factored,
)
from segkd.models import create_model


def reference(s4: Tensor, weight: Tensor, ft: Tensor) -> tuple[float, Tensor, Tensor]:
    """The patch loss of ``resize(conv1x1(s4))`` against ``ft`` all in float64 through the full N x N Grams, and
    its gradients w.r.t. the stage-4 map and the head weight (autograd)."""
    s64 = s4.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    fs = resize_to(F.conv2d(s64, w64), ft.shape[-2:])
    loss = gram_mse(relation_rows(fs), relation_rows(ft.double()), "chunked", chunk=None)
    gs, gw = torch.autograd.grad(loss, (s64, w64))
    return loss.item(), gs, gw


RECORD: dict[str, bool] = {}  # which float32 parts the last lowrank() call recomputed in float64


def lowrank(s4: Tensor, weight: Tensor, ft: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The patch loss as ``C2VKD.forward`` computes it (``lowrank``), and its gradients."""
    s = s4.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    u = resize_rows(feature_rows(s).double(), s.shape, ft.shape[-2:])
    RECORD.clear()
    loss = vlfd_patch_loss_factored(u, w, feature_rows(ft), method="lowrank", record=RECORD)
    gs, gw = torch.autograd.grad(loss, (s, w))
    return loss, gs, gw


def rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gram_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtypes the low-rank path computes the teacher's residual Gram in, call by call."""
    seen: list[torch.dtype] = []
    inner = c2vkd_module._gram_sq_norm

    def spy(x: Tensor, blocks: int = 4, with_diag: bool = False) -> Any:
        seen.append(x.dtype)
        return inner(x, blocks, with_diag)

    monkeypatch.setattr(c2vkd_module, "_gram_sq_norm", spy)
    return seen


@pytest.mark.parametrize("c", [48, 160], ids=["N>C", "N<C"])  # N = 2 * 6 * 8 = 96 rows
def test_lowrank_patch_matches_the_float64_gram_on_random_features(c: int, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(c)
    s4 = torch.randn(2, 8, 3, 4, generator=g)
    weight = torch.randn(c, 8, 1, 1, generator=g)
    ft = torch.relu(torch.randn(2, c, 6, 8, generator=g))
    value, gs_ref, gw_ref = reference(s4, weight, ft)
    seen = gram_dtypes(monkeypatch)
    loss, gs, gw = lowrank(s4, weight, ft)
    assert seen == [torch.float32]  # far from the teacher: the float32 residual Gram is kept
    assert RECORD["residual_gram"] is False  # (A^T R may go to float64: at N = 96 its error estimate is loose)
    assert loss.dtype == torch.float32 and gs.dtype == gw.dtype == torch.float32
    assert abs(loss.item() - value) <= 1e-6 * value
    assert rel(gs, gs_ref) <= 1e-6 and rel(gw, gw_ref) <= 1e-6
    # the old dense path on the same inputs agrees too (what the forward ran before)
    old = vlfd_patch_loss(resize_to(F.conv2d(s4, weight), ft.shape[-2:]), ft)
    assert abs(old.item() - value) <= 1e-5 * value


def test_lowrank_patch_is_exact_when_the_student_gram_nearly_equals_the_teacher_gram(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The teacher is the student's own map with its channels permuted (the relation Gram ignores that, though the
    # teacher's rows lie far from the student's subspace) plus 1e-4 noise: L / ||Xt^T Xt||^2 ~ 4e-10. The three
    # terms of ||Xs^T Xs||^2 - 2 ||Xs^T Xt||^2 + ||Xt^T Xt||^2 then cancel to ~1e-10 of their size, so float32
    # products cannot give them: the low-rank path's guard must send the teacher's residual Gram to float64.
    g = torch.Generator().manual_seed(7)
    c = 64
    s4 = torch.randn(2, 6, 6, 8, generator=g)
    weight = torch.randn(c, 6, 1, 1, generator=g)
    perm = torch.randperm(c, generator=g)
    ft = (F.conv2d(s4.double(), weight.double())[:, perm] + 1e-4 * torch.randn(2, c, 6, 8, generator=g,
                                                                                dtype=torch.float64)).float()
    value, gs_ref, gw_ref = reference(s4, weight, ft)
    xt = relation_rows(ft.double())
    teacher_term = (xt.T @ xt).pow(2).sum().item() / (xt.shape[0] ** 2 * (c - 1) ** 2)
    assert value / teacher_term < 1e-6  # the hard regime
    seen = gram_dtypes(monkeypatch)
    loss, gs, gw = lowrank(s4, weight, ft)
    assert seen == [torch.float32, torch.float64]  # the guard saw the float32 Gram could not do: float64 again
    assert RECORD == {"K": True, "residual_gram": True}
    assert abs(loss.item() - value) <= 1e-5 * value
    assert rel(gs, gs_ref) <= 1e-5 and rel(gw, gw_ref) <= 1e-5
    assert abs(naive_fp32(s4, weight, ft) - value) > 1e-2 * value  # the textbook sum in float32


def test_lowrank_guard_measures_the_float32_gram_error_on_rows_of_equal_magnitude() -> None:
    # Residual rows of +-1 (half the channels each way, every row mirrored so the mean is 0): every product in the
    # Gram's sums has the same magnitude, the float32 rounding errors add up instead of cancelling, and the float32
    # ||R^T R||^2 is off by ~1e-5 of itself, more than any fixed constant allowed. The guard estimates the error from
    # the float32 Gram's own diagonal, so it sends that Gram to float64 and the value stays exact.
    g = torch.Generator().manual_seed(0)
    n, c, r = 8192, 162, 78
    half = torch.stack([torch.randperm(c, generator=g) < c // 2 for _ in range(n // 2)]).double() * 2 - 1
    ft = torch.cat([half, -half])
    basis = torch.linalg.qr(torch.randn(c, r, generator=g, dtype=torch.float64))[0]
    u, weight = (ft @ basis).float(), basis.float()
    assert pick_patch_method(n, c, r) == "lowrank"
    rows = relation_rows(ft, rows=True)
    gram64 = (rows.T @ rows).pow(2).sum().item()
    gram32 = c2vkd_module._gram_sq_norm(rows.float()).item()
    assert abs(gram32 - gram64) > 2e-6 * gram64  # the float32 Gram alone
    record: dict[str, bool] = {}
    loss = vlfd_patch_loss_factored(u.double(), weight, ft.float(), method="lowrank", record=record)
    exact = gram_mse(relation_rows(u.double() @ weight.double().T, rows=True), rows, "channels").item()
    assert record["residual_gram"] is True
    assert abs(loss.item() - exact) <= 1e-6 * exact


def naive_fp32(s4: Tensor, weight: Tensor, ft: Tensor) -> float:
    """The textbook ``||Xs^T Xs||^2 - 2 ||Xs^T Xt||^2 + ||Xt^T Xt||^2`` with float32 products (scaled)."""
    xs, xt = relation_rows(F.conv2d(s4.double(), weight.double())).float(), relation_rows(ft.double()).float()
    n, c = xt.shape
    return ((xs.T @ xs).pow(2).sum() - 2 * (xs.T @ xt).pow(2).sum() + (xt.T @ xt).pow(2).sum()).item() / (
        n * n * (c - 1) ** 2)


@pytest.mark.parametrize("spread", [0.03, 0.01])
def test_lowrank_patch_is_exact_where_the_rows_share_their_mean(spread: float,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Student and teacher rows share one large common direction (relation rows of real features do: on a
    # ResNet-50's layer4, the residual after the mean held 1e-4 of ||Xt^T Xt||^2), their residuals are unrelated:
    # L / ||Xt^T Xt||^2 is 4e-6 (7e-8) and the float32 three-term sum is off by > 1e-3 (by ~200 %). Split at the
    # mean, only the residual's Gram is left to float32, whose guard keeps it or not by its error estimate (at
    # N = 96 rows the diagonal check measures a float32 error of a few 1e-7); either way the value is exact.
    g = torch.Generator().manual_seed(1)
    common = torch.randn(1, 8, 1, 1, generator=g)
    s4 = common + spread * torch.randn(2, 8, 6, 8, generator=g)
    weight = torch.randn(96, 8, 1, 1, generator=g)
    ft = F.conv2d(common + spread * torch.randn(2, 8, 6, 8, generator=g), weight)
    value, gs_ref, gw_ref = reference(s4, weight, ft)
    xt = relation_rows(ft.double())
    assert value / ((xt.T @ xt).pow(2).sum().item() / (96 * 96 * 95**2)) < 1e-5
    assert abs(naive_fp32(s4, weight, ft) - value) > 1e-3 * value
    seen = gram_dtypes(monkeypatch)
    loss, gs, gw = lowrank(s4, weight, ft)
    assert seen[0] == torch.float32 and seen[1:] == [torch.float64] * RECORD["residual_gram"]
    assert abs(loss.item() - value) <= 1e-6 * value and rel(gs, gs_ref) <= 1e-6 and rel(gw, gw_ref) <= 1e-6


def test_lowrank_patch_degenerate_rows_and_channels() -> None:
    g = torch.Generator().manual_seed(3)
    s4 = torch.randn(1, 4, 4, 4, generator=g)
    s4[..., 0, :] = 0.0  # rows whose head output is 0: the norm is clamped as relation_rows clamps it
    weight = torch.randn(16, 4, 1, 1, generator=g)
    ft = torch.randn(1, 16, 4, 4, generator=g)
    value, gs_ref, gw_ref = reference(s4, weight, ft)
    loss, gs, gw = lowrank(s4, weight, ft)
    assert abs(loss.item() - value) <= 1e-6 * value and rel(gs, gs_ref) <= 1e-6 and rel(gw, gw_ref) <= 1e-6
    with pytest.raises(SegkdError, match="the patch-relation loss needs features with at least 2 channels"):
        vlfd_patch_loss_factored(torch.randn(8, 4), torch.randn(1, 4), torch.randn(8, 1))
    with pytest.raises(SegkdError, match="the patch-relation loss needs features with at least 2 channels"):
        vlfd_patch_loss(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))  # as before
    with pytest.raises(SegkdError, match="gram method lowrank needs the student's rows as a head"):
        gram_mse(torch.randn(8, 4), torch.randn(8, 4), "lowrank")
    spec = METHODS.get("c2vkd")
    assert make_options(spec, {"gram_method": "lowrank"}).gram_method == "lowrank"
    # the dense paths take the factored rows too, whatever the dtypes (the forward passes float64 u, float32 W)
    u = resize_rows(feature_rows(s4).double(), s4.shape, ft.shape[-2:])
    for method in ("rows", "channels", "chunked"):
        dense = vlfd_patch_loss_factored(u, weight, feature_rows(ft), method=method)  # type: ignore[arg-type]
        assert abs(dense.item() - value) <= 1e-5 * value, method
    # PDD names a label outside the classes instead of reading it as the last class
    labels = torch.full((1, 4, 4), 2)
    labels[0, 0, 0] = 7
    with pytest.raises(SegkdError, match="PDD: label 7 is outside the 5 classes"):
        pdd_paper_maps(torch.randn(1, 5, 4, 4), torch.randn(1, 5, 4, 4), labels)
    labels[0, 0, 0] = 255  # the ignore index is not a class
    assert torch.isfinite(pdd_paper_maps(torch.randn(1, 5, 4, 4), torch.randn(1, 5, 4, 4), labels))


def test_lowrank_patch_stays_float64_under_autocast() -> None:
    g = torch.Generator().manual_seed(5)
    s4, weight, ft = torch.randn(2, 8, 3, 4, generator=g), torch.randn(32, 8, 1, 1, generator=g), torch.randn(
        2, 32, 6, 8, generator=g)
    plain, _, _ = lowrank(s4, weight, ft)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp, gs, gw = lowrank(s4, weight, ft)
    assert amp.dtype == torch.float32 and gs.dtype == gw.dtype == torch.float32
    assert abs(amp.item() - plain.item()) <= 1e-12 * plain.item()


def test_auto_picks_lowrank_where_it_is_cheaper() -> None:
    assert pick_patch_method(4096, 2048, 256) == "lowrank"  # the benchmark's SegFormer-B0 <- R50 layer4
    assert pick_patch_method(4096, 512, 256) == "channels"  # R18's 512 channels: the dense path stays cheaper
    assert pick_patch_method(256, 512, 256) == "rows"


FORWARD_OPTS = [
    {"gram_method": "lowrank"},
    {"gram_method": "lowrank", "align": "student", "kl": "student_teacher"},
    {"gram_method": "lowrank", "ling_student": "pool", "pdd_kl": "forward", "pdd_nckd": 0.5, "pdd_temperature": 2.0},
    {},  # auto: the dense path at this size, through the new row layout
    {"pdd_mode": "dkd", "gram_method": "channels"},
]


@pytest.mark.parametrize("opts", FORWARD_OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "auto")
def test_forward_equals_the_forward_before_the_rewrite(opts: dict[str, object]) -> None:
    torch.manual_seed(0)
    spec = METHODS.get("c2vkd")
    student = create_model("segformer-b0", num_classes=5)
    teacher = create_model("deeplabv3-resnet18", num_classes=5)  # layer4: C = 512 > the student's 256 channels
    method = spec.build(make_options(spec, {k: str(v) for k, v in opts.items()}), student, teacher, ignore_index=255)
    method.train()
    images = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 5, (2, 64, 96))
    labels[:, :5] = 255
    with torch.no_grad():
        t_out = teacher.eval()(images, taps=True)
    s_out = student.train()(images, taps=True)
    outs = {"student": s_out, "teacher": t_out}
    s4 = s_out.tap(method.s_tap)
    params = (s4, method.vis_head.weight)

    now = method(images, labels, outs)
    g_now = torch.autograd.grad(sum(now.values()), params, retain_graph=True)
    before_opts = dataclasses.replace(method.opts, gram_method="auto" if opts.get("gram_method") == "lowrank"
                                      else method.opts.gram_method)
    method.opts, kept = before_opts, method.opts
    try:
        before = swapped(lambda: method(images, labels, outs), BEFORE)()
    finally:
        method.opts = kept
    g_before = torch.autograd.grad(sum(before.values()), params)  # type: ignore[attr-defined]
    assert set(now) == set(before) and set(now.raw) == set(before.raw)  # type: ignore[arg-type, attr-defined]
    for k in now.raw:
        # the linguistic KL is ~1e-5 per element at random weights: float32 rounding of either form of the pool
        # moves it by up to ~2e-4 of itself (both measured against float64), so it gets 5e-4 here
        tol = 5e-4 if k == "vlfd_ling" else 1e-5
        assert now.raw[k].item() == pytest.approx(before.raw[k].item(), rel=tol), k  # type: ignore[attr-defined]
    assert sum(now.values()).item() == pytest.approx(sum(before.values()).item(), rel=1e-5)  # type: ignore
    for a, b in zip(g_now, g_before):
        assert rel(a, b) <= 1e-4


def test_pdd_on_maps_matches_the_row_form() -> None:
    g = torch.Generator().manual_seed(11)
    for scale, temperature, nckd, kl in [(1.0, 1.0, 0.0, "reverse"), (30.0, 1.0, 0.0, "reverse"),
                                         (5.0, 2.0, 0.5, "forward")]:
        s = (scale * torch.randn(2, 7, 10, 12, generator=g)).requires_grad_(True)
        t = scale * torch.randn(2, 7, 10, 12, generator=g)
        y = torch.randint(0, 7, (2, 10, 12), generator=g)
        y[:, :2] = 255
        a = pdd_paper_maps(s, t, y, 0.5, 0.5, temperature, nckd, kl)
        b = pdd_paper_rows(s, t, y, 0.5, 0.5, temperature, nckd, kl)
        (ga,), (gb,) = torch.autograd.grad(a, s), torch.autograd.grad(b, s)
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
        assert rel(ga, gb) <= 1e-5
    none = pdd_paper_maps(s, t, torch.full_like(y, 255))
    assert none.item() == 0.0 and none.requires_grad


def test_row_kl_equals_the_plain_channel_kl() -> None:
    g = torch.Generator().manual_seed(2)
    fs = (3 * torch.randn(40, 24, generator=g)).requires_grad_(True)
    ft = 3 * torch.randn(40, 24, generator=g)
    fused = vlfd_global_loss(fs, ft)
    log_s, log_t = F.log_softmax(fs, 1), F.log_softmax(ft, 1)
    plain = (log_t.exp() * (log_t - log_s)).mean()
    (g_fused,), (g_plain,) = torch.autograd.grad(fused, fs), torch.autograd.grad(plain, fs)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    assert rel(g_fused, g_plain) <= 1e-6
    # and the row layout gives the map's value
    maps = ft.reshape(2, 4, 5, 24).permute(0, 3, 1, 2)
    assert vlfd_global_loss(fs.detach().reshape(2, 4, 5, 24).permute(0, 3, 1, 2), maps).item() == pytest.approx(
        fused.item(), rel=1e-6)


def test_forward_under_bf16_autocast_keeps_the_patch_term_exact() -> None:
    torch.manual_seed(1)
    spec = METHODS.get("c2vkd")
    student = create_model("segformer-b0", num_classes=5)
    teacher = create_model("deeplabv3-resnet18", num_classes=5)
    method = spec.build(make_options(spec, {"gram_method": "lowrank"}), student, teacher, ignore_index=255).train()
    images, labels = torch.randn(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))
    with torch.no_grad():
        outs = {"student": student.train()(images, taps=True), "teacher": teacher.eval()(images, taps=True)}
    plain = method(images, labels, outs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = method(images, labels, outs)
    assert amp.raw["vlfd_patch"].dtype == torch.float32
    assert amp.raw["vlfd_patch"].item() == pytest.approx(plain.raw["vlfd_patch"].item(), rel=1e-9)
    assert amp.raw["vlfd_global"].item() == pytest.approx(plain.raw["vlfd_global"].item(), rel=2e-2)  # bf16 head
    sum(amp.values()).backward()
    assert method.vis_head.weight.grad is not None and method.vis_head.weight.grad.dtype == torch.float32
