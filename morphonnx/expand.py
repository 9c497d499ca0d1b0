"""MorphNet's expansion step: spend what pruning saved by widening the learned structure.

One width multiplier ``m`` scales every prunable group's alive count (``round(alive * m)``, or to
the nearest multiple of ``round_to``; at least one channel, or ``round_to``), so the proportions the
regularizer learned stay and tied channels stay tied (a group is one width). Non-prunable groups
keep their width. ``m`` is found by bisection on the cost model: costs are a function of shapes, so
the analysis predicts the cost of any widths, grown or shrunk, without building a model. The
answer is the largest ``m`` whose structure costs at most the budget (by default what the
original model costs): one rounding step more would exceed it.

An ONNX model of the structure can be written: alive channels keep their weights, new channels
start as copies of the group's alive ones (a valid, finite model to analyze and time; retrain it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from morphonnx.analysis import Analysis
from morphonnx.costs import Totals
from morphonnx.devices import Device
from morphonnx.errors import MorphonnxError
from morphonnx.ops import op_kind
from morphonnx.ops.slicing import slice_bounds
from morphonnx.prune import layer_widths, rewrite_model

TARGETS = ("flops", "size", "latency")
WIDTHS_FORMAT = "morphonnx.widths"


@dataclass
class Expansion:
    target: str
    budget: float
    multiplier: float
    alive: dict[str, int]  # group id -> alive channels in the mask
    widths: dict[str, int]  # group id -> channels of the expanded structure
    cost: float  # predicted cost of the expanded structure (same unit as budget)
    totals: Totals
    round_to: int | None
    device: Device | None

    def document(self, a: Analysis) -> dict[str, Any]:
        """The ``widths.json`` document (format ``morphonnx.widths``)."""
        return {
            "format": WIDTHS_FORMAT,
            "version": 1,
            "model_fingerprint": a.fingerprint,
            "model": str(a.graph.path),
            "target": self.target,
            "device": self.device.name if self.device else None,
            "budget": self.budget,
            "cost": self.cost,
            "multiplier": self.multiplier,
            "round_to": self.round_to,
            "groups": {
                g.id: {
                    "channels": g.channels,
                    "alive": self.alive[g.id],
                    "width": self.widths[g.id],
                }
                for g in a.solution.groups
                if g.id in self.widths
            },
            "totals": {"flops": self.totals.flops, "params": self.totals.params},
            "layers": layer_widths(a, a.resized_shapes(self.widths)),
        }


def scaled(count: int, m: float, round_to: int | None) -> int:
    """``count * m`` rounded (half up) to a whole channel or to a multiple of ``round_to``."""
    step = round_to or 1
    return max(step, int(math.floor(count * m / step + 0.5)) * step)


def cost(a: Analysis, widths: Mapping[str, int], target: str, device: Device | None) -> float:
    """The ``target`` cost of ``a``'s model at group ``widths`` (predicted from shapes)."""
    _, t = a.costs_at(a.resized_shapes(widths))
    return _pick(t, target, device)


def _pick(t: Totals, target: str, device: Device | None) -> float:
    value: float | None
    if target == "flops":
        value = t.flops
    elif target == "size":
        value = t.params
    else:
        assert device is not None
        value = t.latency[device.name]
    if value is None:
        raise MorphonnxError(
            f"the model's {target} cost is unknown (shapes unknown at {', '.join(t.unknown[:3])})"
        )
    return float(value)


def expand(
    a: Analysis,
    keep: Mapping[str, Sequence[bool]],
    target: str,
    device: Device | None = None,
    budget: float | None = None,
    round_to: int | None = None,
) -> Expansion:
    """The widest structure of the mask's proportions that costs at most ``budget`` (default: the
    original model's cost). ``a.devices`` must include ``device`` for the latency target."""
    if target not in TARGETS:
        raise MorphonnxError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "latency" and (device is None or device not in a.devices):
        raise MorphonnxError("the latency target needs a device (--device)")
    if round_to is not None and round_to < 1:
        raise MorphonnxError(f"--round-to must be 1 or more, got {round_to}")
    alive = {gid: int(sum(k)) for gid, k in keep.items()}
    alive.update({g.id: g.channels for g in a.solution.groups if g.prunable and g.id not in alive})
    goal = _pick(a.totals, target, device) if budget is None else float(budget)
    if not (math.isfinite(goal) and goal > 0):
        raise MorphonnxError(f"--budget must be a positive number, got {budget}")

    def widths(m: float) -> dict[str, int]:
        return {gid: scaled(n, m, round_to) for gid, n in alive.items()}

    def at(m: float) -> float:
        return cost(a, widths(m), target, device)

    lo = 0.0
    if at(lo) > goal:
        raise MorphonnxError(
            f"budget {goal:.4g} is below the cost of the narrowest structure ({at(lo):.4g})"
        )
    hi = 1.0
    while at(hi) <= goal:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise MorphonnxError(f"budget {goal:.4g} is not reached by widening (cost saturates)")
    # widths only change where some alive * m / step crosses a half: search those points only
    step = round_to or 1
    points = sorted(
        {
            (j + 0.5) * step / n * (1 + 1e-12)
            for n in alive.values()
            for j in range(math.floor(lo * n / step), math.ceil(hi * n / step) + 1)
            if lo < (j + 0.5) * step / n * (1 + 1e-12) < hi
        }
    )
    first, last = 0, len(points)  # invariant: cost(points[:first]) <= goal < cost(points[last:])
    while first < last:
        mid = (first + last) // 2
        if at(points[mid]) <= goal:
            first = mid + 1
        else:
            last = mid
    lo = points[first - 1] if first else lo
    best = widths(lo)
    _, t = a.costs_at(a.resized_shapes(best))
    return Expansion(target, goal, lo, alive, best, _pick(t, target, device), t, round_to, device)


