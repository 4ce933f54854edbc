"""Distillation methods: every loss against hand-computed values, gradient routing, and short end-to-end runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.data import Dataset

from segkd.checkpoint import CheckpointMeta, save_checkpoint
from segkd.engine.batch import Batch
from segkd.engine.task import build_optimizer
from segkd.engine.trainer import DataBundle
from segkd.errors import SegkdError
from segkd.methods import METHODS, check_pair, make_options
from segkd.methods.base import register_method, weigh
from segkd.methods.c2vkd import (
    AttentionPool2d,
    gram_mse,
    load_pool,
    pdd_loss,
    pick_gram_method,
    random_pool,
    relation_rows,
    vlfd_global_loss,
    vlfd_ling_loss,
    vlfd_patch_loss,
)
from segkd.methods.collab import pbsd_loss, pbsd_masks, rbsd_loss, region_scores
from segkd.methods.cwd import cwd_loss
from segkd.methods.dkd import dkd_loss
from segkd.methods.kd import kd_loss
from segkd.methods.transkd import SK, hcl_loss, pea_loss
from segkd.models import create_model
from segkd.models.loading import load_teacher
from segkd.runs.distill import DistillBuilder, DistillConfig, run_distill
from tests.conftest import build_distill_task

L3 = math.log(3.0)
KL_75_50 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL([.75,.25] || [.5,.5])


def px(*values: float) -> torch.Tensor:
    """One pixel's logits as a 1 x K x 1 x 1 tensor."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------------ logit losses
def test_terms_carry_their_raw_values_and_skip_zero_weights() -> None:
    raw = torch.tensor(2.0, requires_grad=True)
    terms = weigh({"a": (0.5, raw), "b": (0.0, raw * 3)})
    assert set(terms) == {"a"} and set(terms.raw) == {"a"}  # a zero weight drops the term entirely
    assert float(terms["a"].detach()) == 1.0 and float(terms.raw["a"]) == 2.0
    assert terms["a"].requires_grad and not terms.raw["a"].requires_grad  # only the weighted value back-propagates


def test_register_method_names_a_method_once() -> None:
    assert METHODS.get("kd").name == "kd" and METHODS.get("kd").build.__name__ == "_build"
    with pytest.raises(ValueError, match="registered twice"):
        register_method("kd", "again", object)(lambda *a, **k: nn.Identity())


@pytest.mark.parametrize(("method", "option"), [("kd", "temperature"), ("dkd", "temperature"), ("dml", "temperature"),
                                                 ("collab", "temperature"), ("cwd", "feat_temperature"),
                                                 ("c2vkd", "pdd_temperature")])
def test_a_vanishing_temperature_is_refused(method: str, option: str) -> None:
    # 1e-300 was accepted and turned the loss NaN at iteration 1 (logits / T overflow); 0.01 is the floor
    for bad in ("1e-300", "0.001", "0"):
        with pytest.raises(SegkdError, match=f"option {option} must be >= 0.01"):
            make_options(METHODS.get(method), {option: bad})
    assert getattr(make_options(METHODS.get(method), {option: "0.01"}), option) == 0.01


def test_kd_by_hand() -> None:
    s, t = px(0.0, 0.0), px(L3, 0.0)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(KL_75_50, rel=1e-5)
    # T = 2: pT = softmax([ln3/2, 0]) = [sqrt3, 1] / (sqrt3 + 1); times T^2
    r3 = math.sqrt(3)
    pt = [r3 / (r3 + 1), 1 / (r3 + 1)]
    expected = 4 * sum(p * math.log(p / 0.5) for p in pt)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-5)
    # two pixels, the second identical in both: batchmean over pixels halves the value; masking it restores it
    s2 = torch.cat([s, px(1.0, 2.0)], dim=3)
    t2 = torch.cat([t, px(1.0, 2.0)], dim=3)
    assert kd_loss(s2, t2).item() == pytest.approx(KL_75_50 / 2, rel=1e-5)
    mask = torch.tensor([[[True, False]]])
    assert kd_loss(s2, t2, mask=mask).item() == pytest.approx(KL_75_50, rel=1e-5)


def test_cwd_by_hand() -> None:
    # one channel over two positions: teacher spatial softmax at T=4 is [.75, .25]; T^2/(B*C) with C=2, channel
    # two identical in both
    s = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    t = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    t[0, 0, 0, 0] = 4 * L3
    s[0, 1] = torch.tensor([1.0, -1.0])
    t[0, 1] = torch.tensor([1.0, -1.0])
    assert cwd_loss(s, t, 4.0).item() == pytest.approx(16 * KL_75_50 / 2, rel=1e-5)


def test_dkd_by_hand() -> None:
    s = torch.cat([px(0.0, 0.0, 0.0), px(5.0, 0.0, 1.0)], dim=3)
    t = torch.cat([px(math.log(2), math.log(2), 0.0), px(0.0, 3.0, 0.0)], dim=3)
    labels = torch.tensor([[[0, 255]]])  # the second pixel is void and must not count
    # pT = [.4, .4, .2], pS = 1/3 each: b^T = [.4, .6], b^S = [1/3, 2/3]; non-target: [2/3, 1/3] vs [.5, .5]
    tckd = 0.4 * math.log(0.4 / (1 / 3)) + 0.6 * math.log(0.6 / (2 / 3))
    nckd = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    got = dkd_loss(s, t, labels, alpha=1.0, beta=8.0, temperature=1.0)
    assert got.item() == pytest.approx(tckd + 8 * nckd, rel=1e-5)
    assert dkd_loss(s, t, torch.full_like(labels, 255)).item() == 0.0


