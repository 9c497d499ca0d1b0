"""Groups across a channel axis split into blocks: channel shuffle, group norm, attention heads,
split attention (radix), weight standardization. Each pattern in several variants (opsets,
static and dynamic batch, fused and unfused forms), its groups checked against the permutation
or block structure computed here with numpy, then pruned with random masks and verified tensor
by tensor in onnxruntime (``group_patterns.prune_verified``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from group_patterns import (
    attention,
    group_norm_op,
    group_norm_unfused,
    prune_verified,
    shuffle_unit,
    split_attention,
    weight_standardized,
)
from onnx_builders import Builder, group_of, member

from morphonnx.analysis import analyze
from morphonnx.groups import Group, Solution

VARIANTS = [(13, False), (17, True), (18, False)]


def groups_with(sol: Solution, tensor: str, axis: int) -> list[Group]:
    return [g for g in sol.groups if any(m.tensor == tensor and m.axis == axis for m in g.members)]


def positions(g: Group, tensor: str, axis: int) -> list[list[int]]:
    return member(g, tensor, axis).positions


@pytest.mark.parametrize(
    ("opset", "dynamic", "g"), [(11, False, 2), *[(o, d, g) for o, d in VARIANTS for g in (2, 3)]]
)
def test_channel_shuffle_ties_positions(opset: int, dynamic: bool, g: int, tmp_path: Path) -> None:
    """Shuffled channel j is concatenated channel perm[j]: branch b's filter p. Position p of
    every branch is one class (the reshape keeps g blocks), and each half after the shuffle
    reads exactly the shuffled positions of its classes."""
    c = 4
    path = shuffle_unit(opset, dynamic, g).save(tmp_path)
    sol = analyze(path).solution
    perm = np.arange(g * c).reshape(g, c).T.reshape(-1)
    halves = np.split(np.arange(g * c), 2)
    found = 0
    for grp in sol.groups:
        if not any(m.tensor == "branch0.weight" and m.axis == 0 for m in grp.members):
            continue
        assert grp.prunable, grp.reason
        for k, p in enumerate(positions(grp, "branch0.weight", 0)):
            (pos,) = p
            for b in range(g):
                assert positions(grp, f"branch{b}.weight", 0)[k] == [pos]
            for h, half in enumerate(halves):
                want = [j - half[0] for j in half if perm[j] % c == pos]
                got = [
                    m.positions[k]
                    for m in grp.members
                    if m.tensor == f"head{h}.weight" and m.axis == 1
                ]
                assert (got[0] if got else []) == want
            found += 1
    assert found == c
    prune_verified(path)


@pytest.mark.parametrize(("opset", "dynamic"), [(21, False), (21, True)])
def test_group_normalization_prunes_whole_groups(opset: int, dynamic: bool, tmp_path: Path) -> None:
    path = group_norm_op(opset, dynamic).save(tmp_path)
    sol = analyze(path).solution
    g = group_of(sol, "c1.weight", 0)
    assert g.prunable and g.channels == 3
    assert positions(g, "c1.weight", 0) == [[0, 1], [2, 3], [4, 5]]
    assert positions(g, "gn.weight", 0) == [[0, 1], [2, 3], [4, 5]]
    prune_verified(path)


def test_group_normalization_18_stops_with_reason(tmp_path: Path) -> None:
    b = group_norm_op(18, False)
    path = tmp_path / "gn18.onnx"
    onnx.save(b.model(check=False), str(path))  # onnx.checker refuses the deprecated op
    g = group_of(analyze(path).solution, "c1.weight", 0)
    assert not g.prunable and "deprecated opset-18 form" in (g.reason or "")


@pytest.mark.parametrize(("opset", "dynamic"), [(13, False), (17, True), (21, False)])
def test_group_norm_as_instance_norm_prunes_whole_groups(
    opset: int, dynamic: bool, tmp_path: Path
) -> None:
    """Reshape [B, G, -1] -> InstanceNormalization -> Reshape back -> Mul -> Add: the statistics
    are per group, so the channel axis goes to G (whole blocks), with the per-group unit scale
    and zero bias of the InstanceNormalization as members."""
    path = group_norm_unfused(opset, dynamic).save(tmp_path)
    sol = analyze(path).solution
    g = group_of(sol, "c1.weight", 0)
    assert g.prunable and g.channels == 3
    assert positions(g, "c1.weight", 0) == [[0, 1], [2, 3], [4, 5]]
    assert positions(g, "in.scale", 0) == [[0], [1], [2]]
    assert positions(g, "gn.weight", 0) == [[0, 1], [2, 3], [4, 5]]
    prune_verified(path)


def _group_norm_by_reductions(b: Builder, y: str, nhwc: bool) -> str:
    """Group norm written with reductions: NCHW ``[B, G, C/G, H*W]`` over axes (2, 3), or
    Keras's NHWC ``[B, H, W, G, C/G]`` over axes (1, 2, 4); then per-channel gamma and beta."""
    if nhwc:
        y = b.node("Transpose", [y], perm=[0, 2, 3, 1])
        shape, axes, back, per = [1, 4, 4, 3, 2], [1, 2, 4], [1, 4, 4, 6], [6]
    else:
        shape, axes, back, per = [1, 3, 2, 16], [2, 3], [1, 6, 4, 4], [6, 1, 1]
    t = b.node("Reshape", [y, b.ints("to_groups", shape)])
    mean = b.node("ReduceMean", [t], axes=axes, keepdims=1, name="mean")
    centered = b.node("Sub", [t, mean])
    var = b.node("ReduceMean", [b.node("Mul", [centered, centered])], axes=axes, keepdims=1)
    eps = b.init("eps", np.array(1e-5, np.float32))
    t = b.node("Div", [centered, b.node("Sqrt", [b.node("Add", [var, eps])])])
    t = b.node("Reshape", [t, b.ints("back", back)])
    t = b.node("Add", [b.node("Mul", [t, b.init("gn.weight", per)]), b.init("gn.bias", per)])
    return b.node("Transpose", [t], perm=[0, 3, 1, 2]) if nhwc else t


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_by_reductions_prunes_whole_groups(nhwc: bool, tmp_path: Path) -> None:
    """The statistics are taken over the positions within a group, so the split gives whole
    groups (not per position, which the reductions would mix)."""
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    t = _group_norm_by_reductions(b, b.conv(x, 3, 6, 3, prefix="c1"), nhwc)
    b.output(b.conv(b.relu(t), 6, 5, 1, prefix="c2"))
    path = b.save(tmp_path)
    g = group_of(analyze(path).solution, "c1.weight", 0)
    assert g.prunable and positions(g, "c1.weight", 0) == [[0, 1], [2, 3], [4, 5]]
    prune_verified(path)


