"""morphonnx: MorphNet-style channel groups, costs, specs and pruning for ONNX models."""

from morphonnx.errors import MorphonnxError

__all__ = ["MorphonnxError"]
__version__ = "0.1.0"