def test_dkd_on_maps_equals_the_row_form() -> None:
    """dkd_loss runs on the B x K x H x W maps; the per-row form over the labelled pixels (valid_pixels +
    dkd_rows, what it computed before) gives the same value and gradient within float32 rounding."""
    from segkd.methods.dkd import dkd_rows, valid_pixels

    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 11, 18, 24, generator=g, requires_grad=True)
    zt = 3 * torch.randn(2, 11, 18, 24, generator=g)
    labels = torch.randint(0, 11, (2, 18, 24), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.2] = 255
    new = dkd_loss(zs, zt, labels, 1.0, 8.0, 4.0)
    (g_new,) = torch.autograd.grad(new, zs)
    s, t, y = valid_pixels(zs, zt, labels, 255)
    tckd, nckd = dkd_rows(s, t, y, 1.0, 8.0, 4.0)
    ref = (tckd + 8.0 * nckd).mean()
    (g_ref,) = torch.autograd.grad(ref, zs)
    assert float(new.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert float((g_new - g_ref).abs().max()) <= 1e-6 * float(g_ref.abs().max())
    assert float(g_new[0][:, labels[0] == 255].abs().max()) == 0.0  # void pixels get no gradient


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_dkd_maps_equal_dkd_terms_in_float64(scale: float) -> None:
    """The log-sum-exp form (dkd_maps, what dkd_loss runs) against the two-softmax form (dkd_terms) evaluated in
    float64: per-pixel values and the student gradient, at ordinary logits and at +-300 (where the teacher's
    non-target mass underflows EPS and both forms clamp it)."""
    from segkd.methods.dkd import dkd_maps, dkd_terms

    g = torch.Generator().manual_seed(3)
    zs = scale * torch.randn(2, 11, 9, 12, generator=g)
    zt = 3 * scale * torch.randn(2, 11, 9, 12, generator=g)
    y = torch.randint(0, 11, (2, 9, 12), generator=g)
    zt[0, :, 0, 0] = -scale
    zt[0, y[0, 0, 0], 0, 0] = 300.0  # b^T non-target ~ exp(-75): clamped at EPS
    s64 = zs.double().requires_grad_(True)
    tc64, nc64 = dkd_terms(s64, zt.double(), F.one_hot(y, 11).permute(0, 3, 1, 2), 4.0)
    (g64,) = torch.autograd.grad((tc64 + 8 * nc64).sum(), s64)
    s32 = zs.clone().requires_grad_(True)
    tc, nc = dkd_maps(s32, zt, y, 4.0)
    (g32,) = torch.autograd.grad((tc + 8 * nc).sum(), s32)
    for got, ref in ((tc, tc64), (nc, nc64)):
        assert float((got.detach().double() - ref.detach()).abs().max()) <= 1e-5 * float(ref.detach().abs().max())
    assert float((g32.double() - g64).abs().max()) <= (2e-5 if scale > 1 else 1e-6) * float(g64.abs().max())


def test_without_target_puts_the_target_80_below_the_others_max_and_passes_it_no_gradient() -> None:
    from segkd.methods.dkd import without_target

    z = torch.tensor([[[[1.0]], [[5.0]], [[-3.0]]], [[[2.0]], [[0.5]], [[9.0]]]], requires_grad=True)  # 2 x 3 x 1 x 1
    idx = torch.tensor([1, 2]).view(2, 1, 1, 1)  # target 1 (5.0; others' max 1.0), target 2 (9.0; others' max 2.0)
    out = without_target(z, idx)
    assert out.detach().flatten().tolist() == [1.0, -79.0, -3.0, 2.0, 0.5, -78.0]
    torch.logsumexp(out, 1).sum().backward()
    assert z.grad is not None and float(z.grad[0, 1]) == 0.0 and float(z.grad[1, 2]) == 0.0
    # the others' softmax: the target's share (exp(-80) of the max) is lost in float32
    assert z.grad[0, 0, 0, 0] == pytest.approx(1 / (1 + math.exp(-4.0)), rel=1e-6)
    # one class: no others to take the max of; DKD's terms are 0 up to float32 rounding at the push's 1000, finite
    one = torch.randn(2, 1, 3, 4, requires_grad=True)
    loss = dkd_loss(one, torch.randn(2, 1, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long))
    loss.backward()
    assert abs(float(loss.detach())) < 1e-2 and one.grad is not None and bool(torch.isfinite(one.grad).all())


@pytest.mark.parametrize(("method", "opts"), [("kd", {}), ("kd", {"temperature": "2"}), ("dkd", {}), ("cwd", {})])
def test_ce_reads_the_aligned_logits_with_the_same_value(method: str, opts: dict) -> None:
    """The CE term reuses the student logits align_logits upsampled to the label size (and KD at T = 1 their
    log-probabilities too): the same values as CE and KD computed apart on the student's own logits, and the same
    gradient within float32 rounding (one upsampling backward instead of two; one log_softmax)."""
    from segkd.engine.losses import seg_cross_entropy
    from segkd.methods.base import resize_to
    from segkd.models import SegOutput

    spec = METHODS.get(method)
    m = spec.build(make_options(spec, opts), None, None, ignore_index=255)
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 5, 6, 8, generator=g, requires_grad=True)
    zt, labels = torch.randn(2, 5, 24, 32, generator=g), torch.randint(0, 5, (2, 24, 32), generator=g)
    labels[0, :3] = 255
    terms = m(None, labels, {"student": SegOutput(zs), "teacher": SegOutput(zt)})
    assert torch.equal(terms.raw["ce"], seg_cross_entropy(zs, labels, 255).detach())
    if method == "kd":
        t = float(opts.get("temperature", 1))
        assert torch.equal(terms.raw["kd"], kd_loss(resize_to(zs, labels.shape[-2:]), zt, t).detach())
    (got,) = torch.autograd.grad(sum(terms.values()), zs, retain_graph=True)
    separate = seg_cross_entropy(zs, labels, 255) + sum(v for k, v in terms.items() if k != "ce")
    if method == "kd":
        separate = seg_cross_entropy(zs, labels, 255) + kd_loss(resize_to(zs, labels.shape[-2:]), zt, t)
    (ref,) = torch.autograd.grad(separate, zs)
    assert float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max())


