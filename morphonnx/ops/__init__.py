"""The op registry: the one home of per-operator knowledge.

Each op-family module lists its :class:`OpKind` entries in ``KINDS``: the channel rule, the rewrite
after pruning, MACs and weight axes, per-channel parameters, whether it can expand a deviation.
Every other module asks :func:`op_kind`. An op not listed here, or outside the default ONNX domain,
gets :data:`UNSUPPORTED`: it stops every group it touches, nothing unknown passes channels.
"""

from __future__ import annotations

from morphonnx.channels import RuleContext
from morphonnx.ir import Node
from morphonnx.ops import (
    conv,
    elementwise,
    layout,
    linear,
    normalization,
    quantize,
    reduction,
    shape,
    slicing,
)
from morphonnx.ops.kind import Grouping, Layer, OpKind, ShapeOf, numel

__all__ = ["REGISTRY", "UNSUPPORTED", "Grouping", "Layer", "OpKind", "ShapeOf", "numel", "op_kind"]

_FAMILIES = (conv, linear, elementwise, normalization, reduction, layout, slicing, shape, quantize)


def _registry() -> dict[str, OpKind]:
    table: dict[str, OpKind] = {}
    for family in _FAMILIES:
        for kind in family.KINDS:
            assert kind.op_type not in table, f"{kind.op_type} registered twice"
            table[kind.op_type] = kind
    return table


REGISTRY = _registry()
"""Op kind per op type of the default ONNX domain."""


def _unsupported(ctx: RuleContext) -> None:
    domain = f"{ctx.node.domain}." if not ctx.node.standard else ""
    ctx.stop_all(f"unsupported op `{domain}{ctx.node.op_type}` at {ctx.where()}")


UNSUPPORTED = OpKind("", _unsupported, shapeless=True)
"""The conservative default: stops every group the node touches, with the op's name."""


def op_kind(node: Node) -> OpKind:
    """The registry entry of ``node``'s op, or :data:`UNSUPPORTED`."""
    if not node.standard:
        return UNSUPPORTED
    return REGISTRY.get(node.op_type, UNSUPPORTED)
