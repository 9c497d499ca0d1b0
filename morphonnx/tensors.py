"""Every tensor a model stores, wherever it is: the loader checks exactly the tensors that saving
(and onnx) later read, so both walk the model with this one function."""

from __future__ import annotations

import onnx


def all_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers, ``TENSOR`` / ``TENSORS`` attributes (``Constant`` values, ``ConstantOfShape``
    fills), in the graph and in every subgraph (If / Loop / Scan bodies), recursively."""
    found = list(graph.initializer)
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                found.append(a.t)
            elif a.type == onnx.AttributeProto.TENSORS:
                found.extend(a.tensors)
            elif a.type == onnx.AttributeProto.GRAPH:
                found.extend(all_tensors(a.g))
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    found.extend(all_tensors(sg))
    return found
