"""MorphNet's formulas in the core (numpy), against closed forms worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from morphonnx.devices import Device
from morphonnx.regularize import NUMPY, cost_and_loss, group_vector, select_groups


def _term(kind: str, inputs: dict, outputs: dict, flop: float, size: float = 0.0) -> dict:
    return {
        "op": f"{kind}-op",
        "op_type": "Conv",
        "kind": kind,
        "inputs": inputs,
        "outputs": outputs,
        "flop_coeff": flop,
        "size_coeff": size,
        "in_elems": 100.0,
        "out_elems": 50.0,
        "bias_elems": 1.0,
        "dtype_bytes": 4,
    }


def _side(group: str, per_channel: int = 1) -> dict:
    return {"groups": [{"group": group, "per_channel": per_channel}], "static": 0}


SPEC = {
    "groups": [
        {"id": "g0", "channels": 4, "prunable": True},
        {"id": "g1", "channels": 3, "prunable": True},
        {"id": "g2", "channels": 5, "prunable": False},
    ],
    "costs": [
        _term("pair", {"groups": [], "static": 3}, _side("g0"), 10, 9),  # image -> g0
        _term("pair", _side("g0"), _side("g1"), 5, 1),  # g0 -> g1
        _term("depthwise", _side("g1"), _side("g1", 2), 7, 9),  # depthwise, multiplier 2
    ],
}

VECTORS = {"g0": np.array([0.5, 0.0, 0.2, 0.0]), "g1": np.array([0.0, 0.0, 0.05])}
# threshold 0.1: g0 has 2 alive (R = 0.7); g1 has none, counted as 1 (a mask keeps its strongest)


def test_flops_cost_and_loss_by_hand() -> None:
    cost, loss = cost_and_loss(NUMPY, SPEC, VECTORS, cost="flops", threshold=0.1)
    a0, r0, a1, r1 = 2, 0.7, 1, 0.05
    assert cost == pytest.approx(10 * 3 * a0 + 5 * a0 * a1 + 7 * (2 * a1))
    expected = 10 * (3 * r0 + a0 * 0) + 5 * (a0 * r1 + a1 * r0) + 7 * (r1 + 2 * r1)
    assert float(loss) == pytest.approx(expected)


def test_size_cost_and_unregularized_groups_count_whole() -> None:
    cost, loss = cost_and_loss(NUMPY, SPEC, {"g1": VECTORS["g1"]}, cost="size", threshold=0.1)
    # g0 has no vector: all 4 channels alive, no gradient through it
    assert cost == pytest.approx(9 * 3 * 4 + 1 * 4 * 1 + 9 * 2)
    assert float(loss) == pytest.approx(1 * (4 * 0.05) + 9 * (0.05 + 2 * 0.05))


def test_latency_picks_the_larger_roofline_branch() -> None:
    compute = Device("c", peak_flops=1.0, mem_bandwidth=1e12)
    memory = Device("m", peak_flops=1e12, mem_bandwidth=1.0)
    cost_c, _ = cost_and_loss(NUMPY, SPEC, VECTORS, cost="latency", threshold=0.1, device=compute)
    flops, _ = cost_and_loss(NUMPY, SPEC, VECTORS, cost="flops", threshold=0.1)
    assert cost_c == pytest.approx(flops)  # compute-bound everywhere: seconds = FLOPs / 1
    cost_m, _ = cost_and_loss(NUMPY, SPEC, VECTORS, cost="latency", threshold=0.1, device=memory)
    a0, a1 = 2, 1
    by_hand = 4 * (
        (100 * 3 + 50 * a0 + 9 * 3 * a0 + 1 * a0)
        + (100 * a0 + 50 * a1 + 1 * a0 * a1 + 1 * a1)
        + (100 * a1 + 50 * 2 * a1 + 9 * 2 * a1 + 1 * 2 * a1)
    )
    assert cost_m == pytest.approx(by_hand)


def test_group_vector_gamma_max_and_lasso() -> None:
    group = {
        "regularize": {
            "gammas": [
                {"tensor": "bn1", "axis": 0, "positions": [[0], [1], [2]]},
                {"tensor": "bn2", "axis": 0, "positions": [[0], [1], [2]]},
            ],
            "weights": [{"tensor": "w", "axis": 0, "positions": [[0], [1], [2]]}],
        }
    }
    w = np.arange(3 * 2 * 2, dtype=np.float64).reshape(3, 2, 2) - 5
    tensors = {"bn1": np.array([-0.5, 0.1, 0.0]), "bn2": np.array([0.2, -0.3, 0.0]), "w": w}
    gamma = group_vector(NUMPY, group, tensors, "gamma")
    assert np.allclose(gamma, [0.5, 0.3, 0.0])  # |gamma|, max over the two sources
    lasso = group_vector(NUMPY, group, tensors, "group_lasso", l1_fraction=0.25)
    for k in range(3):
        row = w[k].reshape(-1)
        expected = 0.75 * math.sqrt(np.mean(row**2)) + 0.25 * np.mean(np.abs(row))
        assert lasso[k] == pytest.approx(expected)


def test_select_groups_excludes_by_regex() -> None:
    assert [g["id"] for g in select_groups(SPEC)] == ["g0", "g1"]
    assert [g["id"] for g in select_groups(SPEC, ["g1"])] == ["g0"]
    assert [g["id"] for g in select_groups(SPEC, ["g.*"])] == []