def test_seg_cross_entropy_is_torchs_and_zero_without_labels() -> None:
    """log_softmax + nll_loss, spelt out, is F.cross_entropy bit for bit; no labelled pixel gives 0 with a gradient."""
    from segkd.engine.losses import seg_cross_entropy

    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 7, 12, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (2, 12, 16), generator=g)
    y[1, 4:] = 255
    assert torch.equal(seg_cross_entropy(z, y, 255), F.cross_entropy(z, y, ignore_index=255))
    none = seg_cross_entropy(z, torch.full_like(y, 255), 255)
    none.backward()
    assert float(none.detach()) == 0.0 and z.grad is not None and float(z.grad.abs().sum()) == 0.0


def test_pdd_both_modes_by_hand() -> None:
    s = torch.cat([px(0.0, 0.0, 0.0), px(9.0, 0.0, 0.0)], dim=3)
    t = torch.cat([px(math.log(2), math.log(2), 0.0), px(0.0, 0.0, 9.0)], dim=3)
    labels = torch.tensor([[[0, 255]]])
    bs, bt = (1 / 3, 2 / 3), (0.4, 0.6)
    q = ((bt[0] + 1) / 2, bt[1] / 2)  # already normalised
    paper = 0.5 * bs[0] * math.log(bs[0] / q[0]) + 0.5 * bs[1] * math.log(bs[1] / q[1])
    assert pdd_loss(s, t, labels, "paper").item() == pytest.approx(paper, rel=1e-5)
    forward = 0.5 * q[0] * math.log(q[0] / bs[0]) + 0.5 * q[1] * math.log(q[1] / bs[1])
    assert pdd_loss(s, t, labels, "paper", kl="forward").item() == pytest.approx(forward, rel=1e-5)
    tckd = bt[0] * math.log(bt[0] / bs[0]) + bt[1] * math.log(bt[1] / bs[1])
    nckd = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    assert pdd_loss(s, t, labels, "dkd").item() == pytest.approx(0.5 * tckd + 0.5 * nckd, rel=1e-5)
    assert pdd_loss(s, t, labels, "paper", nckd=2.0).item() == pytest.approx(paper + 2 * nckd, rel=1e-5)


def test_pdd_gradient_vanishes_when_student_is_confidently_wrong() -> None:
    """papers-extra §2.2: reverse-KL PDD gives a tiny push when p_y -> 0, far below CE's; the forward variant
    does not vanish."""
    z = px(-6.0, 0.0, 0.0).float().requires_grad_(True)
    t, y = px(2.0, 0.0, 0.0).float(), torch.tensor([[[0]]])
    pdd_loss(z, t, y, "paper").backward()
    g_pdd = z.grad[0, 0].abs().item()
    z.grad = None
    F.cross_entropy(z, y).backward()
    g_ce = z.grad[0, 0].abs().item()
    z.grad = None
    pdd_loss(z, t, y, "paper", kl="forward").backward()
    assert g_pdd < 0.05 * g_ce and z.grad[0, 0].abs().item() > 0.2