def test_softmax_over_a_split_channel_axis_stops(tmp_path: Path) -> None:
    """Softmax over the head dim itself mixes the channels: a stop with the reason."""
    b = Builder()
    x = b.input("x", [1, 5, 6])
    y = b.node("MatMul", [x, b.init("w", [6, 8])])
    t = b.node("Reshape", [y, b.ints("heads", [1, 5, 2, 4])])
    t = b.node("Softmax", [t], axis=-1, name="sm")
    t = b.node("Reshape", [t, b.ints("merge", [1, 5, 8])])
    b.output(b.node("MatMul", [t, b.init("proj", [8, 3])]))
    g = group_of(b.solve(tmp_path), "w", 1)
    assert not g.prunable
    assert "Softmax at node `sm` normalizes over the channel axis" in (g.reason or "")


def _head_columns(heads: int, dim: int, offset: int = 0) -> list[list[int]]:
    """Columns of a [E, H*D] projection per head dim d: d, D + d, 2D + d, ..."""
    return [[offset + h * dim + d for h in range(heads)] for d in range(dim)]


@pytest.mark.parametrize(("opset", "dynamic"), VARIANTS)
@pytest.mark.parametrize("form", ["separate", "split", "slice", "fused5d"])
def test_attention_head_dims(opset: int, dynamic: bool, form: str, tmp_path: Path) -> None:
    """Per-head dims, uniform across heads: q and k dims tied through q·kᵀ, v dims with the
    output projection's rows. In the 5-D fused form the one reshape ties q, k and v dims."""
    heads, dim = 2, 4
    path = attention(opset, dynamic, form, heads, dim).save(tmp_path)
    sol = analyze(path).solution
    hd = heads * dim
    if form == "separate":
        qk = group_of(sol, "q.weight", 1)
        assert positions(qk, "q.weight", 1) == _head_columns(heads, dim)
        assert positions(qk, "k.weight", 1) == _head_columns(heads, dim)
        v = group_of(sol, "v.weight", 1)
        assert positions(v, "v.weight", 1) == _head_columns(heads, dim)
    elif form in ("split", "slice"):
        qk, v = groups_with(sol, "qkv.weight", 1)
        assert positions(qk, "qkv.weight", 1) == [
            a + b
            for a, b in zip(_head_columns(heads, dim), _head_columns(heads, dim, hd), strict=True)
        ]
        assert positions(v, "qkv.weight", 1) == _head_columns(heads, dim, 2 * hd)
    else:
        (qk,) = groups_with(sol, "qkv.weight", 1)
        v = qk
        want = [
            [part * hd + h * dim + d for part in range(3) for h in range(heads)] for d in range(dim)
        ]
        assert [sorted(p) for p in positions(qk, "qkv.weight", 1)] == want
    assert qk.prunable and v.prunable and qk.channels == v.channels == dim
    assert positions(v, "proj.weight", 0) == _head_columns(heads, dim)
    prune_verified(path, seeds=(0, 1))


def test_attention_with_nonzero_dead_dims_stops(tmp_path: Path) -> None:
    """q and k through Sigmoid: a dead dim is 1/2 on both sides, its q·kᵀ term stays."""
    b = attention(17, False, "separate")
    for n in b.nodes:
        if n.op_type == "Reshape" and n.input[0] in ("q.out", "k.out"):
            sig = b.node("Sigmoid", [n.input[0]])
            b.nodes.insert(b.nodes.index(n), b.nodes.pop())
            n.input[0] = sig
    path = b.save(tmp_path)
    qk = group_of(analyze(path).solution, "q.weight", 1)
    assert not qk.prunable and "not zero when removed" in (qk.reason or "")


