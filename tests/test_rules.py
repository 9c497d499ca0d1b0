"""The channel rules of the op registry, one op kind at a time: small graphs built with
onnx.helper, saved to disk, loaded with ``load_graph`` and solved; the exact groups are asserted.

Most graphs have the shape ``x -> conv a (3 -> C) -> OP -> conv b (C -> 5) -> output``: the group
under test is the one of ``a.weight`` axis 0 (the filters of ``a``), and the question is which other
slices join it and whether it stays prunable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx.defs
import pytest
from onnx import TensorProto
from onnx_builders import (  # noqa: E402
    FLOAT,
    INT64,
    Builder,
    activation,
    group_of,
    groups_with,
    identity,
    member,
    member_keys,
)

from morphonnx.groups import Group, Solution  # noqa: E402
from morphonnx.ops import REGISTRY
from morphonnx.ops.layout import reshape_map

C = 8
A_OWN = {("a.weight", 0), ("a.bias", 0)}
B_IN = ("b.weight", 1)


def stem(b: Builder, c: int = C, hw: int = 4, cin: int = 3) -> str:
    """x (graph input) -> conv ``a``: ``c`` channels on ``hw`` x ``hw``."""
    x = b.input("x", [1, cin, hw, hw])
    return b.conv(x, cin, c, prefix="a")


def head(b: Builder, t: str, c: int = C, cout: int = 5) -> str:
    """conv ``b`` (c -> cout) reading ``t``; its output is the graph output."""
    y = b.conv(t, c, cout, prefix="b")
    return b.output(y)


def a_group(sol: Solution) -> Group:
    return group_of(sol, "a.weight", 0)


def assert_plain(g: Group, n: int, keys: set[tuple[str, int]]) -> None:
    """A prunable group of ``n`` channels, one slice per channel in every member, in order."""
    assert g.prunable, g.reason
    assert g.reason is None and g.reasons == []
    assert g.channels == n
    assert member_keys(g) == keys
    for m in g.members:
        assert m.positions == identity(n), (m.tensor, m.axis)


def assert_stopped(g: Group, *fragments: str) -> None:
    assert not g.prunable
    assert g.reason is not None
    for f in fragments:
        assert f in g.reason, (f, g.reason)


def passes(sol: Solution) -> None:
    """The op under test passes the channels of ``a`` unchanged to ``b``."""
    assert_plain(a_group(sol), C, A_OWN | {B_IN})


def stops(sol: Solution, *fragments: str) -> Group:
    """The op under test stops the group of ``a``; ``b``'s input side is a separate group."""
    g = a_group(sol)
    assert_stopped(g, *fragments)
    assert B_IN not in member_keys(g)
    return g


# --- the baseline chain, graph inputs and outputs -----------------------------------------------


def test_conv_chain_groups(tmp_path: Path) -> None:
    b = Builder()
    head(b, stem(b))
    sol = b.solve(tmp_path)
    assert [g.id for g in sol.groups] == ["g0", "g1", "g2"]
    g_in, g_a, g_out = (
        group_of(sol, *k) for k in [("a.weight", 1), ("a.weight", 0), ("b.weight", 0)]
    )
    assert (g_a.id, g_in.id, g_out.id) == ("g0", "g1", "g2")  # order of first appearance
    assert_stopped(g_in, "graph input `x`")
    assert g_in.channels == 3 and member_keys(g_in) == {("a.weight", 1)}
    assert [m.tensor for m in g_in.activations] == ["x"]
    assert_plain(g_a, C, A_OWN | {B_IN})
    assert [m.tensor for m in g_a.activations] == ["a.out"]
    assert member(g_a, "a.weight").role == "producer"
    assert member(g_a, "a.bias").role == "bias"
    assert member(g_a, "b.weight").role == "consumer"
    assert_stopped(g_out, "graph output `b.out`")
    assert g_out.channels == 5 and member_keys(g_out) == {("b.weight", 0), ("b.bias", 0)}


def test_ir3_initializers_listed_as_inputs_are_weights(tmp_path: Path) -> None:
    """Old exporters list every initializer among the graph inputs: they are not graph inputs."""
    b = Builder(opset=8, ir_version=3)
    head(b, b.bn(stem(b), C, prefix="bn"))
    sol = b.solve(tmp_path)
    assert sol.graph.inputs == ["x"]
    g = a_group(sol)
    bn = {("bn.weight", 0), ("bn.bias", 0), ("bn.running_mean", 0), ("bn.running_var", 0)}
    assert_plain(g, C, A_OWN | bn | {B_IN})


def test_intermediate_graph_output_stops_its_group(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    r = b.relu(a)
    head(b, r)
    b.output(r)
    sol = b.solve(tmp_path)
    g = a_group(sol)
    assert_stopped(g, f"graph output `{r}`")
    assert member_keys(g) == A_OWN | {B_IN}


# --- unary, pools, normalization ------------------------------------------------------------


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "Identity", "Dropout", "Cast"])
def test_unary_passes(tmp_path: Path, op: str) -> None:
    b = Builder()
    attrs: dict[str, Any] = {"to": 1} if op == "Cast" else {}
    head(b, b.node(op, [stem(b)], **attrs))
    passes(b.solve(tmp_path))


def _first_opset(op: str) -> int:
    """The opset that introduced ``op`` (from onnx's own schemas)."""
    return min(
        s.since_version
        for s in onnx.defs.get_all_schemas_with_history()
        if s.name == op and s.domain == ""
    )


@pytest.mark.parametrize(
    "op",
    """Abs Acos Acosh Asin Asinh Atan Atanh Ceil Celu Cos Cosh Elu Erf Exp Floor Gelu HardSigmoid
    HardSwish LeakyRelu Log Mish Neg Reciprocal Round Selu Shrink Sign Sin Sinh Softplus Softsign
    Sqrt Tan Tanh ThresholdedRelu Swish""".split(),
)
def test_float_unary_passes(tmp_path: Path, op: str) -> None:
    b = Builder(opset=max(17, _first_opset(op)))
    head(b, b.node(op, [stem(b)]))
    passes(b.solve(tmp_path))


@pytest.mark.parametrize(
    "chain",
    [
        [("CastLike", {})],
        [("IsNaN", {}), ("Cast", {"to": FLOAT})],
        [("IsInf", {}), ("Cast", {"to": FLOAT})],
        [("IsNaN", {}), ("Not", {}), ("Cast", {"to": FLOAT})],
        [("Cast", {"to": TensorProto.INT32}), ("BitwiseNot", {}), ("Cast", {"to": FLOAT})],
    ],
)
def test_unary_chains_through_other_dtypes_pass(
    tmp_path: Path, chain: list[tuple[str, dict[str, Any]]]
) -> None:
    """Unary ops on booleans and integers (masks, bit tricks) pass channels like float ones."""
    b = Builder(opset=18)
    t = stem(b)
    like = b.init("like", np.zeros((), dtype=np.float32))
    for op, attrs in chain:
        t = b.node(op, [t, like] if op == "CastLike" else [t], **attrs)
    head(b, t)
    passes(b.solve(tmp_path))


def test_clip_with_constant_bounds_passes(tmp_path: Path) -> None:
    b = Builder()
    lo = b.init("lo", np.array(0.0, dtype=np.float32))
    hi = b.init("hi", np.array(6.0, dtype=np.float32))
    head(b, b.node("Clip", [stem(b), lo, hi]))
    passes(b.solve(tmp_path))


@pytest.mark.parametrize(
    "op, attrs",
    [
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
        ("LpPool", {"kernel_shape": [2, 2], "p": 2}),
        ("GlobalLpPool", {}),
    ],
)
def test_pools_pass(tmp_path: Path, op: str, attrs: dict) -> None:
    b = Builder()
    head(b, b.node(op, [stem(b)], **attrs))
    passes(b.solve(tmp_path))


def test_pool_over_channel_axis_stops(tmp_path: Path) -> None:
    """NHWC tensor fed to MaxPool: the pool runs over axis 1 = W, where channels are not; the
    channels (axis 3) would be pooled as space."""
    b = Builder()
    t = b.node("Transpose", [stem(b)], perm=[0, 2, 3, 1])
    p = b.node("MaxPool", [t], kernel_shape=[2, 2], name="pool")
    b.output(p)
    g = a_group(b.solve(tmp_path))
    assert_stopped(g, "MaxPool at node `pool` pools over axis 3")