# ------------------------------------------------------------------------------------------------- VLFD terms
def test_vlfd_global_and_ling_by_hand() -> None:
    fs, ft = px(0.0, 0.0), px(L3, 0.0)
    # channel softmax, KLDivLoss 'mean' = divided by all B*C*H*W = 2 elements
    assert vlfd_global_loss(fs, ft).item() == pytest.approx(KL_75_50 / 2, rel=1e-5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert vlfd_global_loss(fs, ft, "student_teacher").item() == pytest.approx(rev / 2, rel=1e-5)
    assert vlfd_ling_loss(fs.flatten(1), ft.flatten(1)).item() == pytest.approx(KL_75_50 / 2, rel=1e-5)


def test_vlfd_patch_by_hand_and_chunked_equals_unchunked() -> None:
    # student tokens [1,0], [0,1] -> centred [.5,-.5], [-.5,.5]; teacher [1,0], [1,0]; C - 1 = 1
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    ft = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)
    gs = torch.tensor([[0.5, -0.5], [-0.5, 0.5]])
    gt = torch.full((2, 2), 0.5)
    assert ((gs - gt) ** 2).mean().item() == 0.5
    assert vlfd_patch_loss(fs, ft, chunk=None).item() == pytest.approx(0.5)
    assert vlfd_patch_loss(fs, ft, chunk=1).item() == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64)
    ref = vlfd_patch_loss(a, b, chunk=None)
    (ga,) = torch.autograd.grad(ref, a)
    for chunk in (1, 7, 30, 1000):
        val = vlfd_patch_loss(a, b, chunk=chunk, method="chunked")
        (gc,) = torch.autograd.grad(val, a)
        assert val.item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(gc, ga, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n, c", [(300, 64), (96, 512)])  # rows > channels and rows < channels
@pytest.mark.parametrize("near", [False, True], ids=["random", "student~teacher"])
def test_gram_identity_paths_match_the_fp64_reference(n: int, c: int, near: bool) -> None:
    # The parity: value and gradient within 1e-6 relative, in fp32, on both sides of N = C. With
    # Xs ~ Xt (1e-3 apart) the textbook identity's three terms nearly cancel; the D/P form must not care. The
    # reference is the unchunked N x N Gram in float64 on the very same fp32 rows.
    g = torch.Generator().manual_seed(n + c)
    fs = torch.randn(1, c, 1, n, generator=g)
    ft = fs + 1e-3 * torch.randn(1, c, 1, n, generator=g) if near else torch.randn(1, c, 1, n, generator=g)
    xs, xt = relation_rows(fs), relation_rows(ft)
    x64 = xs.double().requires_grad_(True)
    ref = gram_mse(x64, xt.double(), "chunked", chunk=None)
    (g_ref,) = torch.autograd.grad(ref, x64)
    for method in ("rows", "channels", "auto"):
        x = xs.clone().requires_grad_(True)
        val = gram_mse(x, xt, method)
        (grad,) = torch.autograd.grad(val, x)
        assert val.dtype == torch.float32
        assert abs(val.item() - ref.item()) <= 1e-6 * ref.item(), method
        assert ((grad.double() - g_ref).norm() / g_ref.norm()).item() <= 1e-6, method
    chunked = gram_mse(xs, xt, "chunked", chunk=64).item()  # today's version: also within 1e-6 off the near case
    if not near:
        assert abs(chunked - ref.item()) <= 1e-6 * ref.item()


def test_gram_paths_in_fp64_agree_and_auto_picks_the_cheaper_side() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = vlfd_patch_loss(a, b, chunk=None)
    (ga,) = torch.autograd.grad(ref, a)
    xs, xt = relation_rows(a), relation_rows(b)
    for method in ("rows", "channels"):
        s, t = xs.detach().requires_grad_(True), xt.detach().requires_grad_(True)
        val = gram_mse(s, t, method)
        gs, gt = torch.autograd.grad(val, (s, t))
        rs, rt = xs.detach().requires_grad_(True), xt.detach().requires_grad_(True)
        gs_ref, gt_ref = torch.autograd.grad(gram_mse(rs, rt, "chunked", chunk=None), (rs, rt))
        assert val.item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(gs, gs_ref, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(gt, gt_ref, rtol=1e-10, atol=1e-14)  # the teacher side too, if it had grad
        (g_full,) = torch.autograd.grad(vlfd_patch_loss(a, b, method=method), a)
        torch.testing.assert_close(g_full, ga, rtol=1e-10, atol=1e-14)
    # rows cost 2 N^2 C, channels 5 N C^2; rows also needs its N x N matrix to fit
    assert pick_gram_method(4096, 2048) == "rows" and pick_gram_method(4096, 256) == "channels"
    assert pick_gram_method(21600, 2048) == "channels"
    with pytest.raises(SegkdError, match="gram method must be"):
        gram_mse(xs, xt, "gram")  # type: ignore[arg-type]


def test_attention_pool_matches_reference_and_loads_clip_keys(tmp_path: Path) -> None:
    pool = random_pool(64, out_dim=16, heads=8, spacial_dim=4, seed=3)
    again = random_pool(64, out_dim=16, heads=8, spacial_dim=4, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(pool.parameters(), again.parameters(), strict=True))
    x = torch.randn(2, 64, 4, 4)
    # reference: CLIP's formulation through torch's multi-head attention with separate projection weights
    tok = x.flatten(2).permute(2, 0, 1)
    tok = torch.cat([tok.mean(0, keepdim=True), tok]) + pool.positional_embedding[:, None]
    ref, _ = F.multi_head_attention_forward(
        tok[:1], tok, tok, 64, 8, None, torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None,
        None, False, 0.0, pool.c_proj.weight, pool.c_proj.bias, use_separate_proj_weight=True,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        need_weights=False)
    torch.testing.assert_close(pool(x), ref[0], rtol=1e-5, atol=1e-5)
    # a CLIP-style state dict loads; the positional embedding is interpolated to other grids
    torch.save({f"visual.attnpool.{k}": v for k, v in pool.state_dict().items()} | {"visual.conv1.weight":
                                                                                     torch.zeros(1)},
               tmp_path / "clip.pt")
    loaded, source = load_pool(tmp_path / "clip.pt", 64, heads=8)
    torch.testing.assert_close(loaded(x), pool(x))
    assert "sha256:" in source and loaded(torch.randn(1, 64, 6, 3)).shape == (1, 16)
    with pytest.raises(SegkdError, match="the pool takes 64 channels but the teacher's layer4 has 512"):
        load_pool(tmp_path / "clip.pt", 512)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(SegkdError, match="no attention-pool weights"):
        load_pool(tmp_path / "bad.pt", 64)
    assert isinstance(loaded, AttentionPool2d)


# --------------------------------------------------------------------------------------------- TransKD losses
def test_hcl_and_pea_by_hand() -> None:
    fs = [torch.zeros(1, 1, 2, 2)]
    ft = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)]
    # h = 2: levels 4 and 2 are skipped, level 1 gets weight 1/2: (7.5 + 0.5 * 2.5^2) / 1.5
    assert hcl_loss(fs, ft).item() == pytest.approx((7.5 + 0.5 * 6.25) / 1.5)
    big = [torch.zeros(1, 1, 8, 8)]
    tb = [torch.ones(1, 1, 8, 8)]
    # h = 8: levels 4, 2, 1 with 1/2, 1/4, 1/8; every MSE is 1 -> (1 + .5 + .25 + .125) / 1.875 = 1
    assert hcl_loss(big + fs, tb + ft).item() == pytest.approx(1.0 + (7.5 + 3.125) / 1.5)
    et = [torch.ones(1, 4, 3), torch.ones(1, 4, 3), torch.ones(1, 4, 3), 2 * torch.ones(1, 4, 3)]
    es = [torch.zeros(1, 4, 3), None, None, torch.zeros(1, 4, 3)]
    assert pea_loss(es, et, (0.1, 0.1, 0.5, 1.0)).item() == pytest.approx(0.1 * 1 + 1.0 * 4)


