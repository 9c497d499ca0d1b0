"""The adapters' shared core: binding a spec to framework parameters through an axis map, the
regularization plan, loss coefficients and dead slices, on hand-written specs (numpy only)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from morphonnx.binding import Binding, Param, check_options
from morphonnx.regularize import NUMPY, cost_and_coefficients, cost_and_loss

# one group of 3 channels produced by an OIHW conv (3, 2, 1, 1) and read by a Gemm (4, 3) on axis
# 1; a residual partner with a second BN gamma; a second group of 4 (the Gemm's outputs)


def entry(tensor: str, axis: int, positions: list[list[int]]) -> dict[str, Any]:
    return {"tensor": tensor, "axis": axis, "positions": positions}


SPEC: dict[str, Any] = {
    "model": {"fingerprint": "fp"},
    "groups": [
        {
            "id": "g0",
            "channels": 3,
            "prunable": True,
            "members": [
                entry("conv.w", 0, [[0], [1], [2]]),
                entry("bn.g", 0, [[0], [1], [2]]),
                entry("bn2.g", 0, [[2], [1], [0]]),
                entry("fc.w", 1, [[0], [1], [2]]),
            ],
            "regularize": {
                "gammas": [entry("bn.g", 0, [[0], [1], [2]]), entry("bn2.g", 0, [[2], [1], [0]])],
                "weights": [entry("conv.w", 0, [[0], [1], [2]])],
            },
        },
        {
            "id": "g1",
            "channels": 4,
            "prunable": True,
            "members": [entry("fc.w", 0, [[0], [1], [2], [3]])],
            "regularize": {"gammas": [], "weights": [entry("fc.w", 0, [[0], [1], [2], [3]])]},
        },
    ],
    "costs": [
        {
            "op": "conv",
            "op_type": "Conv",
            "kind": "pair",
            "inputs": {"groups": [], "static": 2},
            "outputs": {"groups": [{"group": "g0", "per_channel": 1}], "static": 0},
            "flop_coeff": 10.0,
            "size_coeff": 1.0,
            "in_elems": 1.0,
            "out_elems": 1.0,
            "bias_elems": 0.0,
            "dtype_bytes": 4,
        },
        {
            "op": "fc",
            "op_type": "Gemm",
            "kind": "pair",
            "inputs": {"groups": [{"group": "g0", "per_channel": 1}], "static": 0},
            "outputs": {"groups": [{"group": "g1", "per_channel": 1}], "static": 0},
            "flop_coeff": 2.0,
            "size_coeff": 1.0,
            "in_elems": 1.0,
            "out_elems": 1.0,
            "bias_elems": 0.0,
            "dtype_bytes": 4,
        },
    ],
}

# framework layouts: the conv as HWIO (perm (3, 2, 0, 1)), the Gemm weight as in x out
PARAMS = {
    "conv.w": Param("conv/kernel", (1, 1, 2, 3), (3, 2, 0, 1)),
    "bn.g": Param("bn/gamma", (3,), (0,)),
    "bn2.g": Param("bn2/gamma", (3,), (0,)),
    "fc.w": Param("fc/kernel", (3, 4), (1, 0)),
}


def bind(kind: str = "gamma", **params: Param) -> Binding:
    options = check_options(kind, "flops", 0.1, None, 0.0, ())
    return Binding(SPEC, "spec.json", {**PARAMS, **params}, options)


def test_plan_gathers_every_channel_from_all_its_sources() -> None:
    b = bind()
    assert b.gids == ["g0", "g1"] and b.sizes == [3, 4]
    by = {(s.tensor, s.stat): s for s in b.sources}
    # gamma group: both gammas (raw, first), the second one reversed; Gemm group: rows of
    # fc/kernel on its framework axis 1 (ONNX axis 0 through the axis map)
    assert b.raw == 2 and {s.tensor for s in b.sources[:2]} == {"bn.g", "bn2.g"}
    assert by[("fc.w", "norm")].axis == 1
    g, g2 = by[("bn.g", "abs")].offset, by[("bn2.g", "abs")].offset
    f = by[("fc.w", "norm")].offset
    # buckets by entries per channel: g1's four single rows, then g0's channels of two gammas
    assert [x.tolist() for x in b.buckets] == [
        [[f], [f + 1], [f + 2], [f + 3]],
        [[g, g2 + 2], [g + 1, g2 + 1], [g + 2, g2]],
    ]
    assert b.segment.tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert b.unsort.tolist() == [4, 5, 6, 0, 1, 2, 3]
    # evaluating the plan with numpy equals a hand gather and the core's per-group formula
    rng = np.random.default_rng(0)
    tensors = {
        "bn.g": rng.normal(size=3),
        "bn2.g": rng.normal(size=3),
        "fc.w": rng.normal(size=(3, 4)),
    }
    stats = np.zeros(f + 4)
    stats[g : g + 3] = np.abs(tensors["bn.g"])
    stats[g2 : g2 + 3] = np.abs(tensors["bn2.g"])
    stats[f : f + 4] = np.sqrt((tensors["fc.w"] ** 2).mean(0))
    by_hand = np.concatenate([stats[x].max(1) for x in b.buckets])
    indices = b.indices(lambda a: a)
    flat = b.values(NUMPY, [tensors[s.tensor] for s in b.sources], indices)
    np.testing.assert_allclose(flat, by_hand)
    onnx_layout = {"bn.g": tensors["bn.g"], "bn2.g": tensors["bn2.g"], "fc.w": tensors["fc.w"].T}
    from morphonnx.regularize import group_vector

    for gid, vec in b.split(NUMPY, flat, indices).items():
        group = next(gr for gr in SPEC["groups"] if gr["id"] == gid)
        np.testing.assert_allclose(vec, group_vector(NUMPY, group, onnx_layout, "gamma"))


def test_coefficients_are_the_loss_once_counts_are_fixed() -> None:
    b = bind()
    value, per_channel = b.coefficients(b.counts([2, 0]))  # g1 empty: counted as one
    # conv: 10 * 2 * A0; fc: 2 * A0 * A1; loss = 10*2*R0 + 2*(A0*R1 + A1*R0)
    assert value == 10 * 2 * 2 + 2 * 2 * 1
    assert per_channel.tolist() == [2 * 2] * 4 + [20 + 2 * 1] * 3  # plan order: g1, then g0
    vectors = {"g0": np.array([0.5, 0.2, 0.0]), "g1": np.zeros(4)}
    total, loss = cost_and_loss(NUMPY, SPEC, vectors, threshold=0.1)
    assert total == value
    assert loss == pytest.approx(per_channel[4:] @ vectors["g0"])
    assert cost_and_coefficients(SPEC, {"g0": 2.0, "g1": 1.0})[1] == {"g0": 22.0, "g1": 4.0}


def test_dead_slices_follow_the_axis_map() -> None:
    b = bind()
    cuts, missing = b.dead_slices({"g0": [True, False, False], "g1": [True] * 4}, strict=True)
    assert missing == []
    assert cuts == {
        "conv/kernel": {3: [1, 2]},  # ONNX output axis 0 is HWIO axis 3
        "bn/gamma": {0: [1, 2]},
        "bn2/gamma": {0: [1, 0]},
        "fc/kernel": {0: [1, 2]},  # ONNX Gemm input axis 1 is axis 0 of in x out
    }
    partial = {k: v for k, v in PARAMS.items() if k != "bn2.g"}
    b2 = Binding(SPEC, "s", partial, check_options("group_lasso", "flops", 0.1, None, 0.0, ()))
    assert b2.unmapped == ["bn2.g"]
    with pytest.raises(ValueError, match="not parameters of the model: bn2.g"):
        b2.dead_slices({"g0": [True, False, True]}, strict=True)
    assert b2.dead_slices({"g0": [True, False, True]}, strict=False)[1] == ["bn2.g"]
    with pytest.raises(ValueError, match="must list 3 flags"):
        b.dead_slices({"g0": [False, False, False]}, strict=True)


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"'conv/kernel' has shape \[1, 1, 3, 2\]"):
        bind(**{"conv.w": Param("conv/kernel", (1, 1, 3, 2), (3, 2, 0, 1))})
    with pytest.raises(ValueError, match="not parameters of the model .*: bn.g"):
        bind(**{"bn.g": Param("bn/gamma", (3,), (0,), trainable=False)})
    with pytest.raises(ValueError, match="kind must be"):
        check_options("l2", "flops", 0.1, None, 0.0, ())
    with pytest.raises(ValueError, match="needs device"):
        check_options("gamma", "latency", 0.1, None, 0.0, ())
    with pytest.raises(ValueError, match="l1_fraction"):
        check_options("gamma", "flops", 0.1, None, 2.0, ())
    with pytest.raises(ValueError, match="no prunable group left"):
        Binding(SPEC, "s", PARAMS, check_options("gamma", "flops", 0.1, None, 0.0, "g.*"))


def test_core_and_torch_adapter_import_without_tensorflow() -> None:
    code = (
        "import sys\n"
        "for m in ('tensorflow', 'keras', 'tf2onnx'): sys.modules[m] = None\n"
        "import morphonnx.cli, morphonnx.binding, morphonnx.adapters.tf\n"
        "import morphonnx.adapters.torch\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
