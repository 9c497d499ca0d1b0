"""Reading an untrusted ONNX file: parse errors become one-line errors, weights stay on disk
(read lazily: analyze never needs their values), and no tensor's data may lie outside the model's
folder or beyond the end of its data file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from morphonnx.errors import MorphonnxError
from morphonnx.ir import np_dtype
from morphonnx.protoscan import LazyWeights, read_stripped
from morphonnx.tensors import all_tensors


def read_model(p: Path) -> tuple[onnx.ModelProto, LazyWeights]:
    """Parse the graph; big weights stay on disk until a command needs their values."""
    if not p.exists():
        raise MorphonnxError(f"{p}: file not found")
    if not p.is_file():
        raise MorphonnxError(f"{p}: not a file")
    try:
        model, lazy = read_stripped(p)
    except OSError as exc:
        raise MorphonnxError(f"{p}: cannot read file ({exc.strerror or exc})") from None
    except Exception as exc:  # protobuf raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MorphonnxError(f"{p}: not a valid ONNX model ({first})") from None
    if not model.HasField("graph") or not model.graph.output:
        raise MorphonnxError(f"{p}: not a valid ONNX model (no graph outputs; truncated file?)")
    if not model.opset_import:
        raise MorphonnxError(f"{p}: not a valid ONNX model (no opset_import; truncated file?)")
    return model, lazy


PACKED_OR_VARIABLE = frozenset(
    getattr(onnx.TensorProto, n, -1)
    for n in ("UNDEFINED", "STRING", "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
)
"""Element types whose stored size is not ``numel * itemsize``."""


def check_external_data(model: onnx.ModelProto, p: Path) -> None:
    """Refuse external-data locations that escape the model's folder (absolute, ``..``, links).

    The folder is the one holding ``p`` as given (not a symlink's target): that is where
    ``onnx`` and :meth:`Graph.value` look for the data.
    """
    base = p.absolute().parent.resolve()
    for t in all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location", "")
        where = f"{p}: external data of tensor '{t.name}' at '{loc}'"
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            raise MorphonnxError(f"{where} points outside the model's folder")
        target = (base / loc).resolve()
        if base not in target.parents:
            raise MorphonnxError(f"{where} points outside the model's folder")
        if not target.is_file():
            raise MorphonnxError(f"{where} is missing")
        try:
            offset, length = (int(entries.get(k) or 0) for k in ("offset", "length"))
        except ValueError:
            offset = length = -1
        if offset < 0 or length < 0:
            raise MorphonnxError(f"{where} has an invalid offset or length")
        dtype = np_dtype(t.data_type)
        if not length and dtype is not None and t.data_type not in PACKED_OR_VARIABLE:
            length = int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
        if offset + length > target.stat().st_size:
            raise MorphonnxError(f"{where} is shorter than the tensor (truncated file?)")


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return onnx.defs.onnx_opset_version()


def check_initializer(path: Path | None, t: onnx.TensorProto, stored: int) -> np.dtype:
    """The dtype of initializer ``t``, after checking its type, dims and inline byte count."""
    dtype = np_dtype(t.data_type)
    if dtype is None:
        raise MorphonnxError(f"{path}: initializer '{t.name}' has unknown data type {t.data_type}")
    if any(d < 0 for d in t.dims):
        raise MorphonnxError(f"{path}: initializer '{t.name}' has negative dims {list(t.dims)}")
    if stored and t.data_type not in PACKED_OR_VARIABLE:
        need = int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
        if stored != need:
            raise MorphonnxError(
                f"{path}: initializer '{t.name}' holds {stored} bytes, its shape "
                f"{list(t.dims)} needs {need} (corrupt file?)"
            )
    return dtype
