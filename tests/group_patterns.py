"""Graphs of the block patterns whose channels are split into blocks (channel shuffle, group norm,
attention heads, split attention, weight standardization), built with ``onnx.helper`` in several
variants, and one helper that prunes any model with random masks and verifies it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx_builders import Builder

from morphonnx.analysis import Analysis, analyze
from morphonnx.formats import Attention
from morphonnx.prune import check_pruned, prune_model, save_model
from morphonnx.verify import verify


def random_keep(a: Analysis, seed: int) -> dict[str, list[bool]]:
    """Each channel of each prunable group kept with probability 1/2, at least one per group."""
    rng = np.random.default_rng(seed)
    keep = {}
    for g in a.solution.groups:
        if g.prunable:
            k = rng.random(g.channels) < 0.5
            k[rng.integers(g.channels)] = True
            keep[g.id] = k.tolist()
    return keep


def prune_verified(
    path: Path,
    seeds: tuple[int, ...] = (0, 1, 2),
    attention: Attention = "dims",
    masks: Callable[[Analysis, int], dict[str, list[bool]]] = random_keep,
) -> list[onnx.ModelProto]:
    """Prune ``path`` with a mask per seed (``masks``, random by default), analysed with
    ``attention``; each result passes the checker, equals the zeroed original tensor by tensor
    in onnxruntime, and costs what ``predict`` said."""
    results = []
    for seed in seeds:
        a = analyze(path, attention=attention)
        keep = masks(a, seed)
        assert keep, [(g.id, g.reason) for g in a.solution.groups]
        _, predicted = a.predict(keep)
        pruned = prune_model(a, keep)
        out = path.with_name(f"{path.stem}-pruned{seed}.onnx")
        save_model(pruned, out, path)
        check_pruned(out, str(out))
        v = verify(analyze(path, attention=attention), keep, pruned)
        assert v.ok and v.tensors > 0, v.failures[:5]
        b = analyze(out)
        assert (b.totals.macs, b.totals.params) == (predicted.macs, predicted.params)
        results.append(pruned)
    return results


def batch_dim(dynamic: bool) -> int | str:
    return "N" if dynamic else 1


def channel_shuffle(b: Builder, x: str, g: int, c: int, hw: int, *, zero: bool) -> str:
    """ShuffleNet's shuffle: ``[B, g*c, H, W] -> [B, g, c, H, W] -> swap -> [B, c*g, H, W]``;
    the batch entry of the targets is 0 (copy) or -1 (infer), so a dynamic batch passes."""
    lead = 0 if zero else -1
    t = b.node("Reshape", [x, b.ints(f"split{b._count}", [lead, g, c, hw, hw])])
    t = b.node("Transpose", [t], perm=[0, 2, 1, 3, 4])
    return b.node("Reshape", [t, b.ints(f"merge{b._count}", [lead, g * c, hw, hw])])


def shuffle_unit(opset: int, dynamic: bool, g: int = 2) -> Builder:
    """ShuffleNetV2 unit: a kept half and a conv branch, concatenated, shuffled, then split in
    two halves that feed two convs."""
    b = Builder(opset)
    c, hw = 4, 4
    x = b.input("x", [batch_dim(dynamic), 3, hw, hw])
    parts = [b.relu(b.conv(x, 3, c, 1, prefix=f"branch{i}")) for i in range(g)]
    cat = b.node("Concat", parts, axis=1)
    y = channel_shuffle(b, cat, g, c, hw, zero=opset > 13)
    if opset >= 18:
        halves = b.node("Split", [y], 2, axis=1, num_outputs=2)
    elif opset >= 13:
        halves = b.node("Split", [y, b.ints("sizes", [g * c // 2] * 2)], 2, axis=1)
    else:
        halves = b.node("Split", [y], 2, axis=1, split=[g * c // 2] * 2)
    outs = [b.conv(h, g * c // 2, 5, 1, prefix=f"head{i}") for i, h in enumerate(halves)]
    b.output(b.node("Add", outs, "y"))
    return b


def group_norm_op(opset: int, dynamic: bool, groups: int = 3, per: int = 2) -> Builder:
    """Conv -> GroupNormalization (scale per group at opset 18, per channel at 21) -> conv."""
    b = Builder(opset)
    c = groups * per
    x = b.input("x", [batch_dim(dynamic), 3, 4, 4])
    y = b.conv(x, 3, c, 3, prefix="c1")
    n = groups if opset < 21 else c
    y = b.node(
        "GroupNormalization",
        [y, b.init("gn.weight", [n]), b.init("gn.bias", [n])],
        name="gn",
        num_groups=groups,
    )
    out = b.conv(b.relu(y), c, 5, 1, prefix="c2")
    b.output(out, shape=[batch_dim(dynamic), 5, 4, 4])  # ONNX infers no GroupNormalization shape
    return b


def group_norm_unfused(opset: int, dynamic: bool, groups: int = 3, per: int = 2) -> Builder:
    """Group norm as torch writes it: Reshape [B, G, -1] -> InstanceNormalization (unit scale,
    zero bias per group) -> Reshape back -> Mul gamma -> Add beta."""
    b = Builder(opset)
    c, hw = groups * per, 4
    x = b.input("x", [batch_dim(dynamic), 3, hw, hw])
    y = b.conv(x, 3, c, 3, prefix="c1")
    t = b.node("Reshape", [y, b.ints("to_groups", [0, groups, -1])])
    ones, zeros = np.ones(groups, np.float32), np.zeros(groups, np.float32)
    t = b.node("InstanceNormalization", [t, b.init("in.scale", ones), b.init("in.bias", zeros)])
    back = b.node("Shape", [y]) if dynamic else b.ints("to_channels", [1, c, hw, hw])
    t = b.node("Reshape", [t, back])
    t = b.node("Mul", [t, b.init("gn.weight", [c, 1, 1])])
    t = b.node("Add", [t, b.init("gn.bias", [c, 1, 1])])
    b.output(b.conv(b.relu(t), c, 5, 1, prefix="c2"))
    return b


def _linear(b: Builder, x: str, k: int, n: int, prefix: str) -> str:
    y = b.node("MatMul", [x, b.init(f"{prefix}.weight", [k, n])])
    return b.node("Add", [y, b.init(f"{prefix}.bias", [n])], f"{prefix}.out")


def _heads(b: Builder, t: str, heads: int, dim: int, perm: list[int]) -> str:
    t = b.node("Reshape", [t, b.ints(f"heads{b._count}", [0, -1, heads, dim])])
    return b.node("Transpose", [t], perm=perm)


def rotary(b: Builder, q: str, n: int, dim: int) -> str:
    """What modern attention does to q per head before q·kᵀ: a norm over the head dim
    (qk-norm: LayerNormalization, or RMSNormalization from opset 23), rotary position embeddings
    (``q * cos + rotate_half(q) * sin``: halves sliced, one negated, concatenated back), a scale
    multiplied from the left."""
    if b.opset >= 23:
        q = b.node("RMSNormalization", [q, b.init("qn.w", [dim])], axis=-1)
    else:
        q = b.node("LayerNormalization", [q, b.init("qn.w", [dim]), b.init("qn.b", [dim])], axis=-1)
    half = [b.ints(f"h{i}", [v]) for i, v in enumerate((0, dim // 2, dim))]
    axis = b.ints("last", [-1])
    first, second = (b.node("Slice", [q, s, e, axis]) for s, e in zip(half, half[1:], strict=False))
    rotated = b.node("Concat", [b.node("Neg", [second]), first], axis=-1)
    q = b.node(
        "Add",
        [
            b.node("Mul", [q, b.init("cos", [n, dim])]),
            b.node("Mul", [rotated, b.init("sin", [n, dim])]),
        ],
    )
    return b.node("Mul", [b.init("qscale", np.array(0.5, np.float32)), q])


def attention(
    opset: int, dynamic: bool, form: str, heads: int = 2, dim: int = 4, extras: bool = False
) -> Builder:
    """A transformer attention layer on a residual stream ``x [B, N, E]``: q, k, v projections
    (``form``: ``separate``, ``split`` / ``slice`` (one qkv Linear, then Split or three Slices),
    ``fused5d`` (one qkv Linear, Reshape [B, N, 3, H, D], Transpose, Gather)), heads (with
    ``extras``, q through :func:`rotary`), q·kᵀ scaled, Softmax, ·v, heads merged back, output
    projection, residual Add."""
    b = Builder(opset)
    e, n = 6, 5
    x = b.input("x", [batch_dim(dynamic), n, e])
    hd = heads * dim
    if form == "fused5d":
        qkv = _linear(b, x, e, 3 * hd, "qkv")
        t = b.node("Reshape", [qkv, b.ints("qkv_shape", [0, n, 3, heads, dim])])
        t = b.node("Transpose", [t], perm=[2, 0, 3, 1, 4])
        q, k, v = (b.node("Gather", [t, b.init(f"i{i}", np.array(i))], axis=0) for i in range(3))
        k = b.node("Transpose", [k], perm=[0, 1, 3, 2])
    else:
        if form == "slice":
            qkv = _linear(b, x, e, 3 * hd, "qkv")
            parts = [
                b.node(
                    "Slice",
                    [
                        qkv,
                        b.ints(f"st{i}", [i * hd]),
                        b.ints(f"en{i}", [i * hd + hd]),
                        b.ints(f"ax{i}", [-1]),
                    ],
                )
                for i in range(3)
            ]
        elif form == "split":
            qkv = _linear(b, x, e, 3 * hd, "qkv")
            if opset >= 18:
                parts = b.node("Split", [qkv], 3, axis=2, num_outputs=3)
            else:
                parts = b.node("Split", [qkv, b.ints("qkv_sizes", [hd] * 3)], 3, axis=2)
        else:
            parts = [_linear(b, x, e, hd, name) for name in ("q", "k", "v")]
        q = _heads(b, parts[0], heads, dim, [0, 2, 1, 3])
        k = _heads(b, parts[1], heads, dim, [0, 2, 3, 1])
        v = _heads(b, parts[2], heads, dim, [0, 2, 1, 3])
    if extras:
        q = rotary(b, q, n, dim)
    s = b.node("MatMul", [q, k])
    s = b.node("Mul", [s, b.init("scale", np.array(dim**-0.5, np.float32))])
    s = b.node("Softmax", [s], axis=-1)
    o = b.node("MatMul", [s, v])
    o = b.node("Transpose", [o], perm=[0, 2, 1, 3])
    o = b.node("Reshape", [o, b.ints("merge", [0, n, hd])])
    b.output(b.node("Add", [_linear(b, o, hd, e, "proj"), x], "y"))
    return b


def split_attention(opset: int, dynamic: bool, radix: int = 2, card: int = 2) -> Builder:
    """ResNeSt's split-attention block: grouped conv into ``radix`` x C channels, the radix
    parts summed, pooled, two grouped 1x1 convs, an rSoftmax (Reshape [B, card, radix, -1],
    swap, Softmax over radix, Reshape back), each part weighted and summed, then a conv."""
    b = Builder(opset)
    c, inter, hw = 8, 4, 4
    x = b.input("x", [batch_dim(dynamic), 3, hw, hw])
    x = b.relu(b.conv(x, 3, 8, 1, prefix="c0"))
    y = b.relu(b.conv(x, 8, radix * c, 3, prefix="conv", group=card * radix))
    sizes = [c] * radix
    if opset >= 13:
        parts = b.node("Split", [y, b.ints("split_sizes", sizes)], radix, axis=1)
    else:
        parts = b.node("Split", [y], radix, axis=1, split=sizes)
    gap = b.node("GlobalAveragePool", [b.node("Sum", parts)])
    att = b.relu(b.conv(gap, c, inter, 1, prefix="fc1", group=card))
    att = b.conv(att, inter, radix * c, 1, prefix="fc2", group=card)
    att = b.node("Reshape", [att, b.ints("rsoftmax_in", [0, card, radix, -1])])
    att = b.node("Transpose", [att], perm=[0, 2, 1, 3])
    att = b.node("Softmax", [att], axis=1)
    att = b.node("Reshape", [att, b.ints("rsoftmax_out", [0, -1, 1, 1])])
    if opset >= 13:
        atts = b.node("Split", [att, b.ints("att_sizes", sizes)], radix, axis=1)
    else:
        atts = b.node("Split", [att], radix, axis=1, split=sizes)
    weighted = [b.node("Mul", [w, p]) for w, p in zip(atts, parts, strict=True)]
    b.output(b.conv(b.node("Sum", weighted), c, 5, 1, prefix="out"))
    return b


def weight_standardized(opset: int, dynamic: bool, group: int = 1) -> Builder:
    """A conv whose weight is standardized per filter at run time (mean and variance over the
    rest of the kernel, then a per-filter gain), as in BiT / NFNet."""
    b = Builder(opset)
    cin, cout = 4, 8
    x = b.input("x", [batch_dim(dynamic), cin, 4, 4])
    x = b.conv(x, cin, cin, 1, prefix="c0")
    w = b.init("ws.weight", [cout, cin // group, 3, 3])

    def mean(t: str) -> str:
        if opset >= 18:
            return b.node("ReduceMean", [t, b.ints(f"axes{b._count}", [1, 2, 3])], keepdims=1)
        return b.node("ReduceMean", [t], axes=[1, 2, 3], keepdims=1)

    centered = b.node("Sub", [w, mean(w)])
    var = mean(b.node("Mul", [centered, centered]))
    std = b.node("Sqrt", [b.node("Add", [var, b.init("eps", np.array(1e-5, np.float32))])])
    ws = b.node("Div", [centered, std])
    ws = b.node("Mul", [ws, b.init("ws.gain", [cout, 1, 1, 1])])
    y = b.node(
        "Conv",
        [x, ws, b.init("ws.bias", [cout])],
        "ws.out",
        name="ws",
        kernel_shape=[3, 3],
        pads=[1] * 4,
        group=group,
    )
    b.output(b.conv(b.relu(y), cout, 5, 1, prefix="c2"))
    return b
