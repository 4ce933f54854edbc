"""ONNX export of deployable segkd models: export, verification, ONNX Runtime predictor, TensorRT readiness."""

from segkd.export.onnx_export import DeployModel, ExportConfig, export_checkpoint
from segkd.export.runtime import create_session, load_onnx_predictor, read_onnx_metadata
from segkd.export.tensorrt import check_graph, trtexec_command

__all__ = [
    "DeployModel",
    "ExportConfig",
    "check_graph",
    "create_session",
    "export_checkpoint",
    "load_onnx_predictor",
    "read_onnx_metadata",
    "trtexec_command",
]
