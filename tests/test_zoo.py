"""Robustness sweep over well-known architectures (``zoo_models``), exported from PyTorch.

Every model is exported as ``export_onnx`` writes it (BN kept, state_dict names); some also with
the exporter's constant folding (BN folded into the convs, ``onnx::Conv_N`` names), simplified
(shape computations folded into constants, as onnxsim leaves them), at opset 13, with a dynamic
batch, or by torch's default exporter (``dynamo=True``, also with a dynamic batch). For each:

- ``analyze`` succeeds and its MACs equal an independent forward-hook count in torch (plus the
  attention MatMuls between activations, counted by hand);
- the groups the architecture obviously allows are found prunable (a lower bound per model, with
  the reason in :data:`MIN_PRUNABLE`), and every unprunable group says why;
- a random mask keeping about half of every prunable group (at least 2 channels) prunes to a
  model that passes ``onnx.checker``, equals the zeroed original tensor by tensor (``verify``),
  and costs exactly what ``Analysis.predict`` said;
- for a few conv models the pruned ONNX also equals the torch model with its dead slices zeroed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from onnx_builders import Builder  # noqa: E402
from torch_models import torch_macs_params  # noqa: E402
from zoo_models import ZOO, ZOO_INPUTS, example, extra_matmul_macs, fold_shape_computations  # noqa: E402

from morphonnx.adapters.torch import export_onnx  # noqa: E402
from morphonnx.analysis import Analysis, analyze  # noqa: E402
from morphonnx.prune import check_pruned, prune_model, save_model  # noqa: E402
from morphonnx.verify import verify  # noqa: E402

FOLDED = ("efficientnet_b0", "mobilenet_v3", "resnext", "unet", "yolov8_split", "deeplab_aspp")
"""Also exported with ``do_constant_folding=True`` (BN folded into the conv weights)."""

SIMPLIFIED = ("shufflenet_v2", "yolov8", "yolov8_cls", "vit", "unet_pad", "deeplab_aspp")
"""Also with every shape computation folded into constants, as onnxsim / onnxslim leave them
(Ultralytics exports are simplified by default)."""

OPSET13 = ("shufflenet_v2", "vit", "norm_zoo", "mobilenet_v3")
"""Also at opset 13 (no LayerNormalization; shape computations exported another way)."""

DYNAMIC = ("efficientnet_b0", "vit", "yolov8_split", "yolov8_cls", "deeplab_aspp")
"""Also with a dynamic batch dim (analyzed at batch 1)."""

DYNAMO = ("shufflenet_v2", "efficientnet_b0", "yolov8", "vit", "nhwc", "densenet_bc", "unet_pad")
"""Also exported by torch's default exporter (``dynamo=True``, onnxscript): ops as the
torch.export decompositions write them, names from the FX graph (``conv2d_3``), BN kept."""

DYNAMO_DYNAMIC = ("efficientnet_b0", "yolov8_split", "vit")
"""Also by the default exporter with a dynamic batch (``dynamic_shapes``)."""

CASES = (
    [(name, "") for name in ZOO]
    + [(name, "folded") for name in FOLDED]
    + [(name, "simplified") for name in SIMPLIFIED]
    + [(name, "opset13") for name in OPSET13]
    + [(name, "dynamic") for name in DYNAMIC]
    + [(name, "dynamo") for name in DYNAMO]
    + [(name, "dynamo_dynamic") for name in DYNAMO_DYNAMIC]
)


def cases(test: str) -> list[object]:
    return [
        pytest.param(name, variant, id=f"{name}-{variant}" if variant else name)
        for name, variant in CASES
    ]


MIN_PRUNABLE: dict[str, int] = {
    # the stem (-> max pool -> the first unit's two branches), each unit's branch2 middle
    # (1x1 -> depthwise -> 1x1, 4 units) and conv5 (-> pool -> fc); the concatenated unit
    # outputs tie position by position across the channel shuffle (4 more groups)
    "shufflenet_v2": 10,
    # the stem (the first MBConv does not expand: its depthwise and SE scale are the stem's),
    # per MBConv the expanded width (5) and the SE squeeze (6), the residual width of each of
    # the 4 stages and the head conv
    "efficientnet_b0": 17,
    # the stem (block 0 is depthwise on it), per block the expanded width (4) and the SE squeeze
    # (3), the stage widths (3: 8, 12, 20), the last conv and fc1's hidden width
    "mobilenet_v3": 13,
    # per bottleneck the reduce width and the grouped conv's output (position p of every group
    # tied, 3 blocks x 2), the stem and the two residual widths
    "resnext": 9,
    # the MLP hidden width and the head dim (q, k, v tied by the one 5-D qkv reshape, uniform
    # across heads) of each of the 2 blocks; the embedding width meets LayerNorm
    "vit": 4,
    # every YConv whose output stays inside: backbone downsampling (5), both halves of every C2f
    # cv1 (8 x 2), bottleneck cv1 (9), neck bottleneck cv2 without shortcut (4; with one it is
    # the half it adds to), C2f cv2 (8), SPPF (2), neck downsampling (2), head hidden (12)
    "yolov8": 58,
    "yolov8_split": 58,
    # the same without neck and detect head: downsampling (3), both halves of the two C2f cv1
    # (2 x 2, read through torch `chunk`'s run-time bounds), bottleneck cv1 (3), C2f cv2 (2),
    # the Classify head's conv
    "yolov8_cls": 13,
    # every conv but the last (14 double-conv halves, 3 ConvTranspose outputs)
    "unet": 17,
    "unet_pad": 17,
    # backbone (4), ASPP branches (5: 1x1, three dilated, image pooling), projection, head conv
    "deeplab_aspp": 11,
    # stem, per dense layer the bottleneck (4k) and the growth (k) channels (6 + 6), transition
    "densenet_bc": 14,
    # stem, the 2 stage widths, per block (4) the a-conv width, the grouped b-conv width (tied
    # with SE fc2) and the SE squeeze
    "regnet_y": 15,
    # c1 (PReLU per channel), c2 (InstanceNorm affine), c3 (whole GroupNorm groups), c4
    # (InstanceNorm, shared PReLU), c5 (PReLU per channel)
    "norm_zoo": 5,
    # stem (NCHW -> NHWC Linear consumer), NHWC MLP hidden, MLP output (back to NCHW, tied with
    # the SwiGLU residual), SwiGLU hidden (both `chunk` halves tied by the gate), ConvNeXt MLP
    # hidden; the ConvNeXt width meets LayerNorm
    "nhwc": 5,
}

TORCH_CHECKED = ("efficientnet_b0", "unet_pad", "deeplab_aspp", "regnet_y", "yolov8_cls")
"""Conv models whose every member is a state_dict tensor: the pruned ONNX is compared to torch."""


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


_EXPORTED: dict[tuple[str, str], Path] = {}


def exported(name: str, variant: str, folder: Path) -> Path:
    """The model exported once per session: as ``export_onnx`` writes it (BN kept), ``folded``
    by the exporter's constant folding, ``simplified`` (shape computations folded), at opset 13,
    with a ``dynamic`` batch dim, or by torch's default ``dynamo`` exporter."""
    key = (name, variant)
    if key not in _EXPORTED:
        path = folder / f"{name}-{variant or 'export'}.onnx"
        model, x = ZOO[name](), example(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if variant == "folded":
                torch.onnx.export(
                    model, (x,), str(path), dynamo=False, do_constant_folding=True, opset_version=17
                )
            elif variant.startswith("dynamo"):
                pytest.importorskip("onnxscript")
                batch = ({0: torch.export.Dim("batch")},) if variant == "dynamo_dynamic" else None
                torch.onnx.export(
                    model, (x,), str(path), dynamo=True, verbose=False, dynamic_shapes=batch
                )
            elif variant == "simplified":
                fold_shape_computations(exported(name, "", folder), path)
            else:
                opset = 13 if variant == "opset13" else 17
                export_onnx(model, x, path, opset=opset, dynamic_batch=variant == "dynamic")
        _EXPORTED[key] = path
    return _EXPORTED[key]


def half_keep(a: Analysis, seed: int = 0) -> dict[str, list[bool]]:
    """Each channel of each prunable group kept with probability 1/2, at least 2 per group (1 in
    a one-channel group): no layer turns into another kind (depthwise <-> grouped <-> plain)."""
    rng = np.random.default_rng(seed)
    keep: dict[str, list[bool]] = {}
    for g in a.solution.groups:
        if not g.prunable:
            continue
        k = rng.random(g.channels) < 0.5
        need = min(2, g.channels)
        if k.sum() < need:
            k[rng.choice(np.flatnonzero(~k), need - int(k.sum()), replace=False)] = True
        keep[g.id] = k.tolist()
    return keep


@pytest.mark.parametrize(("name", "variant"), cases("macs"))
def test_macs_match_torch(name: str, variant: str, zoo_dir: Path) -> None:
    a = analyze(exported(name, variant, zoo_dir))
    model, x = ZOO[name](), example(name)
    macs, _ = torch_macs_params(model, x)
    assert a.totals.macs == macs + extra_matmul_macs(model, x)
    assert a.totals.flops == 2 * a.totals.macs


@pytest.mark.parametrize(("name", "variant"), cases("groups"))
def test_groups(name: str, variant: str, zoo_dir: Path) -> None:
    a = analyze(exported(name, variant, zoo_dir))
    groups = a.solution.groups
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) >= MIN_PRUNABLE[name], [(g.id, g.channels, g.reason) for g in groups]
    for g in groups:
        assert g.prunable or g.reason, g.id
        assert g.prunable == (g.reason is None)
    # the graph's input and output channels are never prunable
    for t in a.graph.inputs + a.graph.outputs:
        axis = a.solution.channels.axis_of.get(t)
        if axis is not None:
            slot = a.solution.channels.by_key[(t, axis)]
            labels = set(a.solution.slot_labels(slot).tolist())
            assert not any(g.prunable and labels & set(g.labels.tolist()) for g in groups)