def test_sk_batch_one_skips_batchnorm() -> None:
    sk = SK(64).train()
    u, r = torch.randn(1, 64, 4, 4), torch.randn(1, 64, 4, 4)
    out = sk(u, r)  # BN over one value per channel would raise in training mode
    assert out.shape == u.shape
    assert sk(torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4)).shape == (2, 64, 4, 4)


# --------------------------------------------------------------------------------------------- collab (BSD)
def _two_students() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1 x 2 classes x 1 x 5 pixels. Labels 0,0,1,0,void. a right / b wrong; b right / a wrong; both wrong;
    both right (a more confident); void."""
    za = torch.tensor([[3.0, 0.0, 2.0, 4.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]]).reshape(1, 2, 1, 5)
    zb = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [2.0, -1.0, 0.0, 0.0, 3.0]]).reshape(1, 2, 1, 5)
    labels = torch.tensor([[[0, 0, 1, 0, 255]]])
    return za, zb, labels


def test_pixel_bsd_direction() -> None:
    za, zb, labels = _two_students()
    a_t, b_t, valid = pbsd_masks(za, zb, labels, 255)
    assert a_t[0, 0].tolist() == [True, False, False, True, False]
    assert b_t[0, 0].tolist() == [False, True, False, False, False]
    a_t, b_t, _ = pbsd_masks(za, zb, labels, 255, ties="none")
    assert a_t[0, 0].tolist() == [True, False, False, False, False]
    za, zb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    loss = pbsd_loss(za, zb, labels)
    loss.backward()
    # a learns only where b teaches (pixel 1), b only where a teaches (pixels 0 and 3)
    assert (za.grad[0, :, 0].abs().sum(0) > 0).tolist() == [False, True, False, False, False]
    assert (zb.grad[0, :, 0].abs().sum(0) > 0).tolist() == [True, False, False, True, False]

    def kl(p: torch.Tensor, q: torch.Tensor) -> float:
        p, q = p.detach().softmax(0), q.detach().softmax(0)
        return float((p * (p / q).log()).sum())

    expected = (kl(za[0, :, 0, 0], zb[0, :, 0, 0]) + kl(za[0, :, 0, 3], zb[0, :, 0, 3])
                + kl(zb[0, :, 0, 1], za[0, :, 0, 1])) / 4  # divided by the 4 labelled pixels
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_region_bsd_direction_and_reverse() -> None:
    # 2 regions (left / right halves of a 1 x 4 label map); a is right on the left half, b on the right half
    labels = torch.tensor([[[0, 0, 1, 1]]])
    za = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 2, 1, 4)
    zb = -za
    valid = labels != 255
    grid = (1, 2)
    ce_a = F.cross_entropy(za, labels, reduction="none")
    ce_b = F.cross_entropy(zb, labels, reduction="none")
    for rule in ("lower-ce", "correct-ratio"):
        sa, has = region_scores(ce_a, za.argmax(1) == labels, valid, grid, rule)
        sb, _ = region_scores(ce_b, zb.argmax(1) == labels, valid, grid, rule)
        fa = torch.randn(1, 3, 2, 4, requires_grad=True)
        fb = torch.randn(1, 5, 2, 4, requires_grad=True)
        q_ab, q_ba = nn.Conv2d(3, 5, 1, bias=False), nn.Conv2d(5, 3, 1, bias=False)
        loss, a_t, b_t = rbsd_loss(fa, fb, q_ab, q_ba, sa, sb, has)
        assert a_t[0, 0].tolist() == [True, False] and b_t[0, 0].tolist() == [False, True]
        loss.backward()
        # b learns (in its left region only), a learns in its right region only
        assert fb.grad[..., :2].abs().sum() > 0 and fb.grad[..., 2:].abs().sum() == 0
        assert fa.grad[..., 2:].abs().sum() > 0 and fa.grad[..., :2].abs().sum() == 0
        pa = F.adaptive_avg_pool2d(fa, grid).detach()
        pb = F.adaptive_avg_pool2d(fb, grid).detach()
        d_b = (q_ba(pb)[..., 0] - pa[..., 0]).pow(2).mean()
        d_a = (q_ab(pa)[..., 1] - pb[..., 1]).pow(2).mean()
        assert loss.item() == pytest.approx(((d_b + d_a) / 2).item(), rel=1e-5)
    # the reverse case: swap the students, the directions swap
    sa, has = region_scores(ce_b, zb.argmax(1) == labels, valid, grid, "lower-ce")
    sb, _ = region_scores(ce_a, za.argmax(1) == labels, valid, grid, "lower-ce")
    _, a_t, b_t = rbsd_loss(torch.randn(1, 3, 2, 4), torch.randn(1, 5, 2, 4), nn.Conv2d(3, 5, 1), nn.Conv2d(5, 3, 1),
                            sa, sb, has)
    assert a_t[0, 0].tolist() == [False, True] and b_t[0, 0].tolist() == [True, False]


# ------------------------------------------------------------------------------------ tasks and end to end
class Tiny(Dataset):
    def __init__(self, n: int = 2, k: int = 3, hw: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, hw, hw, generator=g)
        self.y = torch.randint(0, k, (n, hw, hw), generator=g)
        self.y[:, :4] = 255

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def bundle() -> DataBundle:
    return DataBundle(Tiny(), Tiny(1, seed=1), 3, ["a", "b", "c"], [[0, 0, 0], [9, 9, 9], [99, 99, 99]])


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    torch.manual_seed(0)
    for name in ("deeplabv3-resnet18", "segformer-b1"):
        path = root / f"{name}.safetensors"
        save_checkpoint(path, create_model(name, num_classes=3), CheckpointMeta(model=name, num_classes=3))
        out[name] = str(path)
    return out


def _cfg(method: str, tmp: Path, teachers: dict[str, str], teacher: str | None = None, peer: str | None = None,
         **opts: str) -> DistillConfig:
    return DistillConfig(method=method, model="segformer-b0", teacher=teacher,
                         teacher_weights=teachers[teacher] if teacher else None, peer=peer, method_opts=opts,
                         out=str(tmp / method), iters=1, batch=2, val_every=1, workers=0, progress=False,
                         device="cpu", scale="1", crop=None)


@pytest.mark.parametrize(("method", "teacher", "opts"), [
    ("c2vkd", "deeplabv3-resnet18", {}), ("transkd", "segformer-b1", {"variant": "ea"}),
    ("cwd", "deeplabv3-resnet18", {"feature": "true"})])
def test_gradients_reach_student_and_adapters_never_teacher(method: str, teacher: str, opts: dict,
                                                            tmp_path: Path, teachers: dict[str, str]) -> None:
    cfg = _cfg(method, tmp_path, teachers, teacher=teacher, **opts)
    torch.manual_seed(0)
    task = build_distill_task(cfg, bundle())
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    frozen = {k: v.clone() for k, v in task.method.state_dict().items() if "pool" in k}
    opt = build_optimizer(task.parts()["student"])
    task.train(True)
    x, y = Tiny()[0]
    terms = task.losses(Batch(torch.stack([x, Tiny()[1][0]]), torch.stack([y, Tiny()[1][1]])))
    terms["loss"].backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(not p.requires_grad for p in task.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.student.parameters())
    trainable = [p for p in task.method.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in task.method.parameters() if not p.requires_grad)
    opt.step()
    after = task.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too: the teacher stays in eval
    assert all(torch.equal(v, task.method.state_dict()[k]) for k, v in frozen.items())
    weighted = {k[len("loss_"):] for k in terms if k.startswith("loss_")}
    assert weighted and {f"raw_{k}" for k in weighted} <= set(terms)  # every weighted term logged raw too
    assert not hasattr(task.method, "last_raw")  # the raw values are returned, not stashed on the method


def test_pixel_accuracy_by_hand() -> None:
    from segkd.methods.task import pixel_accuracy

    z = torch.zeros(1, 3, 2, 2)
    z[0, 0, 0, 0] = z[0, 1, 0, 1] = z[0, 2, 1, 0] = z[0, 2, 1, 1] = 5.0  # argmax [[0, 1], [2, 2]]
    labels = torch.tensor([[[0, 2], [2, 255]]])  # right, wrong, right, ignored -> 2 / 3
    assert float(pixel_accuracy(z, labels, 255)) == pytest.approx(2 / 3)
    # logits at half the label size are upsampled first: a constant class-1 map is right wherever the label is 1
    small = torch.zeros(1, 3, 1, 1)
    small[0, 1] = 1.0
    assert float(pixel_accuracy(small, torch.tensor([[[1, 1], [0, 1]]]), 255)) == pytest.approx(3 / 4)
    assert float(pixel_accuracy(z, torch.full((1, 2, 2), 255), 255)) == 0.0  # nothing labelled: 0, not NaN
    # random float logits (no ties): the same share as argmax == label, labels of every class and void
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2, 11, 18, 24, generator=g)
    y = torch.randint(0, 11, (2, 18, 24), generator=g)
    y[:, :3] = 255
    want = ((r.argmax(1) == y) & (y != 255)).sum() / (y != 255).sum()
    assert float(pixel_accuracy(r, y, 255)) == pytest.approx(float(want), abs=1e-7)
    # an exact tie for the maximum counts as right for either tied class (argmax would pick the first)
    tie = torch.tensor([[[[2.0]], [[2.0]], [[1.0]]]])
    assert [float(pixel_accuracy(tie, torch.tensor([[[c]]]), 255)) for c in range(3)] == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(("method", "align"), [(m, "label") for m in METHODS.names()] + [("kd", "student")])
def test_step_accuracy_reuses_the_methods_upsampled_logits(method: str, align: str, tmp_path: Path,
                                                           teachers: dict[str, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``acc_<role>`` equals the share computed apart from the network's own logits, and the metric reads the
    student's logits at the label size, not upsampling them again, wherever its method upsampled them there
    (``Terms.aligned``): every method aligned on the label grid except transkd, whose terms read taps."""
    from segkd.methods import task as task_module

    teacher, peer, opts = _pair(method)
    cfg = _cfg(method, tmp_path, teachers, teacher=teacher, peer=peer,
               **({**opts, "align": "student"} if align == "student" else opts))
    torch.manual_seed(0)
    task = build_distill_task(cfg, bundle())
    ds = Tiny()
    batch = Batch(torch.stack([ds[0][0], ds[1][0]]), torch.stack([ds[0][1], ds[1][1]]))
    real = task_module.pixel_accuracy
    sizes: list[tuple[int, ...]] = []  # what the metric was handed, in the order of the roles

    def accuracy(z: torch.Tensor, labels: torch.Tensor, ignore: int) -> torch.Tensor:
        sizes.append(tuple(z.shape[-2:]))
        return real(z, labels, ignore)

    monkeypatch.setattr(task_module, "pixel_accuracy", accuracy)
    task.train(False)  # no dropout: the logits recomputed below are the step's
    out = task.losses(batch)
    roles = [k[len("acc_"):] for k in out if k.startswith("acc_")]
    assert roles == (["student", "peer"] if peer else ["student", "teacher"])
    with torch.no_grad():
        for r in roles:
            assert float(out[f"acc_{r}"]) == float(real(getattr(task, r)(batch.images), batch.labels, 255)), r
    label_size, student_size = tuple(batch.labels.shape[-2:]), tuple(task.student(batch.images).shape[-2:])
    assert student_size != label_size
    reused = align == "label" and method != "transkd"
    assert sizes[0] == (label_size if reused else student_size)


