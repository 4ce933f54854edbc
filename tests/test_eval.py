"""Evaluation: metrics against hand-computed confusion matrices, slide/flip/multi-scale inference, distributed
reduction, the ``segkd eval`` command and its one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segkd.checkpoint import CheckpointMeta, save_checkpoint
from segkd.engine.evaluate import EvalResult, evaluate, run_eval, shard_dataset
from segkd.engine.inference import make_predictor, parse_scales, slide_windows
from segkd.engine.metrics import ConfusionMeter, confusion_matrix, scores_from_confusion
from segkd.engine.visualize import colorize, overlay, save_prediction
from segkd.errors import SegkdError
from segkd.models import create_model
from segkd.shapes import parse_hw

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ metrics
def test_confusion_and_metrics_by_hand_with_ignore():
    # (gt, pred) over valid pixels: (0,0) (0,1) (1,1) [ignored] (2,2) (1,1) (1,0) (0,0)
    target = torch.tensor([[0, 0, 1, 255], [2, 1, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 1, 0, 0]])
    conf = confusion_matrix(pred, target, 3, ignore_index=255)
    assert conf.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 1]]
    s = scores_from_confusion(conf)
    assert s.per_class_iou == pytest.approx([2 / 4, 2 / 4, 1.0])
    assert s.miou == pytest.approx(2 / 3)
    assert s.aacc == pytest.approx(5 / 7)
    assert s.per_class_acc == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert s.macc == pytest.approx(7 / 9)
    assert s.fwiou == pytest.approx(3 / 7 * 0.5 + 3 / 7 * 0.5 + 1 / 7 * 1.0)
    assert s.per_class_dice == pytest.approx([4 / 6, 4 / 6, 1.0])
    assert s.gt_pixels == [3, 3, 1] and s.pred_pixels == [3, 3, 1]


def test_classes_absent_from_gt_and_or_prediction():
    # class 2 only predicted (IoU 0, counted in mIoU, no Acc); class 3 absent from both (NaN, excluded)
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    conf = confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    s = scores_from_confusion(conf)
    assert s.per_class_iou[:3] == pytest.approx([0.5, 1.0, 0.0]) and math.isnan(s.per_class_iou[3])
    assert s.miou == pytest.approx(1.5 / 3)
    assert math.isnan(s.per_class_acc[2]) and math.isnan(s.per_class_acc[3])
    assert s.macc == pytest.approx(0.75)
    assert s.aacc == pytest.approx(0.75)
    assert s.fwiou == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    # class 1 in GT but never predicted: IoU 0 and Acc 0, both counted
    s2 = scores_from_confusion(confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 1]), 2))
    assert s2.per_class_iou == pytest.approx([0.5, 0.0]) and s2.miou == pytest.approx(0.25)
    assert s2.per_class_acc == pytest.approx([1.0, 0.0]) and s2.macc == pytest.approx(0.5)


def test_metrics_match_brute_force_on_random_maps():
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 5, (2, 9, 7), generator=g)
    target[0, :2] = 255
    pred = torch.randint(0, 5, (2, 9, 7), generator=g)
    conf = confusion_matrix(pred, target, 5)
    brute = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            brute[t, p] += 1
    assert conf.numpy().tolist() == brute.tolist()
    s = scores_from_confusion(conf)
    ious = [brute[c, c] / (brute[c].sum() + brute[:, c].sum() - brute[c, c]) for c in range(5)]
    assert s.miou == pytest.approx(float(np.mean(ious)))


def test_bad_labels_and_empty_input():
    with pytest.raises(SegkdError, match="label value 7 is neither a class"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(SegkdError, match="label value -1"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, -1]), 3)
    with pytest.raises(SegkdError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 3)
    meter = ConfusionMeter(3)
    meter.update(torch.tensor([[1, 2]]), torch.tensor([[255, 255]]))
    s = scores_from_confusion(meter.matrix)
    assert math.isnan(s.miou) and math.isnan(s.aacc) and math.isnan(s.fwiou)


# ---------------------------------------------------------------------------------------------- inference
def _conv1x1(k: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(3, k, 1).eval()


def test_slide_windows_cover_every_pixel():
    assert slide_windows(10, 4, (4, 4), (3, 3)) == [(0, 4, 0, 4), (3, 7, 0, 4), (6, 10, 0, 4)]
    rows = [w[:2] for w in slide_windows(11, 4, (4, 4), (3, 3))]
    assert rows == [(0, 4), (3, 7), (6, 10), (7, 11)]
    cover = torch.zeros(23, 31)
    for y1, y2, x1, x2 in slide_windows(23, 31, (8, 10), (5, 7)):
        assert (y2 - y1, x2 - x1) == (8, 10)
        cover[y1:y2, x1:x2] += 1
    assert bool((cover > 0).all())


@pytest.mark.parametrize("size", [(23, 31), (6, 9)])  # second case: image smaller than the crop (padded window)
def test_slide_equals_whole_for_translation_equivariant_model(size):
    model = _conv1x1()
    x = torch.randn(2, 3, *size)
    whole = make_predictor(model)(x)
    slide = make_predictor(model, mode="slide", crop=(8, 10), stride=(5, 7))(x)
    assert slide.shape == (2, 4, *size)
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)


def test_slide_averages_logits_over_the_overlap_count():
    def position_model(x):  # logit 0 = column index inside the window, whatever the image
        b, _, h, w = x.shape
        return torch.arange(w, dtype=torch.float32).expand(b, 1, h, w)

    out = make_predictor(position_model, mode="slide", crop=(2, 3), stride=(2, 2))(torch.zeros(1, 3, 2, 5))
    # windows x in [0,3) and [2,5): column 2 is seen as local 2 and local 0
    assert out[0, 0, 0].tolist() == pytest.approx([0, 1, 1, 1, 2])


def test_model_at_an_output_stride_is_upsampled_to_the_input():
    model = create_model("deeplabv3-resnet18", num_classes=3).eval()
    out = make_predictor(model)(torch.randn(1, 3, 40, 56))
    assert out.shape == (1, 3, 40, 56)


def test_flip_tta():
    x = torch.randn(1, 3, 6, 8)
    model = _conv1x1()
    plain = make_predictor(model)(x)
    flipped = make_predictor(model, flip=True)(x)  # a pointwise model is flip-equivariant: same probabilities
    torch.testing.assert_close(flipped.softmax(1), plain.softmax(1), atol=1e-6, rtol=1e-5)

    def ramp(x):  # class 0 favoured on the right, class 1 on the left: flip-averaged probabilities are 0.5
        b, _, h, w = x.shape
        col = torch.arange(w, dtype=torch.float32).expand(b, h, w)
        return torch.stack([col, (w - 1) - col], 1)

    probs = make_predictor(ramp, flip=True)(x).softmax(1)
    torch.testing.assert_close(probs, torch.full_like(probs, 0.5))
    assert not torch.allclose(make_predictor(ramp)(x).softmax(1), probs)
    mean_logits = make_predictor(ramp, flip=True, tta_average="logits")(x)  # (x + (w-1-x)) / 2 for both classes
    torch.testing.assert_close(mean_logits, torch.full_like(mean_logits, 3.5))


def test_multiscale_tta_on_a_constant_image():
    model = _conv1x1()
    x = torch.randn(1, 3, 1, 1).expand(2, 3, 16, 20).contiguous()
    plain = make_predictor(model)(x)
    ms = make_predictor(model, scales="0.5,1.0,1.5", flip=True)(x)
    assert ms.shape == plain.shape
    torch.testing.assert_close(ms.softmax(1), plain.softmax(1), atol=1e-5, rtol=1e-5)


def test_option_parsing_errors():
    assert parse_hw("32x48") == (32, 48) and parse_hw("32") == (32, 32)
    assert parse_scales("0.75,1.0,1.25") == (0.75, 1.0, 1.25)
    for bad in ("32xa", "0x4", "1x2x3", "x"):
        with pytest.raises(SegkdError, match="--crop"):
            parse_hw(bad, "--crop")
    with pytest.raises(SegkdError, match="--scales"):
        parse_scales("1.0,big")
    with pytest.raises(SegkdError, match="needs --crop"):
        make_predictor(_conv1x1(), mode="slide")
    with pytest.raises(SegkdError, match="larger than --crop"):
        make_predictor(_conv1x1(), mode="slide", crop="8x8", stride="9x4")
    with pytest.raises(SegkdError, match="--mode"):
        make_predictor(_conv1x1(), mode="tiles")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- evaluate
class TinySet(Dataset):
    """Deterministic images with labels, some ignore pixels; labels at a different size than images."""

    def __init__(self, n: int = 5, k: int = 3, size: tuple[int, int] = (16, 16), label_size: tuple[int, int] = (16, 16),
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, *size, generator=g)
        self.labels = torch.randint(0, k, (n, *label_size), generator=g)
        self.labels[:, 0, :3] = 255
        self.num_classes = k
        self.ignore_index = 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def test_evaluate_compares_at_label_resolution():
    ds = TinySet(n=3, size=(16, 16), label_size=(32, 32))
    model = _conv1x1(3)
    predict = make_predictor(model)
    res = evaluate(predict, DataLoader(ds, batch_size=2), 3, progress=False, class_names=["a", "b", "c"])
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for img, lab in ds:
        pred = torch.nn.functional.interpolate(predict(img[None]), size=(32, 32), mode="bilinear",
                                               align_corners=False).argmax(1)[0]
        expected += confusion_matrix(pred, lab, 3)
    assert res.confusion.tolist() == expected.tolist()
    assert res.n_images == 3 and int(res.confusion.sum()) == 3 * (32 * 32 - 3)
    d = res.to_dict()
    for key in ("miou", "aacc", "macc", "fwiou", "per_class_iou", "per_class_acc", "confusion", "n_images",
                "per_class", "convention"):
        assert key in d
    assert list(d["per_class"]) == ["a", "b", "c"]
    assert d["miou"] == pytest.approx(scores_from_confusion(expected).miou)


def test_evaluate_rejects_wrong_class_count():
    ds = TinySet(k=3)
    with pytest.raises(SegkdError, match="predicts 4 classes"):
        evaluate(make_predictor(_conv1x1(4)), DataLoader(ds, batch_size=2), 3, progress=False)


def test_to_dict_has_nulls_for_undefined():
    conf = torch.tensor([[3, 0, 0], [0, 0, 0], [0, 0, 0]])
    s = scores_from_confusion(conf)
    r = EvalResult(**dataclasses.asdict(s), confusion=conf, n_images=1)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["per_class_iou"] == [1.0, None, None] and d["miou"] == 1.0


def test_visualize_palette_and_overlay(tmp_path):
    pal = [[10, 20, 30], [200, 100, 0]]
    rgb = colorize(torch.tensor([[0, 1], [255, 1]]), pal)
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[0, 1].tolist() == [200, 100, 0] and rgb[1, 0].tolist() == [0] * 3
    blended = overlay(np.full((2, 2, 3), 100, np.uint8), rgb, alpha=0.5)
    assert blended[0, 1].tolist() == [150, 100, 50]
    from PIL import Image

    paths = save_prediction(tmp_path, "x", torch.tensor([[0, 1], [1, 1]]), pal, image=torch.zeros(3, 4, 4),
                            mean=[0.5] * 3, std=[0.5] * 3)
    assert [p.name for p in paths] == ["x_pred.png", "x_overlay.png"]
    assert np.asarray(Image.open(paths[0])).tolist()[1][0] == [200, 100, 0]
    assert np.asarray(Image.open(paths[1])).shape == (2, 2, 3)


# ------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        ds = TinySet(n=5, size=(32, 32), label_size=(32, 32))
        res = run_eval(ckpt, dataset=ds, device="cpu", batch=2, progress=False)
        # the shard + reduce primitives directly as well
        sub = shard_dataset(ds, rank, world)
        res2 = evaluate(make_predictor(_conv1x1(3)), DataLoader(sub, batch_size=2), 3, distributed=True,
                        progress=False)
        Path(f"{out}.{rank}.json").write_text(json.dumps({"run_eval": res.to_dict(), "conv": res2.to_dict(),
                                                          "shard": len(sub)}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("deeplabv3-resnet18", num_classes=3)
    with torch.no_grad():  # a larger random head so an untrained model predicts every class somewhere
        for p in model.classifier_parameters():
            p.normal_(0, 0.5)
    meta = CheckpointMeta(model="deeplabv3-resnet18", num_classes=3, class_names=["sky", "road", "car"],
                          mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", model, meta)


def test_distributed_equals_single_process(tiny_ckpt, tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tiny_ckpt), out), nprocs=2, join=True)
    r0, r1 = (json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1))
    assert (r0["shard"], r1["shard"]) == (3, 2)
    ds = TinySet(n=5, size=(32, 32), label_size=(32, 32))
    single = run_eval(tiny_ckpt, dataset=ds, device="cpu", batch=2, progress=False).to_dict()
    single_conv = evaluate(make_predictor(_conv1x1(3)), DataLoader(ds, batch_size=2), 3, progress=False).to_dict()
    for r in (r0, r1):
        assert r["run_eval"]["confusion"] == single["confusion"] and r["run_eval"]["n_images"] == 5
        assert r["run_eval"]["miou"] == pytest.approx(single["miou"]) and r["run_eval"]["world_size"] == 2
        assert r["conv"]["confusion"] == single_conv["confusion"] and r["conv"]["n_images"] == 5


# -------------------------------------------------------------------------------------------- run_eval / CLI
def test_run_eval_dataset_class_mismatch(tiny_ckpt):
    with pytest.raises(SegkdError, match="predicts 3 classes but the dataset"):
        run_eval(tiny_ckpt, dataset=TinySet(k=5), device="cpu", progress=False)


def test_run_eval_save_preds(tiny_ckpt, tmp_path):
    res = run_eval(tiny_ckpt, dataset=TinySet(n=3, size=(24, 24), label_size=(24, 24)), device="cpu", batch=2,
                   progress=False, save_preds=tmp_path / "preds", mode="slide", crop="16x16", stride="8x8", flip=True)
    names = sorted(p.name for p in (tmp_path / "preds").iterdir())
    assert names == [f"{i:06d}_{kind}.png" for i in range(3) for kind in ("overlay", "pred")]
    assert res.extra["mode"] == "slide" and res.extra["crop"] == [16, 16] and res.n_images == 3


def test_onnx_export_evaluates_like_the_checkpoint(tiny_ckpt, tmp_path):
    from segkd.export.onnx_export import ExportConfig, export_checkpoint

    ds = TinySet(n=3, size=(32, 32), label_size=(32, 32))
    ref = run_eval(tiny_ckpt, dataset=ds, device="cpu", progress=False, mode="slide", crop="24x24", stride="16x16")
    ref_whole = run_eval(tiny_ckpt, dataset=ds, device="cpu", progress=False)
    assert (ref.confusion.sum(0) > 0).sum() >= 2  # the model predicts more than one class: a real comparison
    for output in ("logits", "labels"):
        onnx_path = tmp_path / f"tiny-{output}.onnx"
        export_checkpoint(tiny_ckpt, onnx_path, ExportConfig(verify=False, size="32x32", output=output))
        got = run_eval(onnx_path, dataset=ds, device="cpu", progress=False, mode="slide", crop="24x24",
                       stride="16x16")
        assert got.extra["kind"] == "onnx" and got.n_images == 3
        if output == "logits":
            assert got.confusion.tolist() == ref.confusion.tolist()
        whole = run_eval(onnx_path, dataset=ds, device="cpu", progress=False)
        assert whole.confusion.tolist() == ref_whole.confusion.tolist()  # label maps are exact in whole mode
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(b"garbage")
    with pytest.raises(SegkdError, match="plain.onnx"):
        run_eval(plain, dataset=ds, device="cpu", progress=False)


_cli = run_cli


def test_cli_bad_inputs_are_one_line(tiny_ckpt, tmp_path, monkeypatch, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    cases = [  # a bad file: exit 1; a bad option value: a usage error, exit 2
        ((str(junk), "--data", "synth"), "junk.safetensors", 1),
        ((str(tmp_path / "missing.safetensors"), "--data", "synth"), "not found", 1),
        ((str(tiny_ckpt), "--data", "synth", "--mode", "slide", "--crop", "12xq"), "--crop", 2),
        ((str(tiny_ckpt), "--data", "synth", "--scales", "a,b"), "--scales", 2),
        ((str(tiny_ckpt), "--data", "synth", "--batch", "0"), "--batch", 2),
        ((str(tiny_ckpt), "--data", "synth", "--device", "tpu"), "--device", 2),
    ]
    for args, needle, want in cases:
        code, _, err = _cli(monkeypatch, capsys, "eval", *args)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == want, err
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def _write_folder_dataset(root: Path, names: list[str], n: int = 3, size: tuple[int, int] = (24, 32)) -> Path:
    """A tiny dataset in the ``folder`` layout (images/val, labels/val, classes.json)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images/val", "labels/val"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images/val" / f"im{i}.png")
        lab = rng.integers(0, len(names), size, dtype=np.uint8)
        lab[:2] = 255
        Image.fromarray(lab).save(root / "labels/val" / f"im{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": names}))
    return root


