"""Small helpers to build ONNX graphs with ``onnx.helper``, save them to disk and load them.

A :class:`Builder` collects nodes, initializers, inputs and outputs; shapes of intermediate tensors
come from ONNX shape inference at load time, so a test only declares the graph inputs and the
weights. Weights are random but seeded, and every weight gets a distinct name so the tests can
assert on member tensor names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from morphonnx.graph import Graph
from morphonnx.groups import Group, Member, Solution, solve
from morphonnx.load import load_graph

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


class Builder:
    """Collects a graph; ``node`` returns the output name(s) so calls chain like expressions."""

    def __init__(self, opset: int = 17, *, ir_version: int = 8, seed: int = 0) -> None:
        self.opset = opset
        self.ir_version = ir_version
        if opset > 20:  # an opset newer than IR 8 allows (23 needs IR 11) raises it
            needed = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
            self.ir_version = max(ir_version, needed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.domains: dict[str, int] = {}
        self.value_info: list[onnx.ValueInfoProto] = []
        self._seed = seed  # weight values differ between seeds, the structure does not
        self._count = 0

    # --- tensors -------------------------------------------------------------------------------
    def input(self, name: str, shape: Sequence[int | str], dtype: int = FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(
        self, name: str, dtype: int = FLOAT, shape: Sequence[int | str] | None = None
    ) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def declare(self, name: str, shape: Sequence[int], dtype: int = FLOAT) -> str:
        """Declare a tensor's type (value_info), e.g. the output of a custom-domain op."""
        self.value_info.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def init(self, name: str, value: Sequence[int] | np.ndarray, dtype: Any = np.float32) -> str:
        """An initializer: ``value`` is an array, or a shape for seeded random values."""
        if isinstance(value, np.ndarray):
            arr = value
        else:
            self._seed += 1
            rng = np.random.default_rng(self._seed)
            arr = rng.standard_normal(tuple(value)).astype(dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, name: str, values: Sequence[int]) -> str:
        """An int64 initializer (shapes, axes, sizes, pads)."""
        return self.init(name, np.array(list(values), dtype=np.int64))

    # --- nodes ---------------------------------------------------------------------------------
    def node(
        self,
        op: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | str | int | None = None,
        *,
        name: str | None = "",
        domain: str = "",
        **attrs: Any,
    ) -> Any:
        """Add a node. ``outputs``: names, one name, or a count (names generated). ``name=""`` gives
        a readable default name, ``name=None`` leaves the node unnamed. Returns the output name (or
        the list of names for several outputs)."""
        self._count += 1
        if outputs is None:
            outs = [f"{op.lower()}{self._count}"]
        elif isinstance(outputs, int):
            outs = [f"{op.lower()}{self._count}_{i}" for i in range(outputs)]
        elif isinstance(outputs, str):
            outs = [outputs]
        else:
            outs = list(outputs)
        node_name = f"{op}_{self._count}" if name == "" else name
        node = helper.make_node(op, list(inputs), outs, domain=domain or None, **attrs)
        if node_name is not None:
            node.name = node_name
        if domain:
            self.domains.setdefault(domain, 1)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        *,
        prefix: str,
        group: int = 1,
        bias: bool = True,
        **attrs: Any,
    ) -> str:
        """Conv with weight ``{prefix}.weight`` (and ``{prefix}.bias``), 'same' padding."""
        w = self.init(f"{prefix}.weight", [cout, cin // group, k, k])
        ins = [x, w]
        if bias:
            ins.append(self.init(f"{prefix}.bias", [cout]))
        pad = k // 2
        return self.node(
            "Conv",
            ins,
            f"{prefix}.out",
            name=prefix,
            kernel_shape=[k, k],
            pads=[pad] * 4,
            group=group,
            **attrs,
        )

    def bn(self, x: str, c: int, *, prefix: str) -> str:
        names = [
            self.init(f"{prefix}.weight", [c]),
            self.init(f"{prefix}.bias", [c]),
            self.init(f"{prefix}.running_mean", [c]),
            self.init(f"{prefix}.running_var", np.abs(np.random.default_rng(c).random(c)) + 0.5),
        ]
        return self.node("BatchNormalization", [x, *names], f"{prefix}.out", name=prefix)

    def relu(self, x: str, name: str | None = "") -> str:
        return self.node("Relu", [x], name=name)

    def gemm(self, x: str, k: int, n: int, *, prefix: str) -> str:
        w = self.init(f"{prefix}.weight", [n, k])
        b = self.init(f"{prefix}.bias", [n])
        return self.node("Gemm", [x, w, b], f"{prefix}.out", name=prefix, transB=1)

    # --- finishing -----------------------------------------------------------------------------
    def model(self, *, check: bool = True) -> onnx.ModelProto:
        inputs = list(self.inputs)
        if self.ir_version < 4:  # IR 3: every initializer is also a graph input
            inputs += [
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits
            ]
        g = helper.make_graph(
            self.nodes,
            "g",
            inputs,
            self.outputs,
            initializer=self.inits,
            value_info=self.value_info,
        )
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        m = helper.make_model(g, opset_imports=opsets, ir_version=self.ir_version)
        if not self.domains:
            m = onnx.shape_inference.infer_shapes(m, strict_mode=False)
            m.graph.ClearField("value_info")  # load_graph infers shapes itself
            shaped = all(o.type.tensor_type.HasField("shape") for o in m.graph.output)
            if check and shaped:  # (the checker refuses outputs whose shape inference failed)
                onnx.checker.check_model(m)
        return m

    def save(self, directory: str | os.PathLike[str], name: str = "model.onnx") -> Path:
        path = Path(directory) / name
        onnx.save(self.model(), str(path))
        return path

    def load(self, directory: str | os.PathLike[str], name: str = "model.onnx") -> Graph:
        return load_graph(self.save(directory, name))

    def solve(self, directory: str | os.PathLike[str], name: str = "model.onnx") -> Solution:
        return solve(self.load(directory, name))


# --- reading solutions ----------------------------------------------------------------------------


def member_keys(group: Group) -> set[tuple[str, int]]:
    """The (tensor, axis) pairs of a group's constant members."""
    return {(m.tensor, m.axis) for m in group.members}


def member(group: Group, tensor: str, axis: int | None = None) -> Member:
    found = [m for m in group.members if m.tensor == tensor and (axis is None or m.axis == axis)]
    assert len(found) == 1, (tensor, axis, [(m.tensor, m.axis) for m in group.members])
    return found[0]


def activation(group: Group, tensor: str) -> Member:
    found = [m for m in group.activations if m.tensor == tensor]
    assert len(found) == 1, (tensor, [m.tensor for m in group.activations])
    return found[0]


def group_of(sol: Solution, tensor: str, axis: int) -> Group:
    """The one group that has ``tensor`` (a constant) along ``axis`` as a member."""
    found = [g for g in sol.groups if any(m.tensor == tensor and m.axis == axis for m in g.members)]
    assert len(found) == 1, (tensor, axis, [g.id for g in found])
    return found[0]


def groups_with(sol: Solution, tensor: str, axis: int) -> list[Group]:
    return [g for g in sol.groups if any(m.tensor == tensor and m.axis == axis for m in g.members)]


def identity(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]


def summary(sol: Solution) -> list[tuple[str, int, bool, list[tuple[str, int, str]]]]:
    """A comparable picture of a solution (ids, sizes, flags, members with roles)."""
    return [
        (g.id, g.channels, g.prunable, sorted((m.tensor, m.axis, m.role) for m in g.members))
        for g in sol.groups
    ]
