"""Safe loading of untrusted ONNX files into a :class:`~morphonnx.graph.Graph`, one concern per
module: ``files`` (reading and checking the file), ``inputs`` (concrete input shapes), ``nodes``
(names, order, references), ``constants`` (where constant values live) and ``shapes`` (shape
inference). Every error is one line naming the file."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from morphonnx.errors import MorphonnxError
from morphonnx.graph import Graph
from morphonnx.load.constants import find_constants, fold_constants, unshare_per_channel_constants
from morphonnx.load.files import check_external_data, default_opset, read_model
from morphonnx.load.inputs import batch_filled, resolve_input_shapes
from morphonnx.load.nodes import check_references, make_nodes
from morphonnx.load.shapes import infer_tensor_shapes

__all__ = ["load_graph"]


def load_graph(
    path: str | os.PathLike[str],
    *,
    batch: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Graph:
    """Load ``path`` with every tensor shape known, or raise a one-line :class:`MorphonnxError`."""
    try:
        return _load_graph(Path(path), batch, input_shapes or {})
    except MorphonnxError as err:
        flat = _one_line(str(err))
        if flat != str(err):
            raise MorphonnxError(flat) from None
        raise


_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
"""Characters ``str.splitlines`` breaks on."""


def _one_line(text: str) -> str:
    """``text`` with line breaks escaped, so names and paths from the file cannot split it."""
    return "".join(c.encode("unicode_escape").decode() if c in _LINE_BREAKS else c for c in text)


def _load_graph(p: Path, batch: int, input_shapes: Mapping[str, Sequence[int]]) -> Graph:
    model, lazy = read_model(p)
    check_external_data(model, p)
    opset = default_opset(model)
    defined = {t.name for t in model.graph.initializer}
    defined.update(o for n in model.graph.node for o in n.output)
    real_inputs = [i for i in model.graph.input if i.name not in defined]
    fixed = resolve_input_shapes(p, real_inputs, batch, input_shapes)
    nodes = make_nodes(model)
    check_references(p, model, nodes)
    constants = find_constants(model, nodes, p, lazy)
    tensors = infer_tensor_shapes(p, model, fixed, constants, [n.index for n in nodes])
    fold_constants(nodes, constants, tensors)
    unshare_per_channel_constants(nodes, constants)
    return Graph(
        model=model,
        path=p,
        nodes=nodes,
        tensors=tensors,
        constants=constants,
        inputs=[i.name for i in real_inputs],
        outputs=[o.name for o in model.graph.output],
        opset=opset,
        lazy=lazy,
        batch_used=batch_filled(real_inputs, input_shapes),
    )
