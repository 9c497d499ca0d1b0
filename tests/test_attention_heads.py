"""Whole attention heads (``attention="heads"``): a head's q, k and v dims and the output
projection's rows live or die together, found automatically in attention built in several
variants (separate q/k/v, fused qkv cut by Split or Slice, fused qkv reshaped 5-D; static and
dynamic batch; opsets 13 to 18; q through qk-norm and rotary embeddings). Each is pruned with
random masks of heads and verified tensor by tensor in onnxruntime; the pruned model's reshape
targets hold the kept head count and its MACs equal a hand count. The grouping is an option
that specs and masks record, so mask and prune use the spec's, and one made under the other
grouping is refused. Torch exports: ``test_attention_heads_torch.py``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_runner import run
from group_patterns import attention, prune_verified
from onnx import numpy_helper
from onnx_builders import group_of, member

from morphonnx.analysis import Analysis, analyze
from morphonnx.api import make_mask, make_spec, prune_file
from morphonnx.binding import Binding, Param, check_options
from morphonnx.errors import MorphonnxError
from morphonnx.formats import mask_document, write_json
from morphonnx.mask import load_mask
from morphonnx.spec import read_spec

VARIANTS = [(13, False), (17, True), (18, False)]
E, N = 6, 5  # residual width and sequence length of ``group_patterns.attention``
Mask = Callable[[Analysis, int], dict[str, list[bool]]]


def dropping(tensor: str, axis: int) -> Mask:
    """Masks that keep every group whole but the one with ``tensor`` on ``axis``, of which a
    random nonempty proper subset of channels (heads) dies."""

    def mask(a: Analysis, seed: int) -> dict[str, list[bool]]:
        g = group_of(a.solution, tensor, axis)
        rng = np.random.default_rng(seed)
        dead = rng.choice(g.channels, size=rng.integers(1, g.channels), replace=False)
        return {g.id: [k not in dead for k in range(g.channels)]}

    return mask


def head_blocks(heads: int, dim: int, offset: int = 0) -> list[list[int]]:
    return [[offset + h * dim + d for d in range(dim)] for h in range(heads)]


def targets(model: onnx.ModelProto) -> list[list[int]]:
    """The constant targets of the model's Reshapes, in node order."""
    values = {t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    return [values[n.input[1]] for n in model.graph.node if n.op_type == "Reshape"]


def attention_macs(heads: int, dim: int, e: int = E, n: int = N, batch: int = 1) -> int:
    """qkv projections, q·kᵀ and ·v, output projection."""
    hd = heads * dim
    return batch * (n * e * 3 * hd + 2 * n * n * hd + n * hd * e)


def saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("opset", "dynamic"), VARIANTS)
@pytest.mark.parametrize("form", ["separate", "split", "slice", "fused5d"])
def test_whole_heads(opset: int, dynamic: bool, form: str, tmp_path: Path) -> None:
    """One group of H channels: head h is columns h·D .. h·D+D-1 of each of q, k, v (in each
    third of a fused qkv) and the same rows of the output projection. Pruned with random sets
    of heads: the split targets hold the kept count H', the merge H'·D, MACs the hand count."""
    heads, dim = 3, 4
    path = attention(opset, dynamic, form, heads, dim).save(tmp_path)
    sol = analyze(path, attention="heads").solution
    g = group_of(sol, "proj.weight", 0)
    assert [p.id for p in sol.groups if p.prunable] == [g.id]
    assert g.channels == heads
    assert member(g, "proj.weight", 0).positions == head_blocks(heads, dim)
    if form == "separate":
        for name in ("q", "k", "v"):
            assert member(g, f"{name}.weight", 1).positions == head_blocks(heads, dim)
            assert member(g, f"{name}.bias", 0).positions == head_blocks(heads, dim)
    else:
        hd = heads * dim
        want = [sum((head_blocks(heads, dim, p * hd)[h] for p in range(3)), []) for h in range(3)]
        assert [sorted(p) for p in member(g, "qkv.weight", 1).positions] == want
        assert [sorted(p) for p in member(g, "qkv.bias", 0).positions] == want
    masks = dropping("proj.weight", 0)
    pruned = prune_verified(path, seeds=(0, 1, 2), attention="heads", masks=masks)
    a = analyze(path, attention="heads")
    for seed, model in enumerate(pruned):
        kept = sum(masks(a, seed)[g.id])
        assert 0 < kept < heads
        split = [[0, N, 3, kept, dim]] if form == "fused5d" else [[0, -1, kept, dim]] * 3
        assert targets(model) == [*split, [0, N, kept * dim]]
        b = analyze(saved(model, tmp_path / f"pruned{seed}.onnx"))
        assert b.totals.macs == attention_macs(kept, dim)