def test_collab_updates_both_students(tmp_path: Path, teachers: dict[str, str]) -> None:
    cfg = _cfg("collab", tmp_path, teachers, peer="deeplabv3-resnet18")
    torch.manual_seed(0)
    task = build_distill_task(cfg, bundle())
    parts = task.parts()
    assert set(parts) == {"student", "peer"}
    opts = {n: build_optimizer(p) for n, p in parts.items()}
    snap = {n: [p.detach().clone() for p in m.parameters()] for n, m in task.deploy_models().items()}
    task.train(True)
    ds = Tiny()
    terms = task.losses(Batch(torch.stack([ds[0][0], ds[1][0]]), torch.stack([ds[0][1], ds[1][1]])))
    assert {"loss_hfd", "loss_rbsd", "loss_pbsd", "loss_ce", "loss_peer_ce"} <= set(terms)
    terms["loss"].backward()
    for o in opts.values():
        o.step()
    for name, model in task.deploy_models().items():
        changed = sum(not torch.equal(a, b) for a, b in zip(snap[name], model.parameters(), strict=True))
        assert changed > 0, name
    # the projections are split: a->b trains with the student, b->a with the peer
    ids_a = {id(p) for p in parts["student"].module.parameters()}
    ids_b = {id(p) for p in parts["peer"].module.parameters()}
    assert not ids_a & ids_b
    assert {id(p) for p in task.method.a.parameters()} <= ids_a and {id(p) for p in task.method.b.parameters()} <= ids_b


