"""Compact teacher caches (``--cache-topk K``): exactness against the full-logit cache, a hand-computed top-2
example for KD/DKD/CWD, the key that keeps top-K and full caches apart, and the one-line refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from segkd.checkpoint import CheckpointMeta, save_checkpoint
from segkd.data import synthesize
from segkd.data.transforms import Geometry, collate_pairs
from segkd.engine.batch import Batch
from segkd.errors import SegkdError
from segkd.methods import teacher_cache as tc
from segkd.methods.cwd import cwd_loss
from segkd.methods.dkd import dkd_loss
from segkd.methods.kd import kd_loss
from segkd.models import create_model
from segkd.models.loading import load_teacher
from segkd.runs.distill import DistillConfig, cache_key, prepare_distill_data

K = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("topk")
    data = synthesize(root / "data", n_train=4, n_val=1, size=(32, 48), num_classes=K, seed=5)
    torch.manual_seed(7)
    model = create_model("deeplabv3-resnet18", num_classes=K)
    with torch.no_grad():  # a larger random head: logits spread over several units, so rounding matters
        for p in model.classifier_parameters():
            p.normal_(0, 0.5)
    path = save_checkpoint(root / "teacher.safetensors", model, CheckpointMeta(model="deeplabv3-resnet18",
                                                                               num_classes=K))
    return {"data": data, "teacher": path}


def _cfg(tiny: dict[str, Path], tmp: Path, **kw) -> DistillConfig:
    base = dict(model="segformer-b0", method="kd", teacher="deeplabv3-resnet18", teacher_weights=str(tiny["teacher"]),
                data=str(tiny["data"]), crop="32x32", scale="0.75,1.5", iters=2, batch=2, workers=0, device="cpu",
                progress=False, out=str(tmp / "run"))
    return DistillConfig(**{**base, **kw})


def _build(tiny: dict[str, Path], tmp: Path, topk: int, name: str) -> tuple[tc.TeacherCache, list[tc.CacheImage]]:
    cfg = _cfg(tiny, tmp, cache_topk=topk, teacher_cache=str(tmp / name))
    data = prepare_distill_data(cfg)
    teacher = load_teacher("deeplabv3-resnet18", tiny["teacher"], K)
    images = data.train.cache_images()
    key = cache_key(cfg, teacher, data)
    return tc.build_cache(tmp / name, key, images, teacher, data.mean, data.std, progress=False), images


def _losses(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    return [kd_loss(zs, zt, 1.0), kd_loss(zs, zt, 4.0), dkd_loss(zs, zt, labels), cwd_loss(zs, zt, 4.0)]


def test_topk_equal_to_classes_is_the_full_cache(tiny: dict[str, Path], tmp_path: Path) -> None:
    full, images = _build(tiny, tmp_path, 0, "full")
    top, _ = _build(tiny, tmp_path, K, "top")
    g = Geometry((32, 48), (40, 60), 5, 9, (32, 32), (32, 32), True)  # rescaled, cropped, flipped
    torch.manual_seed(0)
    for im in images:
        a, b = full.tensors(im.sha256), top.tensors(im.sha256)
        assert torch.equal(a["logits"], b["logits"])  # the same fp16 logits, scattered back
        za = tc.cached_targets(full, im.sha256, g).logits[None]
        zb = tc.cached_targets(top, im.sha256, g).logits[None]
        zs, labels = torch.randn_like(za), torch.randint(0, K, (1, 32, 32))
        for x, y in zip(_losses(zs, za, labels), _losses(zs, zb, labels), strict=True):
            assert float(x) == pytest.approx(float(y), rel=1e-3)  # fp16 tolerance (here: equal)
    shard = tmp_path / "top" / top.manifest["shards"][0]
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith(".logits_top_index"))
        assert f.get_tensor(name).dtype == torch.uint8
        rest = f.get_tensor(name.replace("_top_index", "_rest"))
        assert torch.isinf(rest).all() and (rest < 0).all()  # K = C: no rest mass


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_top2_by_hand() -> None:
    """Two pixels, four classes, top 2 kept: A = [2, 1, 0, -1], B = [0, 3, -2, 1]."""
    z = torch.tensor([[2.0, 0.0], [1.0, 3.0], [0.0, -2.0], [-1.0, 1.0]]).reshape(4, 1, 2)
    stored = tc.encode_logits(z, 2)
    assert stored["logits_top_index"].flatten(1).tolist() == [[0, 1], [1, 3]]
    ra, rb = math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))  # logsumexp of each pixel's two other classes
    assert stored["logits_rest"].flatten().tolist() == pytest.approx([ra, rb], abs=1e-3)
    dense = tc.densify(stored["logits_top"], stored["logits_top_index"], stored["logits_rest"], 4)
    a = [2.0, 1.0, ra - math.log(2), ra - math.log(2)]
    b = [rb - math.log(2), 3.0, rb - math.log(2), 1.0]
    assert dense[:, 0, 0].tolist() == pytest.approx(a, abs=2e-3) and dense[:, 0, 1].tolist() == pytest.approx(
        b, abs=2e-3)
    pa, true = _softmax(a), _softmax([2.0, 1.0, 0.0, -1.0])
    assert pa[:2] == pytest.approx(true[:2], rel=1e-3) and sum(pa[2:]) == pytest.approx(sum(true[2:]), rel=1e-3)
    zt, zs = dense[None], torch.zeros(1, 4, 1, 2)
    pb = _softmax(b)
    u4 = [0.25] * 4
    assert float(kd_loss(zs, zt, 1.0)) == pytest.approx((_kl(pa, u4) + _kl(pb, u4)) / 2, rel=1e-3)
    # DKD (alpha 1, beta 8, T 1) with labels A: class 0, B: class 1; the student is uniform
    tckd = (_kl([pa[0], 1 - pa[0]], [0.25, 0.75]) + _kl([pb[1], 1 - pb[1]], [0.25, 0.75])) / 2
    na, nb = _softmax(a[1:]), _softmax([b[0], b[2], b[3]])
    nckd = (_kl(na, [1 / 3] * 3) + _kl(nb, [1 / 3] * 3)) / 2
    labels = torch.tensor([[[0, 1]]])
    assert float(dkd_loss(zs, zt, labels, 1.0, 8.0, 1.0)) == pytest.approx(tckd + 8 * nckd, rel=1e-3)
    # CWD (T 1): per class, a softmax over the two positions against the student's even split
    cwd = sum(_kl(_softmax([a[c], b[c]]), [0.5, 0.5]) for c in range(4)) / 4
    assert float(cwd_loss(zs, zt, 1.0)) == pytest.approx(cwd, rel=1e-3)


def test_indices_widen_above_256_classes_and_bytes_shrink() -> None:
    z = torch.randn(300, 4, 5)
    small = tc.encode_logits(z, 4)
    assert small["logits_top_index"].dtype == torch.int16
    assert torch.equal(small["logits_top"].float(), z.topk(4, 0).values.half().float())
    dense = tc.densify(small["logits_top"], small["logits_top_index"], small["logits_rest"], 300)
    p, q = dense.softmax(0), z.softmax(0)
    top = z.topk(4, 0).indices
    assert torch.allclose(p.gather(0, top), q.gather(0, top), rtol=5e-3)  # fp16 logits and rest
    nbytes = sum(t.numel() * t.element_size() for t in small.values())
    assert nbytes == 4 * 5 * (4 * 2 + 4 * 2 + 2)  # vs 300 * 2 bytes per cell for the full logits


def test_topk_is_part_of_the_key(tiny: dict[str, Path], tmp_path: Path) -> None:
    _build(tiny, tmp_path, 2, "c")
    for topk, msg in ((0, "built with --cache-topk 2 \\(top-2 logits\\), this run asks for full logits"),
                      (1, "built with --cache-topk 2 \\(top-2 logits\\), this run asks for --cache-topk 1")):
        with pytest.raises(SegkdError, match=msg) as e:
            _build(tiny, tmp_path, topk, "c")
        assert "\n" not in str(e.value)
    _build(tiny, tmp_path, 0, "f")
    with pytest.raises(SegkdError, match="built with full logits \\(--cache-topk 0\\), this run asks for --cache-t"):
        _build(tiny, tmp_path, 2, "f")
    # the shard digest binds the setting too: a full cache's manifest edited to say top-2 is refused by its shards
    man = tc.read_manifest(tmp_path / "f")
    assert tc.key_digest({**man, "topk": 2}) != tc.key_digest(man)


def test_topk_options_are_checked_in_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SegkdError, match="--cache-topk 2: needs --teacher-cache"):
        _cfg(tiny, tmp_path, cache_topk=2).check()
    with pytest.raises(SegkdError, match="--cache-topk -1: needs --teacher-cache and K >= 1"):
        _cfg(tiny, tmp_path, cache_topk=-1, teacher_cache=str(tmp_path / "c")).check()
    with pytest.raises(SegkdError, match="--cache-topk 4: more than the dataset's 3 classes"):
        _build(tiny, tmp_path, 4, "c")
    note = tc.topk_note("cwd", 2, 11)
    assert note is not None and "top-2 of 11" in note and "positions of every class map" in note
    assert tc.topk_note("kd", 11, 11) is None and tc.topk_note("kd", 0, 11) is None


def test_topk_cache_serves_a_distillation_step(tiny: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import build_distill_task

    cfg = _cfg(tiny, tmp_path, method="dkd", cache_topk=2, teacher_cache=str(tmp_path / "c"))
    data = prepare_distill_data(cfg)
    assert "top-2 of 3 classes per pixel; dkd: TCKD" in capsys.readouterr().err
    batch = Batch.from_loader(collate_pairs([data.train[0]]))
    assert batch.stored is not None and batch.stored.maps["logits_top"].dtype == torch.float16
    assert tuple(tc.warp_stored(batch.stored).logits.shape) == (1, K, 32, 32)  # densified, then warped
    task = build_distill_task(cfg, data)
    terms = task.losses(batch)
    assert torch.isfinite(terms["loss"]) and float(terms["raw_dkd"]) > 0


def test_bad_topk_index_is_refused_in_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save

    cache, images = _build(tiny, tmp_path, 2, "c")
    shard = cache.manifest["shards"][0]
    good = cache.tensors(images[0].sha256)["logits"]
    blob = save({f"{im.sha256}.{n}": (torch.full((2, 4, 6), K, dtype=torch.uint8) if n.endswith("index")
                                      else torch.zeros(2 if n == "logits_top" else 1, 4, 6, dtype=torch.float16))
                 for im in images for n in tc.TOPK_TENSORS}, metadata={tc.KEY_META: tc.key_digest(cache.manifest)})
    (tmp_path / "c" / shard).write_bytes(blob)
    from segkd.checkpoint import file_sha256

    forged = {**cache.manifest, "shard_sha256": {shard: file_sha256(tmp_path / "c" / shard)}}
    with pytest.raises(SegkdError, match=r"'logits_top_index' holds no class indices of 0..2; delete the shard"):
        tc.TeacherCache(tmp_path / "c", forged).tensors(images[0].sha256)
    assert good.shape[0] == K
