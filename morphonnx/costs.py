"""Per-op cost model with MorphNet's conventions: MACs, FLOPs, params, bytes, roofline latency.

- ``macs``: multiply-accumulates of the registry's weighted layers (Conv, ConvTranspose, Gemm,
  MatMul; no bias); others are 0.
- ``flops`` = 2 x ``macs``.
- ``params``: elements of the op's floating-point constant inputs (weights, biases, norm
  parameters; shape vectors and indices are not parameters).
- ``bytes``: what the op reads and writes: computed inputs + outputs + float constant inputs, each
  at its dtype size (or the device's ``bytes_per_element``), at the graph's batch.
- latency on a device: ``Device.latency``: ``overhead + max(flops / peak(kind, shape), bytes /
  mem_bandwidth)``, where ``kind`` is the op's kind (dense conv, depthwise conv, Gemm/MatMul) for
  profiles that give a peak per kind, and ``shape`` what the peak reached depends on (channel
  alignment, efficiency curve: :class:`OpShape`); nodes that only compute constants cost
  nothing, and so do ops the device folds into the Conv before them (``Device.fuses``).

Costs are a function of tensor shapes only, so the costs of a pruned model can be predicted by
running the same functions on the shrunk shapes (``shape_of``). A cost that needs a shape nobody
could infer is ``None`` (unknown), never 0: totals then say they are incomplete.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from morphonnx.devices import FUSES_INTO, Device, OpShape, roofline_kind
from morphonnx.graph import Graph
from morphonnx.ir import Node, Shape
from morphonnx.ops import ShapeOf, op_kind


@dataclass
class OpCost:
    """Cost of one node at the graph's batch; ``bytes`` uses each tensor's own dtype size."""

    name: str
    op_type: str
    macs: int | None  # None: unknown (a shape it needs is unknown)
    params: int
    bytes: int | None
    elements: int | None  # activations read + written + weights, for a fixed element size
    kind: str | None = None  # op kind for per-kind peaks (morphonnx.devices.OP_KINDS)
    shape: OpShape = OpShape()  # channels, reduction, positions: for per-shape peaks (layer_shape)
    chains: tuple[tuple[str, ...], ...] = ()  # op types from each Conv it may fold into

    @property
    def known(self) -> bool:
        return self.macs is not None and self.bytes is not None

    @property
    def flops(self) -> int | None:
        return None if self.macs is None else 2 * self.macs

    def nbytes(self, device: Device) -> int | None:
        """Memory traffic on ``device``: dtype-sized, or ``elements x bytes_per_element``."""
        if device.bytes_per_element is None or self.elements is None:
            return self.bytes
        return self.elements * device.bytes_per_element

    def latency(self, device: Device) -> float | None:
        """Roofline seconds on ``device`` (:meth:`Device.latency`); 0 for constant-only nodes,
        None when a shape it needs is unknown."""
        if (self.macs == 0 and self.elements == 0) or device.fuses(self.chains):
            return 0.0
        flops, nbytes = self.flops, self.nbytes(device)
        if flops is None or nbytes is None:
            return None
        return device.latency(flops, nbytes, self.kind, self.shape)

    def bound(self, device: Device) -> str | None:
        """``"compute"`` or ``"memory"``: which side of the roofline sets the latency;
        ``"fused"`` for an op the device folds into the Conv before it."""
        if device.fuses(self.chains):
            return "fused"
        flops, nbytes = self.flops, self.nbytes(device)
        if flops is None or nbytes is None:
            return None
        return device.bound(flops, nbytes, self.kind, self.shape)


@dataclass
class Totals:
    """Whole-model sums; each weight counts once in ``params``; ``latency`` is keyed by device.
    ``unknown``: ops with an unknown cost; then ``latency`` is None, and ``macs`` too when one of
    them is a Conv/ConvTranspose/Gemm/MatMul (incomplete totals are never shown as numbers)."""

    macs: int | None
    params: int
    weight_bytes: int
    latency: dict[str, float | None] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    @property
    def flops(self) -> int | None:
        return None if self.macs is None else 2 * self.macs

    @property
    def complete(self) -> bool:
        return not self.unknown


def _numel(shape: Shape | None) -> int | None:
    """Elements of a tensor; None when its shape is unknown (never 0)."""
    if shape is None or any(d < 0 for d in shape):
        return None
    return math.prod(shape)


def node_macs(node: Node, shape_of: ShapeOf) -> int | None:
    """MACs of one node from its shapes (0 for ops that are not weighted layers, None when a
    shape it needs is unknown)."""
    layer = op_kind(node).layer
    if layer is None or len(node.inputs) < 2:
        return 0
    a, b = shape_of(node.inputs[0]), shape_of(node.inputs[1])
    y = shape_of(node.outputs[0])
    if a is None or b is None or y is None or any(_numel(s) is None for s in (a, b, y)):
        return None
    return layer.macs(node, a, b, y) if a else 0


def node_roofline_kind(node: Node, shape_of: ShapeOf) -> str | None:
    """The device profile's op kind of a node (dense/depthwise conv, Gemm/MatMul), None for ops
    that are no weighted layer of the registry."""
    layer = op_kind(node).layer
    if layer is None or len(node.inputs) < 2:
        return None
    w = shape_of(node.inputs[1])
    return roofline_kind(node.op_type, w is not None and layer.depthwise(node, w))


def layer_shape(node: Node, shape_of: ShapeOf, kind: str | None, macs: int | None) -> OpShape:
    """What a weighted layer's speed depends on (:class:`OpShape`): a conv's (input, output)
    channels (axis 1), the reduction length (MACs per output value) and the output positions per
    output channel (axis 1 of a conv, the last axis of a Gemm/MatMul); empty if unknown."""
    x, y = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if kind is None or not macs or x is None or y is None or len(x) < 2 or len(y) < 2:
        return OpShape()
    conv = kind in ("conv", "depthwise")
    out, per = math.prod(y), y[1] if conv else y[-1]
    channels = (x[1], y[1]) if conv else ()
    return OpShape(channels, macs / out if out else 0.0, out / per if per else 0.0)


_MAX_CHAIN = 4
"""Longest run of ops after a Conv looked at for fusion (Conv, BatchNormalization, Add, Relu: 3)."""
_MAX_CHAINS = 8
"""Most runs kept per op (an Add has two; a Concat of many convs needs no more to be priced)."""


def fusion_chains(graph: Graph, node: Node) -> tuple[tuple[str, ...], ...]:
    """Each run of op types from a Conv (:data:`FUSES_INTO`) whose output ``node`` reads, via ops
    that each alone read the one before (a runtime can only fold an op into a kernel whose output
    nothing else reads), to ``node`` itself. Every computed input is followed, so a residual Add
    reaches the conv on either side (runtimes accumulate the other input into that conv's output:
    onnxruntime's NCHWc ``Sum``), and one whose path on one side holds an op the device does not
    fold may still fold into the conv on the other."""

    seen: dict[tuple[int, int], list[tuple[str, ...]]] = {}  # (node, depth): its chains, once

    def walk(current: Node, depth: int) -> list[tuple[str, ...]]:
        if current.op_type in FUSES_INTO:
            return [(current.op_type,)]
        if depth == _MAX_CHAIN:
            return []
        key = (id(current), depth)
        if key not in seen:
            found: list[tuple[str, ...]] = []
            for t in dict.fromkeys(current.inputs):
                before = graph.producer.get(t) if t and not graph.is_const(t) else None
                if before is None or len(graph.consumers.get(t, [])) != 1 or t in graph.outputs:
                    continue
                found += [(*c, current.op_type) for c in walk(before, depth + 1)]
                if len(found) >= _MAX_CHAINS:
                    break
            seen[key] = found[:_MAX_CHAINS]
        return seen[key]

    return tuple(chain for chain in walk(node, 0) if len(chain) > 1)


def op_costs(graph: Graph, shape_of: ShapeOf | None = None) -> list[OpCost]:
    """Cost of every node in graph order; nodes that only compute constants cost nothing."""
    shape = shape_of or graph.shape
    result = []
    for node in graph.nodes:
        if all(graph.is_const(t) for t in node.outputs if t):
            result.append(OpCost(node.name, node.op_type, 0, 0, 0, 0))
            continue
        params = 0
        elements: int | None = 0
        nbytes: int | None = 0
        for t in dict.fromkeys(t for t in node.inputs if t):
            info = graph.info(t)
            n = _numel(shape(t))
            if graph.is_const(t):
                if info.dtype is None or info.dtype.kind != "f":
                    continue
                params += n or 0  # constants have known shapes
            elements, nbytes = _add(elements, n), _add(nbytes, n, info.itemsize)
        for t in node.outputs:
            n = _numel(shape(t)) if t else 0
            if n is None and t not in graph.consumers and t not in graph.outputs:
                continue  # an optional output nothing reads (Dropout's mask): not computed
            elements, nbytes = _add(elements, n), _add(nbytes, n, graph.info(t).itemsize)
        macs = node_macs(node, shape)
        kind = node_roofline_kind(node, shape)
        op = layer_shape(node, shape, kind, macs)
        chains = () if kind else fusion_chains(graph, node)
        result.append(
            OpCost(node.name, node.op_type, macs, params, nbytes, elements, kind, op, chains)
        )
    return result


def _add(total: int | None, n: int | None, size: int = 1) -> int | None:
    return None if total is None or n is None else total + n * size


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
    params = sum(_numel(shape(t)) or 0 for t in weights)
    wbytes = sum((_numel(shape(t)) or 0) * graph.info(t).itemsize for t in weights)
    unknown = [c.name for c in costs if not c.known]
    macs = [c.macs for c in costs]
    latency: dict[str, float | None] = {}
    for d in devices:
        each = [c.latency(d) for c in costs]
        latency[d.name] = None if unknown else sum(x for x in each if x is not None)
    return Totals(
        macs=None if None in macs else sum(m for m in macs if m is not None),
        params=params,
        weight_bytes=wbytes,
        latency=latency,
        unknown=unknown,
    )