@pytest.mark.parametrize(
    ("norm", "opset"), [("LayerNormalization", 17), ("RMSNormalization", 23)], ids=["ln", "rms"]
)
@pytest.mark.parametrize("form", ["separate", "fused5d"])
def test_whole_heads_through_qk_norm_and_rotary(
    form: str, norm: str, opset: int, tmp_path: Path
) -> None:
    """q through a norm over the head dim (``norm``), rotary embeddings (slices of the head dim,
    Neg, Concat) and a scale multiplied from the left still reaches q·kᵀ with its heads on the
    batch axis: whole heads, pruned and verified; per head dim, the norm stops q's dims."""
    path = attention(opset, True, form, 3, 4, extras=True).save(tmp_path)
    assert norm in {n.op_type for n in onnx.load(str(path)).graph.node}
    dims = analyze(path).solution
    assert any(f"{norm} at node" in (g.reason or "") for g in dims.groups)
    g = group_of(analyze(path, attention="heads").solution, "proj.weight", 0)
    assert g.prunable and g.channels == 3
    assert member(g, "proj.weight", 0).positions == head_blocks(3, 4)
    prune_verified(path, seeds=(0, 1), attention="heads", masks=dropping("proj.weight", 0))


def test_heads_and_dims_are_separate_analyses(tmp_path: Path) -> None:
    """The default stays per head dim (q·k dims and v dims, D channels each); heads gives one
    group of H. The two groupings never share a group id's meaning silently: see the spec and
    mask tests below."""
    path = attention(17, False, "separate", 3, 4).save(tmp_path)
    dims = analyze(path).solution
    assert [g.channels for g in dims.groups if g.prunable] == [4, 4]
    heads = analyze(path, attention="heads").solution
    assert [g.channels for g in heads.groups if g.prunable] == [3]


def test_softmax_over_heads_stops(tmp_path: Path) -> None:
    """Scores normalized over the head axis mix the heads: a stop with the reason."""
    b = attention(17, False, "separate", 3, 4)
    for n in b.nodes:
        if n.op_type == "Softmax":
            n.attribute[0].i = 1
            n.name = "sm"
    path = b.save(tmp_path)
    g = group_of(analyze(path, attention="heads").solution, "proj.weight", 0)
    assert not g.prunable and "Softmax at node `sm` normalizes over the channel axis" in (
        g.reason or ""
    )


def test_an_axis_that_picks_q_k_v_is_not_heads(tmp_path: Path) -> None:
    """A reshape ``[B, N, 3, E]`` whose 3 is gathered (torch's ``unflatten`` before the heads
    are split) ties q, k and v channel p together (per position) and leaves heads to the later
    split: the fused form's positions stay those of the 5-D reshape."""
    b = attention(17, False, "fused5d", 3, 4)
    path = b.save(tmp_path)
    g = group_of(analyze(path, attention="heads").solution, "qkv.weight", 1)
    assert g.channels == 3  # the head axis of [B, N, 3, H, D], not the 3


# --------------------------------------------------------------------------- the option


def zero_head(path: Path, head: int, dim: int, out: Path) -> Path:
    """``path`` with head ``head``'s q, k, v columns zeroed, as group LASSO training leaves a
    dead head."""
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name in ("q.weight", "k.weight", "v.weight"):
            w = numpy_helper.to_array(t).copy()
            w[:, head * dim : (head + 1) * dim] = 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save(model, str(out))
    return out


def test_spec_mask_prune_keep_the_grouping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """spec --attention heads records it; mask and prune take it from the files they are given
    (no option needed) and refuse a differing --attention, writing nothing."""
    path = attention(17, False, "separate", 3, 4).save(tmp_path)
    trained = zero_head(path, 1, 4, tmp_path / "trained.onnx")
    spec, mask, out = tmp_path / "spec.json", tmp_path / "mask.json", tmp_path / "pruned.onnx"
    assert run(capsys, "spec", path, "--attention", "heads", "-o", spec)[0] == 0
    assert json.loads(spec.read_text())["attention"] == "heads"

    rc, _, err = run(capsys, "mask", trained, "--spec", spec, "--attention", "dims", "--auto",
                     "-o", mask)  # fmt: skip
    assert rc != 0 and "spec.json: made with attention 'heads', not 'dims'" in err
    assert not mask.exists()
    assert run(capsys, "mask", trained, "--spec", spec, "--threshold", "1e-6", "-o", mask)[0] == 0
    doc = json.loads(mask.read_text())
    gid = group_of(analyze(path, attention="heads").solution, "proj.weight", 0).id
    assert doc["attention"] == "heads" and doc["groups"] == {gid: [True, False, True]}

    rc, stdout, _ = run(capsys, "analyze", trained, "--attention", "heads")
    assert rc == 0 and "prunable channels; whole attention heads)" in " ".join(stdout.split())
    rc, _, err = run(capsys, "prune", trained, "--mask", mask, "--attention", "dims", "-o", out)
    assert rc != 0 and "mask.json: made with attention 'heads', not 'dims'" in err
    assert not out.exists()
    rc, stdout, _ = run(capsys, "prune", trained, "--mask", mask, "-o", out)
    assert rc == 0 and out.exists()
    assert targets(onnx.load(str(out))) == [[0, -1, 2, 4]] * 3 + [[0, N, 8]]
    assert analyze(out).totals.macs == attention_macs(2, 4)


