"""morphonnx: MorphNet-style channel groups, costs, specs and pruning for ONNX models.

The library API (:mod:`morphonnx.api`): ``analyze_file``, ``make_spec``, ``make_mask`` and
``prune_file`` run each command's flow; the CLI calls the same functions. They are imported on
first use, so ``import morphonnx`` (and ``morphonnx --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from morphonnx.errors import MorphonnxError

if TYPE_CHECKING:
    from morphonnx.api import (
        PruneReport,
        VerificationFailed,
        analyze_file,
        make_mask,
        make_spec,
        prune_file,
    )

__all__ = [
    "MorphonnxError",
    "PruneReport",
    "VerificationFailed",
    "analyze_file",
    "make_mask",
    "make_spec",
    "prune_file",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "MorphonnxError":
        return getattr(importlib.import_module("morphonnx.api"), name)
    raise AttributeError(f"module 'morphonnx' has no attribute {name!r}")
