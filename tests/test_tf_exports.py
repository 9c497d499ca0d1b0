"""tf2onnx exports of Keras models (NHWC, BN folded into convs, TF scope names), committed under
``tests/data`` so these tests need no TensorFlow, plus minimal ``onnx.helper`` repros of the bugs a
sweep over real exports and shipped models found.

The fixtures were made with tensorflow-cpu 2.21 / keras 3.15 / tf2onnx 1.17 by the code under
``if __name__ == "__main__"`` at the end of this file (``python tests/test_tf_exports.py OUTDIR``
in an environment with ``tensorflow-cpu tf2onnx``). Their weights are random; every count asserted
below is computed by hand from the Keras architecture, not read back from morphonnx.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_runner import run
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import Builder

DATA = Path(__file__).resolve().parent / "data"


def analyze_json(capsys: pytest.CaptureFixture[str], model: Path, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{model.stem}.analyze.json"
    rc, _, err = run(capsys, "analyze", model, "--json", out)
    assert rc == 0, err
    return json.loads(out.read_text())


def half_mask(capsys: pytest.CaptureFixture[str], model: Path, tmp: Path) -> Path:
    """A mask keeping every other channel of every prunable group (at least one)."""
    spec_path = tmp / f"{model.stem}.spec.json"
    rc, _, err = run(capsys, "spec", model, "-o", spec_path)
    assert rc == 0, err
    spec = json.loads(spec_path.read_text())
    groups = {
        g["id"]: [i % 2 == 0 for i in range(g["channels"])] for g in spec["groups"] if g["prunable"]
    }
    mask = {
        "format": "morphonnx.mask",
        "version": 1,
        "model_fingerprint": spec["model"]["fingerprint"],
        "groups": groups,
    }
    path = tmp / f"{model.stem}.mask.json"
    path.write_text(json.dumps(mask))
    return path


def prune_ok(capsys: pytest.CaptureFixture[str], model: Path, tmp: Path) -> str:
    mask = half_mask(capsys, model, tmp)
    out = tmp / f"{model.stem}.pruned.onnx"
    rc, stdout, err = run(capsys, "prune", model, "--mask", mask, "-o", out)
    assert rc == 0, err
    assert "verification passed" in stdout
    assert out.is_file()
    return stdout


def groups_of(report: dict[str, Any]) -> list[tuple[int, bool]]:
    return sorted((g["channels"], g["prunable"]) for g in report["groups"])


# --- Keras exports that work ------------------------------------------------------------------

# keras_custom_op13: 32x32x3 -> conv16(no bias)+BN+ReLU -> [conv16+BN+relu] residual add ->
# depthwise3x3+BN+ReLU6 -> conv1x1 24 ; conv3x3 8 on the add -> concat(32) -> conv3x3/2 32+BN+ReLU
# -> GAP -> Dense 20 relu -> Dense 10 softmax
CUSTOM_MACS = (
    32 * 32 * 16 * 27  # conv1 3x3, 3->16
    + 32 * 32 * 16 * 144  # residual conv 3x3, 16->16
    + 32 * 32 * 16 * 9  # depthwise 3x3
    + 32 * 32 * 24 * 16  # 1x1, 16->24
    + 32 * 32 * 8 * 144  # 3x3, 16->8
    + 16 * 16 * 32 * 288  # 3x3 stride 2, 32->32
    + 32 * 20
    + 20 * 10
)


def test_keras_custom_cnn_groups_costs_and_prune(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = DATA / "keras_custom_op13.onnx"
    report = analyze_json(capsys, model, tmp_path)
    assert report["model"]["inputs"] == {"input": [1, 32, 32, 3]}  # NHWC input, batch filled
    assert report["totals"]["macs"] == CUSTOM_MACS == 6_882_120
    # residual add ties conv1, the residual conv and the depthwise conv (16); the concat keeps
    # its two inputs apart (24, 8); conv 32 and Dense 20; input 3 and the softmax'd 10 are not
    assert groups_of(report) == sorted(
        [(16, True), (24, True), (8, True), (32, True), (20, True), (3, False), (10, False)]
    )
    reasons = {g["channels"]: g["reason"] for g in report["groups"] if not g["prunable"]}
    assert "graph input" in reasons[3] and "Softmax" in reasons[10]
    prune_ok(capsys, model, tmp_path)


# keras_zoo_op17: ZeroPadding2D, Conv+BN+LeakyReLU, SeparableConv2D (depthwise + pointwise) +
# PReLU, Conv swish, squeeze-excite (GAP keepdims, conv relu, conv hard_sigmoid, Multiply),
# Conv stride 2, Conv2DTranspose, UpSampling2D(1), Concatenate, Cropping2D, MaxPooling2D,
# Dense on a 4-D NHWC tensor (MatMul on the last axis), LayerNormalization, Conv, Flatten, Dense.
ZOO_MACS = (
    32 * 32 * 16 * 27  # conv 3x3 valid after ZeroPadding(1)
    + 32 * 32 * 16 * 9  # separable: depthwise
    + 32 * 32 * 24 * 16  # separable: pointwise
    + 32 * 32 * 24 * 216  # conv 3x3 24->24
    + 24 * 6 * 2  # SE squeeze / excite 1x1 convs on 1x1
    + 16 * 16 * 16 * 216  # conv 3x3/2 24->16
    + 16 * 16 * 16 * 12 * 9  # conv transpose 16->12 (numel(X) * C_out * k)
    + 15 * 15 * 20 * 36  # Dense(20) on the 15x15x36 pooled crop
    + 7 * 7 * 8 * 180  # conv 3x3/2 valid 20->8
    + 392 * 10  # Flatten (7*7*8) -> Dense 10
)


def test_keras_layer_zoo_groups_costs_and_prune(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = DATA / "keras_zoo_op17.onnx"
    report = analyze_json(capsys, model, tmp_path)
    assert report["totals"]["macs"] == ZOO_MACS == 7_855_328
    assert groups_of(report) == sorted(
        [
            (16, True),  # first conv + depthwise of the separable conv
            (24, True),  # separable pointwise (PReLU per channel)
            (24, True),  # conv 24 + SE excite (tied by Multiply), read by concat
            (6, True),  # SE squeeze
            (16, True),  # conv stride 2
            (12, True),  # conv transpose (through Resize(1), Concat, Slice, MaxPool)
            (8, True),  # last conv: Flatten in NHWC gives each channel a stride of Dense rows
            (20, False),  # Dense(20) feeds LayerNormalization over its channels
            (3, False),
            (10, False),
        ]
    )
    layer_norm = next(g for g in report["groups"] if g["channels"] == 20)
    assert "ReduceMean" in layer_norm["reason"]
    prune_ok(capsys, model, tmp_path)


# keras_invres_*: conv3x3/2 8 + BN + ReLU6, then two MobileNetV2 inverted residual blocks
# (1x1 expand 24 + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 project 8 + BN, residual add),
# GAP, Dense 5. "_trained" has random BN statistics (as after training), "_init" Keras' defaults.
INVRES_MACS = 8 * 8 * 8 * 27 + 2 * (8 * 8 * 24 * 8 + 8 * 8 * 24 * 9 + 8 * 8 * 8 * 24) + 8 * 5


def test_keras_inverted_residuals_trained_export(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = DATA / "keras_invres_trained_op13.onnx"
    report = analyze_json(capsys, model, tmp_path)
    assert report["totals"]["macs"] == INVRES_MACS == 90_664
    # stem + both projections (residual adds); each block's expand + depthwise on its own
    assert groups_of(report) == sorted([(8, True), (24, True), (24, True), (3, False), (5, False)])
    prune_ok(capsys, model, tmp_path)


# --- regressions found by the sweep ---------------------------------------------------------


def test_keras_inverted_residuals_initial_export_keeps_blocks_apart(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = analyze_json(capsys, DATA / "keras_invres_init_op13.onnx", tmp_path)
    assert report["totals"]["macs"] == INVRES_MACS
    assert groups_of(report) == sorted([(8, True), (24, True), (24, True), (3, False), (5, False)])


def shared_scale_model(path: Path) -> Path:
    """Two conv->Mul(k) blocks where both Muls read the SAME (1,4,1,1) constant ``k``."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w4"),
        numpy_helper.from_array(np.full((1, 4, 1, 1), 0.9995, np.float32), "k"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["a", "k"], ["am"]),
        helper.make_node("Relu", ["am"], ["ar"]),
        helper.make_node("Conv", ["ar", "w2"], ["b"]),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("Conv", ["br", "w3"], ["c"]),
        helper.make_node("Mul", ["c", "k"], ["cm"]),
        helper.make_node("Relu", ["cm"], ["cr"]),
        helper.make_node("Conv", ["cr", "w4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared_scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_shared_per_channel_constant_does_not_tie_layers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = analyze_json(capsys, shared_scale_model(tmp_path / "shared.onnx"), tmp_path)
    # conv w1 (4) and conv w3 (4) are unrelated layers: two groups, plus w2's 8
    assert groups_of(report) == sorted([(4, True), (4, True), (8, True), (3, False), (2, False)])
    # and each layer prunes on its own: the pruned file gives each Mul the slices it needs
    prune_ok(capsys, tmp_path / "shared.onnx", tmp_path)


def shape_reshape_model(path: Path, opset: int) -> Path:
    """conv8 -> relu -> conv4 -> GAP -> Reshape(p, Concat(Slice(Shape(p), 0, 1), [-1])) -> relu.

    The Reshape target is computed from Shape, as tf2onnx (Flatten, UpSampling2D) and paddle2onnx
    emit it. onnx's data propagation resolves it only from Reshape-14 on, so at opset <= 13 the
    Reshape output (and everything after it) has no inferred shape."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([0], np.int64), "st"),
        numpy_helper.from_array(np.array([1], np.int64), "en"),
        numpy_helper.from_array(np.array([-1], np.int64), "m1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Shape", ["p"], ["s"]),
        helper.make_node("Slice", ["s", "st", "en"], ["b"]),
        helper.make_node("Concat", ["b", "m1"], ["tgt"], axis=0),
        helper.make_node("Reshape", ["p", "tgt"], ["y"]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shape_reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "f"])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def test_shape_computed_reshape_prunes_at_opset_14(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prune_ok(capsys, shape_reshape_model(tmp_path / "m14.onnx", 14), tmp_path)


def test_shape_computed_reshape_prunes_at_opset_13(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Regression: at commit 4c2c79d prune crashed here (internal error, AssertionError in
    RewriteContext.shape / old_shape, reached from the Reshape and Conv rewrites) on any
    node with a rewrite whose tensors have no inferred shape, even one the mask does not touch
    (PP-OCRv4 rec / ppocr cls from rapidocr-onnxruntime, ddddocr's common.onnx, tf2onnx opset-13
    UpSampling2D). Passes with RewriteContext.changed returning False for unknown shapes."""
    prune_ok(capsys, shape_reshape_model(tmp_path / "m13.onnx", 13), tmp_path)


# keras_upsample_op13: conv3x3 8 relu on 16x16x3 -> UpSampling2D(2) -> conv3x3 8 -> GlobalMaxPool
# -> Dense 4; tf2onnx writes the upsampling as Unsqueeze/Tile/Reshape with a Shape-computed target,
# which ONNX's data propagation does not resolve before opset 14 (morphonnx computes it itself)
UPSAMPLE_MACS = 16 * 16 * 8 * 27 + 32 * 32 * 8 * 72 + 8 * 4


def test_keras_upsampling_opset13_counts_all_macs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = analyze_json(capsys, DATA / "keras_upsample_op13.onnx", tmp_path)
    assert report["totals"]["macs"] == UPSAMPLE_MACS == 645_152


def test_keras_upsampling_opset13_groups_prunable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = analyze_json(capsys, DATA / "keras_upsample_op13.onnx", tmp_path)
    assert groups_of(report) == sorted([(8, True), (8, True), (3, False), (4, False)])


def test_keras_upsampling_opset13_prunes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prune_ok(capsys, DATA / "keras_upsample_op13.onnx", tmp_path)


def sigmoid_head_model(path: Path, seed: int) -> Path:
    """conv64 relu -> conv1 -> *1e-3 - 14 -> Sigmoid: outputs ~1e-6, where onnxruntime's Sigmoid
    moves in steps of 2**-24 (6e-8)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((1, 64, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([-14.0], np.float32), "b2"),
        numpy_helper.from_array(np.array([1e-3], np.float32), "k"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c2", "k"], ["c3"]),
        helper.make_node("Add", ["c3", "b2"], ["c4"]),
        helper.make_node("Sigmoid", ["c4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sigmoid_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 32, 32])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_verify_accepts_correct_prune_before_saturated_sigmoid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A saturated Sigmoid moves in steps of 2**-24 near 0: reassociation noise of 1e-6 before it
    changes its output by a few such steps (PP-OCRv4 det from rapidocr-onnxruntime did)."""
    for seed in range(12):
        folder = tmp_path / str(seed)
        folder.mkdir()
        prune_ok(capsys, sigmoid_head_model(folder / "sig.onnx", seed), folder)


def test_verify_catches_a_wrong_prune_on_small_activations(tmp_path: Path) -> None:
    """Tensors whose values are all tiny (deep in untrained exports) are still checked."""
    from morphonnx.analysis import analyze
    from morphonnx.prune import prune_model
    from morphonnx.verify import verify

    b = Builder(17)
    w1 = b.init(
        "w1", (1e-9 * np.random.default_rng(0).standard_normal((8, 3, 3, 3))).astype(np.float32)
    )
    r1 = b.relu(b.node("Conv", [b.input("x", [1, 3, 8, 8]), w1], pads=[1, 1, 1, 1]))
    b.node("Conv", [r1, b.init("w2", [4, 8, 1, 1])], b.output("y"))
    path = b.save(tmp_path, "small.onnx")
    keep = {"g0": [True, False] * 4}
    a = analyze(path)
    assert [(g.id, g.channels, g.prunable) for g in a.solution.groups][:1] == [("g0", 8, True)]
    pruned = prune_model(analyze(path), keep)
    # break the pruned model: negate the kept filters of the first conv
    w1 = next(t for t in pruned.graph.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w1), "w1"))
    assert not verify(a, keep, pruned).ok


