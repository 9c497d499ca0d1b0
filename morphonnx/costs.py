"""Per-op cost model with MorphNet's conventions: MACs, FLOPs, params, bytes, roofline latency.

- ``macs``: multiply-accumulates of the registry's weighted layers (Conv, ConvTranspose, Gemm,
  MatMul; no bias); others are 0.
- ``flops`` = 2 x ``macs``.
- ``params``: elements of the op's floating-point constant inputs (weights, biases, norm
  parameters; shape vectors and indices are not parameters).
- ``bytes``: what the op reads and writes: computed inputs + outputs + float constant inputs, each
  at its dtype size (or the device's ``bytes_per_element``), at the graph's batch.
- latency on a device: ``max(flops / peak_flops, bytes / mem_bandwidth)``.

Costs are a function of tensor shapes only, so the costs of a pruned model can be predicted by
running the same functions on the shrunk shapes (``shape_of``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from morphonnx.devices import Device
from morphonnx.graph import Graph
from morphonnx.ir import Node
from morphonnx.ops import ShapeOf, numel, op_kind


@dataclass
class OpCost:
    """Cost of one node at the graph's batch; ``bytes`` uses each tensor's own dtype size."""

    name: str
    op_type: str
    macs: int
    params: int
    bytes: int
    elements: int  # activations read + written + weights, for devices that fix the element size

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def nbytes(self, device: Device) -> int:
        """Memory traffic on ``device``: dtype-sized, or ``elements x bytes_per_element``."""
        if device.bytes_per_element is None:
            return self.bytes
        return self.elements * device.bytes_per_element

    def latency(self, device: Device) -> float:
        """Roofline seconds: ``max(flops / peak_flops, nbytes / mem_bandwidth)``."""
        return device.latency(self.flops, self.nbytes(device))

    def bound(self, device: Device) -> str:
        """``"compute"`` or ``"memory"``: which side of the roofline sets the latency."""
        return device.bound(self.flops, self.nbytes(device))


@dataclass
class Totals:
    """Whole-model sums; each weight counts once in ``params``; ``latency`` is keyed by device."""

    macs: int
    params: int
    weight_bytes: int
    latency: dict[str, float] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def node_macs(node: Node, shape_of: ShapeOf) -> int:
    """MACs of one node from its shapes (0 for ops that are not weighted layers)."""
    layer = op_kind(node).layer
    if layer is None or len(node.inputs) < 2:
        return 0
    a, b = shape_of(node.inputs[0]), shape_of(node.inputs[1])
    y = shape_of(node.outputs[0])
    if a is None or b is None or y is None or not a:
        return 0
    return layer.macs(node, a, b, y)


def op_costs(graph: Graph, shape_of: ShapeOf | None = None) -> list[OpCost]:
    """Cost of every node in graph order; nodes that only compute constants cost nothing."""
    shape = shape_of or graph.shape
    result = []
    for node in graph.nodes:
        if all(graph.is_const(t) for t in node.outputs if t):
            result.append(OpCost(node.name, node.op_type, 0, 0, 0, 0))
            continue
        params = elements = nbytes = 0
        for t in dict.fromkeys(t for t in node.inputs if t):
            info = graph.info(t)
            n = numel(shape(t))
            if graph.is_const(t):
                if info.dtype is None or info.dtype.kind != "f":
                    continue
                params += n
            elements += n
            nbytes += n * info.itemsize
        for t in node.outputs:
            if t:
                n = numel(shape(t))
                elements += n
                nbytes += n * graph.info(t).itemsize
        macs = node_macs(node, shape)
        result.append(OpCost(node.name, node.op_type, macs, params, nbytes, elements))
    return result


def weight_tensors(graph: Graph, stored: Collection[str] = ()) -> list[str]:
    """Distinct floating-point constants stored in the model that feed a computation.

    A folded constant (``Unsqueeze``/``Transpose``/``Mul``... of weights) stands for the stored
    constants it is computed from, so a weight read both directly and through such a view (tied
    embeddings: ``Gather(W)`` and ``MatMul(x, Transpose(W))``) counts once. Folded constants in
    ``stored`` count as themselves: ``prune`` writes the ones it slices as initializers.
    """
    used: dict[str, None] = {}
    visited: set[str] = set()

    def add_sources(t: str) -> None:
        stack = [t]
        while stack:
            name = stack.pop()
            if name in visited:
                continue
            visited.add(name)
            c = graph.constants[name]
            if c.kind == "copy" and name not in stored:
                stack.append(c.source or name)  # counts as what it copies
                continue
            folded = c.kind == "folded" and name not in stored
            producer = graph.by_name.get(c.node or "") if folded else None
            if producer is None:
                used.setdefault(name, None)
            else:
                stack.extend(s for s in reversed(producer.inputs) if graph.is_const(s))

    for n in graph.nodes:
        if all(graph.is_const(o) for o in n.outputs if o):
            continue  # computes constants only: its inputs count where its outputs are used
        for t in n.inputs + n.implicit_inputs:
            if graph.is_const(t):
                add_sources(t)
    return [t for t in used if (dt := graph.info(t).dtype) is not None and dt.kind == "f"]


def totals(
    graph: Graph,
    costs: list[OpCost],
    devices: Iterable[Device] = (),
    shape_of: ShapeOf | None = None,
    stored: Collection[str] = (),
) -> Totals:
    """Sum ``costs`` (from :func:`op_costs`) over the graph, with latency on each device.
    ``stored``: folded constants that count as stored weights (see :func:`weight_tensors`)."""
    shape = shape_of or graph.shape
    weights = weight_tensors(graph, stored)
    params = sum(numel(shape(t)) for t in weights)
    wbytes = sum(numel(shape(t)) * graph.info(t).itemsize for t in weights)
    return Totals(
        macs=sum(c.macs for c in costs),
        params=params,
        weight_bytes=wbytes,
        latency={d.name: sum(c.latency(d) for c in costs) for d in devices},
    )