@pytest.mark.parametrize(("name", "variant"), cases("prune"))
def test_half_mask_prunes_exactly(name: str, variant: str, zoo_dir: Path) -> None:
    path = exported(name, variant, zoo_dir)
    out = zoo_dir / f"{path.stem}-pruned.onnx"
    a = analyze(path)
    keep = half_keep(a)
    _, predicted = a.predict(keep)
    pruned = prune_model(a, keep)
    save_model(pruned, out, path)
    check_pruned(out, str(out))
    v = verify(a, keep, pruned)
    assert v.ok, v.failures[:5]
    assert v.tensors > 0
    b = analyze(out)
    assert (b.totals.macs, b.totals.params) == (predicted.macs, predicted.params)
    assert b.totals.macs < a.totals.macs or not keep
    # the pruned model has exactly the kept channels left to prune
    kept = sum(sum(k) for k in keep.values())
    assert sum(g.channels for g in b.solution.groups if g.prunable) == kept
    if variant in ("dynamic", "dynamo_dynamic"):  # nothing in the pruned file froze the batch
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((3, *ZOO_INPUTS[name])).astype(np.float32)
        feed = sess.get_inputs()[0].name
        (three,), (one,) = (sess.run(None, {feed: v})[:1] for v in (x, x[:1]))
        np.testing.assert_allclose(three[:1], one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TORCH_CHECKED)
