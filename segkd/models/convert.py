"""Import checkpoints users already have into segkd's key layout.

Recognised sources (detected from the keys, not the file name):

* ``hf``: HuggingFace ``SegformerForSemanticSegmentation`` (``segformer.encoder.*``, ``decode_head.*``) and the
  encoder-only ``mit-b*`` / ``SegformerModel`` checkpoints (``encoder.*``);
* ``nvlabs``: the original NVlabs SegFormer / mmseg 0.x layout (``patch_embed1``, ``block1.0.attn.kv``,
  ``decode_head.linear_c4``...), full model (``backbone.`` prefix) or MiT encoder alone;
* ``mmseg``: mmseg 1.x ``MixVisionTransformer`` backbones (``layers.0.0.projection``...); its ``SegformerHead``
  has BN+ReLU per branch, a different head, so only the backbone is imported and the head keys are reported;
* ``torchvision``: DeepLabV3 (``backbone.layer1``..., ``classifier.0.convs``...); the optional ``aux_classifier``
  is skipped (training-only) and reported.

Every conversion returns a :class:`ConversionReport` listing source keys it could not place and model keys it
left at their initial values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from segkd.checkpoint import load_state_checked, read_safetensors, torch_load_weights
from segkd.errors import SegkdError
from segkd.models.base import SegModel, is_training_only


@dataclass
class ConversionReport:
    source_format: str
    placed: int = 0
    unplaced: list[str] = field(default_factory=list)  # source keys with no place in the model
    skipped: list[str] = field(default_factory=list)  # source keys deliberately dropped (aux head, cls head)
    missing: list[str] = field(default_factory=list)  # model keys left at initialisation


def read_foreign(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``weights_only=True``), unwrapped and de-prefixed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state: dict = read_safetensors(path)[0]
    else:
        state = torch_load_weights(path)
    for wrapper in ("state_dict", "model", "model_state", "module"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = dict(state[wrapper])
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise SegkdError(f"{path}: holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def detect_format(keys: list[str]) -> str:
    if any(re.match(r"(segformer\.)?(encoder\.patch_embeddings|stages\.\d+\.patch_embeddings)\.", k) for k in keys):
        return "hf"
    if any(re.search(r"(^|\.)patch_embed1\.", k) for k in keys):
        return "nvlabs"
    if any(re.search(r"(^|\.)layers\.\d+\.0\.projection\.", k) for k in keys):
        return "mmseg"
    if any(k.startswith(("backbone.layer1.", "classifier.0.convs.")) for k in keys):
        return "torchvision"
    return "unknown"


_HF_BLOCK = {
    # transformers 4.x names (also the layout of checkpoints on the Hub)
    "layer_norm_1": "norm1",
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.sr_norm",
    "attention.output.dense": "attn.proj",
    "layer_norm_2": "norm2",
    "mlp.dense1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv",
    "mlp.dense2": "mlp.fc2",
    # transformers 5.x names
    "layernorm_before": "norm1",
    "attention.q_proj": "attn.q",
    "attention.k_proj": "attn.k",
    "attention.v_proj": "attn.v",
    "attention.o_proj": "attn.proj",
    "attention.sequence_reduction.sequence_reduction": "attn.sr",
    "attention.sequence_reduction.layer_norm": "attn.sr_norm",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _map_hf(key: str) -> str | None:
    k = key.removeprefix("segformer.")
    patch = r"(?:encoder\.patch_embeddings\.(\d)|stages\.(\d)\.patch_embeddings)\.(proj|layer_norm)\.(\w+)"
    if m := re.fullmatch(patch, k):
        part = "proj" if m[3] == "proj" else "norm"
        return f"encoder.patch_embeds.{m[1] or m[2]}.{part}.{m[4]}"
    if m := re.fullmatch(r"(?:encoder\.block|stages)\.(\d)\.(?:blocks\.)?(\d+)\.(.+)\.(weight|bias)", k):
        sub = _HF_BLOCK.get(m[3])
        return f"encoder.stages.{m[1]}.{m[2]}.{sub}.{m[4]}" if sub else None
    if m := re.fullmatch(r"(?:encoder\.layer_norm\.(\d)|stages\.(\d)\.layer_norm)\.(weight|bias)", k):
        return f"encoder.norms.{m[1] or m[2]}.{m[3]}"
    if m := re.fullmatch(r"decode_head\.linear_(?:c|projections)\.(\d)\.proj\.(weight|bias)", k):
        return f"decode_head.linear_c.{m[1]}.{m[2]}"
    if k == "decode_head.linear_fuse.weight":
        return k
    if m := re.fullmatch(r"decode_head\.batch_norm\.(.+)", k):
        return f"decode_head.bn.{m[1]}"
    if m := re.fullmatch(r"decode_head\.classifier\.(weight|bias)", k):
        return k
    return None


_NV_BLOCK = {
    "norm1": "norm1",
    "attn.q": "attn.q",
    "attn.proj": "attn.proj",
    "attn.sr": "attn.sr",
    "attn.norm": "attn.sr_norm",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv",
    "mlp.fc2": "mlp.fc2",
}


def _convert_nvlabs(src: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    out: dict[str, Tensor] = {}
    unplaced, skipped = [], []
    for key, v in src.items():
        k = key.removeprefix("backbone.")
        if m := re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(weight|bias)", k):
            out[f"encoder.patch_embeds.{int(m[1]) - 1}.{m[2]}.{m[3]}"] = v
        elif m := re.fullmatch(r"block(\d)\.(\d+)\.attn\.kv\.(weight|bias)", k):
            kk, vv = v.chunk(2, dim=0)  # NVlabs reshapes kv to (2, heads, head_dim): k first, then v
            base = f"encoder.stages.{int(m[1]) - 1}.{m[2]}.attn"
            out[f"{base}.k.{m[3]}"], out[f"{base}.v.{m[3]}"] = kk, vv
        elif m := re.fullmatch(r"block(\d)\.(\d+)\.(.+)\.(weight|bias)", k):
            sub = _NV_BLOCK.get(m[3])
            if sub is None:
                unplaced.append(key)
            else:
                out[f"encoder.stages.{int(m[1]) - 1}.{m[2]}.{sub}.{m[4]}"] = v
        elif m := re.fullmatch(r"norm(\d)\.(weight|bias)", k):
            out[f"encoder.norms.{int(m[1]) - 1}.{m[2]}"] = v
        elif m := re.fullmatch(r"decode_head\.linear_c(\d)\.proj\.(weight|bias)", k):
            out[f"decode_head.linear_c.{int(m[1]) - 1}.{m[2]}"] = v
        elif k == "decode_head.linear_fuse.conv.weight":
            out["decode_head.linear_fuse.weight"] = v
        elif m := re.fullmatch(r"decode_head\.linear_fuse\.bn\.(.+)", k):
            out[f"decode_head.bn.{m[1]}"] = v
        elif m := re.fullmatch(r"decode_head\.linear_pred\.(weight|bias)", k):
            out[f"decode_head.classifier.{m[1]}"] = v
        elif k.startswith("head."):
            skipped.append(key)  # ImageNet classification head of an encoder checkpoint
        else:
            unplaced.append(key)
    return out, unplaced, skipped


_MM_BLOCK = {"ln1": "norm1", "ln2": "norm2", "attn.attn.out_proj": "attn.proj", "attn.sr": "attn.sr",
             "attn.norm": "attn.sr_norm", "ffn.layers.1": "mlp.dwconv"}


def _convert_mmseg(src: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    out: dict[str, Tensor] = {}
    unplaced, skipped = [], []
    for key, v in src.items():
        k = key.removeprefix("backbone.")
        if m := re.fullmatch(r"layers\.(\d)\.0\.(projection|norm)\.(weight|bias)", k):
            out[f"encoder.patch_embeds.{m[1]}.{'proj' if m[2] == 'projection' else 'norm'}.{m[3]}"] = v
        elif m := re.fullmatch(r"layers\.(\d)\.1\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", k):
            base = f"encoder.stages.{m[1]}.{m[2]}.attn"
            for name, part in zip("qkv", v.chunk(3, dim=0), strict=True):
                out[f"{base}.{name}.{m[3]}"] = part
        elif m := re.fullmatch(r"layers\.(\d)\.1\.(\d+)\.ffn\.layers\.(0|4)\.(weight|bias)", k):
            fc = "fc1" if m[3] == "0" else "fc2"
            out[f"encoder.stages.{m[1]}.{m[2]}.mlp.{fc}.{m[4]}"] = v.flatten(1) if m[4] == "weight" else v
        elif m := re.fullmatch(r"layers\.(\d)\.1\.(\d+)\.(.+)\.(weight|bias)", k):
            sub = _MM_BLOCK.get(m[3])
            if sub is None:
                unplaced.append(key)
            else:
                out[f"encoder.stages.{m[1]}.{m[2]}.{sub}.{m[4]}"] = v
        elif m := re.fullmatch(r"layers\.(\d)\.2\.(weight|bias)", k):
            out[f"encoder.norms.{m[1]}.{m[2]}"] = v
        elif k.startswith(("decode_head.", "auxiliary_head.")):
            skipped.append(key)  # mmseg 1.x SegformerHead differs from the published all-MLP head
        else:
            unplaced.append(key)
    return out, unplaced, skipped


def _map_transformer(src: dict[str, Tensor], fmt: str, report: ConversionReport) -> dict[str, Tensor]:
    """A SegFormer/MiT checkpoint (HF, NVlabs or mmseg keys) under segkd's key names (no model needed)."""
    if fmt == "nvlabs":
        out, report.unplaced, report.skipped = _convert_nvlabs(src)
        return out
    if fmt == "mmseg":
        out, report.unplaced, report.skipped = _convert_mmseg(src)
        return out
    if fmt != "hf":
        raise SegkdError(f"keys look like a {fmt} checkpoint, not a SegFormer/MiT one (first key {next(iter(src))!r})")
    out = {}
    for key, v in src.items():
        new = _map_hf(key)
        if new is not None:
            out[new] = v
        elif key.startswith("classifier."):
            report.skipped.append(key)  # ImageNet head of an encoder-only checkpoint
        else:
            report.unplaced.append(key)
    return out