def test_library_refuses_a_mixed_grouping(tmp_path: Path) -> None:
    path = attention(17, False, "separate", 3, 4).save(tmp_path)
    heads, dims = analyze(path, attention="heads"), analyze(path)
    spec = tmp_path / "spec.json"
    write_json(spec, make_spec(heads))
    assert make_spec(dims)["attention"] == "dims"
    with pytest.raises(MorphonnxError, match="spec.json: made with attention 'heads', not 'dims'"):
        make_mask(dims, spec, threshold=0.0)
    result = make_mask(heads, spec, threshold=0.0)
    mask = tmp_path / "mask.json"
    write_json(mask, result.document(heads.fingerprint, "group_lasso", heads.attention))
    with pytest.raises(MorphonnxError, match="mask.json: made with attention 'heads', not 'dims'"):
        load_mask(dims, str(mask))
    assert load_mask(heads, str(mask)) == result.keep
    gid = group_of(heads.solution, "proj.weight", 0).id
    report = prune_file(path, {gid: [False, True, True]}, tmp_path / "p.onnx", attention="heads")
    assert report.verification is not None and report.verification.ok
    assert report.measured.macs == attention_macs(2, 4)


def test_adapter_binding_keeps_the_grouping(tmp_path: Path) -> None:
    """A training adapter bound to a whole-heads spec writes masks that say so and refuses a
    per-head-dim mask (its group ids mean other channels)."""
    path = attention(17, False, "separate", 3, 4).save(tmp_path)
    model = onnx.load(str(path))
    params = {
        t.name: Param(t.name, tuple(t.dims), tuple(range(len(t.dims))))
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and t.dims
    }
    options = check_options("group_lasso", "flops", 1e-6, None, 0.0, ())
    heads = analyze(path, attention="heads")
    binding = Binding(make_spec(heads), "spec.json", params, options)
    assert binding.attention == "heads"
    mask = tmp_path / "mask.json"
    gid = group_of(heads.solution, "proj.weight", 0).id
    write_json(mask, mask_document(heads.fingerprint, {gid: [True, False, True]}, "heads"))
    assert binding.keep(mask) == {gid: [True, False, True]}
    write_json(mask, mask_document(heads.fingerprint, {gid: [True, False, True]}))
    with pytest.raises(ValueError, match="mask groups attention by 'dims', the spec by 'heads'"):
        binding.keep(mask)


def test_files_without_the_field_are_per_head_dim(tmp_path: Path) -> None:
    """Specs and masks written before the option read as ``dims``; a value that is neither is
    refused with a line naming the file."""
    path = attention(17, False, "separate", 3, 4).save(tmp_path)
    a = analyze(path)
    doc = make_spec(a)
    del doc["attention"]
    old = tmp_path / "old.json"
    write_json(old, doc)
    assert make_mask(a, old, threshold=0.0).keep
    doc["attention"] = "rows"
    bad = tmp_path / "bad.json"
    write_json(bad, doc)
    with pytest.raises(MorphonnxError, match=r"bad.json: 'attention': 'rows' is not an attention"):
        read_spec(bad)


def test_sweep_varies_whole_heads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``sweep --attention heads`` draws its random widths over whole heads: every variant keeps
    the head dim (4) in its split targets, the head count varies, the CSV records the grouping
    and a resume under the other grouping is refused."""
    import csv

    path = attention(17, False, "separate", 3, 4).save(tmp_path)
    kept, out = tmp_path / "variants", tmp_path / "sweep.csv"
    kept.mkdir()
    argv = ["sweep", path, "-o", out, "--repeats", "1", "--warmup", "0", "--attention", "heads"]
    rc, _, err = run(capsys, *argv, "-n", 4, "--keep-models", kept)
    assert rc == 0, err
    assert [r["attention"] for r in csv.DictReader(out.open())] == ["heads"] * 4
    counts = set()
    for f in sorted(kept.glob("variant_*.onnx")):
        *splits, merge = targets(onnx.load(str(f)))
        (h,) = {t[2] for t in splits}
        assert splits == [[0, -1, h, 4]] * 3 and merge == [0, N, 4 * h]
        counts.add(h)
    assert min(counts) < 3
    before = out.read_bytes()
    rc, _, err = run(capsys, *argv[:-1], "dims", "-n", 5)
    assert rc == 1 and out.read_bytes() == before and "attention heads" in err
