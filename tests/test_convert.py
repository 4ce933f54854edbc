"""`segkd convert`: foreign checkpoints give the same logits as their source model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segkd.checkpoint import read_meta
from segkd.cli import app
from segkd.models import create_model
from segkd.models.convert import convert_state, detect_format
from segkd.models.loading import load_model

runner = CliRunner()
SHARED = Path(__file__).resolve().parents[2] / "shared"


def _convert(src: Path, model: str, out: Path, *extra: str):
    result = runner.invoke(app, ["convert", str(src), "--model", model, "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result


def _hf_v4_name(key: str) -> str:
    """transformers 5.x SegFormer key -> the 4.x / Hub layout (what users' model.safetensors files hold)."""
    rules = [
        (r"segformer\.stages\.(\d)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
        (r"segformer\.stages\.(\d)\.blocks\.(\d+)\.layernorm_before", r"segformer.encoder.block.\1.\2.layer_norm_1"),
        (r"segformer\.stages\.(\d)\.blocks\.(\d+)\.layernorm_after", r"segformer.encoder.block.\1.\2.layer_norm_2"),
        *[(rf"segformer\.stages\.(\d)\.blocks\.(\d+)\.attention\.{a}_proj",
           rf"segformer.encoder.block.\1.\2.attention.self.{b}")
          for a, b in (("q", "query"), ("k", "key"), ("v", "value"))],
        (r"segformer\.stages\.(\d)\.blocks\.(\d+)\.attention\.o_proj",
         r"segformer.encoder.block.\1.\2.attention.output.dense"),
        (r"segformer\.stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction",
         r"segformer.encoder.block.\1.\2.attention.self.sr"),
        (r"segformer\.stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm",
         r"segformer.encoder.block.\1.\2.attention.self.layer_norm"),
        (r"segformer\.stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1", r"segformer.encoder.block.\1.\2.mlp.dense1"),
        (r"segformer\.stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2", r"segformer.encoder.block.\1.\2.mlp.dense2"),
        (r"segformer\.stages\.(\d)\.blocks\.(\d+)\.mlp\.dwconv", r"segformer.encoder.block.\1.\2.mlp.dwconv"),
        (r"segformer\.stages\.(\d)\.layer_norm", r"segformer.encoder.layer_norm.\1"),
        (r"decode_head\.linear_projections\.", "decode_head.linear_c."),
    ]
    for pat, rep in rules:
        key = re.sub(pat, rep, key)
    return key


@pytest.fixture(scope="module")
def hf_b0():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=11)
    model = transformers.SegformerForSemanticSegmentation(cfg).eval()
    for mod in model.modules():  # non-trivial BN statistics so the head is really compared
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("layout", ["v5", "hub-v4"])
def test_hf_segformer_parity(hf_b0, tmp_path, layout):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf_b0.state_dict().items()}
    if layout == "hub-v4":
        state = {_hf_v4_name(k): v for k, v in state.items()}
        assert any(k.startswith("segformer.encoder.block.0.0.attention.self.query") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    out = tmp_path / "b0.safetensors"
    _convert(tmp_path / "model.safetensors", "segformer-b0", out)
    model = load_model(out)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = hf_b0(pixel_values=x).logits
        got = model(x)
    assert got.shape == ref.shape == (2, 11, 16, 24)
    assert (got - ref).abs().max().item() < 1e-4


def test_hf_pytorch_model_bin(hf_b0, tmp_path):
    torch.save(hf_b0.state_dict(), tmp_path / "pytorch_model.bin")
    _convert(tmp_path / "pytorch_model.bin", "segformer-b0", tmp_path / "b0.safetensors")
    assert read_meta(tmp_path / "b0.safetensors").num_classes == 11


def test_torchvision_deeplabv3_parity(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = tv.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=7,
                                                     aux_loss=True).eval()
    for mod in ref.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    result = _convert(tmp_path / "tv.pth", "deeplabv3-resnet50", tmp_path / "dl.safetensors", "--json")
    assert '"skipped"' in result.output and "aux_classifier" in result.output
    model = load_model(tmp_path / "dl.safetensors")
    x = torch.randn(1, 3, 72, 96)
    with torch.no_grad():
        want = ref(x)["out"]
        got = model.predict(x)
    assert (got - want).abs().max().item() < 1e-4


def _nvlabs_state(model) -> dict[str, torch.Tensor]:
    """Our SegFormer state written in the NVlabs/mmseg-0.x key layout (fused kv), as the original repo saves it."""
    out = {}
    for k, v in model.state_dict().items():
        if m := re.fullmatch(r"encoder\.patch_embeds\.(\d)\.(proj|norm)\.(\w+)", k):
            out[f"backbone.patch_embed{int(m[1]) + 1}.{m[2]}.{m[3]}"] = v
        elif m := re.fullmatch(r"encoder\.stages\.(\d)\.(\d+)\.attn\.k\.(\w+)", k):
            vv = model.state_dict()[k.replace(".k.", ".v.")]
            out[f"backbone.block{int(m[1]) + 1}.{m[2]}.attn.kv.{m[3]}"] = torch.cat([v, vv])
        elif ".attn.v." in k:
            continue
        elif m := re.fullmatch(r"encoder\.stages\.(\d)\.(\d+)\.(.+)", k):
            sub = m[3].replace("attn.sr_norm", "attn.norm").replace("mlp.dwconv", "mlp.dwconv.dwconv")
            out[f"backbone.block{int(m[1]) + 1}.{m[2]}.{sub}"] = v
        elif m := re.fullmatch(r"encoder\.norms\.(\d)\.(\w+)", k):
            out[f"backbone.norm{int(m[1]) + 1}.{m[2]}"] = v
        elif m := re.fullmatch(r"decode_head\.linear_c\.(\d)\.(\w+)", k):
            out[f"decode_head.linear_c{int(m[1]) + 1}.proj.{m[2]}"] = v
        elif k == "decode_head.linear_fuse.weight":
            out["decode_head.linear_fuse.conv.weight"] = v
        elif k.startswith("decode_head.bn."):
            out[k.replace("decode_head.bn.", "decode_head.linear_fuse.bn.")] = v
        elif k.startswith("decode_head.classifier."):
            out[k.replace("classifier", "linear_pred")] = v
    return out


def test_nvlabs_full_checkpoint_places_every_key(tmp_path):
    torch.manual_seed(1)
    src_model = create_model("segformer-b0", num_classes=6).eval()
    state = _nvlabs_state(src_model)
    torch.save({"state_dict": state, "meta": {"note": "mmseg style"}}, tmp_path / "segformer.pth")
    assert detect_format(list(state)) == "nvlabs"
    _convert(tmp_path / "segformer.pth", "segformer-b0", tmp_path / "out.safetensors")
    model = load_model(tmp_path / "out.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src_model(x))


def test_mit_encoder_only_pretrained(tmp_path):
    torch.manual_seed(2)
    src_model = create_model("segformer-b0", num_classes=6)
    enc = {k.removeprefix("backbone."): v for k, v in _nvlabs_state(src_model).items() if k.startswith("backbone.")}
    enc["head.weight"] = torch.zeros(1000, 256)  # ImageNet classifier of mit_b0.pth
    torch.save(enc, tmp_path / "mit_b0.pth")
    model = create_model("segformer-b0", num_classes=3, pretrained=str(tmp_path / "mit_b0.pth"))
    for k, v in src_model.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v)
    _, report = convert_state(enc, create_model("segformer-b0", num_classes=3))
    assert report.skipped == ["head.weight"] and not report.unplaced
    assert all(k.startswith("decode_head.") for k in report.missing)


def test_mmseg1_mit_backbone(tmp_path):
    """mmseg 1.x MixVisionTransformer layout: fused in_proj q/k/v, 1x1-conv FFN."""
    torch.manual_seed(3)
    src_model = create_model("segformer-b0", num_classes=6)
    st = src_model.state_dict()
    mm = {}
    for i in range(4):
        for part, name in (("proj", "projection"), ("norm", "norm")):
            for p in ("weight", "bias"):
                mm[f"backbone.layers.{i}.0.{name}.{p}"] = st[f"encoder.patch_embeds.{i}.{part}.{p}"]
        for p in ("weight", "bias"):
            mm[f"backbone.layers.{i}.2.{p}"] = st[f"encoder.norms.{i}.{p}"]
        for j in range(2):
            b = f"encoder.stages.{i}.{j}"
            m = f"backbone.layers.{i}.1.{j}"
            for p in ("weight", "bias"):
                mm[f"{m}.attn.attn.in_proj_{p}"] = torch.cat([st[f"{b}.attn.{n}.{p}"] for n in "qkv"])
                mm[f"{m}.attn.attn.out_proj.{p}"] = st[f"{b}.attn.proj.{p}"]
                mm[f"{m}.ln1.{p}"] = st[f"{b}.norm1.{p}"]
                mm[f"{m}.ln2.{p}"] = st[f"{b}.norm2.{p}"]
                mm[f"{m}.ffn.layers.1.{p}"] = st[f"{b}.mlp.dwconv.{p}"]
                w1, w2 = st[f"{b}.mlp.fc1.{p}"], st[f"{b}.mlp.fc2.{p}"]
                mm[f"{m}.ffn.layers.0.{p}"] = w1[..., None, None] if p == "weight" else w1
                mm[f"{m}.ffn.layers.4.{p}"] = w2[..., None, None] if p == "weight" else w2
                if i < 3:
                    mm[f"{m}.attn.sr.{p}"] = st[f"{b}.attn.sr.{p}"]
                    mm[f"{m}.attn.norm.{p}"] = st[f"{b}.attn.sr_norm.{p}"]
    torch.save({"state_dict": mm}, tmp_path / "mmseg_mit.pth")
    model = create_model("segformer-b0", num_classes=6, pretrained=str(tmp_path / "mmseg_mit.pth"))
    x = torch.randn(1, 3, 64, 64)
    model.eval(), src_model.eval()
    with torch.no_grad():
        a, _ = model.encoder(x)
        b, _ = src_model.encoder(x)
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(fa, fb)


@pytest.mark.skipif(not (SHARED / "checkpoints").is_dir(), reason="shared checkpoints not present")
def test_shared_camvid_teacher_imports_and_segments(tmp_path):
    from PIL import Image

    src = SHARED / "checkpoints" / "camvid-deeplabv3-resnet18-torchvision.pth"
    names = SHARED / "data" / "camvid" / "stats.json"
    import json

    classes = json.loads(names.read_text())["classes"] if names.is_file() else None
    extra: list[str] = []
    if classes:
        (tmp_path / "classes.txt").write_text("\n".join(c if isinstance(c, str) else c["name"] for c in classes))
        extra = ["--classes", str(tmp_path / "classes.txt")]
    result = _convert(src, "deeplabv3-resnet18", tmp_path / "teacher.safetensors", "--json", *extra)
    assert '"unplaced": []' in result.output
    model = load_model(tmp_path / "teacher.safetensors")
    assert model.num_classes == 11
    img_dir, lab_dir = SHARED / "data" / "camvid" / "images" / "val", SHARED / "data" / "camvid" / "labels" / "val"
    stems = sorted(p.stem for p in img_dir.glob("*.png"))[:2]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    correct = total = 0
    for stem in stems:
        img = torch.from_numpy(np.array(Image.open(img_dir / f"{stem}.png").convert("RGB"))).float() / 255
        lab = torch.from_numpy(np.array(Image.open(lab_dir / f"{stem}.png"))).long()
        x = ((img - mean) / std).permute(2, 0, 1)[None]
        with torch.no_grad():
            pred = model.predict(x)[0].argmax(0)
        valid = lab != 255
        correct += int((pred[valid] == lab[valid]).sum())
        total += int(valid.sum())
    assert correct / total > 0.8  # the README reports 90 % pixel accuracy on val


def test_hf_save_pretrained_folder_and_its_label_names(hf_b0, tmp_path):
    import json

    hf_b0.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    names = [f"thing{i}" for i in range(11)]
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    _convert(tmp_path / "hf", "segformer-b0", tmp_path / "b0.safetensors")
    assert read_meta(tmp_path / "b0.safetensors").class_names == names
    _convert(tmp_path / "hf" / "model.safetensors", "segformer-b0", tmp_path / "f.safetensors")  # the file too
    assert read_meta(tmp_path / "f.safetensors").class_names == names
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["convert", str(tmp_path / "empty"), "-m", "segformer-b0", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "a folder without model.safetensors or pytorch_model.bin" in str(r.exception)


def test_convert_bad_inputs(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    r = runner.invoke(app, ["convert", str(tmp_path / "junk.pth"), "-m", "segformer-b0", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "cannot be read" in str(r.exception)
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    r = runner.invoke(app, ["convert", str(tmp_path / "other.pth"), "-m", "segformer-b0", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not a SegFormer" in str(r.exception)
    assert not (tmp_path / "o").exists()