def detect_model(src: dict[str, Tensor], source: str | Path) -> str:
    """The zoo model a foreign checkpoint holds, from its keys and shapes alone (what ``segkd convert`` uses
    without ``-m``): a MiT variant from its stage-1 width and blocks per stage, a torchvision DeepLabV3's ResNet
    depth from its blocks per stage. One line when the layout says neither."""
    fmt = detect_format(list(src))
    if fmt in ("hf", "nvlabs", "mmseg"):
        from segkd.models.segformer import MIT_CONFIGS

        mapped = _map_transformer(src, fmt, ConversionReport(fmt))
        depths = tuple(1 + max((int(m[1]) for k in mapped if (m := re.match(rf"encoder\.stages\.{s}\.(\d+)\.", k))),
                               default=-1) for s in range(4))
        width = mapped.get("encoder.patch_embeds.0.proj.weight")
        found = (None if width is None else int(width.shape[0]), depths)
        for variant, cfg in MIT_CONFIGS.items():
            if (cfg.dims[0], cfg.depths) == found:
                return f"segformer-{variant}"
        raise SegkdError(f"{source}: a {fmt} SegFormer/MiT checkpoint of no known variant (stage-1 width "
                         f"{found[0]}, blocks per stage {depths}); pass --model")
    if fmt == "torchvision":
        blocks = tuple(1 + max((int(m[1]) for k in src if (m := re.match(rf"backbone\.layer{s}\.(\d+)\.", k))),
                               default=-1) for s in (1, 2, 3, 4))
        depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50, (3, 4, 23, 3): 101}.get(blocks)
        if depth is not None and (depth == 18) != any(".conv3." in k for k in src):
            return f"deeplabv3-resnet{depth}"
        raise SegkdError(f"{source}: a torchvision DeepLabV3 with ResNet blocks per stage {blocks}, which no zoo "
                         "model has; pass --model")
    raise SegkdError(f"{source}: cannot tell the model from its keys (first key {next(iter(src))!r}); pass --model")