# --- fixture generation (needs tensorflow-cpu and tf2onnx; not run by the tests) ---------------


def _make_fixtures(out: Path) -> None:  # pragma: no cover
    import tensorflow as tf
    import tf2onnx
    from tensorflow import keras

    layers = keras.layers

    def custom() -> Any:
        x = keras.Input((32, 32, 3), name="img")
        y = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
        y = layers.ReLU()(layers.BatchNormalization()(y))
        r = layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(y))
        y = layers.Add()([y, layers.Activation("relu")(r)])
        d = layers.DepthwiseConv2D(3, padding="same")(y)
        d = layers.ReLU(6.0)(layers.BatchNormalization()(d))
        p = layers.Conv2D(24, 1)(d)
        q = layers.Conv2D(8, 3, padding="same", activation="relu")(y)
        c = layers.Conv2D(32, 3, strides=2, padding="same")(layers.Concatenate()([p, q]))
        c = layers.ReLU()(layers.BatchNormalization()(c))
        g = layers.Dense(20, activation="relu")(layers.GlobalAveragePooling2D()(c))
        return keras.Model(x, layers.Dense(10, activation="softmax", name="probs")(g))

    def zoo() -> Any:
        x = keras.Input((32, 32, 3), name="img")
        y = layers.Conv2D(16, 3)(layers.ZeroPadding2D(1)(x))
        y = layers.LeakyReLU(0.1)(layers.BatchNormalization()(y))
        a = layers.SeparableConv2D(24, 3, padding="same")(y)
        a = layers.PReLU(shared_axes=[1, 2])(a)
        g = layers.Activation("swish")(layers.Conv2D(24, 3, padding="same")(a))
        s = layers.GlobalAveragePooling2D(keepdims=True)(g)
        s = layers.Conv2D(6, 1, activation="relu")(s)
        s = layers.Conv2D(24, 1, activation="hard_sigmoid")(s)
        g = layers.Multiply()([g, s])
        u = layers.Conv2D(16, 3, strides=2, padding="same")(g)
        u = layers.UpSampling2D(1)(layers.Conv2DTranspose(12, 3, strides=2, padding="same")(u))
        c = layers.Cropping2D(((1, 1), (1, 1)))(layers.Concatenate()([u, g]))
        d = layers.LayerNormalization()(layers.Dense(20)(layers.MaxPooling2D()(c)))
        f = layers.Flatten()(layers.Conv2D(8, 3, strides=2)(d))
        return keras.Model(x, layers.Dense(10, name="out")(f))

    def upsample() -> Any:
        x = keras.Input((16, 16, 3), name="img")
        y = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
        y = layers.Conv2D(8, 3, padding="same")(layers.UpSampling2D(2)(y))
        return keras.Model(x, layers.Dense(4)(layers.GlobalMaxPooling2D()(y)))

    def block(x: Any, exp: int, cout: int) -> Any:
        y = layers.Conv2D(exp, 1, use_bias=False)(x)
        y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
        y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y)
        y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
        y = layers.BatchNormalization()(layers.Conv2D(cout, 1, use_bias=False)(y))
        return layers.Add()([x, y])

    def invres() -> Any:
        x = keras.Input((16, 16, 3))
        y = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
        y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
        y = block(block(y, 24, 8), 24, 8)
        return keras.Model(x, layers.Dense(5)(layers.GlobalAveragePooling2D()(y)))

    def dense_on_maps() -> Any:  # dynamic H, W; Dense on a 4-D tensor: keras Tensordot
        x = keras.Input((None, None, 3), name="img")
        y = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
        y = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu")(y)
        y = layers.DepthwiseConv2D(3, strides=2, padding="same")(y)
        y = layers.Dense(12, activation="relu")(y)
        return keras.Model(x, layers.Dense(4)(layers.GlobalAveragePooling2D()(y)))

    def export(model: Any, size: int | None, opset: int, name: str) -> None:
        spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="input"),)
        tf2onnx.convert.from_keras(
            model, input_signature=spec, opset=opset, output_path=str(out / name)
        )

    out.mkdir(parents=True, exist_ok=True)
    export(custom(), 32, 13, "keras_custom_op13.onnx")
    export(zoo(), 32, 17, "keras_zoo_op17.onnx")
    export(upsample(), 16, 13, "keras_upsample_op13.onnx")
    export(dense_on_maps(), None, 13, "keras_tensordot_dynamic_op13.onnx")
    m = invres()
    export(m, 16, 13, "keras_invres_init_op13.onnx")
    rng = np.random.default_rng(0)
    for layer in m.layers:
        if isinstance(layer, layers.BatchNormalization):
            g = layer.get_weights()[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, g.shape),
                    rng.normal(0, 0.1, g.shape),
                    rng.normal(0, 0.1, g.shape),
                    rng.uniform(0.5, 1.5, g.shape),
                ]
            )
    export(m, 16, 13, "keras_invres_trained_op13.onnx")


