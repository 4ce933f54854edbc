"""The teacher cache warped on the training device: the targets the loss sees equal the per-crop DataLoader warp
of segkd <= 0.x (issue 21 item 4), for full and top-K caches, with rescales, flips, padding, images of different
sizes and autocast."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segkd.data import synthesize
from segkd.data.transforms import Geometry, collate_pairs
from segkd.engine.batch import Batch, StoredTargets
from segkd.methods import teacher_cache as tc
from segkd.methods.distill_data import DistillDataset
from segkd.runs.distill import DistillConfig, prepare_distill_data
from tests.conftest import build_distill_task, random_teacher

torch.set_num_threads(1)  # the machine is shared: one thread keeps the timing loops short and steady

K = 5
TOL = 1e-5


def reference_warp(m: torch.Tensor, g: Geometry, stride: int) -> torch.Tensor:
    """The per-crop warp the DataLoader workers ran before the device warp (segkd main at 73f5534), verbatim: the
    parity reference (resumed long runs must read the same targets)."""
    oh, ow = math.ceil(g.out[0] / stride), math.ceil(g.out[1] / stride)
    yc = (torch.arange(oh, dtype=torch.float64) + 0.5) * stride - 0.5
    xc = (torch.arange(ow, dtype=torch.float64) + 0.5) * stride - 0.5
    inside_y, inside_x = yc < g.cropped[0] - 0.5 + 1e-9, xc < g.cropped[1] - 0.5 + 1e-9
    xs = (g.cropped[1] - 1 - xc) if g.flipped else xc
    gy = ((yc + g.top + 0.5) / g.scaled[0]) * 2 - 1
    gx = ((xs + g.left + 0.5) / g.scaled[1]) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].to(torch.float32)
    out = F.grid_sample(m[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    inside = (inside_y[:, None] & inside_x[None, :]).to(out.dtype)
    return out * inside


def geometry_of(row: torch.Tensor) -> Geometry:
    v = [int(x) for x in row]
    return Geometry((v[0], v[1]), (v[2], v[3]), v[4], v[5], (v[6], v[7]), (v[8], v[9]), bool(v[10]))


def reference_targets(cache: tc.TeacherCache, sha: str, g: Geometry, taps: list[str]) -> dict[str, torch.Tensor]:
    """The old worker path: the image's float32 maps (a top-K cache densified on read), each warped per crop."""
    maps = cache.tensors(sha, taps)
    strides = cache.taps
    return {n: reference_warp(m, g, 1 if n == "logits" else strides[n]) for n, m in maps.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("warp")
    return {"root": root, "data": synthesize(root / "data", n_train=6, n_val=2, size=(32, 48), num_classes=K, seed=4),
            "teacher": random_teacher(root / "teacher.safetensors", K, seed=1)}


def _dataset(setup: dict[str, Path], topk: int, dtype: str = "float16") -> DistillDataset:
    """cwd with its feature term: the cache holds logits and the teacher's ``layer4`` (2 tensor kinds); crops
    larger than some rescaled images (padding), random rescale and flips."""
    cfg = DistillConfig(model="segformer-b0", method="cwd", method_opts={"feature": "true"},
                        teacher="deeplabv3-resnet18", teacher_weights=str(setup["teacher"]), data=str(setup["data"]),
                        crop="40x56", scale="0.6,1.6", iters=1, batch=2, workers=0, device="cpu", progress=False,
                        out=str(setup["root"] / f"run{topk}"),
                        teacher_cache=str(setup["root"] / f"cache{topk}{dtype}"), cache_topk=topk, cache_dtype=dtype)
    ds = prepare_distill_data(cfg).train
    assert isinstance(ds, DistillDataset) and ds.cache is not None and ds.cache.topk == topk
    return ds


@pytest.mark.parametrize(("topk", "dtype"), [(0, "float16"), (2, "float16"), (0, "float32")])
def test_device_warp_equals_the_worker_warp(setup: dict[str, Path], topk: int, dtype: str) -> None:
    ds = _dataset(setup, topk, dtype)
    assert ds.cache is not None and ds.taps == ["layer4"]
    seen_flip = seen_pad = seen_scale = False
    worst = 0.0
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        items = [ds[i] for i in range(len(ds))]
        batch = Batch.from_loader(collate_pairs(items))
        assert batch.stored is not None and batch.teacher is None
        stored = batch.stored.maps
        assert set(stored) == ({"logits"} if not topk else set(tc.TOPK_TENSORS)) | {"layer4"}
        assert {t.dtype for t in stored.values()} <= {getattr(torch, dtype), torch.uint8}  # as stored, unwarped
        got = tc.warp_stored(batch.stored)
        for i in range(len(ds)):
            g = geometry_of(batch.stored.geometry[i])
            seen_flip |= g.flipped
            seen_pad |= g.cropped != g.out
            seen_scale |= g.scaled != g.source
            ref = reference_targets(ds.cache, ds.sha(i), g, ds.taps)
            assert got.logits[i].shape == ref["logits"].shape == (K, 40, 56)
            assert got.features["layer4"][i].shape == ref["layer4"].shape == (512, 5, 7)
            worst = max(worst, float((got.logits[i] - ref["logits"]).abs().max()),
                        float((got.features["layer4"][i] - ref["layer4"]).abs().max()))
    assert seen_flip and seen_pad and seen_scale
    assert worst <= TOL


def _random_stored(sizes: list[tuple[int, int]], geoms: list[Geometry], topk: int, seed: int = 0
                   ) -> tuple[StoredTargets, list[dict[str, torch.Tensor]]]:
    """Per-image stored items of the given map sizes (logits at stride 8 and a 3-channel stride-8 tap), and the
    float32 maps the old path warped (top-K densified per image)."""
    gen = torch.Generator().manual_seed(seed)
    parts, dense = [], []
    for (h, w), g in zip(sizes, geoms, strict=True):
        z = 4 * torch.randn(K, h, w, generator=gen)
        tap = torch.randn(3, h, w, generator=gen).half()
        raw = {**tc.encode_logits(z, topk), "tap": tap}
        parts.append(StoredTargets({n: t[None] for n, t in raw.items()},
                                   {n: torch.tensor([[h, w]]) for n in raw}, tc.geometry_row(g)[None],
                                   {"logits": 1, "tap": 8}, K, topk))
        logits = tc.densify(*(raw[n] for n in tc.TOPK_TENSORS), K) if topk else raw["logits"].float()
        dense.append({"logits": logits, "tap": tap.float()})
    return StoredTargets.join(parts), dense


@pytest.mark.parametrize("topk", [0, 2])
def test_images_of_different_sizes_share_one_batch(topk: int) -> None:
    # three source images of different sizes (stored maps 5x7, 4x6, 6x5 at stride 8), crops of one output size
    sizes = [(5, 7), (4, 6), (6, 5)]
    geoms = [Geometry((40, 56), (50, 70), 3, 9, (32, 48), (32, 48), True),
             Geometry((32, 48), (24, 36), 0, 0, (24, 36), (32, 48), False),   # rescaled below the crop: padding
             Geometry((48, 40), (60, 50), 20, 2, (32, 48), (32, 48), True)]
    st, dense = _random_stored(sizes, geoms, topk)
    first = "logits_top" if topk else "logits"
    assert tuple(st.maps[first].shape[-2:]) == (6, 7) and st.sizes[first].tolist() == [list(s) for s in sizes]
    # edge padding: image 1's map repeats its last row and column
    assert torch.equal(st.maps["tap"][1, :, 4:, :6], st.maps["tap"][1, :, 3:4, :6].expand(3, 2, 6))
    assert torch.equal(st.maps["tap"][1, :, :4, 6:], st.maps["tap"][1, :, :4, 5:6].expand(3, 4, 1))
    got = tc.warp_stored(st)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --amp: the targets stay those of the fp32 warp
        amp = tc.warp_stored(st)
    assert got.logits.dtype == amp.logits.dtype == torch.float32 and torch.equal(got.logits, amp.logits)
    for i, g in enumerate(geoms):
        ref_logits = reference_warp(dense[i]["logits"], g, 1)
        ref_tap = reference_warp(dense[i]["tap"], g, 8)
        assert got.logits[i].shape == ref_logits.shape == (K, 32, 48)
        assert got.features["tap"][i].shape == ref_tap.shape == (3, 4, 6)
        assert float((got.logits[i] - ref_logits).abs().max()) <= TOL
        assert float((got.features["tap"][i] - ref_tap).abs().max()) <= TOL
    assert float(got.logits[1, :, 24:].abs().max()) == 0.0  # the crop's padding rows have no teacher output


def test_warp_batch_refuses_crops_of_different_sizes() -> None:
    geoms = [Geometry((8, 8), (8, 8), 0, 0, (8, 8), (8, 8), False), Geometry((8, 8), (8, 8), 0, 0, (4, 8), (4, 8),
                                                                               False)]
    st, _ = _random_stored([(1, 1), (1, 1)], geoms, 0)
    with pytest.raises(Exception, match="one output size"):
        tc.warp_stored(st)


def test_the_task_warps_the_stored_batch(setup: dict[str, Path], tmp_path: Path) -> None:
    """The step's loss with the stored batch equals the loss with the per-crop reference targets handed over ready
    (the task warps what the batch carries, and nothing else differs)."""
    ds = _dataset(setup, 0)
    cfg = DistillConfig(model="segformer-b0", method="cwd", method_opts={"feature": "true"},
                        teacher="deeplabv3-resnet18", teacher_weights=str(setup["teacher"]), data=str(setup["data"]),
                        crop="40x56", iters=1, batch=2, workers=0, device="cpu", progress=False,
                        out=str(tmp_path / "r"))
    data = prepare_distill_data(cfg)
    torch.manual_seed(0)
    task = build_distill_task(cfg, data)

    def refuse(module: torch.nn.Module, args: tuple) -> None:
        raise AssertionError("the teacher ran although the batch carries the cache's stored maps")

    task.teacher.register_forward_pre_hook(refuse)
    task.train(False)
    batch = Batch.from_loader(collate_pairs([ds[0], ds[1]]))
    assert batch.stored is not None and ds.cache is not None
    refs = [reference_targets(ds.cache, ds.sha(i), geometry_of(batch.stored.geometry[i]), ds.taps) for i in (0, 1)]
    ready = tc.TeacherTargets(torch.stack([r["logits"] for r in refs]),
                              {"layer4": torch.stack([r["layer4"] for r in refs])})
    a = task.losses(batch)
    b = task.losses(Batch(batch.images, batch.labels, teacher=ready, inside=batch.inside))
    for k in ("raw_cwd", "raw_cwd_feat", "raw_ce"):
        assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-6, abs=1e-7), k


