"""MorphNet's regularization vectors, cost and loss, written once for every framework.

The functions take the group spec, the tensors it names (numpy arrays, torch tensors, ...) and a
tiny :class:`ArrayOps` of the few array functions whose spelling differs between frameworks. The
core uses :data:`NUMPY` (``morphonnx mask``); adapters pass their own, so the formulas below are
the only copy. Formulas (MorphNet, Gordon et al. 2018): with ``A`` the alive count of a side (no
gradient) and ``R`` the sum of its regularization vector, a ``pair`` op costs ``coeff * A_in *
A_out`` with loss ``coeff * (A_in * R_out + A_out * R_in)``; a ``depthwise`` op costs ``coeff *
A_out`` with loss ``coeff * (R_in + R_out)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from morphonnx.devices import Device, OpShape, roofline_kind

KINDS = ("gamma", "group_lasso")
COSTS = ("flops", "size", "latency")


@dataclass(frozen=True)
class ArrayOps:
    """The array functions whose names differ between numpy and deep-learning frameworks."""

    rows: Callable[[Any, int], Any]  # move ``axis`` first and flatten the rest: (size, -1)
    take: Callable[[Any, Any], Any]  # entries along axis 0 at an index array: x[idx]
    amax: Callable[[Any, int], Any]  # max over one axis
    mean: Callable[[Any, int], Any]  # mean over one axis
    # root mean square over every axis but one (a value per index on it), without copying the
    # tensor; its gradient where all are 0 is 0 (a subgradient), never NaN
    rms: Callable[[Any, int], Any]
    maximum: Callable[[Any, Any], Any]  # element-wise max
    count: Callable[[Any], float]  # number of true entries, as a plain float (no gradient)
    cat: Callable[[Sequence[Any]], Any]  # concatenation along axis 0
    reshape: Callable[[Any, tuple[int, ...]], Any]
    transpose: Callable[[Any, tuple[int, ...]], Any]  # axes permuted: result axis i = x's perm[i]


def _numpy_rms(x: Any, axis: int) -> Any:
    x = np.asarray(x)
    others = tuple(a for a in range(x.ndim) if a != axis)
    return np.sqrt(np.mean(np.square(x), axis=others)) if others else np.abs(x)


NUMPY = ArrayOps(
    rows=lambda x, axis: np.moveaxis(np.asarray(x), axis, 0).reshape(np.shape(x)[axis], -1),
    take=lambda x, idx: x[idx],
    amax=lambda x, axis: x.max(axis=axis),
    mean=lambda x, axis: x.mean(axis=axis),
    rms=_numpy_rms,
    maximum=np.maximum,
    count=lambda x: float(np.sum(x)),
    cat=np.concatenate,
    reshape=np.reshape,
    transpose=np.transpose,
)


def positions_index(positions: list[list[int]]) -> np.ndarray:
    """Positions as a rectangular index array (channels x slices), padding ragged rows by repeating
    their first slice (max over a repeat changes nothing)."""
    width = max(len(p) for p in positions)
    return np.array([p + [p[0]] * (width - len(p)) for p in positions], dtype=np.int64)


def filter_norm(ops: ArrayOps, x: Any, axis: int, l1_fraction: float) -> Any:
    """Group LASSO's value of each filter (index on ``axis``) of ``x``: ``(1 - l1) *
    sqrt(mean(w^2)) + l1 * mean(|w|)``. The RMS reads the weights once in place, as an optimizer
    step does; a filter of zeros (a dead one, zeroed) gets gradient 0, not NaN."""
    norm = ops.rms(x, axis)
    if l1_fraction:
        norm = (1 - l1_fraction) * norm + l1_fraction * ops.mean(abs(ops.rows(x, axis)), 1)
    return norm


def group_vector(
    ops: ArrayOps,
    group: Mapping[str, Any],
    tensors: Mapping[str, Any],
    kind: str = "gamma",
    l1_fraction: float = 0.0,
) -> Any | None:
    """A group's regularization vector (one value per channel), or None without sources.

    ``gamma``: |batch-norm scale|; groups without a gamma fall back to group LASSO. ``group_lasso``:
    per output filter ``(1 - l1_fraction) * sqrt(mean(w^2)) + l1_fraction * mean(|w|)``. Several
    sources (residual adds, tied convs) combine by element-wise max, as in MorphNet.
    """
    reg = group["regularize"]
    sources: list[Any] = []
    if kind == "gamma":
        for g in reg["gammas"]:
            rows = ops.rows(tensors[g["tensor"]], g["axis"])
            sources.append(ops.amax(abs(ops.take(rows, positions_index(g["positions"]))), 2))
    if not sources:
        for w in reg["weights"]:
            norms = filter_norm(ops, tensors[w["tensor"]], w["axis"], l1_fraction)
            sources.append(ops.take(norms, positions_index(w["positions"])))
    if not sources:
        return None
    vec = ops.amax(sources[0], 1)
    for s in sources[1:]:
        vec = ops.maximum(vec, ops.amax(s, 1))
    return vec


def select_groups(spec: Mapping[str, Any], exclude: Iterable[str] = ()) -> list[Mapping[str, Any]]:
    """Prunable groups, less those whose id matches one of the ``exclude`` regexes."""
    patterns = [re.compile(p) for p in exclude]
    return [
        g
        for g in spec["groups"]
        if g["prunable"] and not any(p.fullmatch(g["id"]) for p in patterns)
    ]


@dataclass
class Side:
    alive: float  # A: alive channels (no gradient)
    reg: dict[str, float]  # R as a linear form: group id -> weight of that group's vector sum


def _side(
    side: Mapping[str, Any], counts: Mapping[str, float], channels: Mapping[str, int]
) -> Side:
    alive = float(side["static"])
    reg: dict[str, float] = {}
    for entry in side["groups"]:
        gid, k = entry["group"], entry["per_channel"]
        if gid not in counts:
            alive += k * channels[gid]
            continue
        alive += k * counts[gid]
        reg[gid] = reg.get(gid, 0.0) + k
    return Side(alive, reg)


def _add(acc: dict[str, float], scale: float, form: Mapping[str, float]) -> None:
    for gid, w in form.items():
        acc[gid] = acc.get(gid, 0.0) + scale * w


def cost_and_coefficients(
    spec: Mapping[str, Any],
    counts: Mapping[str, float],
    *,
    cost: str = "flops",
    device: Device | None = None,
) -> tuple[float, dict[str, float]]:
    """MorphNet's cost of the alive structure and its loss as ``sum_g coeff[g] * R_g``.

    ``counts`` maps each regularized group to its alive count (already floored at one: a mask
    never empties a group, so neither does the cost); groups missing from it count with all their
    channels alive and get no coefficient. Once the counts are fixed (they carry no gradient) the
    loss is linear in the vector sums ``R_g``, so these coefficients are all an adapter needs.
    ``cost``: flops, size (weights) or latency (roofline on ``device`` through
    :meth:`Device.latency`, with the op kind's peak and the per-op overhead, as ``analyze``; the
    loss follows the compute or memory branch, whichever is larger at the current counts).
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}")
    if cost == "latency" and device is None:
        raise ValueError("the latency cost needs a device")
    channels = {g["id"]: g["channels"] for g in spec["groups"]}
    total = 0.0
    coeff: dict[str, float] = {}
    for t in spec["costs"]:
        i = _side(t["inputs"], counts, channels)
        o = _side(t["outputs"], counts, channels)
        pair: dict[str, float] = {}  # d(pair cost)/dR as a linear form
        if t["kind"] == "depthwise":
            pair_cost = o.alive
            _add(pair, 1.0, i.reg)
            _add(pair, 1.0, o.reg)
        else:
            pair_cost = i.alive * o.alive
            _add(pair, i.alive, o.reg)
            _add(pair, o.alive, i.reg)
        if cost == "flops":
            total += t["flop_coeff"] * pair_cost
            _add(coeff, t["flop_coeff"], pair)
        elif cost == "size":
            total += t["size_coeff"] * pair_cost
            _add(coeff, t["size_coeff"], pair)
        else:
            assert device is not None
            size = device.bytes_per_element or t["dtype_bytes"]
            flops = t["flop_coeff"] * pair_cost
            nbytes = size * (
                t["in_elems"] * i.alive
                + t["out_elems"] * o.alive
                + t["size_coeff"] * pair_cost
                + t["bias_elems"] * o.alive
            )
            kind = roofline_kind(t["op_type"], t["kind"] == "depthwise")
            op = OpShape(
                (i.alive, o.alive) if kind in ("conv", "depthwise") else (),
                flops / (2 * t["out_elems"] * o.alive) if t["out_elems"] else 0.0,  # MACs/output
                t["out_elems"],
            )
            total += device.latency(flops, nbytes, kind, op)
            if device.bound(flops, nbytes, kind, op) == "compute":
                _add(coeff, t["flop_coeff"] / device.peak(kind, op), pair)
            else:
                scale = size / device.mem_bandwidth
                _add(coeff, scale * t["in_elems"], i.reg)
                _add(coeff, scale * (t["out_elems"] + t["bias_elems"]), o.reg)
                _add(coeff, scale * t["size_coeff"], pair)
    return total, coeff


def cost_and_loss(
    ops: ArrayOps, spec: Mapping[str, Any], vectors: Mapping[str, Any], **options: Any
) -> tuple[float, Any]:
    """MorphNet's cost (of the currently alive structure) and its differentiable loss, evaluated
    group by group on the groups' regularization ``vectors`` (group id -> vector, any array
    type): a channel is alive above ``options["threshold"]`` (default 0); the other options
    (``cost``, ``device``) are :func:`cost_and_coefficients`'."""
    threshold = options.pop("threshold", 0.0)
    counts = {gid: max(1.0, ops.count(v > threshold)) for gid, v in vectors.items()}
    total, coeff = cost_and_coefficients(spec, counts, **options)
    loss: Any = 0.0
    for gid, c in coeff.items():
        if c:
            loss = loss + c * vectors[gid].sum()
    return total, loss
