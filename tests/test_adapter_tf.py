"""The Keras adapter: export with stable names, closed-form cost/loss, torch agreement, training
end to end (export, spec, train, export again, mask, prune, onnxruntime vs Keras), fit, stage 2.

Real TensorFlow, tf2onnx and onnxruntime throughout; every expected number is worked out by hand
from the architecture or computed independently (torch, onnxruntime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")

import keras  # noqa: E402
from keras import layers  # noqa: E402

from morphonnx.adapters.tf import Regularizer, export_onnx, export_spec  # noqa: E402
from morphonnx.analysis import analyze  # noqa: E402
from morphonnx.cli import main as cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T = 1e-2


def chain(tag: str = "") -> Any:
    """conv(3->4) -> bn -> relu -> conv(4->5) -> bn -> relu -> pool -> dense(5->2), 6x6 input;
    ``tag`` is appended to the layer names."""
    x = keras.Input((6, 6, 3))
    y = layers.Conv2D(4, 3, padding="same", use_bias=False, name=f"conv1{tag}")(x)
    y = layers.ReLU()(layers.BatchNormalization(name=f"bn1{tag}")(y))
    y = layers.Conv2D(5, 3, padding="same", use_bias=False, name=f"conv2{tag}")(y)
    y = layers.ReLU()(layers.BatchNormalization(name=f"bn2{tag}")(y))
    return keras.Model(x, layers.Dense(2, name=f"fc{tag}")(layers.GlobalAveragePooling2D()(y)))


def signature(size: int) -> tuple[Any, ...]:
    return (tf.TensorSpec((None, size, size, 3), tf.float32, name="input"),)


def bn_relu(x: Any) -> Any:
    return layers.ReLU()(layers.BatchNormalization()(x))


def conv(filters: int, k: int, **kw: Any) -> Any:
    return layers.Conv2D(filters, k, padding="same", use_bias=False, **kw)


def set_gammas(model: Any, **values: list[float]) -> None:
    for name, v in values.items():
        model.get_layer(name).gamma.assign(np.asarray(v, np.float32))


def alive_sum(v: list[float]) -> tuple[int, float]:
    a = [abs(x) for x in v]
    return sum(x > T for x in a), sum(a)


def conv_gemm_flops(path: Path) -> int:
    return sum(c.flops for c in analyze(path).costs if c.op_type in ("Conv", "Gemm", "MatMul"))


def run_cli(*argv: object) -> int:
    try:
        return cli([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


# --------------------------------------------------------------------------- closed forms


def test_pair_terms_flops_size_and_gradients(tmp_path: Path) -> None:
    model = chain()
    spec = export_spec(model, signature(6), tmp_path / "spec.json")
    g1, g2 = [1.0, -0.5, 0.001, 0.2], [0.3, 0.0, -2.0, 0.005, 0.1]
    set_gammas(model, bn1=g1, bn2=g2)
    a1, r1 = alive_sum(g1)
    a2, r2 = alive_sum(g2)
    k = 2 * 6 * 6 * 9  # FLOPs per (in, out) channel pair of a 3x3 conv on 6x6

    reg = Regularizer(model, spec, cost="flops", threshold=T)
    assert reg.cost() == k * 3 * a1 + k * a1 * a2 + 2 * a2 * 2
    with tf.GradientTape() as tape:
        loss = reg.loss()
    assert float(loss) == pytest.approx(k * 3 * r1 + k * (a1 * r2 + a2 * r1) + 2 * 2 * r2, 1e-6)
    bn1, bn2 = model.get_layer("bn1").gamma, model.get_layer("bn2").gamma
    grads = tape.gradient(loss, [bn1, bn2, model.get_layer("conv1").kernel])
    np.testing.assert_allclose(grads[0].numpy(), np.sign(g1) * (k * 3 + k * a2), rtol=1e-6)
    np.testing.assert_allclose(grads[1].numpy(), np.sign(g2) * (k * a1 + 2 * 2), rtol=1e-6)
    assert grads[2] is None  # gamma kind: kernels get nothing

    size = Regularizer(model, spec, cost="size", threshold=T)
    assert size.cost() == 9 * 3 * a1 + 9 * a1 * a2 + 1 * a2 * 2
    want = 9 * 3 * r1 + 9 * (a1 * r2 + a2 * r1) + 1 * 2 * r2
    assert float(size.loss()) == pytest.approx(want, rel=1e-6)


def test_group_lasso_reads_keras_kernels_in_their_layout(tmp_path: Path) -> None:
    """HWIO kernels: a filter is kernel[..., o]; its norm is sqrt(mean(w^2)) over H, W, I."""
    model = chain()
    spec = export_spec(model, signature(6), tmp_path / "spec.json")
    w1 = model.get_layer("conv1").kernel.numpy()
    w1[..., 1] *= 1e-4
    model.get_layer("conv1").kernel.assign(w1)
    w2 = model.get_layer("conv2").kernel.numpy()
    w2[..., 3] = 0  # a dead filter, zeroed
    model.get_layer("conv2").kernel.assign(w2)
    n1 = np.sqrt((w1**2).mean((0, 1, 2)))
    n2 = np.sqrt((w2**2).mean((0, 1, 2)))
    reg = Regularizer(model, spec, kind="group_lasso", threshold=T)
    values = reg.vectors()
    assert sorted(len(v) for v in values.values()) == [4, 5]
    got = {len(v): v for v in values.values()}
    np.testing.assert_allclose(got[4], n1, rtol=1e-6)
    np.testing.assert_allclose(got[5], n2, rtol=1e-6)
    a1, a2 = int((n1 > T).sum()), int((n2 > T).sum())
    k = 2 * 6 * 6 * 9
    assert reg.cost() == k * 3 * a1 + k * a1 * a2 + 2 * a2 * 2
    kernels = [model.get_layer(n).kernel for n in ("conv1", "conv2")]
    with tf.GradientTape() as tape:
        loss = reg.loss()
    g1, g2 = (g.numpy() for g in tape.gradient(loss, kernels))
    assert np.isfinite(g1).all() and np.isfinite(g2).all()  # not sqrt's NaN at the zeroed filter
    assert not g2[..., 3].any() and g2[..., 2].any()


# --------------------------------------------------------------------------- torch agreement


def test_dense_on_token_inputs_with_layer_norm(tmp_path: Path) -> None:
    """A transformer MLP on (batch, tokens, dim) with a residual and LayerNormalization: tf2onnx
    writes Dense on 3-D inputs as Tensordot reshapes whose shape constants it names with
    process-wide counters in an order that varies between exports, and LayerNormalization's
    gamma and beta reshaped to [1, 1, C]; the export still maps, the hidden units' group-LASSO
    values are the RMS of the kernel's columns, and slice, zeroed model and pruned ONNX agree."""
    x = keras.Input((5, 8))
    h = layers.Dense(16, activation="relu", name="fc1")(x)
    y = layers.LayerNormalization(name="ln")(layers.Add()([x, layers.Dense(8, name="fc2")(h)]))
    model = keras.Model(x, layers.Dense(3, name="head")(layers.GlobalAveragePooling1D()(y)))
    kernel = model.get_layer("fc1").kernel
    kernel.assign(kernel.numpy() * np.where(np.arange(16) % 5 == 0, 1e-5, 1.0))
    sig = (tf.TensorSpec((None, 5, 8), tf.float32, name="input"),)
    spec = export_spec(model, sig, tmp_path / "spec.json")
    (hidden,) = [g for g in spec["groups"] if g["prunable"]]
    assert hidden["regularize"]["weights"] == [
        {"tensor": "fc1/kernel", "axis": 1, "positions": [[i] for i in range(16)]}
    ]
    reg = Regularizer(model, tmp_path / "spec.json", kind="group_lasso")
    want = np.sqrt((kernel.numpy().astype(np.float64) ** 2).mean(0))
    np.testing.assert_allclose(reg.mask().values[hidden["id"]], want, rtol=1e-6)
    assert [i for i, k in enumerate(reg.mask().keep[hidden["id"]]) if not k] == [0, 5, 10, 15]

    export_onnx(model, sig, tmp_path / "trained.onnx")
    reg.write_mask(tmp_path / "mask.json")
    pruned = tmp_path / "pruned.onnx"
    assert run_cli("prune", tmp_path / "trained.onnx", "--mask", tmp_path / "mask.json",
                   "-o", pruned) == 0  # fmt: skip
    reg.zero_dead_()
    small = reg.slice_model()
    assert tuple(small.get_layer("fc2").kernel.shape) == (12, 8)
    data = np.random.default_rng(0).normal(size=(4, 5, 8)).astype(np.float32)
    want_out = model(data).numpy()
    np.testing.assert_allclose(small(data).numpy(), want_out, atol=1e-5)
    sess = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": data})[0], want_out, atol=1e-5)


