"""One analysis of a model: its graph, channel groups, per-op costs and totals on chosen devices.

``analyze``, ``spec``, ``mask`` and ``prune`` all start from this, so a model is loaded, solved and
costed the same way whichever command a user runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from morphonnx.costs import OpCost, Totals, op_costs, totals
from morphonnx.devices import Device
from morphonnx.formats import Attention, check_attention, fingerprint
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
    attention: Attention = "dims"  # how attention heads were grouped (``formats.Attention``)

    def shrunk_shapes(self, mask: Mapping[str, Sequence[bool]]) -> ShapeOf:
        """Tensor shapes once the dead channels of ``mask`` are removed (for cost prediction)."""
        sol = self.solution
        dead = sol.dead_labels({k: list(v) for k, v in mask.items()})
        slots = sol.channels.slots
        lost = sol.lost(dead)
        new: dict[str, list[int]] = {}
        for i in np.flatnonzero(lost).tolist():  # only slots that lose channels
            slot = slots[i]
            shape = new.setdefault(slot.tensor, list(self.graph.shape(slot.tensor) or ()))
            shape[slot.axis] = slot.size - int(lost[i])

        def shape_of(name: str) -> Shape | None:
            s = new.get(name)
            return tuple(s) if s is not None else self.graph.shape(name)

        return shape_of

    def resized_shapes(self, widths: Mapping[str, int]) -> ShapeOf:
        """Tensor shapes when each group in ``widths`` has that many channels, fewer or more than
        now (``expand``): a group's share of a slot scales with it, tied slots stay tied."""
        sol = self.solution
        owner = np.full(sol.channels.n_vars, -1, dtype=np.int64)
        scale = np.ones(len(sol.groups))
        for i, g in enumerate(sol.groups):
            if g.id in widths:
                owner[g.labels] = i
                scale[i] = widths[g.id] / g.channels
        new: dict[str, list[int]] = {}
        for slot in sol.channels.slots:
            own = owner[sol.slot_labels(slot)]
            if not (own >= 0).any():
                continue
            per_group = np.bincount(own[own >= 0], minlength=len(sol.groups))
            size = int((own < 0).sum()) + int(round(float((per_group * scale).sum())))
            shape = new.setdefault(slot.tensor, list(self.graph.shape(slot.tensor) or ()))
            shape[slot.axis] = size

        def shape_of(name: str) -> Shape | None:
            s = new.get(name)
            return tuple(s) if s is not None else self.graph.shape(name)

        return shape_of

    def predict(self, mask: Mapping[str, Sequence[bool]]) -> tuple[list[OpCost], Totals]:
        """Costs of the model pruned with ``mask``: the same cost model on the shrunk shapes."""
        return self.costs_at(self.shrunk_shapes(mask))

    def costs_at(self, shape_of: ShapeOf) -> tuple[list[OpCost], Totals]:
        """Costs of the model with tensor shapes ``shape_of`` (costs are a function of shapes)."""
        costs = op_costs(self.graph, shape_of)
        resized = {  # folded weights that change are written as initializers of their own
            s.tensor
            for s in self.solution.channels.slots
            if s.const and shape_of(s.tensor) != self.graph.shape(s.tensor)
        }
        resized.update(self.graph.materialized_copies(resized))
        return costs, totals(self.graph, costs, self.devices, shape_of, resized)


def analyze(
    path: str | os.PathLike[str],
    *,
    batch: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    devices: Sequence[Device] = (),
    attention: Attention = "dims",
) -> Analysis:
    graph = load_graph(path, batch=batch, input_shapes=input_shapes)
    solution = solve(graph, check_attention(attention))
    costs = op_costs(graph)
    return Analysis(
        graph=graph,
        solution=solution,
        costs=costs,
        totals=totals(graph, costs, devices),
        devices=list(devices),
        fingerprint=fingerprint(graph.model),
        attention=attention,
    )


def unsupported_ops(a: Analysis) -> dict[str, int]:
    """Op types without a channel rule, with their counts: each stops the groups it touches."""
    counts: dict[str, int] = {}
    for n in a.graph.nodes:
        if op_kind(n) is UNSUPPORTED:
            name = n.op_type if n.standard else f"{n.domain}.{n.op_type}"
            counts[name] = counts.get(name, 0) + 1
    return counts


def unknown_from(a: Analysis) -> list[str]:
    """Nodes where shapes stop being known: an output is unknown though every input is known (or
    shape inference never got there: the first node with an unknown output)."""
    g = a.graph
    unknown = {c.name for c in a.costs if not c.known}
    starts = [
        n.name
        for n in g.nodes
        if n.name in unknown
        and all(g.info(t).known for t in n.inputs if t)
        and any(not g.info(t).known for t in n.outputs if t)
    ]
    return starts or [n.name for n in g.nodes if n.name in unknown][:1]


def unknown_note(a: Analysis) -> str | None:
    """One line for the terminal when some costs are unknown: from where, and which ops."""
    if a.totals.complete:
        return None
    g = a.graph
    starts = unknown_from(a)
    where = ", ".join(f"`{n}` ({g.by_name[n].op_type})" for n in starts[:3])
    more = f" and {len(starts) - 3} more" if len(starts) > 3 else ""
    counts: dict[str, int] = {}
    for name in a.totals.unknown:
        op = g.by_name[name].op_type
        counts[op] = counts.get(op, 0) + 1
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))
    return (
        f"shapes unknown from node {where}{more} on: {len(a.totals.unknown)} ops have unknown "
        f"costs ({ops}); totals are incomplete and the groups through them are unprunable"
    )


def report_json(a: Analysis) -> dict[str, Any]:
    """The ``analyze --json`` document (its fields: docs/formats.md)."""
    t = a.totals
    return {
        "model": {
            "path": str(a.graph.path),
            "fingerprint": a.fingerprint,
            "opset": a.graph.opset,
            "nodes": len(a.graph.nodes),
            "inputs": {n: list(a.graph.shape(n) or ()) for n in a.graph.inputs},
            "unsupported_ops": unsupported_ops(a),
            "shapes_unknown_from": unknown_from(a) if not t.complete else [],
        },
        "totals": {
            "macs": t.macs,
            "flops": t.flops,
            "params": t.params,
            "weight_bytes": t.weight_bytes,
            "latency_s": t.latency,
            "complete": t.complete,
            "unknown_ops": [{"name": n, "op_type": a.graph.by_name[n].op_type} for n in t.unknown],
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