# options that keep a method's end-to-end run small (a method not listed runs with its defaults)
FAST_OPTS = {"c2vkd": {"pdd_mode": "dkd", "gram_chunk": "100"}, "transkd": {"variant": "gl"}}


def _pair(method: str) -> tuple[str | None, str | None, dict]:
    """(teacher, peer, options) for ``method``'s end-to-end run, from its spec: a transformer partner when the spec
    asks for one (or taps only transformers have), else the small CNN."""
    spec = METHODS.get(method)
    wants_vit = spec.other_family == "transformer" or any(
        t.startswith(("embed", "stage")) for t in spec.taps.get(spec.other_role, ()))
    other = "segformer-b1" if wants_vit else "deeplabv3-resnet18"
    return (None, other, FAST_OPTS.get(method, {})) if spec.peer else (other, None, FAST_OPTS.get(method, {}))


@pytest.mark.parametrize("method", METHODS.names())  # every registered method, none forgotten (timm's list_models)
def test_end_to_end(method: str, tmp_path: Path, teachers: dict[str, str]) -> None:
    teacher, peer, opts = _pair(method)
    cfg = _cfg(method, tmp_path, teachers, teacher=teacher, peer=peer, **opts)
    summary = run_distill(cfg, data=bundle())
    out = Path(cfg.out)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"][0]
    terms = [k[4:] for k in train if k.startswith("raw_")]
    assert terms and all(f"loss_{t}" in train for t in terms) and math.isfinite(train["loss"])
    assert train["loss"] == pytest.approx(sum(train[f"loss_{t}"] for t in terms), rel=1e-5)
    roles = ("student", "peer") if peer else ("student", "teacher")
    assert all(0.0 <= train[f"acc_{r}"] <= 1.0 for r in roles)  # logged, never part of the loss
    report = json.loads((out / "distill.json").read_text())
    student = create_model("segformer-b0", num_classes=3)
    with safe_open(str(out / "last.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert keys == set(student.state_dict())  # the student alone, no adapter
    assert report["deploy_params"]["student"] == sum(p.numel() for p in student.parameters())
    spec = METHODS.get(method)  # the student's adapters, counted on a method built apart on the same pair
    alone = spec.build(make_options(spec, opts), create_model("segformer-b0", num_classes=3),
                       create_model(teacher or peer, num_classes=3), ignore_index=255)
    assert report["adapter_params"]["student"] == sum(p.numel() for p in alone.student_modules().parameters()
                                                      if p.requires_grad)
    if peer:
        assert (out / "peer_last.safetensors").exists() and "peer" in summary["final"]
    assert report["deploy_gmacs"]["student"] > 0


# ------------------------------------------------------------------------------------------------ bad input
def precheck(cfg: DistillConfig) -> None:
    """What run_task checks before any data is read: the config (start_run), then the builder (options, pair)."""
    cfg.check()
    DistillBuilder().check(cfg)


def test_bad_pairs_fail_before_training(tmp_path: Path, teachers: dict[str, str]) -> None:
    with pytest.raises(SegkdError, match="c2vkd needs a cnn teacher; segformer-b1 is a transformer"):
        precheck(_cfg("c2vkd", tmp_path, teachers, teacher="segformer-b1"))
    with pytest.raises(SegkdError, match="transkd needs transformer stages with patch embeddings on both sides; "
                                         "deeplabv3-resnet18"):
        precheck(_cfg("transkd", tmp_path, teachers, teacher="deeplabv3-resnet18"))
    cfg = _cfg("c2vkd", tmp_path, teachers, teacher="deeplabv3-resnet18")
    cfg.model = "deeplabv3-resnet18"
    with pytest.raises(SegkdError, match="c2vkd needs a transformer student; deeplabv3-resnet18 is a cnn"):
        precheck(cfg)
    with pytest.raises(SegkdError, match="collab needs --peer"):
        precheck(_cfg("collab", tmp_path, teachers))
    with pytest.raises(SegkdError, match="online method"):
        precheck(_cfg("dml", tmp_path, teachers, teacher="segformer-b1", peer="segformer-b0"))
    with pytest.raises(SegkdError, match="needs --teacher-weights"):
        precheck(DistillConfig(method="kd", model="segformer-b0", teacher="segformer-b1"))
    with pytest.raises(SegkdError, match="has no option 'temprature'; did you mean temperature"):
        precheck(_cfg("kd", tmp_path, teachers, teacher="segformer-b1", temprature="2"))
    with pytest.raises(SegkdError, match="variant must be one of base, gl, ea"):
        make_options(METHODS.get("transkd"), {"variant": "xl"})
    with pytest.raises(SegkdError, match="unknown method 'kdd'"):
        METHODS.get("kdd")
    s3, s5 = create_model("segformer-b0", num_classes=3), create_model("deeplabv3-resnet18", num_classes=5)
    with pytest.raises(SegkdError, match="student has 3 classes but the teacher deeplabv3-resnet18 has 5"):
        check_pair(METHODS.get("kd"), s3, s5)
    # no training ran: no run directory was created
    assert not (tmp_path / "c2vkd").exists()


def test_teacher_weights_are_loaded_completely_or_refused(tmp_path: Path, teachers: dict[str, str]) -> None:
    t = load_teacher("segformer-b1", teachers["segformer-b1"], 3)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    with pytest.raises(SegkdError, match="a segformer-b1 checkpoint, but --teacher is segformer-b2"):
        load_teacher("segformer-b2", teachers["segformer-b1"], 3)
    with pytest.raises(SegkdError, match="the teacher predicts 3 classes, the dataset has 4"):
        load_teacher("segformer-b1", teachers["segformer-b1"], 4)
    state = create_model("segformer-b1", num_classes=3).state_dict()
    state.pop("decode_head.classifier.weight")
    path = tmp_path / "partial.safetensors"
    save_checkpoint(path, state, CheckpointMeta(model="segformer-b1", num_classes=3))
    with pytest.raises(SegkdError, match="missing key 'decode_head.classifier.weight'"):
        load_teacher("segformer-b1", path, 3)
    foreign = tmp_path / "foreign.pth"
    full = create_model("deeplabv3-resnet18", num_classes=3).state_dict()
    torch.save(full, foreign)
    assert load_teacher("deeplabv3-resnet18", foreign, 3).num_classes == 3  # convertible torchvision layout
    full.pop("classifier.4.bias")
    torch.save(full, foreign)
    with pytest.raises(SegkdError, match="missing key"):
        load_teacher("deeplabv3-resnet18", foreign, 3)


def test_distill_resume_keeps_the_method_options(tmp_path: Path, teachers: dict[str, str]) -> None:
    from segkd.engine.trainer import TrainingInterrupted

    cfg = _cfg("c2vkd", tmp_path, teachers, teacher="deeplabv3-resnet18", pdd_mode="dkd", gram_chunk="64")
    cfg.iters, cfg.val_every = 2, 1

    def stop(trainer, it: int) -> None:  # noqa: ANN001 - the trainer's callback signature
        if it == 1:
            trainer._stop_requested = True

    with pytest.raises(TrainingInterrupted):
        run_distill(cfg, callbacks=[stop], data=bundle())
    machine = DistillConfig(workers=0, progress=False, device="cpu")
    summary = run_distill(machine, resume=cfg.out, data=bundle())
    assert summary["iterations"] == 2
    report = json.loads((Path(cfg.out) / "distill.json").read_text())
    assert report["options"]["pdd_mode"] == "dkd" and report["options"]["gram_chunk"] == 64
    assert report["teacher"]["name"] == "deeplabv3-resnet18"


def test_cli_distill_on_synth(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from segkd.cli import app

    teacher = tmp_path / "t.safetensors"
    save_checkpoint(teacher, create_model("segformer-b0", num_classes=6), CheckpointMeta(model="segformer-b0",
                                                                                          num_classes=6))
    out = tmp_path / "run"
    args = ["distill", "--method", "kd", "--student", "segformer-b0", "--teacher", "segformer-b0",
            "--teacher-weights", str(teacher), "--data", "synth", "--resize", "32x32", "--crop", "32x32", "--iters",
            "1", "--batch", "2", "--val-every", "1", "--workers", "0", "--no-progress", "--out", str(out),
            "--method-opt", "temperature=2"]
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["distill"]["options"]["temperature"] == 2.0 and (out / "best.safetensors").exists()
    res = CliRunner().invoke(app, ["distill", "--method", "kd", "--student", "segformer-b0", "--teacher",
                                   "segformer-b0", "--teacher-weights", str(teacher), "--pdd-mode", "dkd"])
    assert isinstance(res.exception, SegkdError)
    assert str(res.exception) == "--pdd-mode is a c2vkd option; --method is kd"


def test_chunked_gram_stays_fp32_under_autocast() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    b = torch.randn(2, 8, 4, 4, generator=g)
    ref = vlfd_patch_loss(a, b, chunk=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = vlfd_patch_loss(a, b, chunk=5)
    assert val.dtype == torch.float32 and val.item() == pytest.approx(ref.item(), rel=1e-5)
    val.backward()
    assert a.grad is not None and a.grad.dtype == torch.float32