def test_cli_eval_json_and_predictions(tiny_ckpt, tmp_path, monkeypatch, capsys):
    data = _write_folder_dataset(tmp_path / "ds", ["sky", "road", "car"])
    preds = tmp_path / "preds"
    code, out, err = _cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "--data", str(data), "--split", "val",
                          "--device", "cpu", "--batch", "2", "--json", "--save-preds", str(preds), "--no-progress")
    assert code == 0, err
    d = json.loads(out)
    for key in ("miou", "aacc", "macc", "fwiou", "mdice", "per_class", "per_class_iou", "per_class_acc",
                "confusion", "n_images", "n_pixels", "convention", "class_names", "mode", "scales", "source"):
        assert key in d, key
    assert d["n_images"] == 3 and d["n_pixels"] == 3 * (24 - 2) * 32 and list(d["per_class"]) == ["sky", "road", "car"]
    assert sum(map(sum, d["confusion"])) == d["n_pixels"] and 0.0 <= d["miou"] <= 1.0
    assert sorted(p.name for p in preds.iterdir()) == sorted(f"im{i}_{k}.png" for i in range(3)
                                                            for k in ("pred", "overlay"))
    # the table for people, and --json-out writes the same document
    code, out, err = _cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "--data", str(data), "--device", "cpu",
                          "--mode", "slide", "--crop", "16x16", "--stride", "12x12", "--flip",
                          "--json-out", str(tmp_path / "m.json"), "--no-progress")
    assert code == 0, err
    assert "mIoU" in out and "car" in out and "fwIoU" in out
    assert json.loads((tmp_path / "m.json").read_text())["crop"] == [16, 16]


def test_cli_eval_class_count_mismatch(tiny_ckpt, tmp_path, monkeypatch, capsys):
    data = _write_folder_dataset(tmp_path / "ds4", ["a", "b", "c", "d"])
    code, _, err = _cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "--data", str(data), "--device", "cpu")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "predicts 3 classes" in lines[0] and "has 4" in lines[0], err


def test_report_names_prefer_the_dataset_over_placeholders():
    from types import SimpleNamespace

    from segkd.engine.evaluate import report_names

    ds = SimpleNamespace(info=SimpleNamespace(class_names=["Sky", "Road"]))
    assert report_names(["class0", "class1"], ds) == ["Sky", "Road"]  # a converted checkpoint names nothing
    assert report_names(None, ds) == ["Sky", "Road"]
    assert report_names(["sky", "road"], ds) == ["sky", "road"]  # the model's own names win
    assert report_names(["class0", "class1", "class2"], ds) == ["class0", "class1", "class2"]  # counts differ
    assert report_names(["class0"], SimpleNamespace()) == ["class0"]