def test_pruned_equals_zeroed_torch(name: str, zoo_dir: Path) -> None:
    path = exported(name, "", zoo_dir)
    out = zoo_dir / f"{name}-torch-pruned.onnx"
    a = analyze(path)
    keep = half_keep(a, seed=1)
    dead = a.solution.dead_labels(keep)
    model, x = ZOO[name](), example(name)
    state = model.state_dict()
    for g in a.solution.groups:
        for m in g.members:
            idx = [p for k, pos in enumerate(m.positions) if dead[g.labels[k]] for p in pos]
            if idx:
                assert m.tensor in state, m.tensor
                index: list[slice | list[int]] = [slice(None)] * state[m.tensor].ndim
                index[m.axis] = idx
                state[m.tensor][tuple(index)] = 0
    save_model(prune_model(a, keep), out, path)
    with torch.no_grad():
        expected = model(x).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


SLICES = (
    "efficientnet_b0",
    "mobilenet_v3",
    "resnext",
    "unet",
    "unet_pad",
    "deeplab_aspp",
    "densenet_bc",
    "regnet_y",
    "nhwc",
)
"""Zoo models whose torch code takes any width: the torch adapter's ``slice_model`` must slice
them. The others keep counts of their own (ShuffleNet's and YOLOv8's ``chunk`` into equal halves,
stored split sizes, ViT's head count) or own per-channel constants no module covers."""