@pytest.mark.parametrize("topk", [0, 2])
def test_bench_train_step_times_the_device_warp(topk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``segkd bench --train-step --teacher-cache`` times the new path: every timed step warps the stored batch."""
    from segkd.bench.trainstep import bench_train_step
    from segkd.methods import task as task_mod

    calls: list[StoredTargets] = []
    real = task_mod.warp_stored

    def counting(st: StoredTargets) -> tc.TeacherTargets:
        calls.append(st)
        return real(st)

    monkeypatch.setattr(task_mod, "warp_stored", counting)
    rep = bench_train_step("kd", "deeplabv3-resnet18", "segformer-b0", (2, 3, 64, 64), torch.device("cpu"), K, 1, 2,
                           0.0, 1, cached=True, topk=topk)
    assert rep["method_step"]["iters"] + rep["method_step"]["warmup"] == len(calls)  # the warp is inside the step
    st = calls[0]
    assert set(st.maps) == ({"logits"} if not topk else set(tc.TOPK_TENSORS)) and st.topk == topk
    assert tuple(st.maps["logits_top" if topk else "logits"].shape[-2:]) == (8, 8)  # stored at the teacher's stride
    assert rep["cache_topk"] == topk and rep["warp"]["latency_ms"]["p50"] > 0 and rep["overhead_ratio"] > 0
