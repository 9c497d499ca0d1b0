"""Pruning keeps its promise on random graphs and real models.

For any mask, the pruned model is the original with the dead channels removed: every tensor equals
the zeroed original's on the kept channels (``verify``), the file passes ``onnx.checker`` with
strict shape inference, and its analyzed costs are exactly what ``Analysis.predict`` gave for the
mask.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from light_models import light_model_paths, materialize_weights
from onnx import TensorProto, helper, numpy_helper
from random_graphs import cnn_graphs

import morphonnx.prune as prune_mod
from morphonnx.analysis import Analysis, analyze
from morphonnx.costs import Totals, op_costs, totals
from morphonnx.errors import MorphonnxError
from morphonnx.groups import Group
from morphonnx.load import load_graph
from morphonnx.prune import check_pruned, prune_model, save_model, structure
from morphonnx.verify import random_feeds, run_all, verify, zeroed_original

Keep = dict[str, list[bool]]

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- helpers -----------------------------------------------------------------------------------


def random_keep(a: Analysis, rng: np.random.Generator, p: float = 0.5, least: int = 1) -> Keep:
    """Keep each channel of each prunable group with probability ``p``, and at least ``least``."""
    keep: Keep = {}
    for g in a.solution.groups:
        if not g.prunable:
            continue
        k = rng.random(g.channels) < p
        need = min(least, g.channels)
        if k.sum() < need:
            k[rng.choice(np.flatnonzero(~k), need - int(k.sum()), replace=False)] = True
        keep[g.id] = k.tolist()
    return keep


def draw_keep(data: st.DataObject, a: Analysis, least: int) -> Keep:
    """A hypothesis-drawn mask: some groups left out (kept whole), each listed one keeps
    ``least`` channels or more."""
    keep: Keep = {}
    for g in a.solution.groups:
        if not g.prunable or not data.draw(st.sampled_from([True, True, True, False])):
            continue
        k = data.draw(st.lists(st.booleans(), min_size=g.channels, max_size=g.channels))
        for i in data.draw(st.permutations(range(g.channels))):
            if sum(k) >= min(least, g.channels):
                break
            k[i] = True
        keep[g.id] = k
    return keep


def kept_count(a: Analysis, keep: Mapping[str, Sequence[bool]]) -> int:
    return sum(
        int(np.sum(keep[g.id])) if g.id in keep else g.channels
        for g in a.solution.groups
        if g.prunable
    )


def prunable_count(a: Analysis) -> int:
    return sum(g.channels for g in a.solution.groups if g.prunable)


def file_totals(path: Path) -> Totals:
    """Costs of a model file without solving its groups (so a solver bug cannot hide them)."""
    graph = load_graph(path)
    return totals(graph, op_costs(graph))


def ort_run(path: Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def prune_and_check(
    path: Path, keep: Keep, out: Path
) -> tuple[Analysis, onnx.ModelProto, Totals, Totals]:
    """The prune command's steps: prune, save, checker, verify against a fresh analysis of the
    original; returns the original analysis, the pruned proto, predicted and actual costs."""
    a = analyze(path)
    _, predicted = a.predict(keep)
    pruned = prune_model(a, keep)
    save_model(pruned, out, path)
    check_pruned(out, str(out))
    v = verify(analyze(path), keep, pruned)
    assert v.ok, v.failures[:5]
    assert v.tensors > 0
    return a, pruned, predicted, file_totals(out)


def same_costs(actual: Totals, predicted: Totals) -> None:
    assert (actual.macs, actual.flops, actual.params, actual.weight_bytes) == (
        predicted.macs,
        predicted.flops,
        predicted.params,
        predicted.weight_bytes,
    )


def member_key(g: Group) -> frozenset[tuple[str, int]]:
    return frozenset((m.tensor, m.axis) for m in g.members)


def slices_of(a: Analysis, g: Group, dead: np.ndarray | None = None) -> frozenset[object]:
    """Where a group lives: (tensor, axis, positions per channel) of each member, the positions
    renumbered as in the model pruned by ``dead`` (a producer may be shared by several groups
    when a Slice takes some of its channels)."""
    found = set()
    for m in g.members:
        pos = m.positions
        if dead is not None:
            kept = a.solution.kept(a.solution.channels.by_key[(m.tensor, m.axis)], dead)
            pos = [np.searchsorted(kept, p).tolist() for p in pos]
        found.add((m.tensor, m.axis, tuple(tuple(p) for p in pos)))
    return frozenset(found)


# --- random graphs -------------------------------------------------------------------------------


@PROPERTY
@given(model=cnn_graphs(), data=st.data())
def test_random_graph_prunes_exactly(model: onnx.ModelProto, data: st.DataObject) -> None:
    """Masks keeping >= 2 channels per group (where it has them), so no layer turns into another
    kind: a one-channel depthwise conv is a plain conv (input and output then are groups of their
    own), a grouped conv left with one input channel per group is depthwise (groups merge)."""
    note(model.doc_string)
    with tempfile.TemporaryDirectory(prefix="morphonnx-test-") as tmp:
        path, out = Path(tmp) / "model.onnx", Path(tmp) / "pruned.onnx"
        onnx.save(model, str(path))
        a0 = analyze(path)
        keep = draw_keep(data, a0, least=2)
        note(f"keep={keep}")
        layers = structure(a0, keep)
        a, _, predicted, _ = prune_and_check(path, keep, out)
        b = analyze(out)
        same_costs(b.totals, predicted)
        # the pruned model has exactly the kept channels to prune further, in the same groups
        assert prunable_count(b) == kept_count(a, keep)
        after = {slices_of(b, g): g for g in b.solution.groups}
        dead = a.solution.dead_labels(keep)
        for g in a.solution.groups:
            if g.prunable and all(keep.get(g.id, [True])):
                same = after.get(slices_of(a, g, dead))
                assert same is not None, f"{g.id} ({g.channels} kept channels) is gone"
                assert (same.channels, same.prunable) == (g.channels, True)
        # the structure report says what the pruned file holds
        for layer in layers["layers"]:
            y = b.graph.by_name[layer["node"]].outputs[0]
            shape = b.graph.shape(y)
            assert shape is not None
            assert shape[a0.solution.channels.axis_of.get(y, 1)] == layer["out_channels"][1]


@PROPERTY
@given(model=cnn_graphs(folded=True), data=st.data())
def test_random_graph_single_channel_keeps(model: onnx.ModelProto, data: st.DataObject) -> None:
    """Any mask (one channel per group is enough), weights also in Constant nodes and folded
    Unsqueeze / Reshape constants: still exact, costs as predicted, and the pruned model
    analyzes (one-channel tensors before heads used to crash the solver)."""
    note(model.doc_string)
    with tempfile.TemporaryDirectory(prefix="morphonnx-test-") as tmp:
        path, out = Path(tmp) / "model.onnx", Path(tmp) / "pruned.onnx"
        onnx.save(model, str(path))
        keep = draw_keep(data, analyze(path), least=1)
        note(f"keep={keep}")
        _, _, predicted, actual = prune_and_check(path, keep, out)
        same_costs(actual, predicted)
        same_costs(analyze(out).totals, predicted)  # the pruned model analyzes, too


@settings(PROPERTY, max_examples=15)
@given(model=cnn_graphs(), full=st.booleans())
def test_random_graph_all_keep_is_bitwise_identical(model: onnx.ModelProto, full: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="morphonnx-test-") as tmp:
        path, out = Path(tmp) / "model.onnx", Path(tmp) / "pruned.onnx"
        onnx.save(model, str(path))
        a = analyze(path)
        keep = {g.id: [True] * g.channels for g in a.solution.groups if g.prunable} if full else {}
        save_model(prune_model(a, keep), out, path)
        check_pruned(out, str(out))
        feeds = random_feeds(a, seed=3)
        for before, after in zip(ort_run(path, feeds), ort_run(out, feeds), strict=True):
            assert before.dtype == after.dtype and np.array_equal(before, after)
        same_costs(file_totals(out), a.totals)


# --- torch exports -------------------------------------------------------------------------------

try:  # torch is an optional extra: without it only these tests are skipped
    import torch
    from torch_models import ALL_MODELS, build_model, example_input

    from morphonnx.adapters.torch import export_onnx
except ImportError:  # pragma: no cover
    torch = None
    ALL_MODELS = {}
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

TORCH_MODELS = sorted(ALL_MODELS)


def export(name: str, folder: Path) -> Path:
    """The torch model ``name`` exported to ``folder``."""
    path = folder / f"{name}.onnx"
    export_onnx(build_model(name), example_input(name), path)
    return path


@needs_torch
@pytest.mark.parametrize("name", TORCH_MODELS)
def test_torch_model_half_mask(name: str, tmp_path: Path) -> None:
    path = export(name, tmp_path)
    a0 = analyze(path)
    assert any(g.prunable for g in a0.solution.groups)
    keep = random_keep(a0, np.random.default_rng(7))
    a, pruned, predicted, actual = prune_and_check(path, keep, tmp_path / "pruned.onnx")
    same_costs(actual, predicted)
    same_costs(analyze(tmp_path / "pruned.onnx").totals, predicted)
    assert a.totals.macs > predicted.macs

    # the pruned ONNX computes what the torch model computes with its dead slices zeroed
    model = build_model(name)
    state = model.state_dict()
    dead = a.solution.dead_labels(keep)
    for g in a.solution.groups:
        for m in g.members:
            idx = [p for k, pos in enumerate(m.positions) if dead[g.labels[k]] for p in pos]
            if idx:
                index: list[slice | list[int]] = [slice(None)] * state[m.tensor].ndim
                index[m.axis] = idx
                state[m.tensor][tuple(index)] = 0
    model.load_state_dict(state)
    x = example_input(name)
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = ort_run(tmp_path / "pruned.onnx", {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_torch
@pytest.mark.parametrize("name", TORCH_MODELS)
def test_torch_model_all_keep_is_bitwise_identical(name: str, tmp_path: Path) -> None:
    path = export(name, tmp_path)
    a = analyze(path)
    keep = {g.id: [True] * g.channels for g in a.solution.groups if g.prunable}
    out = tmp_path / "same.onnx"
    save_model(prune_model(a, keep), out, path)
    feeds = {"input": example_input(name).numpy()}
    for before, after in zip(ort_run(path, feeds), ort_run(out, feeds), strict=True):
        assert np.array_equal(before, after)


def wrong_slice(a: Analysis, keep: Keep, pruned: onnx.ModelProto) -> tuple[str, set[str]]:
    """Re-slice the producer of one pruned group with one kept index swapped for a dead one
    (the bug a wrong positions table would make); returns the tensor and the group's
    activations."""
    dead = a.solution.dead_labels(keep)
    for g in a.solution.groups:
        k = np.asarray(keep.get(g.id, [True] * g.channels))
        if not g.prunable or k.sum() < 2 or k.all():
            continue
        producer = next((m for m in g.members if m.role == "producer"), None)
        if producer is None:
            continue
        value = a.graph.value(producer.tensor)
        for slot in a.solution.channels.slots:  # cut the other axes right (a conv's inputs)
            if slot.tensor == producer.tensor and slot.axis != producer.axis:
                value = np.delete(
                    value, np.flatnonzero(dead[a.solution.slot_labels(slot)]), slot.axis
                )
        slot = a.solution.channels.by_key[(producer.tensor, producer.axis)]
        kept = list(a.solution.kept(slot, dead))
        lost = sorted(set(range(value.shape[producer.axis])) - set(kept))
        wrong = sorted([lost[0], *kept[1:]])  # the first kept channel swapped for a dead one
        init = next(t for t in pruned.graph.initializer if t.name == producer.tensor)
        init.CopyFrom(numpy_helper.from_array(np.take(value, wrong, axis=producer.axis), init.name))
        return producer.tensor, {m.tensor for m in g.activations}
    raise AssertionError("no group to corrupt")


@needs_torch
@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet_v2", "tiny_densenet"])
def test_wrong_slice_is_caught_at_an_intermediate_tensor(name: str, tmp_path: Path) -> None:
    path = export(name, tmp_path)
    a = analyze(path)
    keep = random_keep(a, np.random.default_rng(1))
    pruned = prune_model(a, keep)
    original = analyze(path)
    assert verify(original, keep, pruned).ok
    tensor, activations = wrong_slice(original, keep, pruned)
    v = verify(analyze(path), keep, pruned)
    assert not v.ok, f"corrupting {tensor} went unnoticed"
    outputs = {o.name for o in pruned.graph.output}
    named = [f.split("`")[1] for f in v.failures]
    assert set(named) - outputs, v.failures  # an intermediate tensor is named
    assert set(named) & activations, (v.failures, activations)  # at the group that was cut wrong


def _swap_model(path: Path) -> None:
    """conv A (6 filters) -> Relu -> conv B whose input columns 2 and 3 are equal -> Relu ->
    conv C -> output. Swapping filters 2 and 3 of A changes A's output a lot and B's not at all."""
    rng = np.random.default_rng(5)
    wa = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    wb = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    wb[:, 3] = wb[:, 2]
    wc = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "wb"], ["b"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("Conv", ["br", "wc"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in {"wa": wa, "wb": wb, "wc": wc}.items()]
    graph = helper.make_graph(
        nodes,
        "swap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))


def test_outputs_barely_move_but_intermediates_do(tmp_path: Path) -> None:
    """Why verification is layer by layer: a wrongly sliced group can leave the outputs as they
    were while the tensor it produces is off by its own magnitude."""
    path = tmp_path / "swap.onnx"
    _swap_model(path)
    a = analyze(path)
    (g,) = [g for g in a.solution.groups if g.prunable and g.channels == 6]
    keep = {g.id: [False, True, True, True, True, True]}
    pruned = prune_model(a, keep)
    wa = next(t for t in pruned.graph.initializer if t.name == "wa")
    value = numpy_helper.to_array(wa)[[0, 2, 1, 3, 4]]  # kept channels 2 and 3 swapped
    wa.CopyFrom(numpy_helper.from_array(value, "wa"))

    original = analyze(path)
    feeds = random_feeds(original)
    ref = run_all(zeroed_original(original, keep), feeds, tmp_path, "ref")
    got = run_all(pruned, feeds, tmp_path, "got")
    y_err = np.abs(ref["y"] - got["y"]).max() / np.abs(ref["y"]).max()
    a_kept = ref["a"][:, 1:]
    a_err = np.abs(a_kept - got["a"]).max() / np.abs(a_kept).max()
    assert y_err < 1e-5 < 0.1 < a_err

    v = verify(original, keep, pruned)
    assert not v.ok
    named = {f.split("`")[1] for f in v.failures}
    assert {"a", "ar"} <= named and "y" not in named


# --- the nine onnx-zoo light models ---------------------------------------------------------------

LIGHT = sorted(light_model_paths())


def light(name: str, folder: Path) -> Path:
    """The zoo model ``name`` with distinct random weights, saved in ``folder``."""
    path = folder / f"{name}.onnx"
    onnx.save(materialize_weights(onnx.load(str(light_model_paths()[name])), seed=0), str(path))
    return path


SLOW_LIGHT = {"vgg19"}  # ~40 s: a 550 MB model verified tensor by tensor


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_LIGHT else n for n in LIGHT]
)
def test_light_model_random_mask(name: str, tmp_path: Path) -> None:
    path = light(name, tmp_path)
    a0 = analyze(path)
    assert any(g.prunable for g in a0.solution.groups)
    keep = random_keep(a0, np.random.default_rng(11))
    del a0
    # densenet121 and inception_v1 slice folded constants (Unsqueeze, Transpose of weights)
    _, _, predicted, actual = prune_and_check(path, keep, tmp_path / "pruned.onnx")
    same_costs(actual, predicted)


# --- external data --------------------------------------------------------------------------------


def _external_copy(src: Path, folder: Path) -> Path:
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(
        onnx.load(str(src)),
        str(path),
        save_as_external_data=True,
        location="w.data",
        size_threshold=0,
    )
    return path


def test_external_data_model_prunes(tmp_path: Path) -> None:
    """Weights in a data file beside the input: prune, verify before and after saving (the saved
    proto stays whole), save to another folder twice, load in onnxruntime."""
    path = _external_copy(light("squeezenet", tmp_path), tmp_path / "in")
    a = analyze(path)
    first = next(g for g in a.solution.groups if g.prunable and g.channels > 1)
    keep = {first.id: [k % 2 == 0 for k in range(first.channels)]}  # others stay in w.data
    pruned = prune_model(a, keep)
    assert any(t.data_location == TensorProto.EXTERNAL for t in pruned.graph.initializer)
    assert verify(analyze(path), keep, pruned).ok  # not saved yet: reads the input's w.data

    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "pruned.onnx"
    save_model(pruned, out, path)
    assert (tmp_path / "out" / "pruned.onnx.data").is_file()
    check_pruned(out, str(out))
    assert verify(analyze(path), keep, pruned).ok  # and still whole after the save
    again = tmp_path / "again.onnx"
    save_model(pruned, again, path)

    feeds = random_feeds(a)
    np.testing.assert_array_equal(ort_run(out, feeds)[0], ort_run(again, feeds)[0])
    _, predicted = analyze(path).predict(keep)
    same_costs(analyze(out).totals, predicted)


def test_big_model_goes_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the threshold (protobuf's 2 GB in real life) the output gets a .data file."""
    monkeypatch.setattr(prune_mod, "EXTERNAL_DATA_THRESHOLD", 1000)
    path = light("squeezenet", tmp_path)
    a = analyze(path)
    keep = random_keep(a, np.random.default_rng(2))
    pruned = prune_model(a, keep)
    out = tmp_path / "big.onnx"
    save_model(pruned, out, path)
    assert (tmp_path / "big.onnx.data").stat().st_size > 1000
    assert not any(t.data_location == TensorProto.EXTERNAL for t in pruned.graph.initializer)
    check_pruned(out, str(out))
    plain = tmp_path / "plain.onnx"
    monkeypatch.setattr(prune_mod, "EXTERNAL_DATA_THRESHOLD", 10**12)
    save_model(pruned, plain, path)
    assert not (tmp_path / "plain.onnx.data").exists()
    feeds = random_feeds(a)
    np.testing.assert_array_equal(ort_run(out, feeds)[0], ort_run(plain, feeds)[0])
    assert verify(analyze(path), keep, pruned).ok