def keras_block() -> Any:
    """stem conv(3->4)+bn+relu; residual conv(4->4)+bn added; depthwise 3x3 + bn + relu; pointwise
    conv(4->6)+bn+relu; pool; dense(6->2). 6x6 input."""
    x = keras.Input((6, 6, 3))
    s = layers.ReLU()(layers.BatchNormalization(name="bn0")(conv(4, 3, name="stem")(x)))
    y = layers.Add()([s, layers.BatchNormalization(name="bn1")(conv(4, 3, name="c1")(s))])
    d = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(y)
    d = layers.ReLU()(layers.BatchNormalization(name="bn2")(d))
    p = layers.ReLU()(layers.BatchNormalization(name="bn3")(conv(6, 1, name="pw")(d)))
    return keras.Model(x, layers.Dense(2, name="fc")(layers.GlobalAveragePooling2D()(p)))


def test_same_cost_and_loss_as_the_torch_adapter(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from morphonnx.adapters import torch as torch_adapter

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.c1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
            self.bn2 = nn.BatchNorm2d(4)
            self.pw, self.bn3 = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 2)

        def forward(self, x: Any) -> Any:
            s = torch.relu(self.bn0(self.stem(x)))
            y = s + self.bn1(self.c1(s))
            y = torch.relu(self.bn2(self.dw(y)))
            return self.fc(torch.relu(self.bn3(self.pw(y))).mean((2, 3)))

    tm, km = Block(), keras_block()
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for name in ("bn0", "bn1", "bn2", "bn3"):
            bn = getattr(tm, name)
            n = bn.num_features
            gamma = np.where(rng.random(n) > 0.4, rng.random(n) + 0.1, 1e-3).astype(np.float32)
            bn.weight.copy_(torch.from_numpy(gamma))
            km.get_layer(name).gamma.assign(gamma)
        for name in ("stem", "c1", "pw"):
            w = getattr(tm, name).weight
            scale = np.where(rng.random(w.shape[0]) > 0.3, 1.0, 1e-4).astype(np.float32)
            w.mul_(torch.from_numpy(scale)[:, None, None, None])  # some filters ~dead
            km.get_layer(name).kernel.assign(w.numpy().transpose(2, 3, 1, 0))  # OIHW -> HWIO
        km.get_layer("dw").kernel.assign(tm.dw.weight.numpy().transpose(2, 3, 0, 1))  # C1HW->HWC1
        km.get_layer("fc").kernel.assign(tm.fc.weight.numpy().T)
    torch_spec = torch_adapter.export_spec(tm, torch.randn(1, 3, 6, 6), tmp_path / "t.json")
    keras_spec = export_spec(km, signature(6), tmp_path / "k.json")
    # roofline latency differs by the classifier's bias bytes: torch exports Gemm(bias), tf2onnx
    # MatMul + Add, so only the FLOP and weight costs are the same model in both files
    for kind, cost in (("gamma", "flops"), ("group_lasso", "size"), ("group_lasso", "flops")):
        options = {"kind": kind, "cost": cost, "l1_fraction": 0.3}
        treg = torch_adapter.Regularizer(tm, torch_spec, **options)
        kreg = Regularizer(km, keras_spec, **options)
        assert kreg.cost() == pytest.approx(treg.cost(), rel=1e-9)
        assert float(kreg.loss()) == pytest.approx(treg.loss().item(), rel=1e-5)