def channel_order(
    a: Analysis, keep: Mapping[str, Sequence[bool]], widths: Mapping[str, int]
) -> dict[str, list[int]]:
    """Old channel behind each channel of every expanded group: its alive channels in order (the
    first ``width`` of them when narrower), then copies of them, round-robin, when wider."""
    order = {}
    for gid, width in widths.items():
        g = a.solution.group(gid)
        alive = np.flatnonzero(np.asarray(keep.get(gid, [True] * g.channels), dtype=bool))
        order[gid] = [int(alive[i % len(alive)]) for i in range(width)]
    return order


def slot_sources(a: Analysis, order: Mapping[str, list[int]]) -> dict[tuple[str, int], np.ndarray]:
    """For every slot that changes: the old index along its axis behind each new index."""
    sol = a.solution
    group_of = np.full(sol.channels.n_vars, -1, dtype=np.int64)
    channel_of = np.zeros(sol.channels.n_vars, dtype=np.int64)
    groups = [sol.group(gid) for gid in order]
    for i, g in enumerate(groups):
        group_of[g.labels] = i
        channel_of[g.labels] = np.arange(g.channels)
    result = {}
    for slot in sol.channels.slots:
        labels = sol.slot_labels(slot)
        owners = group_of[labels]
        if not (owners >= 0).any():
            continue
        sources: list[int] = []
        pos = 0
        while pos < len(labels):
            gi = int(owners[pos])
            if gi < 0:
                sources.append(pos)
                pos += 1
                continue
            block = np.flatnonzero(owners == gi)
            if block[0] != pos or block[-1] - block[0] + 1 != len(block):
                raise MorphonnxError(
                    f"{a.graph.path}: cannot write the expanded model: channels of group "
                    f"{groups[gi].id} are interleaved with others in '{slot.tensor}'"
                )
            by_channel: dict[int, list[int]] = {}
            for p in block.tolist():
                by_channel.setdefault(int(channel_of[labels[p]]), []).append(p)
            for c in order[groups[gi].id]:
                sources.extend(by_channel[c])
            pos = int(block[-1]) + 1
        if sources != list(range(len(labels))):
            result[(slot.tensor, slot.axis)] = np.array(sources, dtype=np.int64)
    return result


def expand_model(
    a: Analysis, keep: Mapping[str, Sequence[bool]], widths: Mapping[str, int]
) -> onnx.ModelProto:
    """An ONNX model of the structure ``widths``, from a fresh read of the analysed file."""
    sources = slot_sources(a, channel_order(a, keep, widths))
    changed = {tensor for tensor, _ in sources}
    for node in a.graph.nodes:
        if op_kind(node).rewrite is slice_bounds and node.inputs and node.inputs[0] in changed:
            raise MorphonnxError(
                f"{a.graph.path}: cannot write the expanded model: {node.op_type} node "
                f"'{node.name}' slices channels that change width"
            )
    per_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (tensor, axis), src in sources.items():
        if a.graph.is_const(tensor):
            per_tensor.setdefault(tensor, []).append((axis, src))
    for name in a.graph.materialized_copies(per_tensor):
        per_tensor.setdefault(name, [])
    values = {}
    for name, takes in per_tensor.items():
        value = a.graph.value(name)
        for axis, src in takes:
            value = np.take(value, src, axis=axis)
        values[name] = value
    return rewrite_model(a, a.resized_shapes(widths), values, lambda _t: None, changed)