def test_batchnorm_parameters_are_members(tmp_path: Path) -> None:
    b = Builder()
    head(b, b.bn(stem(b), C, prefix="bn"))
    g = a_group(b.solve(tmp_path))
    bn = {("bn.weight", 0), ("bn.bias", 0), ("bn.running_mean", 0), ("bn.running_var", 0)}
    assert_plain(g, C, A_OWN | bn | {B_IN})
    roles = {m.tensor: m.role for m in g.members}
    assert roles["bn.weight"] == "gamma" and roles["bn.bias"] == "beta"
    assert roles["bn.running_mean"] == roles["bn.running_var"] == "stat"


def test_instance_norm_parameters_are_members(tmp_path: Path) -> None:
    b = Builder()
    s, bias = b.init("in.scale", [C]), b.init("in.bias", [C])
    head(b, b.node("InstanceNormalization", [stem(b), s, bias]))
    assert_plain(a_group(b.solve(tmp_path)), C, A_OWN | {("in.scale", 0), ("in.bias", 0), B_IN})


def test_batchnorm_on_graph_input_stops_its_parameters(tmp_path: Path) -> None:
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    y = b.bn(x, 3, prefix="bn")
    b.output(b.conv(y, 3, 4, prefix="b"))
    g = group_of(b.solve(tmp_path), "bn.weight", 0)
    assert_stopped(g, "graph input `x`")
    assert member_keys(g) == {
        ("bn.weight", 0),
        ("bn.bias", 0),
        ("bn.running_mean", 0),
        ("bn.running_var", 0),
        B_IN,
    }