if __name__ == "__main__":  # pragma: no cover
    import sys

    _make_fixtures(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)


@pytest.mark.parametrize("pruned_layer", ["w1", "w3"])
def test_shared_per_channel_constant_prunes_one_reader(pruned_layer: str, tmp_path: Path) -> None:
    """Only one reader of the shared constant loses channels: the other keeps its full copy (the
    source sliced in place, or the copy written apart), exactly as predicted."""
    from morphonnx.analysis import analyze
    from morphonnx.prune import check_pruned, prune_model, save_model
    from morphonnx.verify import verify

    path = shared_scale_model(tmp_path / "shared.onnx")
    a = analyze(path)
    group = next(
        g
        for g in a.solution.groups
        if any(m.tensor == pruned_layer and m.axis == 0 for m in g.members)
    )
    keep = {group.id: [True, False, True, False]}
    _, predicted = a.predict(keep)
    out = tmp_path / "pruned.onnx"
    save_model(prune_model(a, keep), out, path)
    check_pruned(out, str(out))
    assert verify(analyze(path), keep, onnx.load(out)).ok
    after = analyze(out)
    assert (after.totals.macs, after.totals.params) == (predicted.macs, predicted.params)
    kept = {t.name: tuple(t.dims) for t in onnx.load(out).graph.initializer}
    assert sorted(d for n, d in kept.items() if n.startswith("k")) == [(1, 2, 1, 1), (1, 4, 1, 1)]