def convert_state(src: dict[str, Tensor], model: SegModel) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map a foreign state dict onto ``model``'s keys. Shapes are checked by the caller's load."""
    fmt = detect_format(list(src))
    report = ConversionReport(fmt)
    out: dict[str, Tensor] = {}
    if model.family == "transformer":
        out = _map_transformer(src, fmt, report)
    else:
        if fmt != "torchvision":
            raise SegkdError(f"keys look like a {fmt} checkpoint, not a torchvision DeepLab one (first key "
                             f"{next(iter(src))!r})")
        own = model.state_dict()
        for key, v in src.items():
            if is_training_only(model, key) and key not in own:
                report.skipped.append(key)
            elif key in own:
                out[key] = v
            elif key.startswith("backbone.fc."):
                report.skipped.append(key)
            else:
                report.unplaced.append(key)
    own = model.state_dict()
    for key in list(out):
        if key not in own:
            report.unplaced.append(key)
            del out[key]
    report.placed = len(out)
    report.missing = [k for k in own if k not in out and not k.endswith("num_batches_tracked")]
    return out, report


def infer_num_classes(src: dict[str, Tensor]) -> int | None:
    """The class count of a foreign segmentation checkpoint, from its classifier weight."""
    for key in ("decode_head.classifier.weight", "decode_head.linear_pred.weight", "classifier.4.weight"):
        if key in src:
            return int(src[key].shape[0])
    return None


def load_pretrained_encoder(model: SegModel, path: str | Path) -> ConversionReport:
    """Load a MiT encoder (HF, NVlabs or mmseg layout) into a SegFormer; every encoder key must be found."""
    src = read_foreign(path)
    state, report = convert_state(src, model)
    enc = {k: v for k, v in state.items() if k.startswith("encoder.")}
    need = [k for k in model.state_dict() if k.startswith("encoder.")]
    missing = [k for k in need if k not in enc]
    if missing:
        raise SegkdError(f"{path}: not a MiT-{model.variant} encoder checkpoint: missing {missing[0]!r}")  # type: ignore[attr-defined]
    load_state_checked(model, enc, str(path), strict=False, exact_dtype=False)
    return report


def convert_checkpoint(
    src_path: str | Path,
    model_name: str | None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> tuple[SegModel, dict, ConversionReport]:
    """Build ``model_name`` and load a foreign checkpoint into it.

    Returns the model, the ``model_kwargs`` it was built with (recorded in the segkd checkpoint) and the report.
    The class count comes from ``num_classes``, else from ``class_names``, else from the source's classifier.
    """
    from segkd.models import MODELS, create_model

    src = read_foreign(src_path)
    fmt = detect_format(list(src))
    model_name = model_name or detect_model(src, src_path)
    family = MODELS.get(model_name).family
    expected = ("hf", "nvlabs", "mmseg") if family == "transformer" else ("torchvision",)
    if fmt not in expected:
        kind = "a SegFormer/MiT" if family == "transformer" else "a torchvision DeepLab"
        first = next(iter(src))
        raise SegkdError(f"{src_path}: keys look like a {fmt} checkpoint, not {kind} one (first key {first!r})")
    found = infer_num_classes(src)
    if num_classes is None:
        num_classes = len(class_names) if class_names else found
    if num_classes is None:
        raise SegkdError(f"{src_path}: no classifier in the checkpoint; pass --num-classes")
    kwargs: dict = {}
    if family == "transformer" and fmt == "hf":
        kwargs["ln_eps"] = 1e-5  # HF SegFormer uses PyTorch's default LayerNorm eps in blocks and stage norms
    model = create_model(model_name, num_classes=num_classes, **kwargs)
    state, report = convert_state(src, model)
    _check_fit(src, src_path, state, model, found)
    if found is not None and found != num_classes:
        # a different class count: keep everything but the classifier, which stays freshly initialised
        # weight/bias only: BatchNorm's 0-dim num_batches_tracked (torchvision classifier.2.*) has no first dim
        head = [k for k in state if k.startswith(("decode_head.classifier.", "classifier.4.", "classifier."))
                and k.endswith(("weight", "bias")) and state[k].dim() > 0 and state[k].shape[0] == found]
        for k in head:
            report.skipped.append(k)
            del state[k]
        report.missing = [k for k in model.state_dict() if k not in state and not k.endswith("num_batches_tracked")]
        report.placed = len(state)
    if not state:
        raise SegkdError(f"{src_path}: no key could be placed in {model_name}")
    load_state_checked(model, state, str(src_path), strict=False, exact_dtype=False)
    return model, kwargs, report


def _check_fit(src: dict[str, Tensor], src_path: str | Path, state: dict[str, Tensor], model: SegModel,
               found: int | None) -> None:
    """One line when the checkpoint is another architecture than ``-m`` (a ResNet-18 given as -m deeplabv3-resnet50):
    how many tensors differ in shape, the first, and the model the checkpoint holds. The classifier of another class
    count is not a mismatch (it is re-initialised)."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
           and not (found is not None and v.dim() > 0 and v.shape[0] == found and k.startswith(
               ("decode_head.classifier.", "classifier.4.")))]
    if not bad:
        return
    try:
        holds = f"; it holds a {detect_model(src, src_path)} (leave -m out to import it as that)"
    except SegkdError:
        holds = ""
    k = bad[0]
    raise SegkdError(f"{src_path}: not a {model.zoo_name} checkpoint: {len(bad)} of {len(state)} tensors differ in "
                     f"shape (first {k}: {tuple(state[k].shape)} here, {tuple(own[k].shape)} in "
                     f"{model.zoo_name}){holds}")