def test_save_refuses_the_input(tmp_path: Path) -> None:
    path = light("squeezenet", tmp_path)
    a = analyze(path)
    with pytest.raises(MorphonnxError, match="overwrite the input"):
        save_model(prune_model(a, {}), path, path)


# --- regressions: bugs outside prune / verify this suite found (fixed in rules, analysis, costs) -


def _model(
    path: Path,
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    out: list[int],
) -> Path:
    graph = helper.make_graph(
        nodes,
        "repro",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
        str(path),
    )
    return path


def _w(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def test_one_channel_plus_trailing_constant_analyzes(tmp_path: Path) -> None:
    """Conv(3->1) + Add(const of shape (8,), broadcast along W) made the elementwise rule tie the
    constant's axis 0 (size 8) to the one channel: AssertionError in analyze. The same crash hit
    ``analyze`` of a pruned model whose last group kept one channel before a MatMul + Add head
    (which the prune command runs after writing)."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["c", "pos"], ["y"]),
    ]
    path = _model(tmp_path / "m.onnx", nodes, {"w": _w(1, 3, 1, 1), "pos": _w(8)}, [1, 1, 8, 8])
    a = analyze(path)
    assert "pos" not in {m.tensor for g in a.solution.groups for m in g.members}


def test_one_channel_flatten_keeps_channel_axis(tmp_path: Path) -> None:
    """reshape_map put the one channel of Flatten (1,1,8,8) -> (1,64) on axis 0 (the
    batch): a group pruned to one channel before a Flatten -> Gemm head then was unprunable in
    the pruned model ("Gemm ... expects channels of `f` on axis 1, they are on axis 0")."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    path = _model(tmp_path / "m.onnx", nodes, {"w": _w(1, 3, 1, 1), "fc": _w(5, 64)}, [1, 5])
    a = analyze(path)
    assert a.solution.channels.axis_of["f"] == 1
    g = next(g for g in a.solution.groups if ("w", 0) in member_key(g))
    assert ("fc", 1) in member_key(g) and g.prunable, g.reason


def test_predicted_params_with_folded_constant(tmp_path: Path) -> None:
    """Analysis.predict counted the 1-D source of a folded per-channel constant (Unsqueeze(s))
    at full size, while prune writes the folded tensor as a sliced initializer: 20 predicted
    params for 18 in the file."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Unsqueeze", ["s", "axes"], ["s3"]),
        helper.make_node("Mul", ["c", "s3"], ["m"]),
        helper.make_node("Conv", ["m", "w2"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = {
        "w": _w(4, 3, 1, 1),
        "s": _w(4),
        "axes": np.array([1, 2], dtype=np.int64),
        "w2": _w(5, 4, 1, 1),
    }
    path = _model(tmp_path / "m.onnx", nodes, inits, [1, 5, 8, 8])
    (g,) = [g for g in analyze(path).solution.groups if g.prunable]
    assert ("s3", 0) in member_key(g)
    _, _, predicted, actual = prune_and_check(
        path, {g.id: [True, False, True, False]}, tmp_path / "p.onnx"
    )
    same_costs(actual, predicted)
    assert actual.params == 3 * 2 + 2 + 5 * 2


def test_folded_view_of_a_shared_weight_keeps_its_values(tmp_path: Path) -> None:
    """torch exports without constant folding de-duplicate equal batch-norm parameters: one BN
    reads the initializer, another reads ``Identity`` of it. Pruning the first BN's channels must
    not shrink what the second one reads (found by ``sweep`` on ResNet-50)."""
    rng = np.random.default_rng(0)

    def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(arr.astype(np.float32), name)

    stats = [init(n, v) for n, v in (("s", rng.uniform(0.5, 1.5, 8)), ("b", np.zeros(8)))]
    stats += [init("m", np.zeros(8)), init("v", np.ones(8))]
    inits = stats + [
        init("wa", rng.normal(0, 0.3, (8, 3, 3, 3))),
        init("wb", rng.normal(0, 0.3, (8, 8, 3, 3))),
        init("wc", rng.normal(0, 0.3, (4, 8, 1, 1))),
    ]
    nodes = [helper.make_node("Identity", [n], [f"{n}_b"]) for n in "sbmv"]
    nodes += [
        helper.make_node("Conv", ["x", "wa"], ["ya"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["ya", "s", "b", "m", "v"], ["za"]),
        helper.make_node("Relu", ["za"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb"], ["yb"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["yb", "s_b", "b_b", "m_b", "v_b"], ["zb"]),
        helper.make_node("Relu", ["zb"], ["rb"]),
        helper.make_node("Conv", ["rb", "wc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    path = tmp_path / "shared_bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    a = analyze(path)
    first = next(g for g in a.solution.groups if any(m.tensor == "wa" for m in g.members))
    assert first.prunable
    keep = {first.id: [True, False] * 4}  # the second BN's group stays whole
    _, _, predicted, actual = prune_and_check(path, keep, tmp_path / "pruned.onnx")
    same_costs(actual, predicted)
    out = onnx.load(str(tmp_path / "pruned.onnx"))
    shapes = {t.name: list(t.dims) for t in out.graph.initializer}
    assert shapes["s"] == [4] and shapes["s_b"] == [8]


def test_cumsum_along_space_prunes_and_verifies(tmp_path: Path) -> None:
    """CumSum over H between two convs: the channels of ``w`` pass through it, a half mask
    prunes and the pruned model matches the zeroed original tensor by tensor in onnxruntime."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("CumSum", ["c", "axis"], ["s"], reverse=1),
        helper.make_node("Conv", ["s", "w2"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = {"w": _w(4, 3, 1, 1), "axis": np.array(2, dtype=np.int64), "w2": _w(5, 4, 1, 1)}
    path = _model(tmp_path / "m.onnx", nodes, inits, [1, 5, 8, 8])
    (g,) = [g for g in analyze(path).solution.groups if g.prunable]
    assert member_key(g) == {("w", 0), ("w2", 1)}
    _, pruned, predicted, actual = prune_and_check(
        path, {g.id: [False, True, True, False]}, tmp_path / "p.onnx"
    )
    same_costs(actual, predicted)
    assert [n.op_type for n in pruned.graph.node] == ["Conv", "CumSum", "Conv"]
    assert actual.macs == 64 * (2 * 3 + 5 * 2)
