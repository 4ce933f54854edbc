"""segkd: knowledge distillation for semantic segmentation.

Python API (the CLI drives the same functions)::

    import segkd
    model = segkd.create_model("segformer-b0", num_classes=11)      # plain nn.Module, logits at 1/4
    model = segkd.load_model("student.safetensors")                  # rebuilt from the checkpoint alone
    logits = model(x)                        # architecture's own stride (model.output_stride)
    full = segkd.upsample_logits(logits, x.shape[-2:])               # or model.predict(x)
    out = model(x, taps=True)                # SegOutput: logits + named features / patch embeddings
    size = segkd.trained_size(model.segkd_meta).resize               # the size it was validated at (or None)
    x = segkd.preprocess_image(rgb, model.segkd_meta, size)          # H x W x 3 uint8 -> 1 x 3 x h x w, normalised
"""

__version__ = "0.1.0"

_LAZY = {
    "CheckpointMeta": "segkd.checkpoint",
    "load_model": "segkd.models.loading",
    "save_checkpoint": "segkd.checkpoint",
    "MODELS": "segkd.models",
    "create_model": "segkd.models",
    "upsample_logits": "segkd.models",
    "preprocess_image": "segkd.engine.predict",
    "run_predict": "segkd.engine.predict",
    "trained_size": "segkd.shapes",
}


def __getattr__(name: str):
    # imported on first use, so `segkd --version` and `--help` do not pay for torch/timm
    if name in _LAZY:
        import importlib  # lazy CLI start: this module is what `segkd --version` imports

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segkd' has no attribute {name!r}")


__all__ = ["MODELS", "CheckpointMeta", "__version__", "create_model", "load_model", "preprocess_image", "run_predict",
           "save_checkpoint", "trained_size", "upsample_logits"]
