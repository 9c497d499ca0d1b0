"""The op registry itself: every entry is a real ONNX op and is exercised by a test graph.

"Exercised" is read from the test sources: an op type counts when a test builds a node of it
(``Builder.node("Op", ...)``, ``helper.make_node("Op", ...)``) or lists it in a
``pytest.mark.parametrize`` that builds such nodes. Adding an entry without a test that builds
its op fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import onnx.defs
import pytest

from morphonnx.ir import Node
from morphonnx.ops import REGISTRY, UNSUPPORTED, op_kind

HERE = Path(__file__).resolve().parent


def _built_op_types() -> set[str]:
    """Op type strings that test modules build nodes of (see the module docstring)."""
    found: set[str] = set()
    for path in HERE.glob("test_*.py"):
        if path.name == Path(__file__).name:
            continue
        for call in ast.walk(ast.parse(path.read_text())):
            if not isinstance(call, ast.Call):
                continue
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("node", "make_node") and call.args:
                first = call.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.add(first.value)
            elif name == "parametrize":
                for arg in call.args[1:]:
                    for c in ast.walk(arg):
                        if isinstance(c, ast.Constant) and isinstance(c.value, str):
                            found.update(c.value.split())
    return found


def test_every_entry_is_exercised() -> None:
    missing = sorted(set(REGISTRY) - _built_op_types())
    assert missing == [], f"op kinds no test builds a node of: {missing}"


def test_the_check_sees_what_tests_build() -> None:
    """The source scan finds ops built in several ways (direct, parametrized, helper.make_node)
    and nothing that is only mentioned in passing."""
    built = _built_op_types()
    assert {"Conv", "Relu", "Acosh", "CumSum", "BitShift", "LpPool"} <= built
    assert "If" in built and "If" not in REGISTRY  # built, but stops: not an entry
    assert "Loop" not in built


@pytest.mark.parametrize("op", sorted(REGISTRY))
def test_entry_is_a_default_domain_onnx_op(op: str) -> None:
    assert REGISTRY[op].op_type == op
    assert onnx.defs.has(op, ""), f"{op} is not an op of the default ONNX domain"


def _node(op: str, domain: str = "") -> Node:
    return Node(0, "n", op, domain, ["x"], ["y"], {})


def test_unknown_and_custom_ops_get_the_conservative_default() -> None:
    assert op_kind(_node("Conv")) is REGISTRY["Conv"]
    assert op_kind(_node("NonZero")) is UNSUPPORTED
    assert op_kind(_node("Conv", domain="com.example")) is UNSUPPORTED
    assert op_kind(_node("Conv", domain="ai.onnx")) is REGISTRY["Conv"]
    assert UNSUPPORTED.expands and not UNSUPPORTED.per_channel
    assert UNSUPPORTED.layer is None and UNSUPPORTED.rewrite is None