# --------------------------------------------------------------------------- end to end


def e2e_model() -> Any:
    """A residual add, a concat and a depthwise block; 16x16 input, 4 classes."""
    x = keras.Input((16, 16, 3))
    s = bn_relu(conv(16, 3)(x))
    y = layers.ReLU()(layers.Add()([s, layers.BatchNormalization()(conv(16, 3)(s))]))
    d = bn_relu(layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y))
    c = layers.Concatenate()([bn_relu(conv(24, 1)(d)), bn_relu(conv(12, 3)(y))])
    c = bn_relu(conv(32, 3, strides=2)(c))
    h = layers.Dense(16, activation="relu")(layers.GlobalAveragePooling2D()(c))
    return keras.Model(x, layers.Dense(4)(h))


def test_end_to_end_train_export_mask_prune(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = e2e_model()
    sig = signature(16)
    spec = export_spec(model, sig, tmp_path / "spec.json")
    reg = Regularizer(model, tmp_path / "spec.json", kind="gamma", cost="flops", threshold=T)
    before = reg.cost()
    assert before == spec["totals"]["flops"]  # everything alive: every Conv/MatMul FLOP

    rng = np.random.default_rng(0)
    patterns = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)  # one per class, plus noise
    labels = rng.integers(0, 4, 256)
    images = (rng.normal(size=(256, 16, 16, 3)) + patterns[labels]).astype(np.float32)
    # SGD with momentum and a decaying rate, as MorphNet recipes: gammas the cost outweighs reach
    # ~0 and stop oscillating around it as the rate falls
    opt = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.05, 160), momentum=0.9)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    strength = 3.0 / before

    @tf.function
    def step(xb: Any, yb: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = ce(yb, model(xb, training=True)) + strength * reg.loss()
        grads = tape.gradient(loss, model.trainable_weights)
        opt.apply_gradients(zip(grads, model.trainable_weights, strict=True))
        return loss

    for _ in range(20):
        for i in range(0, 256, 32):
            step(images[i : i + 32], labels[i : i + 32])
    after = reg.cost()
    assert after <= 0.75 * before, (before, after)

    trained = tmp_path / "trained.onnx"
    export_onnx(model, sig, trained)  # same process, after training: same structure
    assert analyze(trained).fingerprint == spec["model"]["fingerprint"]
    Regularizer(model, spec, onnx_path=trained)  # accepted
    result = reg.write_mask(tmp_path / "mask.json")
    pruned = tmp_path / "pruned.onnx"
    assert run_cli("prune", trained, "--mask", tmp_path / "mask.json", "-o", pruned) == 0
    assert conv_gemm_flops(pruned) == pytest.approx(reg.cost(), rel=0.03)

    reg.zero_dead_(result)
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    want = model(x, training=False).numpy()
    got = ort.InferenceSession(str(pruned)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    small = reg.slice_model(result)
    assert small.count_params() < model.count_params()
    np.testing.assert_allclose(small(x).numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# --------------------------------------------------------------------------- fit, refusals


def test_fit_callback_adds_the_loss_and_logs_the_cost(tmp_path: Path) -> None:
    """With a task loss of zero, one plain SGD step of fit moves each gamma by exactly
    ``lr * strength * d loss / d gamma`` (the gradient taken eagerly before)."""
    model = chain()
    spec = export_spec(model, signature(6), tmp_path / "spec.json")
    set_gammas(model, bn1=[1.0, -0.5, 0.001, 0.2], bn2=[0.3, 0.0, -2.0, 0.005, 0.1])
    reg = Regularizer(model, spec, threshold=T)
    cost = reg.cost()
    gammas = [model.get_layer(n).gamma for n in ("bn1", "bn2")]
    with tf.GradientTape() as tape:
        loss = reg.loss()
    grads = [g.numpy() for g in tape.gradient(loss, gammas)]
    start = [g.numpy() for g in gammas]
    lr, strength = 0.1, 1e-4
    model.compile(keras.optimizers.SGD(lr), loss=lambda y, p: 0.0 * tf.reduce_sum(p))
    seen: list[float] = []
    log = keras.callbacks.LambdaCallback(
        on_batch_end=lambda b, logs: seen.append(logs["morphnet_cost"])
    )
    x, y = np.zeros((4, 6, 6, 3), np.float32), np.zeros((4, 2), np.float32)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[reg.callback(strength), log])
    for g, s, d in zip(gammas, start, grads, strict=True):
        np.testing.assert_allclose(g.numpy(), s - lr * strength * d, rtol=1e-5, atol=1e-7)
    assert seen == [cost]  # the cost at the step (after it, the 0.001 gamma overshoots zero)
    assert all(v.regularizer is None for v in model.trainable_weights)  # detached after fit


def test_multi_head_attention_exports_alike_and_prunes_heads(tmp_path: Path) -> None:
    """Keras MultiHeadAttention: tf2onnx orders the q, k and v branches differently from one
    conversion to the next and merges equal shape constants under either's name, and exports the
    (E, H, D) kernels reshaped to (E, H*D). Every export still has one fingerprint; per head dim
    and whole heads are found; the regularizer binds the kernels through the reshape (a head's
    group-LASSO value is the largest RMS of its q, k and v columns, computed here from the
    Keras kernels); its mask of two of three heads prunes and verifies, and the pruned model and
    the Keras model with the head zeroed agree."""
    x = keras.Input((6, 8))
    h = layers.Dense(12, name="inp")(x)
    z = layers.MultiHeadAttention(num_heads=3, key_dim=4, name="mha")(h, h)
    model = keras.Model(x, layers.Dense(5, name="out")(layers.Add()([h, z])))
    sig = (tf.TensorSpec((1, 6, 8), tf.float32, name="input"),)
    paths = [tmp_path / f"export{i}.onnx" for i in range(3)]
    for p in paths:
        export_onnx(model, sig, p)
    assert len({analyze(p).fingerprint for p in paths}) == 1
    dims = analyze(paths[0]).solution.groups
    assert sorted(g.channels for g in dims if g.prunable) == [4, 4, 12]  # q·k dims, v dims

    mha = model.get_layer("mha")
    kernels = [d.kernel for d in (mha._query_dense, mha._key_dense, mha._value_dense)]
    for k in kernels:  # (E, H, D): head 1 dies
        k.assign(k.numpy() * np.array([1, 1e-4, 1], np.float32)[None, :, None])
    spec = export_spec(model, sig, tmp_path / "spec.json", attention="heads")
    (heads,) = [g for g in spec["groups"] if g["prunable"] and g["channels"] == 3]
    reg = Regularizer(model, tmp_path / "spec.json", kind="group_lasso")
    assert reg.unmapped == []
    rms = [np.sqrt((k.numpy().astype(np.float64) ** 2).mean(0)).max(1) for k in kernels]
    np.testing.assert_allclose(reg.mask().values[heads["id"]], np.max(rms, 0), rtol=1e-6)
    reg.write_mask(tmp_path / "mask.json")
    export_onnx(model, sig, tmp_path / "trained.onnx")
    pruned = tmp_path / "pruned.onnx"
    assert run_cli("prune", tmp_path / "trained.onnx", "--mask", tmp_path / "mask.json",
                   "-o", pruned) == 0  # fmt: skip

    def macs(heads: int) -> int:  # inp, q/k/v, q·kᵀ and ·v, attention output, out
        qkv, attention, output = 3 * 6 * 12 * 4 * heads, 2 * 6 * 6 * 4 * heads, 6 * 4 * heads * 12
        return 6 * 8 * 12 + qkv + attention + output + 6 * 12 * 5

    assert (analyze(paths[0]).totals.macs, analyze(pruned).totals.macs) == (macs(3), macs(2))
    reg.zero_dead_()
    assert not mha._value_dense.kernel.numpy()[:, 1].any()
    assert mha._value_dense.kernel.numpy()[:, [0, 2]].all()
    data = np.random.default_rng(0).normal(size=(2, 6, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"])
    for row in data:
        got = sess.run(None, {"input": row[None]})[0]
        np.testing.assert_allclose(got, model(row[None]).numpy(), atol=1e-5)
    small = reg.slice_model()
    assert small.get_layer("mha").get_config()["num_heads"] == 2
    np.testing.assert_allclose(small(data).numpy(), model(data).numpy(), atol=1e-5)


def test_multi_head_attention_per_head_dim(tmp_path: Path) -> None:
    """Per head dim: a q·k dim and a v dim die in every head; the sliced MultiHeadAttention gets
    key_dim and value_dim 3, and since Keras scales q·kᵀ by 1/sqrt(key_dim) from its config, q
    absorbs the change: sliced, zeroed and pruned ONNX compute the same."""
    x = keras.Input((6, 8))
    h = layers.Dense(12, name="inp")(x)
    z = layers.MultiHeadAttention(num_heads=3, key_dim=4, name="mha")(h, h)
    model = keras.Model(x, layers.Dense(5, name="out")(layers.Add()([h, z])))
    sig = (tf.TensorSpec((1, 6, 8), tf.float32, name="input"),)
    mha = model.get_layer("mha")
    for dense, dead in ((mha._query_dense, 1), (mha._key_dense, 1), (mha._value_dense, 3)):
        scale = np.ones(4, np.float32)
        scale[dead] = 1e-4
        dense.kernel.assign(dense.kernel.numpy() * scale)
    export_spec(model, sig, tmp_path / "spec.json")
    reg = Regularizer(model, tmp_path / "spec.json", kind="group_lasso")
    assert sorted(sum(not k for k in keep) for keep in reg.mask().keep.values()) == [0, 1, 1]
    reg.write_mask(tmp_path / "mask.json")
    export_onnx(model, sig, tmp_path / "trained.onnx")
    pruned = tmp_path / "pruned.onnx"
    assert run_cli("prune", tmp_path / "trained.onnx", "--mask", tmp_path / "mask.json",
                   "-o", pruned) == 0  # fmt: skip
    reg.zero_dead_()
    small = reg.slice_model()
    config = small.get_layer("mha").get_config()
    assert (config["num_heads"], config["key_dim"], config["value_dim"]) == (3, 3, 3)
    data = np.random.default_rng(0).normal(size=(1, 6, 8)).astype(np.float32)
    want = model(data).numpy()
    np.testing.assert_allclose(small(data).numpy(), want, atol=1e-5)
    sess = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": data})[0], want, atol=1e-5)


def test_depthwise_with_a_channel_multiplier(tmp_path: Path) -> None:
    """DepthwiseConv2D(depth_multiplier=2): the (kh, kw, C, 2) kernel exports as (2C, 1, kh, kw),
    a reshape: the input channel's two filters die with it, in the zeroed model, the sliced one
    and the pruned ONNX alike."""
    x = keras.Input((6, 6, 3))
    y = bn_relu(conv(4, 3, name="c1")(x))
    y = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False, name="dw")(y)
    model = keras.Model(x, layers.Dense(2, name="fc")(layers.GlobalAveragePooling2D()(bn_relu(y))))
    spec = export_spec(model, signature(6), tmp_path / "spec.json")
    assert spec["tensors"]["dw/kernel"] == [8, 1, 3, 3]
    bns = [v for v in model.weights if v.path.endswith("gamma")]
    bns[0].assign(np.array([1.0, 1e-4, 0.7, 1.2], np.float32))
    bns[1].assign(np.array([1, 1, 1e-4, 1e-4, 1, 1, 1, 1], np.float32))  # channel 1's two
    reg = Regularizer(model, tmp_path / "spec.json")
    assert [list(k) for k in reg.mask().keep.values()] == [[True, False, True, True]]
    reg.write_mask(tmp_path / "mask.json")
    export_onnx(model, signature(6), tmp_path / "trained.onnx")
    pruned = tmp_path / "pruned.onnx"
    assert run_cli("prune", tmp_path / "trained.onnx", "--mask", tmp_path / "mask.json",
                   "-o", pruned) == 0  # fmt: skip
    reg.zero_dead_()
    kernel = model.get_layer("dw").kernel.numpy()
    assert not kernel[:, :, 1].any() and kernel[:, :, [0, 2, 3]].all()
    small = reg.slice_model()
    assert tuple(small.get_layer("dw").kernel.shape) == (3, 3, 3, 2)
    data = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    want = model(data).numpy()
    np.testing.assert_allclose(small(data).numpy(), want, atol=1e-5)
    sess = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": data})[0], want, atol=1e-5)


@pytest.mark.parametrize("k2", [1, 3])
def test_folded_slice_computes_the_trained_function(k2: int, tmp_path: Path) -> None:
    """Dead channels with gammas exactly zero output their batch-norm shift: the folded slice
    adds it, through conv2 (a bias created: it had none), to the next biases, so it computes
    what the model computes (1x1 conv2: exactly; 3x3: away from the zero-padded border, with a
    warning); the plain slice loses the shifts."""
    keras.utils.set_random_seed(k2)  # kernels independent of the tests run before
    x = keras.Input((6, 6, 3))
    y = layers.ReLU()(layers.BatchNormalization(name="bn1")(conv(4, 3, name="conv1")(x)))
    y = layers.ReLU()(layers.BatchNormalization(name="bn2")(conv(5, k2, name="conv2")(y)))
    model = keras.Model(x, layers.Dense(2, name="fc")(layers.GlobalAveragePooling2D()(y)))
    rng = np.random.default_rng(0)
    for bn, dead in ((model.get_layer("bn1"), [1, 3]), (model.get_layer("bn2"), [2])):
        gamma = rng.uniform(0.5, 1.5, bn.gamma.shape).astype(np.float32)
        gamma[dead] = 0
        bn.gamma.assign(gamma)
        bn.beta.assign(rng.uniform(0.2, 1.0, bn.beta.shape).astype(np.float32))
    export_spec(model, signature(6), tmp_path / "spec.json")
    reg = Regularizer(model, tmp_path / "spec.json")
    data = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    want = model(data).numpy()
    plain = reg.slice_model()(data).numpy()
    if k2 == 1:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            small = reg.slice_model(fold_constants=True)
        np.testing.assert_allclose(small(data).numpy(), want, atol=1e-5)
    else:
        with pytest.warns(UserWarning, match="zero-padded borders"):
            small = reg.slice_model(fold_constants=True)
        # the interior of conv2 sees every tap of the dead channels' constant relu(beta)
        w = model.get_layer("conv2").kernel.numpy()[:, :, [1, 3]][..., [0, 1, 3, 4]]
        dead = np.maximum(model.get_layer("bn1").beta.numpy()[[1, 3]], 0)
        want_bias = np.einsum("hwio,i->o", w.astype(np.float64), dead.astype(np.float64))
        # float32 storage: within a float32 rounding of the sum's largest term (it cancels)
        np.testing.assert_allclose(
            small.get_layer("conv2").bias.numpy(), want_bias, rtol=1e-5, atol=1e-7
        )
    assert small.get_layer("conv1").kernel.shape[-1] == 2
    assert small.get_layer("conv2").bias is not None
    assert np.abs(plain - want).max() > 1e-2


def test_export_refuses_constants_mixed_from_several_weights(tmp_path: Path) -> None:
    """A batch norm on a Dense output: tf2onnx folds gamma / sqrt(var + eps) into one constant."""
    x = keras.Input((4,))
    y = layers.BatchNormalization(name="bn_dense")(layers.Dense(3)(x))
    model = keras.Model(x, y)
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="map to no single Keras variable"):
        export_onnx(model, (tf.TensorSpec((None, 4), tf.float32, name="input"),), out)
    assert not out.exists()
    w = model.get_layer("bn_dense").gamma.numpy()
    np.testing.assert_array_equal(w, np.ones(3, np.float32))  # weights restored


def test_spec_of_another_model_is_refused_with_the_names(tmp_path: Path) -> None:
    spec = export_spec(chain(), signature(6), tmp_path / "spec.json")
    with pytest.raises(ValueError, match="not parameters of the model") as err:
        Regularizer(chain("_renamed"), spec)
    assert "bn1/gamma, bn2/gamma" in str(err.value)
    with pytest.raises(ValueError, match="'bn2/gamma' has shape \\[4\\] in the model"):
        Regularizer(keras_block(), spec)


def test_frozen_layers_are_regularized_without_gradient(tmp_path: Path) -> None:
    """Freezing layers (``trainable = False``, as in transfer learning) keeps their weights in
    the loss and the cost, as torch's ``requires_grad=False`` does; only the gradient is gone. A
    state variable named as a gamma (a moving mean) is still refused."""
    model = chain()
    set_gammas(model, bn1=[1.0, -0.5, 0.001, 0.2], bn2=[0.3, 0.0, -2.0, 0.005, 0.1])
    spec = export_spec(model, signature(6), tmp_path / "spec.json")
    want = {kind: Regularizer(model, spec, kind=kind) for kind in ("gamma", "group_lasso")}
    want_loss = {k: float(r.loss()) for k, r in want.items()}
    with tf.GradientTape() as tape:
        loss = want["gamma"].loss()
    want_grad = tape.gradient(loss, model.get_layer("bn2").gamma).numpy()
    for name in ("conv1", "bn1"):
        model.get_layer(name).trainable = False
    assert {v.path for v in model.trainable_weights} & {"bn1/gamma", "conv1/kernel"} == set()
    for kind, before in want.items():
        reg = Regularizer(model, spec, kind=kind)
        assert reg.cost() == before.cost()
        assert float(reg.loss()) == pytest.approx(want_loss[kind], rel=1e-6)
    reg = Regularizer(model, spec)
    with tf.GradientTape() as tape:
        loss = reg.loss()
    grads = tape.gradient(loss, model.trainable_weights)
    got = dict(zip([v.path for v in model.trainable_weights], grads, strict=True))
    np.testing.assert_allclose(got["bn2/gamma"].numpy(), want_grad, rtol=1e-6)
    bad = json.loads(json.dumps(spec).replace('"bn1/gamma"', '"bn1/moving_mean"'))
    with pytest.raises(ValueError, match="not parameters of the model .*: bn1/moving_mean"):
        Regularizer(model, bad)


@keras.saving.register_keras_serializable(package="morphonnx_tests")
class CountBranch(layers.Layer):
    """Doubles its input when it has 4 channels: the export traces the full width (a constant
    Mul, which prunes exactly), the sliced model takes the other branch."""

    def call(self, t: Any) -> Any:
        return t * 2 if t.shape[-1] == 4 else t


def test_slice_model_checks_itself_against_the_zeroed_model(tmp_path: Path) -> None:
    x = keras.Input((6, 6, 3))
    y = layers.ReLU()(layers.BatchNormalization(name="bn1")(conv(4, 3, name="conv1")(x)))
    y = layers.ReLU()(
        layers.BatchNormalization(name="bn2")(conv(5, 3, name="conv2")(CountBranch()(y)))
    )
    model = keras.Model(x, layers.Dense(2, name="fc")(layers.GlobalAveragePooling2D()(y)))
    set_gammas(model, bn1=[1.0, -0.5, 0.001, 0.2], bn2=[0.3, 0.0, -2.0, 0.005, 0.1])
    reg = Regularizer(model, export_spec(model, signature(6), tmp_path / "spec.json"))
    with pytest.raises(ValueError, match=r"does not compute what the zeroed one does \(output 0"):
        reg.slice_model()
    small = reg.slice_model(check=False)  # what the check saw
    data = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    reg.zero_dead_()
    assert not np.allclose(small(data).numpy(), model(data).numpy(), atol=1e-3)


def test_slice_model_example_inputs_follow_the_input_types(tmp_path: Path) -> None:
    """Token ids: the spec records int32, the check feeds zeros of that type (an Embedding
    cannot take random floats), and the sliced model equals the zeroed one on real ids."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((5,), dtype="int32")
    h = layers.Dense(16, activation="relu", name="fc1")(layers.Embedding(20, 8)(ids))
    model = keras.Model(ids, layers.Dense(3, name="head")(layers.GlobalAveragePooling1D()(h)))
    kernel = model.get_layer("fc1").kernel
    kernel.assign(kernel.numpy() * np.where(np.arange(16) % 5 == 0, 1e-5, 1.0))
    sig = (tf.TensorSpec((None, 5), tf.int32, name="ids"),)
    spec = export_spec(model, sig, tmp_path / "spec.json")
    assert spec["model"]["input_types"] == {"ids": "int32"}
    reg = Regularizer(model, spec, kind="group_lasso")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a check that could not run would warn
        small = reg.slice_model()
    assert small.get_layer("fc1").units == 12
    tokens = np.random.default_rng(1).integers(0, 20, (3, 5)).astype(np.int32)
    reg.zero_dead_()
    np.testing.assert_allclose(small(tokens).numpy(), model(tokens).numpy(), atol=1e-5)


# --------------------------------------------------------------------------- distributed


def test_mirrored_strategy_two_cpus(tmp_path: Path) -> None:
    """Two logical CPU devices (fixed at TensorFlow's first use, hence a fresh process): the loss
    inside ``strategy.run`` equals the eager one, and one SGD step on the summed per-replica
    losses moves the gammas by the eager gradient."""
    script = ROOT / "tests" / "tf_mirrored.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["replicas"] == 2
    assert result["replica_losses"] == pytest.approx([result["eager_loss"]] * 2, rel=1e-6)
    np.testing.assert_allclose(result["moved"], result["expected"], rtol=1e-5, atol=1e-7)
