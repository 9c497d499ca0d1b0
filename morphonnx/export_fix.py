"""Repairs of exported ONNX files that the adapters share: the model's structure (and with it
the fingerprint a spec is checked against) must not depend on weight values or on exporter
counters."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx

_REDUPLICATE_LIMIT = 1_800_000_000
"""Above this file size the export is left as the exporter wrote it (protobuf's 2 GB limit)."""


def reduplicate(path: str, keys: list[str]) -> None:
    """Undo the exporter's value de-duplication: ``Identity(init) -> key`` becomes an initializer
    ``key`` (a copy), for every output ``key`` that names a parameter or buffer of the model.
    Initializers named after ``keys`` are then put in ``keys`` order (others after them, as they
    were), so the file does not depend on which tensors happened to be equal."""
    if os.path.getsize(path) > _REDUPLICATE_LIMIT:
        return
    model = onnx.load(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    known = set(keys)
    aliases = [
        n
        for n in g.node
        if n.op_type == "Identity"
        and len(n.input) == 1
        and n.input[0] in inits
        and n.output[0] in known
        and n.output[0] not in inits
        and n.output[0] not in graph_outputs
    ]
    for n in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[n.input[0]])
        copy.name = n.output[0]
        g.initializer.append(copy)
    drop = {id(n) for n in aliases}
    nodes = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    rank = {k: i for i, k in enumerate(keys)}
    order = sorted(
        range(len(g.initializer)), key=lambda i: (rank.get(g.initializer[i].name, len(rank)), i)
    )
    if not aliases and order == sorted(order):
        return
    tensors = [g.initializer[i] for i in order]
    del g.initializer[:]
    g.initializer.extend(tensors)
    onnx.save(model, path)


_INTEGER_TYPES = {onnx.TensorProto.INT32, onnx.TensorProto.INT64}
_COUNTER = re.compile(r"__\d+")
_SUFFIX = re.compile(r"(_\d+)+(?=(:\d+)?$)")


def _base(name: str) -> str:
    """``name`` without exporter counters (``__17``, scope suffixes ``_1``)."""
    return "/".join(_SUFFIX.sub("", c) for c in _COUNTER.sub("", name).split("/"))


def _canonical_order(
    nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """``nodes`` topologically sorted with ties broken by what each node is (counter-free name,
    op type, and per input: the place of the node that makes it, an integer constant's dims and
    values, another constant's counter-free name and dims) rather than by the exporter's order:
    tf2onnx orders independent branches, such as an attention's q, k and v, differently from one
    export to the next, and names the nodes its rewriters add by a counter only. Float constants
    go by name, not value: the two tagged conversions hold different values in them."""
    import heapq

    from onnx import numpy_helper

    from morphonnx.ir import subgraph_outer_inputs

    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    place: dict[int, int] = {}

    def source(t: str) -> tuple[object, ...]:
        if t in producer:
            made = nodes[producer[t]]
            return ("node", place[producer[t]], list(made.output).index(t))
        c = constants.get(t)
        if c is not None and c.data_type in _INTEGER_TYPES:  # merged by value: named by either
            return ("ints", tuple(c.dims), numpy_helper.to_array(c).tobytes())
        if c is not None:
            return ("const", _base(t), tuple(c.dims))
        return ("input", t)

    users: list[list[int]] = [[] for _ in nodes]
    waiting = []
    for i, n in enumerate(nodes):
        deps = {producer[t] for t in [*n.input, *subgraph_outer_inputs(n)] if t in producer}
        deps.discard(i)
        waiting.append(len(deps))
        for d in deps:
            users[d].append(i)

    def key(i: int) -> tuple[str, str, str, int]:
        n = nodes[i]
        return _base(n.name), n.op_type, repr([source(t) for t in n.input]), i

    ready = [key(i) for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)[-1]
        place[i] = len(order)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, key(u))
    if len(order) < len(nodes):  # a cycle: not ours to fix, keep the exporter's order
        return list(nodes)
    return [nodes[i] for i in order]


def strip_counters(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with its nodes in a canonical topological order (:func:`_canonical_order`) and
    exporter counters removed from every node and tensor name but the graph's inputs and
    outputs, and from symbolic dimensions: tf2onnx's process-wide ``__17`` and the
    ``_1`` suffixes TensorFlow gives name scopes traced more than once (``functional_1_1/
    conv2d_1/BiasAdd`` becomes ``functional/conv2d/BiasAdd``). Names that then coincide get
    ``__1``, ``__2``... in the order nodes read or write them; a constant several nodes read is
    named after the first (``node:input``: tf2onnx merges equal constants, keeping either's name);
    initializers are put in the order nodes first read them. So every export of one model gets
    the same names and order."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    ordered = _canonical_order(list(g.node), {t.name: t for t in g.initializer})
    del g.node[:]
    g.node.extend(ordered)
    fixed = {v.name for v in list(g.input) + list(g.output)}
    tensors: dict[str, str] = {n: n for n in fixed}
    nodes: dict[str, str] = {}

    stored = {t.name for t in g.initializer}
    reads: dict[str, list[str]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in stored:
                reads.setdefault(i, []).append(f"{n.name or n.op_type}:{k}")
    # tf2onnx merges equal constants under the name of either: a shared one is named by its
    # first reader instead
    alias = {t: r[0] for t, r in reads.items() if len(r) > 1}

    def fresh(name: str, table: dict[str, str]) -> str:
        if name not in table:
            raw = alias.get(name, name) if table is tensors else name
            base = _base(raw)
            used = set(table.values())
            new, k = base, 0
            while new in used:
                k += 1
                new = f"{base}__{k}"
            table[name] = new
        return table[name]

    for n in g.node:  # graph order, not initializer order (tf2onnx's varies between exports)
        n.name = fresh(n.name, nodes) if n.name else n.name
        n.input[:] = [fresh(i, tensors) if i else i for i in n.input]
        n.output[:] = [fresh(o, tensors) if o else o for o in n.output]
    for t in g.initializer:
        t.name = fresh(t.name, tensors)
    first_read: dict[str, int] = {}
    for k, name in enumerate(i for n in g.node for i in n.input):
        first_read.setdefault(name, k)
    inits = sorted(g.initializer, key=lambda t: first_read.get(t.name, len(first_read)))
    del g.initializer[:]
    g.initializer.extend(inits)
    dims: dict[str, str] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name not in fixed:
            vi.name = fresh(vi.name, tensors)
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = fresh(d.dim_param, dims)
    return out


def rename_tensors(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Rename tensors in place (initializers, node inputs/outputs, value_info)."""
    g = model.graph
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer}
    clash = sorted(set(renames.values()) & (taken - set(renames)))
    if clash:
        raise ValueError(f"cannot rename constants to names already used: {', '.join(clash)}")
    for t in g.initializer:
        t.name = renames.get(t.name, t.name)
    for n in g.node:
        n.input[:] = [renames.get(i, i) for i in n.input]
    for vi in g.value_info:
        vi.name = renames.get(vi.name, vi.name)


def bind_values(
    protos: list[onnx.ModelProto],
    tags: list[dict[str, np.ndarray]],
    perms: dict[str, tuple[int, ...]],
    values: dict[str, np.ndarray],
) -> onnx.ModelProto:
    """Two exports of one model, each with generic random values (``tags``: name -> array in
    the framework's layout, ``perms``: its axis map) in every variable, as one file with stable
    names and the real ``values``: each constant that equals a variable's tag (in ONNX layout)
    in both exports becomes that variable, named by it, also when it holds the variable
    reshaped (Keras' MultiHeadAttention kernels; adapters then bind it through
    ``binding.Param.view``), the first such constant of a variable only; one that differs
    between the exports without being either is a mix of weights, refused (its values could not
    be written)."""
    from onnx import numpy_helper

    from morphonnx.formats import fingerprint

    a, b = (strip_counters(p) for p in protos)
    if fingerprint(a) != fingerprint(b):
        raise ValueError("tf2onnx wrote two different graphs for the same model; cannot map it")
    by_size: dict[int, list[str]] = {}
    for p, t in tags[0].items():
        by_size.setdefault(t.size, []).append(p)
    other = {t.name: t for t in b.graph.initializer}
    floats = []
    for init in a.graph.initializer:
        x, y = numpy_helper.to_array(init), numpy_helper.to_array(other[init.name])
        if x.dtype.kind == "f":
            floats.append((init, x, y))

    def holds(p: str, x: np.ndarray, y: np.ndarray, exact: bool) -> bool:
        tx, ty = (t[p].transpose(perms[p]) for t in tags)
        if exact and tx.shape != x.shape:
            return False
        return np.array_equal(tx.reshape(x.shape), x) and np.array_equal(ty.reshape(x.shape), y)

    bound: dict[str, tuple[str, bool]] = {}  # constant -> (variable, held in its ONNX shape)
    for exact in (True, False):
        for init, x, y in floats:
            if init.name not in bound:
                held = next((p for p in by_size.get(x.size, []) if holds(p, x, y, exact)), None)
                if held is not None:
                    bound[init.name] = (held, exact)
    renames: dict[str, str] = {}
    for exact in (True, False):  # a variable names the first constant holding it, exact first
        for name, (p, e) in bound.items():
            if e == exact and p not in renames.values():
                renames[name] = p
    mixed: list[str] = []
    for init, x, y in floats:
        if init.name in bound:
            p = bound[init.name][0]
            real = values[p].transpose(perms[p]).reshape(x.shape)
            init.CopyFrom(numpy_helper.from_array(real, init.name))
        elif not np.array_equal(x, y):
            mixed.append(init.name)
    if mixed:
        raise ValueError(
            "export_onnx: tf2onnx computed these constants from several weights, so they map to "
            f"no single Keras variable: {', '.join(mixed)} (unsupported layer or layout)"
        )
    rename_tensors(a, renames)
    return a