def read_class_file(path: str | Path) -> tuple[list[str], list[list[int]] | None]:
    """Class names from a text file (one per line) or a JSON file with ``classes`` (and optional ``palette``)."""
    import json

    p = Path(path)
    if not p.is_file():
        raise SegkdError(f"{p}: class-name file not found")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
            names = [c if isinstance(c, str) else c["name"] for c in data["classes"]]
            palette = [[int(v) for v in rgb] for rgb in data["palette"]] if data.get("palette") else None
        except (ValueError, KeyError, TypeError) as e:
            raise SegkdError(f"{p}: expected JSON with a 'classes' list (and optional 'palette'): {e}") from None
        if palette is not None and len(palette) != len(names):
            raise SegkdError(f"{p}: {len(palette)} palette colours for {len(names)} classes")
        return names, palette
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()], None


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_hf_folder(src: str | Path) -> Path:
    """A ``save_pretrained`` folder -> its weights file (``model.safetensors``, else ``pytorch_model.bin``); any
    other path is returned as is."""
    src = Path(src)
    if not src.is_dir():
        return src
    for name in HF_WEIGHT_FILES:
        if (src / name).is_file():
            return src / name
    raise SegkdError(f"{src}: a folder without {' or '.join(HF_WEIGHT_FILES)} (a HuggingFace save_pretrained folder "
                     "holds one); give the checkpoint file itself")


