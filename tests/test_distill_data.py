"""Distillation data: the clean teacher view, the augmentation-aware teacher cache, unlabelled images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from segkd.checkpoint import file_sha256
from segkd.data import build_dataset, build_eval_transform, build_train_transform, synthesize
from segkd.data.transforms import Geometry, TrainTransform, collate_pairs
from segkd.engine.batch import Batch, StoredTargets
from segkd.errors import SegkdError
from segkd.methods import teacher_cache as tc
from segkd.methods.distill_data import DistillDataset, UnlabeledImages, pseudo_labels
from segkd.models.base import upsample_logits
from segkd.models.loading import load_teacher
from segkd.runs.distill import DistillConfig, cache_key, prepare_distill_data
from tests.conftest import build_distill_task, random_teacher

K = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 6-image folder dataset (3 classes, 32x48) and two different DeepLabV3-R18 teachers for it."""
    root = tmp_path_factory.mktemp("tiny")
    data = synthesize(root / "data", n_train=6, n_val=2, size=(32, 48), num_classes=K, seed=3)
    out = {"data": data}
    for i in (1, 2):
        out[f"teacher{i}"] = random_teacher(root / f"teacher{i}.safetensors", K, seed=i)
    return out


def _cfg(tiny: dict[str, Path], tmp: Path, method: str = "kd", **kw) -> DistillConfig:
    base = dict(model="segformer-b0", method=method, teacher="deeplabv3-resnet18",
                teacher_weights=str(tiny["teacher1"]), data=str(tiny["data"]), crop="32x32", scale="0.75,1.5",
                iters=2, batch=2, val_every=2, workers=0, device="cpu", progress=False, out=str(tmp / "run"))
    return DistillConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ teacher view
def test_teacher_sees_the_unjittered_crop_bit_for_bit(tiny: dict[str, Path], tmp_path: Path) -> None:
    jit = build_train_transform(crop=(32, 32), scale=(0.75, 1.5), jitter=True)
    plain = build_train_transform(crop=(32, 32), scale=(0.75, 1.5), jitter=False)
    ds = build_dataset(tiny["data"], "train", transform=jit, seed=5)
    ref = build_dataset(tiny["data"], "train", transform=plain, seed=5)
    dds = DistillDataset(ds, teacher_view="clean")
    for epoch in (0, 1):
        dds.set_epoch(epoch)
        ds.set_epoch(epoch)
        ref.set_epoch(epoch)
        for i in range(len(ds)):
            x, y, extras = dds[i]
            x_plain, y_plain = ref[i]
            assert torch.equal(extras["teacher_images"], x_plain)  # same geometry, no jitter
            assert torch.equal(x, ds[i][0]) and torch.equal(y, y_plain)  # the student's crop is unchanged
            assert not torch.equal(x, x_plain)  # ... and jittered
    assert "teacher_images" not in DistillDataset(ds, teacher_view="same")[0][2]

    # and the task really feeds that tensor to the teacher
    task = build_distill_task(_cfg(tiny, tmp_path), prepare_distill_data(_cfg(tiny, tmp_path)))
    seen: list[torch.Tensor] = []
    task.teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x, y, extras = dds[0]
    task.losses(Batch(x[None], y[None], teacher_images=extras["teacher_images"][None]))
    assert torch.equal(seen[0][0], ref[0][0])


def test_prepare_distill_data_defaults(tiny: dict[str, Path], tmp_path: Path) -> None:
    assert isinstance(prepare_distill_data(_cfg(tiny, tmp_path)).train, DistillDataset)  # clean view by default
    same = prepare_distill_data(_cfg(tiny, tmp_path, teacher_view="same")).train
    assert not isinstance(same, DistillDataset) and len(same[0]) == 2  # today's behaviour: plain pairs
    with pytest.raises(SegkdError, match="--teacher-view must be one of clean, same"):
        _cfg(tiny, tmp_path, teacher_view="jittered").check()


