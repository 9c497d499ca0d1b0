"""Concrete input shapes: symbolic dims are resolved from ``--batch`` / ``--input-shape`` before
shape inference, and a dim left unknown is an error that names it."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx

from morphonnx.errors import MorphonnxError


def _dims(vi: onnx.ValueInfoProto) -> list[int | str] | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def resolve_input_shapes(
    p: Path,
    inputs: Sequence[onnx.ValueInfoProto],
    batch: int,
    given: Mapping[str, Sequence[int]],
) -> dict[str, list[int]]:
    """Concrete shapes of the graph inputs: given ones, else declared ones with batch filled in."""
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            raise MorphonnxError(f"{p}: --input-shape names '{name}', not an input of the model")
    if batch < 1:
        raise MorphonnxError(f"{p}: --batch must be at least 1")
    fixed: dict[str, list[int]] = {}
    for vi in inputs:
        dims = _dims(vi)
        if vi.name in given:
            try:
                shape = [operator.index(d) for d in given[vi.name]]
            except TypeError:
                raise MorphonnxError(
                    f"{p}: --input-shape for '{vi.name}' must be integers"
                ) from None
            if dims is not None and len(dims) != len(shape):
                raise MorphonnxError(
                    f"{p}: input '{vi.name}' has rank {len(dims)}, --input-shape gives {len(shape)}"
                )
            if any(d < 1 for d in shape):
                raise MorphonnxError(f"{p}: --input-shape for '{vi.name}' must be positive dims")
            fixed[vi.name] = shape
            continue
        if dims is None:
            if vi.type.HasField("tensor_type"):
                raise MorphonnxError(
                    f"{p}: input '{vi.name}' has no declared shape; pass --input-shape "
                    f"{vi.name}=D0,D1,..."
                )
            continue
        shape = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif axis == 0:
                shape.append(batch)
            else:
                hint = ",".join(
                    str(v) if isinstance(v, int) and v > 0 else str(batch) if a == 0 else f"D{a}"
                    for a, v in enumerate(dims)
                )
                raise MorphonnxError(
                    f"{p}: input '{vi.name}' has dynamic dim '{d}' at axis {axis}; pass "
                    f"--input-shape {vi.name}={hint} with a size for each D"
                )
        fixed[vi.name] = shape
    return fixed


def batch_filled(inputs: Sequence[onnx.ValueInfoProto], given: Mapping[str, Sequence[int]]) -> bool:
    """Whether ``--batch`` filled a dynamic batch dim of some input (else it changes nothing)."""
    return any(
        (dims := _dims(i)) and not (isinstance(dims[0], int) and dims[0] > 0)
        for i in inputs
        if i.name not in given
    )