def hf_label_names(weights: Path) -> list[str] | None:
    """The class names of a HuggingFace checkpoint: ``id2label`` of the ``config.json`` beside ``weights``, in id
    order; ``None`` without one, or when it only holds transformers' ``LABEL_i`` placeholders."""
    import json

    config = weights.parent / "config.json"
    if not config.is_file():
        return None
    try:
        id2label = json.loads(config.read_text()).get("id2label") or {}
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (ValueError, TypeError, AttributeError):
        raise SegkdError(f"{config}: not a readable HuggingFace config.json (id2label)") from None
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def run_convert(
    src: str | Path,
    model_name: str | None,
    out: str | Path,
    num_classes: int | None = None,
    classes_file: str | Path | None = None,
    ignore_index: int = 255,
) -> dict:
    """``segkd convert``: import ``src`` into ``model_name`` (``None``: the model :func:`detect_model` finds) and
    write a segkd checkpoint; returns the report."""
    from dataclasses import asdict

    from segkd.checkpoint import CheckpointMeta, file_sha256, save_checkpoint

    src = resolve_hf_folder(src)
    class_names, palette = None, None
    if classes_file is not None:
        class_names, palette = read_class_file(classes_file)
        if num_classes is not None and len(class_names) != num_classes:
            raise SegkdError(f"{classes_file}: {len(class_names)} class names but --num-classes {num_classes}")
    model, kwargs, report = convert_checkpoint(src, model_name, num_classes, class_names)
    if class_names is None:  # a HuggingFace checkpoint names its classes in config.json: use them, not class0..
        hf_names = hf_label_names(src)
        if hf_names is not None and len(hf_names) == model.num_classes:
            class_names = hf_names
    meta = CheckpointMeta(
        model=model.zoo_name,
        num_classes=model.num_classes,
        class_names=class_names or [],
        palette=palette or [],
        ignore_index=ignore_index,
        model_kwargs=kwargs,
        args={"command": "convert", "src": str(src), "src_sha256": file_sha256(src)},
        source=f"{report.source_format}:{Path(src).name}",
    )
    save_checkpoint(out, model, meta)
    return {"model": model.zoo_name, "model_detected": model_name is None, "num_classes": model.num_classes,
            "out": str(out), **asdict(report)}