@pytest.mark.parametrize("name", sorted(ZOO))
def test_torch_slice_model_works_or_says_why(name: str, tmp_path: Path) -> None:
    """Random masks through the torch adapter: a sliced model equals the zeroed one; a refusal by
    ``slice_model``'s own check is true (the unchecked sliced model fails or differs)."""
    from morphonnx.adapters.torch import Regularizer, export_spec

    model, x = ZOO[name](), example(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = export_spec(model, x, tmp_path / "spec.json")
    reg = Regularizer(model, spec, kind="group_lasso")
    g = torch.Generator().manual_seed(0)
    keep = {}
    for group in reg.groups:
        alive = (torch.rand(group["channels"], generator=g) > 0.4).tolist()
        keep[group["id"]] = [True, *alive[1:]]
    try:
        small = reg.slice_model(keep)
    except ValueError as e:
        assert name not in SLICES, e
        if "not parameters of the model" in str(e):
            return  # PReLU's or a norm's constant computed in forward: refused before slicing
        assert "zeroed one" in str(e), e
        unchecked = reg.slice_model(keep, check=False)
        reg.zero_dead_(keep)
        with torch.no_grad():
            want = model(x)
            try:
                got = unchecked.eval()(x)
            except RuntimeError:
                return  # it fails where the zeroed model runs: as the check said
        assert not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        return
    reg.zero_dead_(keep)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        want, got = model(x), small.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize(
    ("dim", "op", "k", "prunable"),
    [(1, "Div", 2, True), (0, "Mul", 4, False), (2, "Mul", 1, False)],
    ids=["channels", "batch", "height"],
)
def test_slice_bounds_from_shapes(
    dim: int, op: str, k: int, prunable: bool, tmp_path: Path
) -> None:
    """A Slice of 4 of 8 channels up to ``Shape(y)[dim] op k``, as torch ``chunk`` writes it:
    read from the channel count the bound is fixed, the channels are prunable and the pruned
    file has the bound as a constant (the batch stays free); read from the batch or a spatial
    dim it would change at run time, so the channels stop."""
    b = Builder()
    x = b.input("x", ["N", 3, 4, 4])
    y = b.conv(x, 3, 8, 1, prefix="c1")
    size = b.node("Gather", [b.node("Shape", [y]), b.ints("dim", [dim])])
    end = b.node(op, [size, b.ints("k", [k])])
    z = b.node("Slice", [y, b.ints("starts", [0]), end, b.ints("axes", [1])])
    b.output(b.conv(z, 4, 5, 1, prefix="c2"))
    path = b.save(tmp_path)
    a = analyze(path)
    head = next(
        g for g in a.solution.groups if any(m.tensor == "c2.weight" and m.axis for m in g.members)
    )
    assert head.channels == 4 and head.prunable == prunable, head.reason
    if not prunable:
        assert "bounds computed at run time" in (head.reason or "")
        return
    keep = half_keep(a, seed=3)
    out = tmp_path / "pruned.onnx"
    pruned = prune_model(a, keep)
    save_model(pruned, out, path)
    check_pruned(out, str(out))
    v = verify(analyze(path), keep, pruned)
    assert v.ok, v.failures
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 3, 4, 4)).astype(np.float32)}
    assert sess.run(None, feeds)[0].shape == (3, 5, 4, 4)  # the batch is still free
    (node,) = [n for n in pruned.graph.node if n.op_type == "Slice"]
    assert node.input[2] in {t.name for t in pruned.graph.initializer}
