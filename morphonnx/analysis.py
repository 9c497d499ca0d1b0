"""One analysis of a model: its graph, channel groups, per-op costs and totals on chosen devices.

``analyze``, ``spec``, ``mask`` and ``prune`` all start from this, so a model is loaded, solved and
costed the same way whichever command a user runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from morphonnx.costs import OpCost, Totals, op_costs, totals
from morphonnx.devices import Device
from morphonnx.formats import fingerprint
from morphonnx.graph import Graph, Shape
from morphonnx.groups import Solution, solve
from morphonnx.load import load_graph
from morphonnx.ops import UNSUPPORTED, ShapeOf, op_kind


@dataclass
class Analysis:
    graph: Graph
    solution: Solution
    costs: list[OpCost]
    totals: Totals
    devices: list[Device]
    fingerprint: str

    def shrunk_shapes(self, mask: Mapping[str, Sequence[bool]]) -> ShapeOf:
        """Tensor shapes once the dead channels of ``mask`` are removed (for cost prediction)."""
        sol = self.solution
        dead = sol.dead_labels({k: list(v) for k, v in mask.items()})
        new: dict[str, list[int]] = {}
        for slot in sol.channels.slots:
            kept = int((~dead[sol.slot_labels(slot)]).sum())
            shape = new.setdefault(slot.tensor, list(self.graph.shape(slot.tensor) or ()))
            shape[slot.axis] = kept

        def shape_of(name: str) -> Shape | None:
            s = new.get(name)
            return tuple(s) if s is not None else self.graph.shape(name)

        return shape_of

    def predict(self, mask: Mapping[str, Sequence[bool]]) -> tuple[list[OpCost], Totals]:
        """Costs of the model pruned with ``mask``: the same cost model on the shrunk shapes."""
        shape_of = self.shrunk_shapes(mask)
        costs = op_costs(self.graph, shape_of)
        sliced = {  # folded weights that lose slices are written as initializers of their own
            s.tensor
            for s in self.solution.channels.slots
            if s.const and shape_of(s.tensor) != self.graph.shape(s.tensor)
        }
        sliced.update(self.graph.materialized_copies(sliced))
        return costs, totals(self.graph, costs, self.devices, shape_of, sliced)


def analyze(
    path: str | os.PathLike[str],
    *,
    batch: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    devices: Sequence[Device] = (),
) -> Analysis:
    graph = load_graph(path, batch=batch, input_shapes=input_shapes)
    solution = solve(graph)
    costs = op_costs(graph)
    return Analysis(
        graph=graph,
        solution=solution,
        costs=costs,
        totals=totals(graph, costs, devices),
        devices=list(devices),
        fingerprint=fingerprint(graph.model),
    )


def unsupported_ops(a: Analysis) -> dict[str, int]:
    """Op types without a channel rule, with their counts: each stops the groups it touches."""
    counts: dict[str, int] = {}
    for n in a.graph.nodes:
        if op_kind(n) is UNSUPPORTED:
            name = n.op_type if n.standard else f"{n.domain}.{n.op_type}"
            counts[name] = counts.get(name, 0) + 1
    return counts


def report_json(a: Analysis) -> dict[str, Any]:
    """The ``analyze --json`` document (shape fixed by contracts.md)."""
    t = a.totals
    return {
        "model": {
            "path": str(a.graph.path),
            "fingerprint": a.fingerprint,
            "opset": a.graph.opset,
            "nodes": len(a.graph.nodes),
            "inputs": {n: list(a.graph.shape(n) or ()) for n in a.graph.inputs},
            "unsupported_ops": unsupported_ops(a),
        },
        "totals": {
            "macs": t.macs,
            "flops": t.flops,
            "params": t.params,
            "weight_bytes": t.weight_bytes,
            "latency_s": t.latency,
        },
        "ops": [
            {
                "name": c.name,
                "op_type": c.op_type,
                "macs": c.macs,
                "flops": c.flops,
                "params": c.params,
                "bytes": c.bytes,
                "latency_s": {d.name: c.latency(d) for d in a.devices},
                "bound": {d.name: c.bound(d) for d in a.devices},
            }
            for c in a.costs
        ],
        "groups": [
            {
                "id": g.id,
                "channels": g.channels,
                "prunable": g.prunable,
                "reason": g.reason,
                "producers": [m.tensor for m in g.members if m.role == "producer"],
            }
            for g in a.solution.groups
        ],
    }
