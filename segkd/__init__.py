"""segkd: knowledge distillation for semantic segmentation.

Python API (the CLI drives the same functions)::

    import segkd
    model = segkd.create_model("segformer-b0", num_classes=11)      # plain nn.Module, logits at 1/4
    model = segkd.load_model("student.safetensors")                  # rebuilt from the checkpoint alone
    logits = model(x)                        # architecture's own stride (model.output_stride)
    full = segkd.upsample_logits(logits, x.shape[-2:])               # or model.predict(x)
    out = model(x, taps=True)                # SegOutput: logits + named features / patch embeddings
"""

__version__ = "0.1.0"

from segkd.checkpoint import CheckpointMeta, load_model, save_checkpoint  # noqa: E402
from segkd.models import MODELS, create_model, upsample_logits  # noqa: E402

__all__ = ["MODELS", "CheckpointMeta", "__version__", "create_model", "load_model", "save_checkpoint",
           "upsample_logits"]