def test_layernorm_over_channel_axis_stops(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    t = b.node("Transpose", [a], perm=[0, 2, 3, 1])  # NHWC: channels last
    ln = b.node(
        "LayerNormalization", [t, b.init("ln.scale", [C]), b.init("ln.bias", [C])], name="ln"
    )
    t2 = b.node("Transpose", [ln], perm=[0, 3, 1, 2])
    head(b, t2)
    sol = b.solve(tmp_path)
    g = stops(sol, "LayerNormalization at node `ln` normalizes over the channel axis")
    assert member_keys(g) == A_OWN
    g_b = group_of(sol, *B_IN)
    assert_stopped(g_b, "LayerNormalization at node `ln`")


def test_layernorm_with_channels_on_axis_1_of_4d_stops(tmp_path: Path) -> None:
    """axis=1 normalizes C, H and W together."""
    b = Builder()
    ln = b.node(
        "LayerNormalization",
        [stem(b), b.init("ln.scale", [C, 4, 4]), b.init("ln.bias", [C, 4, 4])],
        axis=1,
        name="ln",
    )
    head(b, ln)
    stops(b.solve(tmp_path), "LayerNormalization at node `ln`", "channels mix")


def test_layernorm_over_last_spatial_axis_passes(tmp_path: Path) -> None:
    b = Builder()
    ln = b.node("LayerNormalization", [stem(b), b.init("s", [4]), b.init("t", [4])], axis=-1)
    head(b, ln)
    passes(b.solve(tmp_path))


def test_lp_normalization(tmp_path: Path) -> None:
    b = Builder()
    n = b.node("LpNormalization", [stem(b)], axis=1, name="lp")
    head(b, n)
    stops(b.solve(tmp_path), "LpNormalization at node `lp` normalizes over the channel axis")
    b = Builder()
    head(b, b.node("LpNormalization", [stem(b)], axis=-1))
    passes(b.solve(tmp_path))


def test_mean_variance_normalization(tmp_path: Path) -> None:
    # opset 9: later opsets define MVN as a function whose shape inference fails in onnx 1.2x
    b = Builder(opset=9)
    head(b, b.node("MeanVarianceNormalization", [stem(b)]))  # default axes 0, 2, 3
    passes(b.solve(tmp_path))
    b = Builder(opset=9)
    head(b, b.node("MeanVarianceNormalization", [stem(b)], axes=[1, 2, 3], name="mvn"))
    stops(b.solve(tmp_path), "MeanVarianceNormalization at node `mvn`")


def test_lrn_stops(tmp_path: Path) -> None:
    b = Builder()
    head(b, b.node("LRN", [stem(b)], size=3, name="lrn"))
    sol = b.solve(tmp_path)
    stops(sol, "LRN at node `lrn` mixes neighbouring channels")
    assert_stopped(group_of(sol, *B_IN), "LRN at node `lrn`")


@pytest.mark.parametrize(
    "op, attrs, fragment",
    [
        ("DepthToSpace", {"blocksize": 2}, "moves channels into space"),
        ("SpaceToDepth", {"blocksize": 2}, "moves space into channels"),
    ],
)
def test_space_depth_ops_stop(tmp_path: Path, op: str, attrs: dict, fragment: str) -> None:
    b = Builder()
    y = b.node(op, [stem(b)], name="sd", **attrs)
    b.output(y)
    stops(b.solve(tmp_path), f"{op} at node `sd` {fragment}")


def test_einsum_stops(tmp_path: Path) -> None:
    b = Builder()
    y = b.node("Einsum", [stem(b)], equation="nchw->nhwc", name="es")
    b.output(y)
    stops(b.solve(tmp_path), "Einsum at node `es`")


def test_group_normalization_ties_whole_groups(tmp_path: Path) -> None:
    """Statistics per group: a group of C/G channels lives or dies whole, scale and bias too."""
    b = Builder(opset=21)
    y = b.node(
        "GroupNormalization",
        [stem(b), b.init("gn.scale", [C]), b.init("gn.bias", [C])],
        num_groups=2,
        name="gn",
    )
    head(b, y)
    g = a_group(b.solve(tmp_path))
    assert g.prunable and g.channels == 2
    for m in g.members:
        assert m.positions == [[0, 1, 2, 3], [4, 5, 6, 7]], m.tensor


# --- element-wise and broadcasting -----------------------------------------------------------


@pytest.mark.parametrize("op, role", [("Mul", "scale"), ("Add", "bias"), ("Sub", "bias")])
def test_per_channel_constant_is_member(tmp_path: Path, op: str, role: str) -> None:
    b = Builder()
    k = b.init("k", [C, 1, 1])
    head(b, b.node(op, [stem(b), k]))
    g = a_group(b.solve(tmp_path))
    assert_plain(g, C, A_OWN | {("k", 0), B_IN})
    assert member(g, "k").role == role


def test_per_channel_constant_of_full_rank_is_member_on_axis_1(tmp_path: Path) -> None:
    b = Builder()
    k = b.init("k", [1, C, 1, 1])
    head(b, b.node("Mul", [k, stem(b)]))  # constant first
    g = a_group(b.solve(tmp_path))
    assert_plain(g, C, A_OWN | {("k", 1), B_IN})


@pytest.mark.parametrize("shape", [[], [1], [1, 1, 1], [4], [4, 4], [1, 1, 4, 4]])
def test_broadcast_constant_ties_nothing(tmp_path: Path, shape: list[int]) -> None:
    """Scalars, size-1 dims and spatial constants have no slice per channel."""
    b = Builder()
    k = b.init("k", np.ones(shape, dtype=np.float32))
    head(b, b.node("Mul", [stem(b), k]))
    sol = b.solve(tmp_path)
    passes(sol)
    assert groups_with(sol, "k", 0) == []
    assert all("k" not in {m.tensor for m in g.members} for g in sol.groups)


def test_size_one_activation_does_not_tie(tmp_path: Path) -> None:
    """A 1-channel map (spatial attention) broadcast over the channels stays its own group."""
    b = Builder()
    a = stem(b)
    att = b.node("Sigmoid", [b.conv(a, C, 1, prefix="att")])
    head(b, b.node("Mul", [a, att]))
    sol = b.solve(tmp_path)
    g = a_group(sol)
    assert_plain(g, C, A_OWN | {B_IN, ("att.weight", 1)})
    g_att = group_of(sol, "att.weight", 0)
    assert g_att.channels == 1 and g_att.prunable
    assert member_keys(g_att) == {("att.weight", 0), ("att.bias", 0)}


@pytest.mark.parametrize("op", ["Add", "Max", "Min", "Sum", "Mean"])
def test_two_branches_are_tied(tmp_path: Path, op: str) -> None:
    b = Builder()
    a = stem(b)
    c = b.conv(b.input("x2", [1, 3, 4, 4]), 3, C, prefix="c")
    head(b, b.node(op, [a, c]))
    sol = b.solve(tmp_path)
    g = a_group(sol)
    assert_plain(g, C, A_OWN | {("c.weight", 0), ("c.bias", 0), B_IN})
    assert len(sol.groups) == 4  # x, x2, the tied channels, the output


@pytest.mark.parametrize(
    "op, dtype, attrs",
    [
        ("Pow", None, {}),
        ("Mod", None, {"fmod": 1}),
        ("Equal", None, {}),
        ("Less", None, {}),
        ("LessOrEqual", None, {}),
        ("GreaterOrEqual", None, {}),
        ("And", TensorProto.BOOL, {}),
        ("Or", TensorProto.BOOL, {}),
        ("Xor", TensorProto.BOOL, {}),
        ("BitShift", TensorProto.UINT8, {"direction": "LEFT"}),
        ("BitwiseAnd", TensorProto.INT32, {}),
        ("BitwiseOr", TensorProto.INT32, {}),
        ("BitwiseXor", TensorProto.INT32, {}),
    ],
)
def test_two_branches_of_other_dtypes_are_tied(
    tmp_path: Path, op: str, dtype: int | None, attrs: dict[str, Any]
) -> None:
    """Comparisons, logic and bit ops tie the channels of their operands like Add."""
    b = Builder(opset=18)
    branches = [stem(b), b.conv(b.input("x2", [1, 3, 4, 4]), 3, C, prefix="c")]
    if dtype is not None:
        branches = [b.node("Cast", [t], to=dtype) for t in branches]
    y = b.node(op, branches, **attrs)
    head(b, y if op in ("Pow", "Mod") else b.node("Cast", [y], to=FLOAT))
    g = a_group(b.solve(tmp_path))
    assert_plain(g, C, A_OWN | {("c.weight", 0), ("c.bias", 0), B_IN})


def test_add_with_graph_input_stops(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    y = b.input("y", [1, C, 4, 4])
    head(b, b.node("Add", [a, y]))
    g = a_group(b.solve(tmp_path))
    assert_stopped(g, "graph input `y`")
    assert member_keys(g) == A_OWN | {B_IN}


def test_where_ties_both_branches_and_condition(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    c = b.conv(a, C, C, prefix="c")
    cond = b.node("Greater", [a, b.init("zero", np.zeros(1, dtype=np.float32))])
    head(b, b.node("Where", [cond, a, c]))
    sol = b.solve(tmp_path)
    g = a_group(sol)
    assert_plain(g, C, A_OWN | {("c.weight", 0), ("c.bias", 0), ("c.weight", 1), B_IN})


def test_where_with_per_channel_constant(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    cond = b.node("Greater", [a, b.init("zero", np.zeros(1, dtype=np.float32))])
    k = b.init("k", [C, 1, 1])
    head(b, b.node("Where", [cond, a, k]))
    g = a_group(b.solve(tmp_path))
    assert_plain(g, C, A_OWN | {("k", 0), B_IN})
    assert member(g, "k").role == "const"


def test_prelu_slopes_are_members(tmp_path: Path) -> None:
    b = Builder()
    slope = b.init("slope", [C, 1, 1])
    head(b, b.node("PRelu", [stem(b), slope]))
    g = a_group(b.solve(tmp_path))
    assert_plain(g, C, A_OWN | {("slope", 0), B_IN})


def test_prelu_shared_slope_ties_nothing(tmp_path: Path) -> None:
    b = Builder()
    slope = b.init("slope", [1])
    head(b, b.node("PRelu", [stem(b), slope]))
    passes(b.solve(tmp_path))


def test_elementwise_channel_axes_differ_stops(tmp_path: Path) -> None:
    """Channels of ``a`` on axis 1 added to a tensor whose channels sit on axis 3."""
    b = Builder()
    a = stem(b, c=4)
    t = b.node("Transpose", [a], perm=[0, 2, 3, 1])  # [1, 4, 4, 4], channels on axis 3
    y = b.node("Add", [a, t], name="add")
    b.output(b.conv(y, 4, 5, prefix="b"))
    g = a_group(b.solve(tmp_path))
    assert not g.prunable
    assert "Add at node `add`" in " ".join(g.reasons)


# --- conv -------------------------------------------------------------------------------------


def test_conv_on_single_channel_input(tmp_path: Path) -> None:
    """A grayscale input: the weight's input axis has size 1 and still belongs to the input."""
    b = Builder()
    a = stem(b, cin=1)
    head(b, a)
    sol = b.solve(tmp_path)
    g_in = group_of(sol, "a.weight", 1)
    assert g_in.channels == 1
    assert_stopped(g_in, "graph input `x`")
    assert_plain(a_group(sol), C, A_OWN | {B_IN})


def test_conv_consuming_a_single_channel(tmp_path: Path) -> None:
    b = Builder()
    a = b.conv(b.input("x", [1, 3, 4, 4]), 3, 1, prefix="a")
    head(b, a, c=1)
    g = a_group(b.solve(tmp_path))
    assert_plain(g, 1, A_OWN | {B_IN})


def test_conv_reading_channels_from_another_axis_stops(tmp_path: Path) -> None:
    """A square NHWC tensor fed to a conv: shapes agree, channel axes do not."""
    b = Builder()
    t = b.node("Transpose", [stem(b, c=4)], perm=[0, 2, 3, 1])  # [1, 4, 4, 4], channels last
    b.output(b.conv(t, 4, 5, prefix="b"))
    sol = b.solve(tmp_path)
    g = a_group(sol)
    assert_stopped(g, "Conv at node `b` expects channels of `", "on axis 1, they are on axis 3")
    assert member_keys(g) == A_OWN
    assert_stopped(group_of(sol, *B_IN), "channel axis conflict at node `b`")


def test_shared_weight_ties_both_convs(tmp_path: Path) -> None:
    """One initializer used by two convs is one member: both convs' channels go together."""
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    w = b.init("shared", [C, 3, 1, 1])
    p = b.node("Conv", [b.relu(b.conv(x, 3, 3, 1, prefix="p")), w], "p2")
    q = b.node("Conv", [b.relu(b.conv(x, 3, 3, 1, prefix="q")), w], "q2")
    b.output(b.conv(b.node("Concat", [p, q], axis=1), 2 * C, 5, 1, prefix="b"))
    sol = b.solve(tmp_path)
    g_out = group_of(sol, "shared", 0)
    assert g_out.prunable and g_out.channels == C
    assert member(g_out, "b.weight").positions == [[i, C + i] for i in range(C)]
    g_in = group_of(sol, "shared", 1)
    assert g_in.prunable and g_in.channels == 3
    assert member_keys(g_in) == {
        ("shared", 1),
        ("p.weight", 0),
        ("p.bias", 0),
        ("q.weight", 0),
        ("q.bias", 0),
    }


def test_conv_without_bias(tmp_path: Path) -> None:
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    a = b.conv(x, 3, C, prefix="a", bias=False)
    head(b, a)
    assert_plain(a_group(b.solve(tmp_path)), C, {("a.weight", 0), B_IN})


def test_conv_with_computed_weight_stops(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    w = b.node("Identity", [b.input("w", [5, C, 1, 1])])
    y = b.node("Conv", [a, w], "y", name="dyn")
    b.output(y)
    stops(b.solve(tmp_path), "Conv at node `dyn` takes its weights `")


def test_depthwise_conv_ties_input_and_output(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    d = b.conv(a, C, C, prefix="dw", group=C)
    head(b, d)
    sol = b.solve(tmp_path)
    assert_plain(a_group(sol), C, A_OWN | {("dw.weight", 0), ("dw.bias", 0), B_IN})
    assert groups_with(sol, "dw.weight", 1) == []  # size-1 axis: no member


def test_depthwise_channel_multiplier_2(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b, c=4)
    d = b.conv(a, 4, 8, prefix="dw", group=4)
    head(b, d, c=8)
    g = a_group(b.solve(tmp_path))
    assert g.prunable and g.channels == 4
    assert member_keys(g) == A_OWN | {("dw.weight", 0), ("dw.bias", 0), B_IN}
    assert member(g, "a.weight").positions == identity(4)
    pairs = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert member(g, "dw.weight").positions == pairs
    assert member(g, "dw.bias").positions == pairs
    assert member(g, "b.weight").positions == pairs
    assert activation(g, "dw.out").positions == pairs


def test_grouped_conv_ties_position_p_of_every_group(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    gc = b.conv(a, C, C, prefix="gc", group=4)  # 4 groups of 2 in, 2 out
    head(b, gc)
    sol = b.solve(tmp_path)
    g_in = a_group(sol)
    assert g_in.prunable and g_in.channels == 2
    assert member_keys(g_in) == A_OWN | {("gc.weight", 1)}
    assert member(g_in, "a.weight").positions == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert member(g_in, "a.bias").positions == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert member(g_in, "gc.weight", 1).positions == [[0], [1]]
    assert activation(g_in, "a.out").positions == [[0, 2, 4, 6], [1, 3, 5, 7]]
    g_out = group_of(sol, "gc.weight", 0)
    assert g_out.prunable and g_out.channels == 2
    assert member_keys(g_out) == {("gc.weight", 0), ("gc.bias", 0), B_IN}
    for m in g_out.members:
        assert m.positions == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_conv_transpose(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    w = b.init("up.weight", [C, 6, 2, 2])  # (C_in, C_out, k, k)
    bias = b.init("up.bias", [6])
    up = b.node("ConvTranspose", [a, w, bias], "up.out", name="up", strides=[2, 2])
    b.output(b.conv(up, 6, 5, prefix="b"))
    sol = b.solve(tmp_path)
    assert_plain(a_group(sol), C, A_OWN | {("up.weight", 0)})
    assert member(a_group(sol), "up.weight").role == "consumer"
    g_up = group_of(sol, "up.weight", 1)
    assert_plain(g_up, 6, {("up.weight", 1), ("up.bias", 0), B_IN})
    assert member(g_up, "up.weight").role == "producer"


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv_transpose(tmp_path: Path, mult: int) -> None:
    b = Builder()
    a = stem(b, c=4)
    w = b.init("up.weight", [4, mult, 2, 2])
    up = b.node("ConvTranspose", [a, w], "up.out", name="up", strides=[2, 2], group=4)
    b.output(b.conv(up, 4 * mult, 5, prefix="b"))
    sol = b.solve(tmp_path)
    g = a_group(sol)
    assert g.prunable and g.channels == 4
    assert member_keys(g) == A_OWN | {("up.weight", 0), B_IN}
    assert member(g, "up.weight", 0).positions == identity(4)
    assert member(g, "b.weight").positions == [
        [i * mult + j for j in range(mult)] for i in range(4)
    ]
    if mult > 1:  # the position inside a group's outputs is no channel of its own
        assert_stopped(group_of(sol, "up.weight", 1), "depthwise ConvTranspose at node `up`")


def test_conv_transpose_on_single_channel_input(tmp_path: Path) -> None:
    """One input channel and group 1 is a plain transpose conv, not a depthwise one."""
    b = Builder()
    x = b.input("x", [1, 1, 4, 4])
    up = b.node("ConvTranspose", [x, b.init("up.weight", [1, 6, 2, 2])], "up.out", strides=[2, 2])
    b.output(b.conv(up, 6, 5, prefix="b"))
    sol = b.solve(tmp_path)
    assert_plain(group_of(sol, "up.weight", 1), 6, {("up.weight", 1), B_IN})
    g_in = group_of(sol, "up.weight", 0)
    assert_stopped(g_in, "graph input `x`")
    assert g_in.channels == 1 and member_keys(g_in) == {("up.weight", 0)}


def test_grouped_conv_transpose(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    w = b.init("up.weight", [C, 3, 2, 2])  # 2 groups: 4 in, 3 out each
    up = b.node("ConvTranspose", [a, w], "up.out", name="up", strides=[2, 2], group=2)
    b.output(b.conv(up, 6, 5, prefix="b"))
    sol = b.solve(tmp_path)
    g_in = a_group(sol)
    assert g_in.prunable and g_in.channels == 4
    assert member(g_in, "up.weight", 0).positions == [[0, 4], [1, 5], [2, 6], [3, 7]]
    g_out = group_of(sol, "up.weight", 1)
    assert g_out.prunable and g_out.channels == 3
    assert member(g_out, "up.weight", 1).positions == identity(3)
    assert member(g_out, "b.weight", 1).positions == [[0, 3], [1, 4], [2, 5]]


# --- Gemm and MatMul ---------------------------------------------------------------------------


def _pooled(b: Builder) -> str:
    p = b.node("GlobalAveragePool", [stem(b)])
    return b.node("Flatten", [p], axis=1)


def test_gemm_trans_b(tmp_path: Path) -> None:
    b = Builder()
    y = b.gemm(_pooled(b), C, 6, prefix="fc1")
    b.output(b.gemm(y, 6, 5, prefix="fc2"))
    sol = b.solve(tmp_path)
    assert_plain(a_group(sol), C, A_OWN | {("fc1.weight", 1)})
    g = group_of(sol, "fc1.weight", 0)
    assert_plain(g, 6, {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)})
    assert member(g, "fc1.weight").role == "producer"
    assert member(g, "fc2.weight").role == "consumer"


def test_gemm_without_trans_and_row_bias(tmp_path: Path) -> None:
    b = Builder()
    w = b.init("fc.weight", [C, 6])
    c = b.init("fc.bias", [1, 6])
    y = b.node("Gemm", [_pooled(b), w, c], "fc.out")
    b.output(b.gemm(y, 6, 5, prefix="fc2"))
    sol = b.solve(tmp_path)
    assert_plain(a_group(sol), C, A_OWN | {("fc.weight", 0)})
    assert_plain(
        group_of(sol, "fc.weight", 1), 6, {("fc.weight", 1), ("fc.bias", 1), ("fc2.weight", 1)}
    )


def test_gemm_trans_a(tmp_path: Path) -> None:
    b = Builder()
    t = b.node("Transpose", [_pooled(b)], perm=[1, 0])  # [C, 1]
    w = b.init("fc.weight", [C, 6])
    y = b.node("Gemm", [t, w], "fc.out", transA=1)
    b.output(y)
    assert_plain(a_group(b.solve(tmp_path)), C, A_OWN | {("fc.weight", 0)})


def test_gemm_with_computed_bias_ties_it(tmp_path: Path) -> None:
    """C of Gemm given by another layer's output: its channels are the Gemm's outputs."""
    b = Builder()
    f = _pooled(b)
    other = b.gemm(f, C, 6, prefix="other")
    w = b.init("fc.weight", [C, 6])
    y = b.node("Gemm", [f, w, other], "fc.out")
    b.output(b.gemm(y, 6, 5, prefix="fc2"))
    sol = b.solve(tmp_path)
    g = group_of(sol, "fc.weight", 1)
    assert_plain(
        g, 6, {("fc.weight", 1), ("other.weight", 0), ("other.bias", 0), ("fc2.weight", 1)}
    )


def test_gemm_of_two_activations_stops(tmp_path: Path) -> None:
    b = Builder()
    f = _pooled(b)
    y = b.node("Gemm", [f, b.node("Transpose", [f], perm=[1, 0])], name="gg")
    b.output(y)
    stops(b.solve(tmp_path), "Gemm at node `gg` multiplies two computed tensors")


def test_matmul_with_constant_weight(tmp_path: Path) -> None:
    b = Builder()
    w1 = b.init("w1", [C, 6])
    y = b.node("MatMul", [_pooled(b), w1])
    w2 = b.init("w2", [6, 5])
    b.output(b.node("MatMul", [y, w2]))
    sol = b.solve(tmp_path)
    assert_plain(a_group(sol), C, A_OWN | {("w1", 0)})
    g = group_of(sol, "w1", 1)
    assert_plain(g, 6, {("w1", 1), ("w2", 0)})
    assert member(g, "w1").role == "producer" and member(g, "w2").role == "consumer"


def test_matmul_contracting_channels_nonzero_on_both_sides_stops(tmp_path: Path) -> None:
    """A dead channel is zero on neither side (Sigmoid(0) = 1/2): its term would stay."""
    b = Builder()
    a = b.node("Sigmoid", [stem(b)])
    r = b.node("Reshape", [a, b.ints("shp", [1, C, 16])])  # [1, C, 16]
    t = b.node("Transpose", [r], perm=[0, 2, 1])  # [1, 16, C]
    att = b.node("MatMul", [t, r], name="qk")  # [1, 16, 16]
    b.output(att)
    stops(b.solve(tmp_path), "MatMul at node `qk` contracts channels", "not zero when removed")


def test_matmul_channels_on_row_axis(tmp_path: Path) -> None:
    """Channels on the row axis ride along; the new columns are not followed (stopped)."""
    b = Builder()
    a = stem(b)
    r = b.node("Reshape", [a, b.ints("shp", [1, C, 16])])
    w = b.init("w", [16, 6])
    y = b.node("MatMul", [r, w], name="mm")
    r2 = b.node("Reshape", [y, b.ints("shp2", [1, C, 2, 3])])
    head(b, r2)
    sol = b.solve(tmp_path)
    assert_plain(a_group(sol), C, A_OWN | {B_IN})
    assert_stopped(group_of(sol, "w", 1), "MatMul at node `mm` is not on the channel axis")


def test_patch_embedding_into_linear_layers(tmp_path: Path) -> None:
    """Conv patches -> [N, C, HW] -> [N, HW, C] -> MatMul + bias -> MatMul: a ViT stem."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    w = b.init("a.weight", [C, 3, 4, 4])
    a = b.node("Conv", [x, w], "a.out", kernel_shape=[4, 4], strides=[4, 4])  # [1, C, 2, 2]
    r = b.node("Reshape", [a, b.ints("s", [1, C, 4])])
    t = b.node("Transpose", [r], perm=[0, 2, 1])  # [1, 4, C]
    h = b.node("Add", [b.node("MatMul", [t, b.init("w1", [C, 6])]), b.init("b1", [6])])
    b.output(b.node("MatMul", [b.relu(h), b.init("w2", [6, 5])]))
    sol = b.solve(tmp_path)
    assert_plain(a_group(sol), C, {("a.weight", 0), ("w1", 0)})
    g = group_of(sol, "w1", 1)
    assert_plain(g, 6, {("w1", 1), ("b1", 0), ("w2", 0)})
    assert activation(g, h).axis == 2


# --- shape ops ----------------------------------------------------------------------------------


def test_reshape_map_cases() -> None:
    pos = reshape_map((1, 8, 4, 4), 1, (1, 128))
    assert pos is not None and pos[0] == 1
    assert pos[1].tolist()[3] == list(range(48, 64))
    nhwc = reshape_map((1, 4, 4, 8), 3, (1, 128))
    assert nhwc is not None and nhwc[1].tolist()[2] == [2 + 8 * j for j in range(16)]
    assert reshape_map((1, 8, 4, 4), 1, (1, 2, 4, 4, 4)) is None  # channel shuffle
    assert reshape_map((1, 8, 4, 4), 1, (1, 4, 32)) is None
    batch = reshape_map((2, 8, 4), 1, (16, 4))
    assert batch is not None and batch[1].tolist() == [[c, 8 + c] for c in range(8)]
    same = reshape_map((1, 8, 4, 4), 1, (1, 8, 16))
    assert same is not None and same[0] == 1 and same[1].tolist() == identity(8)


def _flatten_case(tmp_path: Path, make: Callable[[Builder, str], str]) -> None:
    b = Builder()
    f = make(b, stem(b))
    b.output(b.gemm(f, C * 16, 10, prefix="fc"))
    g = a_group(b.solve(tmp_path))
    assert g.prunable and g.channels == C
    assert member_keys(g) == A_OWN | {("fc.weight", 1)}
    assert member(g, "fc.weight").positions == [list(range(16 * c, 16 * c + 16)) for c in range(C)]


def test_flatten_into_gemm(tmp_path: Path) -> None:
    _flatten_case(tmp_path, lambda b, a: b.node("Flatten", [a], axis=1))


@pytest.mark.parametrize("shape", [[1, 128], [1, -1], [0, -1], [-1, 128]])
def test_reshape_with_constant_shape_into_gemm(tmp_path: Path, shape: list[int]) -> None:
    _flatten_case(tmp_path, lambda b, a: b.node("Reshape", [a, b.ints("shape", shape)]))


def test_torch_dynamic_flatten_into_gemm(tmp_path: Path) -> None:
    """x.view(x.size(0), -1) as torch exports it: Shape, Gather, Unsqueeze, Concat, Reshape."""

    def make(b: Builder, a: str) -> str:
        s = b.node("Shape", [a])
        n = b.node("Gather", [s, b.init("zero", np.array(0, dtype=np.int64))], axis=0)
        u = b.node("Unsqueeze", [n, b.ints("axes0", [0])])
        shp = b.node("Concat", [u, b.ints("minus1", [-1])], axis=0)
        return b.node("Reshape", [a, shp])

    _flatten_case(tmp_path, make)


def test_nhwc_flatten_into_matmul_is_strided(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    t = b.node("Transpose", [a], perm=[0, 2, 3, 1])  # [1, 4, 4, C]
    f = b.node("Flatten", [t], axis=1)
    w = b.init("w", [C * 16, 10])
    b.output(b.node("MatMul", [f, w]))
    g = a_group(b.solve(tmp_path))
    assert g.prunable and member_keys(g) == A_OWN | {("w", 0)}
    assert member(g, "w").positions == [[c + C * j for j in range(16)] for c in range(C)]


def test_nhwc_input_transposed_to_nchw(tmp_path: Path) -> None:
    b = Builder()
    x = b.input("x", [1, 4, 4, 3])
    t = b.node("Transpose", [x], perm=[0, 3, 1, 2])
    a = b.conv(t, 3, C, prefix="a")
    head(b, b.relu(a))
    sol = b.solve(tmp_path)
    g_in = group_of(sol, "a.weight", 1)
    assert_stopped(g_in, "graph input `x`")
    assert g_in.channels == 3
    passes(sol)


def test_transpose_without_perm_reverses(tmp_path: Path) -> None:
    b = Builder()
    t = b.node("Transpose", [stem(b)])  # [4, 4, C, 1]
    t2 = b.node("Transpose", [t], perm=[3, 2, 1, 0])
    head(b, t2)
    passes(b.solve(tmp_path))


def test_squeeze_unsqueeze_follow_channels(tmp_path: Path) -> None:
    b = Builder()
    p = b.node("GlobalAveragePool", [stem(b)])  # [1, C, 1, 1]
    s = b.node("Squeeze", [p, b.ints("axes", [2, 3])])  # [1, C]
    u = b.node("Unsqueeze", [s, b.ints("axes2", [0])])  # [1, 1, C]
    f = b.node("Flatten", [u], axis=2)  # [1, C]
    b.output(b.gemm(f, C, 5, prefix="fc"))
    assert_plain(a_group(b.solve(tmp_path)), C, A_OWN | {("fc.weight", 1)})


def test_squeeze_opset11_attribute_form(tmp_path: Path) -> None:
    b = Builder(opset=11)
    p = b.node("GlobalAveragePool", [stem(b)])
    s = b.node("Squeeze", [p], axes=[2, 3])
    u = b.node("Unsqueeze", [s], axes=[0])
    f = b.node("Flatten", [u], axis=2)
    b.output(b.gemm(f, C, 5, prefix="fc"))
    assert_plain(a_group(b.solve(tmp_path)), C, A_OWN | {("fc.weight", 1)})


def test_reshape_splitting_channels_stops(tmp_path: Path) -> None:
    """6 channels x 16 pixels into 4 x 24: no axis holds whole channels or whole blocks."""
    b = Builder()
    r = b.node("Reshape", [stem(b, 6), b.ints("shape", [1, 4, 24])], name="r")
    b.output(r)
    stops(b.solve(tmp_path), "Reshape at node `r` splits the channel axis")


# --- concat, split, slice, gather ---------------------------------------------------------------


def test_concat_offsets(tmp_path: Path) -> None:
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    p = b.conv(x, 3, 2, prefix="p")
    q = b.conv(x, 3, 3, prefix="q")
    cat = b.node("Concat", [p, q], axis=1)
    head(b, cat, c=5)
    sol = b.solve(tmp_path)
    g_p, g_q = group_of(sol, "p.weight", 0), group_of(sol, "q.weight", 0)
    assert g_p.prunable and g_q.prunable and g_p.id != g_q.id
    assert member(g_p, "b.weight").positions == [[0], [1]]
    assert member(g_q, "b.weight").positions == [[2], [3], [4]]
    assert activation(g_q, cat).positions == [[2], [3], [4]]


def test_concat_of_the_same_tensor_twice(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b, c=4)
    head(b, b.node("Concat", [a, a], axis=1), c=8)
    g = a_group(b.solve(tmp_path))
    assert g.prunable and g.channels == 4 and member_keys(g) == A_OWN | {B_IN}
    assert member(g, "b.weight").positions == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_concat_with_negative_axis_and_constant(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b, c=4)
    k = b.init("k", [1, 4, 4, 4])
    cat = b.node("Concat", [k, a], axis=-3)
    head(b, cat, c=8)
    sol = b.solve(tmp_path)
    g = a_group(sol)
    assert g.prunable and member(g, "b.weight").positions == [[4], [5], [6], [7]]
    g_k = group_of(sol, "k", 1)
    assert g_k.prunable and member(g_k, "b.weight").positions == identity(4)
    assert member_keys(g_k) == {("k", 1), B_IN}


def test_concat_with_graph_input_stops_only_that_part(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b, c=4)
    y = b.input("y", [1, 2, 4, 4])
    cat = b.node("Concat", [a, y], axis=1)
    head(b, cat, c=6)
    sol = b.solve(tmp_path)
    assert a_group(sol).prunable
    g_y = [g for g in groups_with(sol, *B_IN) if g is not a_group(sol)]
    assert len(g_y) == 1
    assert_stopped(g_y[0], "graph input `y`")
    assert member(g_y[0], "b.weight").positions == [[4], [5]]


def test_concat_off_the_channel_axis_ties_inputs(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    c = b.conv(b.input("x2", [1, 3, 4, 4]), 3, C, prefix="c")
    cat = b.node("Concat", [a, c], axis=2)  # [1, C, 8, 4]
    head(b, cat)
    g = a_group(b.solve(tmp_path))
    assert_plain(g, C, A_OWN | {("c.weight", 0), ("c.bias", 0), B_IN})


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_split_on_channels(tmp_path: Path, opset: int) -> None:
    b = Builder(opset=opset)
    a = stem(b)
    if opset < 13:
        s1, s2 = b.node("Split", [a], 2, axis=1, split=[3, 5])
    elif opset < 18:
        s1, s2 = b.node("Split", [a, b.ints("split", [3, 5])], 2, axis=1)
    else:
        s1, s2 = b.node("Split", [a], 2, axis=1, num_outputs=2)
    n1 = 3 if opset < 18 else 4
    n2 = C - n1
    y1 = b.conv(s1, n1, 5, prefix="b1")
    y2 = b.conv(s2, n2, 5, prefix="b2")
    b.output(b.node("Add", [y1, y2]))
    sol = b.solve(tmp_path)
    g1 = group_of(sol, "b1.weight", 1)
    g2 = group_of(sol, "b2.weight", 1)
    assert g1.prunable and g2.prunable and g1.id != g2.id
    assert member_keys(g1) == A_OWN | {("b1.weight", 1)}
    assert member_keys(g2) == A_OWN | {("b2.weight", 1)}
    assert member(g1, "a.weight").positions == identity(n1)
    assert member(g2, "a.weight").positions == [[n1 + i] for i in range(n2)]
    assert member(g2, "b2.weight").positions == identity(n2)
    assert groups_with(sol, "a.weight", 0) == [g1, g2]


def test_split_off_the_channel_axis_passes(tmp_path: Path) -> None:
    b = Builder(opset=13)
    s1, s2 = b.node("Split", [stem(b)], 2, axis=2)
    head(b, b.node("Concat", [s1, s2], axis=2))
    passes(b.solve(tmp_path))


@pytest.mark.parametrize("opset", [9, 11, 17])
def test_slice_on_channels(tmp_path: Path, opset: int) -> None:
    b = Builder(opset=opset)
    a = stem(b)
    if opset < 10:
        s = b.node("Slice", [a], starts=[2], ends=[6], axes=[1])
    else:
        s = b.node("Slice", [a, b.ints("st", [2]), b.ints("en", [6]), b.ints("ax", [1])])
    head(b, s, c=4)
    sol = b.solve(tmp_path)
    g = group_of(sol, *B_IN)
    assert g.prunable and g.channels == 4
    assert member(g, "a.weight").positions == [[2], [3], [4], [5]]
    assert member(g, "b.weight").positions == identity(4)
    rest = [x for x in groups_with(sol, "a.weight", 0) if x is not g]
    assert len(rest) == 1 and rest[0].prunable  # channels 0, 1, 6, 7 feed nothing but a
    assert member_keys(rest[0]) == A_OWN
    assert member(rest[0], "a.weight").positions == [[0], [1], [6], [7]]


def test_slice_negative_start_and_other_axes(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    s = b.node(
        "Slice",
        [
            a,
            b.ints("st", [-3, 1]),
            b.ints("en", [100, 3]),
            b.ints("ax", [-3, 2]),
            b.ints("sp", [1, 1]),
        ],
    )
    head(b, s, c=3)
    g = group_of(b.solve(tmp_path), *B_IN)
    assert g.prunable and member(g, "a.weight").positions == [[5], [6], [7]]


def test_slice_without_axes_input_counts_axes_from_0(tmp_path: Path) -> None:
    b = Builder()
    s = b.node("Slice", [stem(b), b.ints("st", [0, 2]), b.ints("en", [1, 6])])
    head(b, s, c=4)
    g = group_of(b.solve(tmp_path), *B_IN)
    assert g.prunable and member(g, "a.weight").positions == [[2], [3], [4], [5]]


def test_slice_off_the_channel_axis_passes(tmp_path: Path) -> None:
    b = Builder()
    s = b.node("Slice", [stem(b), b.ints("st", [1]), b.ints("en", [3]), b.ints("ax", [2])])
    head(b, s)
    passes(b.solve(tmp_path))


def test_slice_with_step_on_channels_stops(tmp_path: Path) -> None:
    b = Builder()
    s = b.node(
        "Slice",
        [stem(b), b.ints("st", [0]), b.ints("en", [8]), b.ints("ax", [1]), b.ints("sp", [2])],
        name="sl",
    )
    head(b, s, c=4)
    stops(b.solve(tmp_path), "Slice at node `sl` slices the channel axis with a step other than 1")


def test_slice_with_runtime_bounds_stops(tmp_path: Path) -> None:
    """Bounds from a graph input: shape inference gives up on the output, which stops."""
    b = Builder()
    a = stem(b)
    st = b.node("Identity", [b.input("start", [1], INT64)])
    s = b.node("Slice", [a, st, b.ints("en", [4]), b.ints("ax", [1])], name="sl")
    b.output(s)
    stops(b.solve(tmp_path), f"shape of `{s}` unknown at node `sl`")


def test_gather_off_the_channel_axis(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    g0 = b.node("Gather", [a, b.init("i", np.array(0, dtype=np.int64))], axis=0)  # [C, 4, 4]
    u = b.node("Unsqueeze", [g0, b.ints("ax", [0])])
    head(b, u)
    passes(b.solve(tmp_path))


def test_gather_on_the_channel_axis_stops(tmp_path: Path) -> None:
    b = Builder()
    idx = b.init("i", np.array([0, 2, 4], dtype=np.int64))
    g0 = b.node("Gather", [stem(b), idx], axis=1, name="ga")
    head(b, g0, c=3)
    stops(b.solve(tmp_path), "Gather at node `ga` gathers along the channel axis")


# --- pad, resize, expand --------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [2, 11, 18])
def test_spatial_pad_passes(tmp_path: Path, opset: int) -> None:
    b = Builder(opset=opset)
    a = stem(b)
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    p = b.node("Pad", [a], pads=pads) if opset < 11 else b.node("Pad", [a, b.ints("pads", pads)])
    head(b, p)
    passes(b.solve(tmp_path))


@pytest.mark.parametrize("opset", [2, 11, 18])
def test_pad_on_channel_axis_stops(tmp_path: Path, opset: int) -> None:
    b = Builder(opset=opset)
    a = stem(b)
    if opset < 11:
        p = b.node("Pad", [a], pads=[0, 1, 0, 0, 0, 1, 0, 0], name="pad")
    elif opset < 18:
        p = b.node("Pad", [a, b.ints("pads", [0, 0, 0, 0, 0, 2, 0, 0])], name="pad")
    else:  # pads given for axes [1] only
        p = b.node("Pad", [a, b.ints("pads", [1, 1]), "", b.ints("axes", [1])], name="pad")
    head(b, p, c=C + 2)
    stops(b.solve(tmp_path), "Pad at node `pad` pads the channel axis")


def test_pad_with_axes_input_off_the_channel_axis(tmp_path: Path) -> None:
    b = Builder(opset=18)
    p = b.node("Pad", [stem(b), b.ints("pads", [1, 1]), "", b.ints("axes", [-1])])
    head(b, p)
    passes(b.solve(tmp_path))


def test_resize_and_upsample_pass(tmp_path: Path) -> None:
    b = Builder()
    scales = b.init("scales", np.array([1, 1, 2, 2], dtype=np.float32))
    head(b, b.node("Resize", [stem(b), "", scales], mode="nearest"))
    passes(b.solve(tmp_path))
    b = Builder(opset=9)
    scales = b.init("scales", np.array([1, 1, 2, 2], dtype=np.float32))
    head(b, b.node("Upsample", [stem(b), scales]))
    passes(b.solve(tmp_path))


def test_resize_on_channel_axis_stops(tmp_path: Path) -> None:
    b = Builder()
    scales = b.init("scales", np.array([1, 2, 1, 1], dtype=np.float32))
    y = b.node("Resize", [stem(b), "", scales], name="rs")
    head(b, y, c=2 * C)
    stops(b.solve(tmp_path), "Resize at node `rs` rescales the channel axis")


def test_expand_and_tile(tmp_path: Path) -> None:
    b = Builder()
    p = b.node("GlobalAveragePool", [stem(b)])
    e = b.node("Expand", [p, b.ints("shape", [1, C, 4, 4])])
    head(b, e)
    passes(b.solve(tmp_path))
    b = Builder()
    head(b, b.node("Tile", [stem(b), b.ints("reps", [1, 1, 2, 2])]))
    passes(b.solve(tmp_path))
    b = Builder()
    y = b.node("Tile", [stem(b), b.ints("reps", [1, 2, 1, 1])], name="tile")
    head(b, y, c=2 * C)
    stops(b.solve(tmp_path), "Tile at node `tile` repeats the channel axis")


# --- reductions, softmax ------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_over_space_passes(tmp_path: Path, opset: int, keepdims: int) -> None:
    b = Builder(opset=opset)
    a = stem(b)
    if opset < 18:
        r = b.node("ReduceMean", [a], axes=[2, 3], keepdims=keepdims)
    else:
        r = b.node("ReduceMean", [a, b.ints("axes", [-2, -1])], keepdims=keepdims)
    f = b.node("Flatten", [r], axis=1)
    b.output(b.gemm(f, C, 5, prefix="fc"))
    assert_plain(a_group(b.solve(tmp_path)), C, A_OWN | {("fc.weight", 1)})


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum"])
def test_reduce_over_channels_stops(tmp_path: Path, op: str) -> None:
    b = Builder(opset=13)
    a = stem(b)
    if op == "ReduceSum":  # axes is an input from opset 13
        r = b.node(op, [a, b.ints("axes", [1])], name="red")
    else:
        r = b.node(op, [a], axes=[1], name="red")
    b.output(r)
    stops(b.solve(tmp_path), f"{op} at node `red` reduces over the channel axis")


@pytest.mark.parametrize(
    "op",
    """ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMin ReduceProd
    ReduceSumSquare""".split(),
)
def test_other_reduces_over_space_pass(tmp_path: Path, op: str) -> None:
    b = Builder(opset=13)
    r = b.node(op, [stem(b)], axes=[2, 3], keepdims=0)
    b.output(b.gemm(r, C, 5, prefix="fc"))
    assert_plain(a_group(b.solve(tmp_path)), C, A_OWN | {("fc.weight", 1)})


def test_reduce_over_all_axes_stops(tmp_path: Path) -> None:
    b = Builder(opset=13)
    r = b.node("ReduceMean", [stem(b)], name="red", keepdims=0)
    b.output(r)
    stops(b.solve(tmp_path), "ReduceMean at node `red` reduces over the channel axis")


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_arg_reduce(tmp_path: Path, op: str) -> None:
    b = Builder()
    am = b.node(op, [stem(b)], axis=1, name="am")
    b.output(am, dtype=INT64)
    stops(b.solve(tmp_path), f"{op} at node `am` reduces over the channel axis")
    b = Builder()
    am = b.node(op, [stem(b)], axis=3, keepdims=0)  # [1, C, 4]
    c = b.node("Cast", [b.node("Unsqueeze", [am, b.ints("ax", [3])])], to=1)
    head(b, c)
    passes(b.solve(tmp_path))


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
def test_softmax_over_channels_stops(tmp_path: Path, op: str) -> None:
    b = Builder()
    y = b.node(op, [stem(b)], axis=1, name="sm")
    head(b, y)
    sol = b.solve(tmp_path)
    stops(sol, f"{op} at node `sm` normalizes over the channel axis 1")
    assert_stopped(group_of(sol, *B_IN), f"{op} at node `sm`")


def test_softmax_over_space_passes(tmp_path: Path) -> None:
    b = Builder()
    head(b, b.node("Softmax", [stem(b)], axis=-1))
    passes(b.solve(tmp_path))


def test_softmax_opset11_flattens_from_axis(tmp_path: Path) -> None:
    """Before opset 13 Softmax normalizes over all axes from ``axis`` on (axis 1 by default)."""
    b = Builder(opset=11)
    y = b.node("Softmax", [stem(b)], axis=2, name="sm")
    head(b, y)
    passes(b.solve(tmp_path))
    b = Builder(opset=11)
    y = b.node("Softmax", [stem(b)], name="sm")
    head(b, y)
    stops(b.solve(tmp_path), "Softmax at node `sm`")


def _scalar(b: Builder, name: str, value: int) -> str:
    return b.init(name, np.array(value, dtype=np.int64))


@pytest.mark.parametrize("axis, reverse", [(2, 0), (3, 1), (-1, 0), (-2, 1)])
def test_cumsum_along_space_passes(tmp_path: Path, axis: int, reverse: int) -> None:
    b = Builder()
    y = b.node("CumSum", [stem(b), _scalar(b, "axis", axis)], reverse=reverse)
    head(b, y)
    passes(b.solve(tmp_path))


@pytest.mark.parametrize("axis", [1, -3])
def test_cumsum_along_channels_stops(tmp_path: Path, axis: int) -> None:
    b = Builder()
    y = b.node("CumSum", [stem(b), _scalar(b, "axis", axis)], name="cs")
    head(b, y)
    stops(b.solve(tmp_path), "CumSum at node `cs` accumulates along the channel axis")


def test_cumsum_nhwc_over_height_passes(tmp_path: Path) -> None:
    """Channels last (after a Transpose): a CumSum over axis 1 (H) keeps them on axis 3."""
    b = Builder()
    t = b.node("Transpose", [stem(b)], perm=[0, 2, 3, 1])
    y = b.node("CumSum", [t, _scalar(b, "axis", 1)], exclusive=1)
    head(b, b.node("Transpose", [y], perm=[0, 3, 1, 2]))
    passes(b.solve(tmp_path))


def test_cumsum_with_axis_computed_at_run_time_stops(tmp_path: Path) -> None:
    b = Builder()
    axis = b.input("axis", [], INT64)
    y = b.node("CumSum", [stem(b), axis], name="cs")
    head(b, y)
    stops(b.solve(tmp_path), "CumSum at node `cs` accumulates along an axis computed at run time")


# --- quantization, shape, constants ---------------------------------------------------------------


def test_per_channel_quantize_dequantize(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    scale = b.init("q.scale", np.full(C, 0.1, dtype=np.float32))
    zp = b.init("q.zp", np.zeros(C, dtype=np.int8))
    q = b.node("QuantizeLinear", [a, scale, zp], axis=1)
    dq = b.node("DequantizeLinear", [q, scale, zp], axis=1)
    head(b, dq)
    g = a_group(b.solve(tmp_path))
    assert_plain(g, C, A_OWN | {("q.scale", 0), ("q.zp", 0), B_IN})


def test_per_tensor_quantize_passes(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    scale = b.init("q.scale", np.array(0.1, dtype=np.float32))
    zp = b.init("q.zp", np.array(0, dtype=np.int8))
    q = b.node("QuantizeLinear", [a, scale, zp])
    head(b, b.node("DequantizeLinear", [q, scale, zp]))
    passes(b.solve(tmp_path))


def test_quantize_on_another_axis_stops(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    scale = b.init("q.scale", np.full(4, 0.1, dtype=np.float32))
    q = b.node("QuantizeLinear", [a, scale], axis=2, name="q")
    b.output(q, dtype=2)
    stops(b.solve(tmp_path), "QuantizeLinear at node `q` quantizes per channel along another axis")


def test_shape_and_size_do_not_stop(tmp_path: Path) -> None:
    """Shape computations inside the model follow the new widths; graph outputs computed from
    shapes stop only where their value depends on the width (issue 8)."""
    b = Builder()
    a = stem(b)
    b.output(b.node("Shape", [a], start=2), dtype=INT64)  # spatial dims only
    b.output(b.node("Gather", [b.node("Shape", [a]), b.ints("zero", [0])]), dtype=INT64)
    size = b.node("Cast", [b.node("Size", [a])], to=FLOAT)
    head(b, b.node("Add", [a, b.node("Mul", [size, b.init("tiny", np.zeros(1, np.float32))])]))
    passes(b.solve(tmp_path))


@pytest.mark.parametrize("op", ["Shape", "Size"])
def test_shape_or_size_of_the_width_as_graph_output_stops(tmp_path: Path, op: str) -> None:
    b = Builder()
    a = stem(b)
    b.output(b.node(op, [a]), dtype=INT64)
    head(b, a)
    assert_stopped(a_group(b.solve(tmp_path)), "graph output", "width of `a.out`")


def test_constant_node_weight_is_member(tmp_path: Path) -> None:
    from onnx import numpy_helper

    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    w = np.random.default_rng(0).standard_normal((C, 3, 3, 3)).astype(np.float32)
    wt = b.node("Constant", [], "a.weight", value=numpy_helper.from_array(w))
    bias = b.node("Constant", [], "a.bias", value_floats=[0.0] * C)
    a = b.node("Conv", [x, wt, bias], "a.out", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    head(b, a)
    passes(b.solve(tmp_path))


def test_big_constant_node_weight_is_member(tmp_path: Path) -> None:
    """Over the small-constant limit the Constant node is kept out of shape inference."""
    from onnx import numpy_helper

    b = Builder()
    x = b.input("x", [1, 64, 4, 4])
    w = np.ones((C, 64, 3, 3), dtype=np.float32)
    wt = b.node("Constant", [], "a.weight", value=numpy_helper.from_array(w), name=None)
    a = b.node("Conv", [x, wt], "a.out", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    head(b, a)
    assert_plain(a_group(b.solve(tmp_path)), C, {("a.weight", 0), B_IN})


def test_constant_of_shape_weight_is_member(tmp_path: Path) -> None:
    """Model-zoo style: a weight made by ConstantOfShape of a constant shape."""
    from onnx import helper, numpy_helper

    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    fill = numpy_helper.from_array(np.array([0.5], dtype=np.float32))
    w = b.node("ConstantOfShape", [b.ints("wshape", [C, 3, 1, 1])], "a.weight", value=fill)
    kc = b.node("Constant", [], "k", value=helper.make_tensor("kv", 1, [C, 1, 1], [1.0] * C))
    a = b.node("Mul", [b.node("Conv", [x, w], "a.out"), kc])
    head(b, a)
    sol = b.solve(tmp_path)
    assert sol.graph.constants["a.weight"].kind == "constant_of_shape"
    assert sol.graph.constants["k"].kind == "constant_node"
    g = a_group(sol)
    assert_plain(g, C, {("a.weight", 0), ("k", 0), B_IN})
    assert member(g, "k").role == "scale"


def test_folded_weights_behind_unsqueeze_and_identity_are_members(tmp_path: Path) -> None:
    b = Builder()
    a = stem(b)
    k = b.node("Unsqueeze", [b.init("k", [C]), b.ints("ax", [1, 2])], "k3")  # [C, 1, 1]
    kid = b.node("Identity", [k], "k3.id")
    y = b.node("Mul", [a, kid])
    wid = b.node("Identity", [b.init("b.w", [5, C, 1, 1])], "b.weight")
    b.output(b.node("Conv", [y, wid], "b.out"))
    sol = b.solve(tmp_path)
    g = a_group(sol)
    assert_plain(g, C, A_OWN | {("k3.id", 0), B_IN})
    assert sol.graph.constants["k3.id"].kind == "folded"
    assert sol.graph.constants["b.weight"].kind == "folded"


# --- unsupported ops ------------------------------------------------------------------------------


def test_custom_domain_op_stops(tmp_path: Path) -> None:
    b = Builder()
    y = b.node("Foo", [stem(b)], "foo.out", domain="com.example", name="foo")
    b.declare(y, [1, C, 4, 4])
    head(b, y)
    sol = b.solve(tmp_path)
    stops(sol, "unsupported op `com.example.Foo` at node `foo`")
    assert_stopped(group_of(sol, *B_IN), "unsupported op `com.example.Foo` at node `foo`")


def test_custom_domain_op_without_shapes_stops_with_its_name(tmp_path: Path) -> None:
    b = Builder()
    y = b.node("Foo", [stem(b)], "foo.out", domain="com.example", name="foo")
    r = b.relu(y)
    b.output(r)
    sol = b.solve(tmp_path)
    stops(sol, "unsupported op `com.example.Foo` at node `foo`")


def test_unsupported_op_without_shapes_names_itself_downstream(tmp_path: Path) -> None:
    """Shape inference stops at the custom op; what reads its output says why."""
    b = Builder()
    y = b.node("Foo", [stem(b)], "foo.out", domain="com.example", name="foo")
    c = b.conv(b.relu(b.relu(y)), C, 5, prefix="c")
    b.output(b.node("Add", [c, b.conv(b.input("x2", [1, 3, 4, 4]), 3, 5, prefix="d")]))
    sol = b.solve(tmp_path)
    reason = "unsupported op `com.example.Foo` at node `foo`"
    stops(sol, reason)
    g_d = group_of(sol, "d.weight", 0)
    assert g_d.reasons == [reason]  # met the custom op's descendants in the Add
    assert groups_with(sol, "c.weight", 0) == []  # c's shapes are unknown: not offered at all


def test_if_reading_channels_from_the_outer_graph_stops(tmp_path: Path) -> None:
    """Control flow is not in the table; a branch reading ``a`` implicitly stops it too."""
    from onnx import TensorProto, helper

    b = Builder()
    a = stem(b)
    cond = b.input("cond", [], TensorProto.BOOL)
    out = [helper.make_tensor_value_info("branch.out", TensorProto.FLOAT, [1, C, 4, 4])]
    then_g = helper.make_graph([helper.make_node("Relu", [a], ["branch.out"])], "t", [], out)
    else_g = helper.make_graph([helper.make_node("Sigmoid", [a], ["branch.out"])], "e", [], out)
    y = b.node("If", [cond], "y", name="if", then_branch=then_g, else_branch=else_g)
    head(b, y)
    sol = b.solve(tmp_path)
    stops(sol, "unsupported op `If` at node `if`")
    assert_stopped(group_of(sol, *B_IN), "unsupported op `If` at node `if`")


@pytest.mark.parametrize("op", ["NonZero", "TopK"])
def test_default_domain_op_missing_from_table_stops(tmp_path: Path, op: str) -> None:
    assert op not in REGISTRY
    b = Builder()
    a = stem(b)
    if op == "TopK":
        vals, _ = b.node("TopK", [a, b.ints("k", [2])], 2, axis=3, name="op")
        b.output(vals)
        b.output(_, dtype=INT64)
    else:
        b.output(b.node("NonZero", [a], name="op"), dtype=INT64)
    head(b, a)
    sol = b.solve(tmp_path)
    g = a_group(sol)
    assert_stopped(g, f"unsupported op `{op}` at node `op`")
    assert member_keys(g) == A_OWN | {B_IN}