# ------------------------------------------------------------------------------------------------------ warping
def test_warp_identity_equals_upsample_logits() -> None:
    m = torch.randn(K, 5, 7, generator=torch.Generator().manual_seed(0))
    g = Geometry((40, 56), (40, 56), 0, 0, (40, 56), (40, 56), False)
    assert torch.allclose(tc.warp(m, g, 1), upsample_logits(m[None], (40, 56))[0], atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_warp_follows_the_image_augmentation(seed: int) -> None:
    """A map that *is* the image (R = x, G = y ramps), warped with a crop's geometry, equals the crop itself."""
    h0, w0 = 45, 60
    yy, xx = np.meshgrid(np.arange(h0), np.arange(w0), indexing="ij")
    img = np.stack([xx * 255 / (w0 - 1), yy * 255 / (h0 - 1), np.full_like(xx, 128)], -1).astype(np.uint8)
    t = TrainTransform(crop=(24, 32), scale=(0.5, 1.5), jitter=False, resize=(30, 40), mean=[0, 0, 0],
                       std=[1, 1, 1])
    x, _, geom, _ = t.apply(img, np.zeros((h0, w0), np.int64), np.random.default_rng(seed))
    warped = tc.warp(torch.from_numpy(img).permute(2, 0, 1).float() / 255, geom, 1)
    inside = tc.inside_mask(geom)
    assert float((warped - x)[:, inside].abs().max()) < 0.02  # PIL's uint8 rounding / filter, not geometry
    assert float(warped[:, ~inside].abs().sum()) == 0.0  # padding: no teacher output
    assert tuple(tc.warp(torch.ones(4, 6, 8), geom, 8).shape) == (4, 3, 4)  # a stride-8 tap: ceil(24/8) x 4


# -------------------------------------------------------------------------------------------------------- cache
def _key_and_images(tiny: dict[str, Path], tmp: Path, teacher: str = "teacher1"):
    cfg = _cfg(tiny, tmp, method="c2vkd", teacher_weights=str(tiny[teacher]))
    data = prepare_distill_data(cfg)
    model = load_teacher("deeplabv3-resnet18", tiny[teacher], K)
    return cache_key(cfg, model, data), data.train.cache_images(), model, data


def test_cache_interrupted_build_continues_to_the_same_tensors(tiny: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tc, "SHARD_SIZE", 2)
    key, images, model, data = _key_and_images(tiny, tmp_path)
    full = tc.build_cache(tmp_path / "full", key, images, model, data.mean, data.std, progress=False)

    calls = {"n": 0}

    def dying(m, args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # killed while computing the second shard

    hook = model.register_forward_pre_hook(dying)
    with pytest.raises(KeyboardInterrupt):
        tc.build_cache(tmp_path / "part", key, images, model, data.mean, data.std, progress=False)
    hook.remove()
    manifest = json.loads((tmp_path / "part" / tc.MANIFEST).read_text())
    assert manifest["shards"] == ["shard-00000.safetensors"]  # the finished shard survived, nothing else
    assert not list((tmp_path / "part").glob("*.tmp"))
    calls["n"] = 0

    def count(m, args):
        calls["n"] += 1

    hook = model.register_forward_pre_hook(count)
    part = tc.build_cache(tmp_path / "part", key, images, model, data.mean, data.std, progress=False)
    hook.remove()
    assert calls["n"] == len(images) - 2  # only the missing images were computed
    for im in images:
        a, b = full.tensors(im.sha256), part.tensors(im.sha256)
        assert set(a) == {"logits", "layer4"} and all(torch.equal(a[k], b[k]) for k in a)


def test_stale_cache_is_refused_with_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    key, images, model, data = _key_and_images(tiny, tmp_path)
    root = tmp_path / "cache"
    tc.build_cache(root, key, images, model, data.mean, data.std, progress=False)
    key2, _, model2, _ = _key_and_images(tiny, tmp_path, "teacher2")
    with pytest.raises(SegkdError, match=r"built for other teacher weights \(sha256 ") as e:
        tc.build_cache(root, key2, images, model2, data.mean, data.std, progress=False)
    assert "\n" not in str(e.value) and str(root) in str(e.value)
    for change, msg in ((dict(mean=[0.5, 0.5, 0.5]), "built with mean/std"),
                        (dict(num_classes=4), "built for 3 classes, not 4"),
                        (dict(taps={"layer3": 8}), "holds no 'layer3' tap"),
                        (dict(input="90x120"), "teacher input native, not"),
                        (dict(dtype="float32"), "stored as float16, this run asks for --cache-dtype float32")):
        bad = tc.CacheKey(**{**vars(key), **change})
        with pytest.raises(SegkdError, match=msg):
            tc.build_cache(root, bad, images, model, data.mean, data.std, progress=False)


def test_cached_targets_replace_the_teacher_forward(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(tiny, tmp_path, method="c2vkd", teacher_cache=str(tmp_path / "cache"))
    data = prepare_distill_data(cfg)
    ds = data.train
    assert isinstance(ds, DistillDataset) and ds.cache is not None
    x, y, extras = ds[0]
    assert set(extras) == {"teacher_stored", "inside"}  # the stored maps and the crop's geometry, unwarped
    targets = tc.warp_stored(extras["teacher_stored"])
    assert tuple(targets.logits.shape) == (1, K, 32, 32) and tuple(targets.features["layer4"].shape)[2:] == (4, 4)
    # with no rescale and no crop, the cached logits are the teacher's own upsampled logits on the clean image
    whole = build_dataset(tiny["data"], "train", transform=build_eval_transform())
    model = load_teacher("deeplabv3-resnet18", tiny["teacher1"], K)
    with torch.no_grad():
        direct = upsample_logits(model(whole[0][0][None]), (32, 48))[0]
    g = Geometry((32, 48), (32, 48), 0, 0, (32, 48), (32, 48), False)
    cached = tc.cached_targets(ds.cache, ds.sha(0), g).logits
    assert torch.allclose(cached, direct, atol=2e-2 * float(direct.abs().max()))  # fp16 storage

    task = build_distill_task(cfg, data)

    def refuse(m, a):
        raise AssertionError("the teacher ran although the batch carries cached targets")

    task.teacher.register_forward_pre_hook(refuse)
    terms = task.losses(Batch.from_loader(collate_pairs([ds[0]])))
    assert torch.isfinite(terms["loss"]) and {"loss_pdd", "loss_vlfd_patch"} <= set(terms)


def test_cache_refuses_methods_it_cannot_serve(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SegkdError, match="--teacher-cache cannot serve transkd: its PEA/CSF terms"):
        _cfg(tiny, tmp_path, method="transkd", teacher="segformer-b1", teacher_cache=str(tmp_path)).check()
    for method in ("dml", "collab"):
        with pytest.raises(SegkdError, match=f"--teacher-cache needs a teacher method; {method} trains two"):
            DistillConfig(model="segformer-b0", method=method, peer="segformer-b0", teacher_cache="c").check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SegkdError, match="exists and is not a directory"):
        _cfg(tiny, tmp_path, teacher_cache=str(tmp_path / "file")).check()


# --------------------------------------------------------------------------------------------------- unlabelled
def test_unlabeled_folder_names_a_non_image_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "raw"
    folder.mkdir()
    for p in sorted((tiny["data"] / "images" / "train").iterdir())[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / ".DS_Store").write_text("hidden files are skipped")
    ds = build_dataset(tiny["data"], "train", transform=build_train_transform(crop=(32, 32)))
    assert len(UnlabeledImages(folder, ds.info, ds.transform)) == 2
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(SegkdError, match=r"--unlabeled .*notes.txt: not an image file"):
        UnlabeledImages(folder, ds.info, ds.transform)
    (folder / "notes.txt").unlink()
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SegkdError, match=r"broken.png: unreadable image"):
        UnlabeledImages(folder, ds.info, ds.transform).validate()


def test_pseudo_labels_by_hand() -> None:
    labels = torch.tensor([[[0, 255], [1, 1]], [[255, 255], [255, 255]]])
    logits = torch.zeros(2, K, 2, 2)
    logits[1, 2, 0, 0] = logits[1, 1, 0, 1] = logits[1, 2, 1, 0] = 5.0  # teacher: 2, 1 / 2, 0 on image 1
    logits[0, 2] = 9.0  # ignored: image 0 has labels
    inside = torch.tensor([[[True, True], [True, True]], [[True, True], [True, False]]])  # padding bottom-right
    out = pseudo_labels(labels, logits, torch.tensor([True, False]), inside, 255)
    assert out.tolist() == [[[0, 255], [1, 1]], [[2, 1], [2, 255]]]


def _pick(batch: Batch, rows: list[int]) -> Batch:
    """The images ``rows`` of a batch (a stored teacher cache's rows too)."""
    st = batch.stored
    assert st is not None
    stored = StoredTargets({k: v[rows] for k, v in st.maps.items()}, {k: v[rows] for k, v in st.sizes.items()},
                           st.geometry[rows], st.strides, st.num_classes, st.topk)
    return Batch(batch.images[rows], batch.labels[rows], inside=batch.inside[rows],  # type: ignore[index]
                 labeled=batch.labeled[rows], stored=stored)  # type: ignore[index]


def test_unlabeled_images_get_only_distillation_terms(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "raw"
    folder.mkdir()
    for p in sorted((tiny["data"] / "images" / "val").iterdir()):
        (folder / p.name).write_bytes(p.read_bytes())
    cfg = _cfg(tiny, tmp_path, method="dkd", unlabeled=str(folder), teacher_cache=str(tmp_path / "cache"),
               unlabeled_ratio=2)
    data = prepare_distill_data(cfg)
    ds = data.train
    assert len(ds) == 6  # the epoch is the labelled set; each item brings two unlabelled crops
    x3, y3, e3 = ds[0]
    assert tuple(x3.shape)[:1] == (3,) and e3["labeled"].tolist() == [True, False, False]
    partners = [ds.unlabeled_index(i, k) for i in range(6) for k in range(2)]
    assert sorted(set(partners)) == [0, 1]  # the 2 unlabelled images, cycled through a seeded permutation
    batch = collate_pairs([ds[0], ds[1]])
    assert tuple(batch[0].shape)[0] == 6 and batch[2]["labeled"].tolist() == [True, False, False] * 2
    group = Batch.from_loader((x3, y3, e3))
    assert group.stored is not None and len(group.stored.geometry) == 3  # one stored entry per image of the group
    assert bool((y3[1] == 255).all()) and bool(e3["inside"][1].any())
    task = build_distill_task(cfg, data)
    terms = task.losses(_pick(group, [1]))
    assert float(terms["raw_ce"]) == 0.0 and float(terms["raw_dkd"]) > 0.0  # no label: CE skips it, DKD does not
    task.train(False)  # batch-norm statistics must not depend on the batch for this comparison
    both = task.losses(_pick(group, [0, 1]))
    alone = task.losses(_pick(group, [0]))
    assert float(both["raw_ce"]) == pytest.approx(float(alone["raw_ce"]), rel=1e-5)  # CE over labelled pixels only
    with pytest.raises(SegkdError, match="--unlabeled-ratio must be >= 1, got 0"):
        _cfg(tiny, tmp_path, unlabeled=str(folder), unlabeled_ratio=0).check()


def test_cli_distill_with_cache_and_unlabeled(tiny: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from segkd.cli import app

    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "a.png").write_bytes(next((tiny["data"] / "images" / "val").iterdir()).read_bytes())
    args = ["distill", "--method", "kd", "--student", "segformer-b0", "--teacher", "deeplabv3-resnet18",
            "--teacher-weights", str(tiny["teacher1"]), "--data", str(tiny["data"]), "--crop", "32x32", "--iters", "2",
            "--batch", "2", "--val-every", "2", "--workers", "0", "--no-progress", "--device", "cpu",
            "--teacher-cache", str(tmp_path / "cache"), "--unlabeled", str(folder)]
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r1")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "cache" / tc.MANIFEST).read_text())
    assert len(manifest["images"]) == 7 and manifest["teacher"]["weights_sha256"] == file_sha256(tiny["teacher1"])
    mtime = (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r2")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    other = [a if a != str(tiny["teacher1"]) else str(tiny["teacher2"]) for a in args]
    res = CliRunner().invoke(app, other + ["--out", str(tmp_path / "r3")])
    assert isinstance(res.exception, SegkdError) and "built for other teacher weights" in str(res.exception)


def test_eval_transform_can_keep_native_labels() -> None:
    img = np.zeros((30, 40, 3), np.uint8)
    lab = np.arange(30 * 40).reshape(30, 40) % 3
    x, y = build_eval_transform(resize=(15, 20), resize_labels=False)(img, lab)
    assert tuple(x.shape) == (3, 15, 20) and tuple(y.shape) == (30, 40) and torch.equal(y, torch.from_numpy(lab))
    assert tuple(build_eval_transform(resize=(15, 20))(img, lab)[1].shape) == (15, 20)


def test_cache_shard_damage_is_named_or_recomputed(tiny: dict[str, Path], tmp_path: Path) -> None:
    key, images, model, data = _key_and_images(tiny, tmp_path)
    root = tmp_path / "cache"
    cache = tc.build_cache(root, key, images, model, data.mean, data.std, progress=False)
    shard = root / "shard-00000.safetensors"
    good = cache.tensors(images[0].sha256)
    shard.write_bytes(shard.read_bytes()[:100])  # truncated on disk
    with pytest.raises(SegkdError, match=r"shard-00000.safetensors: does not match the sha256 .*changed on disk"
                                         r".*delete it"):
        tc.TeacherCache(root, cache.manifest).tensors(images[0].sha256)
    shard.unlink()  # deleted by hand: the next build computes its images again
    again = tc.build_cache(root, key, images, model, data.mean, data.std, progress=False)
    assert torch.equal(again.tensors(images[0].sha256)["logits"], good["logits"])
    (root / ".cache.json.x1.tmp").write_bytes(b"left by a killed write")
    shard.unlink()
    tc.build_cache(root, key, images, model, data.mean, data.std, progress=False)
    assert not list(root.glob("*.tmp"))


def test_a_second_builder_waits_for_the_first(tiny: dict[str, Path], tmp_path: Path) -> None:
    import threading

    from segkd.runlock import acquire_run_lock

    key, images, model, data = _key_and_images(tiny, tmp_path)
    root = tmp_path / "cache"
    lock = acquire_run_lock(root, "--teacher-cache")  # another process is building
    done: list[tc.TeacherCache] = []
    t = threading.Thread(target=lambda: done.append(tc.build_cache(root, key, images, model, data.mean, data.std,
                                                                   progress=False)))
    t.start()
    t.join(1.0)
    assert t.is_alive() and not done  # waiting, not failing and not writing beside the other builder
    lock.release()
    t.join(60)
    assert done and len(done[0].manifest["shards"]) == 1


# ---------------------------------------------------------------------------------- one cache, verified shards
def _count_forwards(model: torch.nn.Module) -> tuple[dict[str, int], object]:
    calls = {"n": 0}
    return calls, model.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))


def test_cache_serves_a_subset_and_adds_only_new_images(tiny: dict[str, Path], tmp_path: Path) -> None:
    key, images, model, data = _key_and_images(tiny, tmp_path)
    root = tmp_path / "cache"
    tc.build_cache(root, key, images, model, data.mean, data.std, progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    calls, hook = _count_forwards(model)
    sub = tc.build_cache(root, key, images[2:], model, data.mean, data.std, progress=False)  # a subset: served
    assert calls["n"] == 0 and {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamp
    assert torch.equal(sub.tensors(images[3].sha256)["logits"], tc.TeacherCache(root, sub.manifest).tensors(
        images[3].sha256)["logits"])
    new = tc.CacheImage("0" * 64, "new.png", images[0].load)  # a run with one image the cache lacks
    grown = tc.build_cache(root, key, [*images, new], model, data.mean, data.std, progress=False)
    hook.remove()
    assert calls["n"] == 1 and grown.manifest["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert (root / "shard-00000.safetensors").stat().st_mtime_ns == stamp["shard-00000.safetensors"]
    assert torch.equal(grown.tensors(new.sha256)["layer4"], grown.tensors(images[0].sha256)["layer4"])
    # the distill data path: a cache built with --unlabeled images serves the same data without them
    folder = tmp_path / "raw"
    folder.mkdir()
    for p in sorted((tiny["data"] / "images" / "val").iterdir()):
        (folder / p.name).write_bytes(p.read_bytes())
    both = _cfg(tiny, tmp_path, teacher_cache=str(tmp_path / "c2"), unlabeled=str(folder))
    assert len(prepare_distill_data(both).train.cache.manifest["images"]) == 8
    alone = prepare_distill_data(_cfg(tiny, tmp_path, teacher_cache=str(tmp_path / "c2")))
    assert len(alone.train.cache.manifest["images"]) == 8 and "teacher_stored" in alone.train[0][2]


def test_swapped_or_malformed_shards_are_refused_in_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save

    key, images, model, data = _key_and_images(tiny, tmp_path)
    key2, _, model2, _ = _key_and_images(tiny, tmp_path, "teacher2")
    a, b = tmp_path / "a", tmp_path / "b"
    cache = tc.build_cache(a, key, images, model, data.mean, data.std, progress=False)
    tc.build_cache(b, key2, images, model2, data.mean, data.std, progress=False)
    shard = "shard-00000.safetensors"
    (a / shard).write_bytes((b / shard).read_bytes())  # same image names, another teacher's answers
    with pytest.raises(SegkdError, match=rf"{shard}: does not match the sha256 the manifest recorded") as e:
        tc.TeacherCache(a, cache.manifest).tensors(images[0].sha256)
    assert "\n" not in str(e.value)
    forged = json.loads(json.dumps(cache.manifest))
    forged["shard_sha256"][shard] = file_sha256(a / shard)  # the manifest edited to match: the key still differs
    with pytest.raises(SegkdError, match=rf"{shard}: a shard of another teacher cache"):
        tc.TeacherCache(a, forged).tensors(images[0].sha256)
    # a shard with this cache's key but a tensor of the wrong shape
    wrong = {f"{im.sha256}.{n}": torch.zeros(K + 1 if n == "logits" else 512, 4, 6, dtype=torch.float16)
             for im in images for n in ("logits", "layer4")}
    blob = save(wrong, metadata={tc.KEY_META: tc.key_digest(cache.manifest)})
    (a / shard).write_bytes(blob)
    forged["shard_sha256"][shard] = file_sha256(a / shard)
    with pytest.raises(SegkdError, match=rf"{shard}: tensor 'logits' has shape \(4, 4, 6\), expected 3 x h x w"):
        tc.TeacherCache(a, forged).tensors(images[0].sha256)
    for change, msg in ((dict(images=[]), "'images' must be a dict, got list"),
                        (dict(shards=["../../etc/passwd"]), "shard name '../../etc/passwd' is not shard-NNNNN"),
                        (dict(taps={"layer4": {"stride": "8"}}), "every tap must be {stride: int}")):
        (a / tc.MANIFEST).write_text(json.dumps({**cache.manifest, **change}))
        with pytest.raises(SegkdError, match=rf"cache.json: not a valid teacher-cache manifest \({re.escape(msg)}"):
            tc.build_cache(a, key, images, model, data.mean, data.std, progress=False)
