"""The group solver on whole blocks of real architectures (residual, Inception, DenseNet, MobileNet,
ShuffleNet, squeeze-and-excitation), on unnamed graphs, and its determinism.

Every graph is built with onnx.helper, saved to disk and loaded with ``load_graph``; the tests
assert the exact groups: how many, their sizes, prunable flags and reasons, members, axes and
positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx_builders import (  # noqa: E402
    Builder,
    activation,
    group_of,
    identity,
    member,
    member_keys,
    summary,
)

from morphonnx.groups import Group, Solution, components, solve  # noqa: E402
from morphonnx.load import load_graph  # noqa: E402


def bn_keys(prefix: str) -> set[tuple[str, int]]:
    return {(f"{prefix}.{p}", 0) for p in ("weight", "bias", "running_mean", "running_var")}


def conv_keys(prefix: str, bias: bool = True) -> set[tuple[str, int]]:
    return {(f"{prefix}.weight", 0)} | ({(f"{prefix}.bias", 0)} if bias else set())


def positions_of(g: Group) -> dict[tuple[str, int], list[list[int]]]:
    return {(m.tensor, m.axis): m.positions for m in g.members}


def assert_sizes(sol: Solution, expected: dict[tuple[str, int], tuple[int, bool]]) -> None:
    """Each key names a member of one group: (channels, prunable) of that group."""
    for key, (n, prunable) in expected.items():
        g = group_of(sol, *key)
        assert (g.channels, g.prunable) == (n, prunable), (key, g.channels, g.reason)


def input_group(sol: Solution, tensor: str, axis: int = 1) -> Group:
    g = group_of(sol, tensor, axis)
    assert not g.prunable
    assert g.reason is not None and "graph input `x`" in g.reason
    return g


# --- residual blocks -----------------------------------------------------------------------------


def _stem(b: Builder, c: int = 8) -> str:
    x = b.input("x", [1, 3, 8, 8])
    return b.relu(b.bn(b.conv(x, 3, c, prefix="stem"), c, prefix="stem_bn"))


def _classifier(b: Builder, t: str, c: int) -> None:
    f = b.node("Flatten", [b.node("GlobalAveragePool", [t])], axis=1)
    b.output(b.gemm(f, c, 10, prefix="fc"))


def test_residual_block_identity_shortcut(tmp_path: Path) -> None:
    b = Builder()
    h = _stem(b)
    y = b.relu(b.bn(b.conv(h, 8, 8, prefix="c1"), 8, prefix="bn1"))
    y = b.bn(b.conv(y, 8, 8, prefix="c2"), 8, prefix="bn2")
    _classifier(b, b.relu(b.node("Add", [y, h])), 8)
    sol = b.solve(tmp_path)
    assert len(sol.groups) == 4

    trunk = group_of(sol, "stem.weight", 0)
    assert trunk.prunable and trunk.channels == 8
    assert member_keys(trunk) == (
        conv_keys("stem")
        | bn_keys("stem_bn")
        | {("c1.weight", 1)}
        | conv_keys("c2")
        | bn_keys("bn2")
        | {("fc.weight", 1)}
    )
    assert all(p == identity(8) for p in positions_of(trunk).values())

    inner = group_of(sol, "c1.weight", 0)
    assert inner.prunable and inner.channels == 8
    assert member_keys(inner) == conv_keys("c1") | bn_keys("bn1") | {("c2.weight", 1)}

    assert member_keys(input_group(sol, "stem.weight")) == {("stem.weight", 1)}
    out = group_of(sol, "fc.weight", 0)
    assert not out.prunable and "graph output `fc.out`" in (out.reason or "")
    assert member_keys(out) == {("fc.weight", 0), ("fc.bias", 0)}


def test_residual_block_projection_shortcut(tmp_path: Path) -> None:
    b = Builder()
    h = _stem(b)
    y = b.relu(b.bn(b.conv(h, 8, 16, prefix="c1", strides=[2, 2]), 16, prefix="bn1"))
    y = b.bn(b.conv(y, 16, 16, prefix="c2"), 16, prefix="bn2")
    p = b.bn(b.conv(h, 8, 16, 1, prefix="proj", strides=[2, 2], bias=False), 16, prefix="proj_bn")
    _classifier(b, b.relu(b.node("Add", [y, p])), 16)
    sol = b.solve(tmp_path)
    assert len(sol.groups) == 5

    stem = group_of(sol, "stem.weight", 0)
    assert stem.prunable and stem.channels == 8
    assert member_keys(stem) == (
        conv_keys("stem") | bn_keys("stem_bn") | {("c1.weight", 1), ("proj.weight", 1)}
    )
    inner = group_of(sol, "c1.weight", 0)
    assert inner.prunable and inner.channels == 16
    assert member_keys(inner) == conv_keys("c1") | bn_keys("bn1") | {("c2.weight", 1)}
    merged = group_of(sol, "proj.weight", 0)
    assert merged.prunable and merged.channels == 16
    assert member_keys(merged) == (
        conv_keys("c2")
        | bn_keys("bn2")
        | conv_keys("proj", bias=False)
        | bn_keys("proj_bn")
        | {("fc.weight", 1)}
    )
    assert all(p == identity(16) for p in positions_of(merged).values())
    assert merged is group_of(sol, "c2.weight", 0)


# --- concat architectures -------------------------------------------------------------------------


def test_inception_concat_offsets_in_next_conv(tmp_path: Path) -> None:
    b = Builder()
    s = _stem(b)
    b1 = b.relu(b.conv(s, 8, 2, 1, prefix="b1"))
    b2 = b.relu(b.conv(b.relu(b.conv(s, 8, 3, 1, prefix="b2a")), 3, 4, prefix="b2b"))
    b3 = b.relu(b.conv(b.relu(b.conv(s, 8, 2, 1, prefix="b3a")), 2, 3, 5, prefix="b3b"))
    mp = b.node("MaxPool", [s], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b4 = b.relu(b.conv(mp, 8, 5, 1, prefix="b4"))
    cat = b.node("Concat", [b1, b2, b3, b4], "cat", axis=1)
    b.output(b.conv(cat, 14, 6, prefix="next"))
    sol = b.solve(tmp_path)
    assert len(sol.groups) == 9

    stem = group_of(sol, "stem.weight", 0)
    assert stem.prunable and stem.channels == 8
    assert member_keys(stem) == conv_keys("stem") | bn_keys("stem_bn") | {
        ("b1.weight", 1),
        ("b2a.weight", 1),
        ("b3a.weight", 1),
        ("b4.weight", 1),
    }
    offsets = {"b1": (0, 2), "b2b": (2, 4), "b3b": (6, 3), "b4": (9, 5)}
    for prefix, (start, n) in offsets.items():
        g = group_of(sol, f"{prefix}.weight", 0)
        assert g.prunable and g.channels == n, prefix
        assert member_keys(g) == conv_keys(prefix) | {("next.weight", 1)}
        assert member(g, f"{prefix}.weight").positions == identity(n)
        assert member(g, "next.weight").positions == [[start + i] for i in range(n)]
        assert activation(g, "cat").positions == [[start + i] for i in range(n)]
    for prefix, n, consumer in [("b2a", 3, "b2b"), ("b3a", 2, "b3b")]:
        g = group_of(sol, f"{prefix}.weight", 0)
        assert g.prunable and g.channels == n
        assert member_keys(g) == conv_keys(prefix) | {(f"{consumer}.weight", 1)}
    assert not group_of(sol, "next.weight", 0).prunable


def test_densenet_concat_of_concat(tmp_path: Path) -> None:
    b = Builder()
    x0 = b.conv(b.input("x", [1, 3, 8, 8]), 3, 4, prefix="stem")
    f1 = b.conv(b.relu(b.bn(x0, 4, prefix="n1")), 4, 2, prefix="l1")
    x1 = b.node("Concat", [x0, f1], "x1", axis=1)
    f2 = b.conv(b.relu(b.bn(x1, 6, prefix="n2")), 6, 2, prefix="l2")
    x2 = b.node("Concat", [x1, f2], "x2", axis=1)
    t = b.conv(b.relu(b.bn(x2, 8, prefix="n3")), 8, 5, 1, prefix="trans")
    b.output(t)
    sol = b.solve(tmp_path)
    assert len(sol.groups) == 5

    stem = group_of(sol, "stem.weight", 0)
    assert stem.prunable and stem.channels == 4
    assert member_keys(stem) == (
        conv_keys("stem")
        | bn_keys("n1")
        | {("l1.weight", 1)}
        | bn_keys("n2")
        | {("l2.weight", 1)}
        | bn_keys("n3")
        | {("trans.weight", 1)}
    )
    assert all(p == identity(4) for p in positions_of(stem).values())

    g1 = group_of(sol, "l1.weight", 0)
    assert g1.prunable and g1.channels == 2
    assert member_keys(g1) == conv_keys("l1") | bn_keys("n2") | {("l2.weight", 1)} | bn_keys(
        "n3"
    ) | {("trans.weight", 1)}
    pos = positions_of(g1)
    assert pos[("l1.weight", 0)] == identity(2)
    for key in bn_keys("n2") | {("l2.weight", 1)} | bn_keys("n3") | {("trans.weight", 1)}:
        assert pos[key] == [[4], [5]], key
    assert activation(g1, "x2").positions == [[4], [5]]

    g2 = group_of(sol, "l2.weight", 0)
    assert g2.prunable and g2.channels == 2
    assert member_keys(g2) == conv_keys("l2") | bn_keys("n3") | {("trans.weight", 1)}
    assert member(g2, "trans.weight").positions == [[6], [7]]
    assert member(g2, "n3.running_var").positions == [[6], [7]]


def test_yolo_c2f_split_and_concat_of_the_same_tensor(tmp_path: Path) -> None:
    """YOLOv8's C2f: split in two, the second half goes through a residual bottleneck, and the
    concat takes both halves and the bottleneck: half 2 appears twice in the next conv."""
    b = Builder()
    c = b.relu(b.conv(b.input("x", [1, 3, 8, 8]), 3, 8, 1, prefix="cv1"))
    y0, y1 = b.node("Split", [c, b.ints("split", [4, 4])], ["y0", "y1"], axis=1)
    m = b.relu(b.conv(b.relu(b.conv(y1, 4, 4, prefix="m0")), 4, 4, prefix="m1"))
    cat = b.node("Concat", [y0, y1, b.node("Add", [m, y1])], "cat", axis=1)
    b.output(b.conv(cat, 12, 5, 1, prefix="cv2"))
    sol = b.solve(tmp_path)
    assert len(sol.groups) == 5
    first, second = sol.groups[0], sol.groups[1]
    assert first.prunable and second.prunable and first.channels == second.channels == 4
    assert member_keys(first) == conv_keys("cv1") | {("cv2.weight", 1)}
    assert member(first, "cv1.weight").positions == identity(4)
    assert member(first, "cv2.weight").positions == identity(4)
    assert member_keys(second) == conv_keys("cv1") | conv_keys("m1") | {
        ("m0.weight", 1),
        ("cv2.weight", 1),
    }
    assert member(second, "cv1.weight").positions == [[4], [5], [6], [7]]
    assert member(second, "m1.weight").positions == identity(4)
    assert member(second, "cv2.weight").positions == [[4, 8], [5, 9], [6, 10], [7, 11]]
    inner = group_of(sol, "m0.weight", 0)
    assert inner.prunable and member_keys(inner) == conv_keys("m0") | {("m1.weight", 1)}


# --- depthwise separable, channel shuffle, squeeze-excitation ------------------------------------


def test_depthwise_separable_block(tmp_path: Path) -> None:
    b = Builder()
    s = _stem(b)
    d = b.relu(b.bn(b.conv(s, 8, 8, prefix="dw", group=8, bias=False), 8, prefix="dw_bn"))
    p = b.relu(b.bn(b.conv(d, 8, 16, 1, prefix="pw", bias=False), 16, prefix="pw_bn"))
    _classifier(b, p, 16)
    sol = b.solve(tmp_path)
    assert len(sol.groups) == 4
    g = group_of(sol, "dw.weight", 0)
    assert g is group_of(sol, "stem.weight", 0) is group_of(sol, "pw.weight", 1)
    assert g.prunable and g.channels == 8
    assert member_keys(g) == (
        conv_keys("stem")
        | bn_keys("stem_bn")
        | {("dw.weight", 0)}
        | bn_keys("dw_bn")
        | {("pw.weight", 1)}
    )
    assert all(p == identity(8) for p in positions_of(g).values())
    pw = group_of(sol, "pw.weight", 0)
    assert pw.prunable and member_keys(pw) == {("pw.weight", 0), ("fc.weight", 1)} | bn_keys(
        "pw_bn"
    )


def test_squeeze_excitation_expand_joins_the_trunk(tmp_path: Path) -> None:
    b = Builder()
    t = b.relu(b.conv(b.input("x", [1, 3, 8, 8]), 3, 8, prefix="a"))
    s = b.node("GlobalAveragePool", [t])
    s = b.relu(b.conv(s, 8, 2, 1, prefix="se_reduce"))
    s = b.node("Sigmoid", [b.conv(s, 2, 8, 1, prefix="se_expand")])
    y = b.node("Mul", [t, s])
    b.output(b.conv(y, 8, 5, prefix="b"))
    sol = b.solve(tmp_path)
    assert len(sol.groups) == 4
    trunk = group_of(sol, "a.weight", 0)
    assert trunk.prunable and trunk.channels == 8
    assert member_keys(trunk) == (
        conv_keys("a") | {("se_reduce.weight", 1)} | conv_keys("se_expand") | {("b.weight", 1)}
    )
    assert all(p == identity(8) for p in positions_of(trunk).values())
    squeeze = group_of(sol, "se_reduce.weight", 0)
    assert squeeze.prunable and squeeze.channels == 2
    assert member_keys(squeeze) == conv_keys("se_reduce") | {("se_expand.weight", 1)}


def test_unsupported_op_in_one_branch_stops_only_what_it_touches(tmp_path: Path) -> None:
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    a = b.conv(x, 3, 8, prefix="a")
    c = b.conv(x, 3, 8, prefix="c")
    foo = b.declare(b.node("Foo", [a], "foo.out", domain="com.example", name="foo"), [1, 8, 4, 4])
    ya = b.conv(foo, 8, 4, prefix="ya")
    yc = b.conv(b.relu(c), 8, 4, prefix="yc")
    b.output(b.conv(b.node("Concat", [ya, yc], axis=1), 8, 2, prefix="out"))
    sol = b.solve(tmp_path)
    reason = "unsupported op `com.example.Foo` at node `foo`"
    for key in [("a.weight", 0), ("ya.weight", 1)]:
        g = group_of(sol, *key)
        assert not g.prunable and g.reason is not None and reason in g.reason
    for key in [("c.weight", 0), ("ya.weight", 0), ("yc.weight", 0)]:
        assert group_of(sol, *key).prunable, key
    assert member(group_of(sol, "ya.weight", 0), "out.weight").positions == identity(4)
    assert member(group_of(sol, "yc.weight", 0), "out.weight").positions == [[4], [5], [6], [7]]
    assert group_of(sol, "a.weight", 0) is not group_of(sol, "ya.weight", 1)


# --- names and determinism ------------------------------------------------------------------------


def _unnamed(b: Builder) -> None:
    x = b.input("x", [1, 3, 4, 4])
    w = b.init("w", [8, 3, 1, 1])
    y = b.node("Conv", [x, w], "y", name=None)
    z = b.node("Foo", [y], "z", name=None, domain="com.example")
    b.declare(z, [1, 8, 4, 4])
    r = b.node("Relu", [y], "r", name=None)
    b.output(b.node("Conv", [r, b.init("w2", [5, 8, 1, 1])], "out", name=None))
    b.output(z)


def test_unnamed_nodes_get_stable_generated_names(tmp_path: Path) -> None:
    b = Builder()
    _unnamed(b)
    path = b.save(tmp_path)
    g1, g2 = load_graph(path), load_graph(path)
    names = [n.name for n in g1.nodes]
    assert names == ["Conv_0", "Foo_1", "Relu_2", "Conv_3"]
    assert names == [n.name for n in g2.nodes]
    sol = solve(g1)
    g = group_of(sol, "w", 0)
    assert not g.prunable
    assert g.reason is not None and "unsupported op `com.example.Foo` at node `Foo_1`" in g.reason
    assert member_keys(g) == {("w", 0), ("w2", 1)}


def test_generated_names_avoid_existing_ones(tmp_path: Path) -> None:
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    r = b.node("Relu", [x], name="Relu_1")  # taken: the unnamed Relu at index 1 gets another
    r2 = b.node("Relu", [r], name=None)
    r3 = b.node("Relu", [r2], name="Relu_1")  # duplicate name: renamed too
    b.output(r3)
    names = [n.name for n in b.load(tmp_path).nodes]
    assert len(set(names)) == 3 and names[0] == "Relu_1"
    assert names == [n.name for n in b.load(tmp_path, "again.onnx").nodes]


def _mixed_model(b: Builder) -> None:
    """A bit of everything: depthwise x2, split, concat, grouped conv, residual add."""
    s = _stem(b)
    d = b.conv(s, 8, 16, prefix="dw", group=8)
    s1, s2 = b.node("Split", [d, b.ints("split", [6, 10])], 2, axis=1)
    p1, p2 = b.conv(s1, 6, 4, 1, prefix="p1"), b.conv(s2, 10, 4, 1, prefix="p2")
    cat = b.node("Concat", [p1, p2], "cat", axis=1)
    g = b.conv(cat, 8, 8, prefix="gc", group=2)
    _classifier(b, b.node("Add", [g, s]), 8)


def test_solving_is_deterministic(tmp_path: Path) -> None:
    b = Builder()
    _mixed_model(b)
    path = b.save(tmp_path)
    first, second = solve(load_graph(path)), solve(load_graph(path))
    assert summary(first) == summary(second)
    for g1, g2 in zip(first.groups, second.groups, strict=True):
        assert g1.reasons == g2.reasons
        assert [(m.tensor, m.axis, m.positions) for m in g1.members] == [
            (m.tensor, m.axis, m.positions) for m in g2.members
        ]
        assert [(m.tensor, m.axis, m.positions) for m in g1.activations] == [
            (m.tensor, m.axis, m.positions) for m in g2.activations
        ]
        assert np.array_equal(g1.labels, g2.labels)
    # the same structure saved elsewhere, with other weight values, gives the same ids
    b2 = Builder(seed=1000)
    _mixed_model(b2)
    other = solve(load_graph(b2.save(tmp_path, "other.onnx")))
    assert summary(other) == summary(first)


def test_group_ids_follow_graph_order(tmp_path: Path) -> None:
    b = Builder()
    _mixed_model(b)
    sol = b.solve(tmp_path)
    assert [g.id for g in sol.groups] == [f"g{i}" for i in range(len(sol.groups))]
    assert member(sol.groups[0], "stem.weight", 0).positions[0] == [0, 4]
    for g in sol.groups:
        assert sol.group(g.id) is g
        assert g.members, g.id  # only groups with a constant member are reported
        assert len(g.labels) == g.channels


def test_mixed_model_groups(tmp_path: Path) -> None:
    """The residual Add ties stem channel i to gc output i; the grouped conv (2 groups of 4) ties
    gc outputs q and 4+q; so stem channels i and 4+i form one class. The depthwise conv gives each
    stem channel 2 outputs, and the split at 6 sends channels 0..2 to p1 and 3..7 to p2. Classes
    {0,4}, {1,5}, {2,6} touch p1 and p2, class {3,7} only p2: two groups."""
    b = Builder()
    _mixed_model(b)
    sol = b.solve(tmp_path)
    assert [(g.channels, g.prunable) for g in sol.groups] == [
        (3, True),
        (1, True),
        (3, False),
        (4, True),
        (10, False),
    ]
    g0, g1, _, g3, _ = sol.groups
    trunk = conv_keys("stem") | bn_keys("stem_bn") | conv_keys("dw") | conv_keys("gc")
    assert member_keys(g0) == trunk | {("p1.weight", 1), ("p2.weight", 1), ("fc.weight", 1)}
    assert member_keys(g1) == trunk | {("p2.weight", 1), ("fc.weight", 1)}
    pos0, pos1 = positions_of(g0), positions_of(g1)
    assert pos0[("stem.weight", 0)] == pos0[("gc.weight", 0)] == [[0, 4], [1, 5], [2, 6]]
    assert pos0[("dw.weight", 0)] == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13]]
    assert pos0[("p1.weight", 1)] == [[0, 1], [2, 3], [4, 5]]
    assert pos0[("p2.weight", 1)] == [[2, 3], [4, 5], [6, 7]]
    assert pos1[("stem.weight", 0)] == pos1[("fc.weight", 1)] == [[3, 7]]
    assert pos1[("dw.weight", 0)] == [[6, 7, 14, 15]]
    assert pos1[("p2.weight", 1)] == [[0, 1, 8, 9]]
    # the grouped conv ties channel p of p1 with channel p of p2 (its two input groups)
    assert member_keys(g3) == conv_keys("p1") | conv_keys("p2") | {("gc.weight", 1)}
    assert activation(g3, "cat").positions == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert all(p == identity(4) for p in positions_of(g3).values())


def test_components_is_union_find() -> None:
    a = np.array([0, 2, 5, 7, 6])
    b = np.array([1, 3, 2, 8, 7])
    labels = components(10, a, b)
    assert labels.tolist() == [0, 0, 2, 2, 4, 2, 6, 6, 6, 9]
    assert components(3, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)).tolist() == [
        0,
        1,
        2,
    ]


@pytest.mark.parametrize("seed", range(5))
def test_components_matches_a_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    a, b = rng.integers(0, n, 150), rng.integers(0, n, 150)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        ri, rj = find(i), find(j)
        parent[max(ri, rj)] = min(ri, rj)
    expected = [min(k for k in range(n) if find(k) == find(i)) for i in range(n)]
    assert components(n, a, b).tolist() == expected