@pytest.mark.parametrize(("opset", "dynamic"), VARIANTS)
def test_split_attention_ties_radix_positions(opset: int, dynamic: bool, tmp_path: Path) -> None:
    """ResNeSt: the rSoftmax reshape [B, card, radix, C/card] ties position p of every
    (card, radix) block; the grouped convs tie the same positions, so one group of C/card."""
    radix, card, c = 2, 2, 8
    path = split_attention(opset, dynamic, radix, card).save(tmp_path)
    sol = analyze(path).solution
    g = group_of(sol, "conv.weight", 0)
    assert g.prunable and g.channels == c // card
    per = c // card
    want = [[blk * per + p for blk in range(radix * card)] for p in range(per)]
    assert positions(g, "conv.weight", 0) == want
    assert positions(g, "fc2.weight", 0) == want
    assert positions(g, "out.weight", 1) == [
        [blk * per + p for blk in range(card)] for p in range(per)
    ]
    prune_verified(path)


@pytest.mark.parametrize(("opset", "dynamic"), [(13, False), (18, True)])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_weight_standardization(opset: int, dynamic: bool, group: int, tmp_path: Path) -> None:
    """Filters standardized one by one stay independent: the raw weight, gain, bias and every
    tensor of the standardization are sliced together. The statistics span the input channels,
    so those stop (except depthwise, where each filter has one)."""
    path = weight_standardized(opset, dynamic, group).save(tmp_path)
    sol = analyze(path).solution
    cin, cout = 4, 8
    if group == cin:  # depthwise, multiplier 2: input channel i with filters 2i, 2i+1
        g = group_of(sol, "ws.weight", 0)
        assert g.prunable and positions(g, "ws.weight", 0) == [[2 * i, 2 * i + 1] for i in range(4)]
        assert positions(g, "c0.weight", 0) == [[i] for i in range(cin)]
    else:
        g = group_of(sol, "ws.weight", 0)
        per = cout // group
        assert g.prunable and g.channels == per
        assert positions(g, "ws.gain", 0) == [
            [b * per + p for b in range(group)] for p in range(per)
        ]
        inputs = group_of(sol, "c0.weight", 0)
        assert not inputs.prunable
        assert "Conv at node `ws` computes its weights" in (inputs.reason or "")
        assert "statistics over its input channels" in (inputs.reason or "")
    prune_verified(path)


def _run_time_target(b: Builder, y: str, dim: int) -> str:
    """torch's ``y.view(y.size(0), 2, y.size(dim) ..., 16)``: Concat of Shape entries and ints."""
    lead = b.node(
        "Slice", [b.node("Shape", [y]), b.ints(f"s{b._count}", [0]), b.ints(f"e{b._count}", [1])]
    )
    parts = [lead, b.ints(f"blocks{b._count}", [2])]
    if dim:
        parts.append(
            b.node(
                "Slice",
                [
                    b.node("Shape", [y]),
                    b.ints(f"d{b._count}", [dim]),
                    b.ints(f"f{b._count}", [dim + 1]),
                ],
            )
        )
    else:
        parts.append(b.ints(f"width{b._count}", [4]))
    parts.append(b.ints(f"pixels{b._count}", [16]))
    return b.node("Concat", parts, axis=0)


@pytest.mark.parametrize("dim", [0, 2])
def test_split_with_run_time_target(dim: int, tmp_path: Path) -> None:
    """A split whose target is computed from shapes is written as a constant with the batch
    entry copied (0): the batch stays free. When the channel entry itself follows a spatial
    dim (here H = 4 happens to equal the block width), it cannot be written: a stop."""
    b = Builder()
    x = b.input("x", ["N", 3, 4, 4])
    y = b.conv(x, 3, 8, 1, prefix="c1")
    t = b.node("Reshape", [y, _run_time_target(b, y, dim)], name="split")
    t = b.node("Transpose", [t], perm=[0, 2, 1, 3])
    t = b.node("Reshape", [t, b.ints("back", [-1, 8, 4, 4])])
    b.output(b.conv(t, 8, 5, 1, prefix="c2"))
    path = b.save(tmp_path)
    g = group_of(analyze(path).solution, "c1.weight", 0)
    if dim:
        assert not g.prunable and "by a target computed at run time" in (g.reason or "")
        return
    assert g.prunable and g.channels == 4
    (pruned, *_) = prune_verified(path, seeds=(0,))
    out = tmp_path / "free-batch.onnx"
    onnx.save(pruned, str(out))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"x": np.zeros((3, 3, 4, 4), np.float32)}
    assert sess.run(None, feeds)[0].shape == (3, 5, 4, 4)


def test_split_attention_softmax_before_opset_13_stops(tmp_path: Path) -> None:
    """Before opset 13 Softmax normalizes every axis from ``axis`` on, the channels' too."""
    g = group_of(analyze(split_attention(11, False).save(tmp_path)).solution, "conv.weight", 0)
    assert not g.prunable and "normalizes over the channel axis" in (g.reason or "")
