"""Regression tests for issue 8 (hostile files and careless users), one or more per numbered item;
each failed before its fix. Every bad file is built in code (``hostile_files``)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hostile_files import (
    WIDTH,
    conv_chain,
    dense_cycle,
    edit_model,
    finish,
    huge_constant_weight,
    huge_initializer,
    mask_for,
    nested_json,
    one_line_error,
    run_cli,
    set_external,
    snapshot,
    start_cli,
    with_external_data,
)
from onnx import TensorProto
from onnx_builders import Builder

HALF = {"g0": [k % 2 == 0 for k in range(WIDTH)]}
ALL: dict[str, list[bool]] = {}  # keeps every weight as it is: still in external data


def external_data_case(tmp_path: Path) -> tuple[Path, Path]:
    """An input model with external data and an output path in a folder of its own."""
    src = with_external_data(conv_chain(tmp_path / "m.onnx"), tmp_path / "in.onnx", "in.data")
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    return src, out


def outputs(path: Path) -> np.ndarray:
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return conv_chain(tmp_path / "model.onnx")


# --- 1. prune never deletes the input's weights -----------------------------------------------


def test_1_iterative_prune_keeps_the_input_data_file(tmp_path: Path, capsys: object) -> None:
    """round1.onnx is a copy of an earlier pruned.onnx and reads pruned.onnx.data; pruning it
    again to pruned.onnx must leave that data file (the input's weights) alone."""
    d = tmp_path / "work"
    d.mkdir()
    first = with_external_data(
        conv_chain(tmp_path / "m.onnx"), d / "pruned.onnx", "pruned.onnx.data"
    )
    shutil.copy(first, d / "round1.onnx")
    before = outputs(d / "round1.onnx")
    data = (d / "pruned.onnx.data").read_bytes()
    for keep in (ALL, HALF):
        mask = mask_for(d / "round1.onnx", tmp_path / "mask.json", keep)
        rc, _, err = run_cli(
            capsys, "prune", d / "round1.onnx", "--mask", mask, "-o", d / "pruned.onnx"
        )
        assert rc == 0, err
        assert (d / "pruned.onnx.data").read_bytes() == data
        np.testing.assert_array_equal(outputs(d / "round1.onnx"), before)
        names = sorted(p.name for p in d.iterdir())
        if keep is ALL:  # the new output has a data file of its own
            np.testing.assert_allclose(outputs(d / "pruned.onnx"), before, rtol=1e-6)
            fresh = [
                n for n in names if n not in ("pruned.onnx", "pruned.onnx.data", "round1.onnx")
            ]
            assert len(names) == 4 and len(fresh) == 1, names
            assert fresh[0].startswith("pruned.onnx.") and fresh[0].endswith(".data"), names
        else:  # inline now: its old data file went, the input's stayed
            assert outputs(d / "pruned.onnx").shape == (1, 2, 8, 8)
            assert names == ["pruned.onnx", "pruned.onnx.data", "round1.onnx"]


# --- 2. a failed prune keeps an earlier good output pair -----------------------------------


def test_2_interrupted_prune_keeps_the_earlier_pair(
    tmp_path: Path, capsys: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = external_data_case(tmp_path)
    mask = mask_for(src, tmp_path / "mask.json", ALL)
    assert run_cli(capsys, "prune", src, "--mask", mask, "-o", out)[0] == 0
    good = outputs(out)
    before = snapshot(out.parent)
    assert len(before) == 2  # pruned.onnx and its data file
    import morphonnx.api

    def interrupted(path: Path, shown: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(morphonnx.api, "check_pruned", interrupted)
    rc, _, _ = run_cli(capsys, "prune", src, "--mask", mask, "-o", out)
    assert rc == 130
    assert snapshot(out.parent) == before
    np.testing.assert_array_equal(outputs(out), good)


def test_2_replaced_pair_leaves_no_stale_data(tmp_path: Path, capsys: object) -> None:
    """Each prune to the same output replaces the pair: the old data file goes."""
    src, out = external_data_case(tmp_path)
    for keep, files in ((ALL, 2), (ALL, 2), (HALF, 1)):
        mask = mask_for(src, tmp_path / "mask.json", keep)
        assert run_cli(capsys, "prune", src, "--mask", mask, "-o", out)[0] == 0
        assert len(list(out.parent.iterdir())) == files
    assert outputs(out).shape == (1, 2, 8, 8)
    assert onnx.load(out, load_external_data=False).graph.initializer[0].dims[0] == WIDTH // 2


def test_2_only_our_own_data_files_are_removed(tmp_path: Path, capsys: object) -> None:
    """An old output whose external data is some other file of the folder: replacing the
    output leaves that file alone."""
    model = conv_chain(tmp_path / "m.onnx")
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    with_external_data(model, out, "precious.txt")
    before = (out.parent / "precious.txt").read_bytes()
    mask = mask_for(model, tmp_path / "mask.json", HALF)
    assert run_cli(capsys, "prune", model, "--mask", mask, "-o", out)[0] == 0
    assert (out.parent / "precious.txt").read_bytes() == before
    assert outputs(out).shape == (1, 2, 8, 8)


# --- 3. -o never replaces a special file ---------------------------------------------------


def _special_outputs(d: Path) -> list[Path]:
    fifo = d / "fifo"
    os.mkfifo(fifo)
    to_stdout = d / "stdout_link"
    to_stdout.symlink_to("/proc/self/fd/1")
    regular = d / "regular.json"
    regular.write_text("precious")
    link = d / "link.json"
    link.symlink_to(regular)
    found = [fifo, to_stdout, link]
    if os.geteuid() == 0:  # a private character device (the same as /dev/null)
        dev = d / "null"
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        found.append(dev)
    return found


@pytest.mark.parametrize("command", ["spec", "prune"])
def test_3_special_files_are_never_replaced(
    tmp_path: Path, model: Path, capsys: object, command: str
) -> None:
    d = tmp_path / "outs"
    d.mkdir()
    mask = mask_for(model, tmp_path / "mask.json", HALF)
    for target in _special_outputs(d):
        before = snapshot(d)
        extra = ["--mask", mask] if command == "prune" else []
        rc, _, err = run_cli(capsys, command, model, *extra, "-o", target)
        assert rc == 1, (target, err)
        one_line_error(err, target)
        assert snapshot(d) == before


# --- 4. plot after the mask, signals, concurrent writers -------------------------------------


def test_4_plot_is_written_only_after_the_mask(
    tmp_path: Path, model: Path, capsys: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "spec.json"
    assert run_cli(capsys, "spec", model, "-o", spec)[0] == 0
    import morphonnx.formats
    from morphonnx.errors import MorphonnxError

    def failing(path: object, data: object) -> None:
        raise MorphonnxError(f"{path}: cannot write (disk full)")

    monkeypatch.setattr(morphonnx.formats, "write_json", failing)
    argv = ["mask", model, "--spec", spec, "--threshold", "0.5", "-o", tmp_path / "m.json"]
    rc, _, err = run_cli(capsys, *argv, "--plot", tmp_path / "hist.png")
    assert rc == 1
    one_line_error(err, "m.json")
    assert not (tmp_path / "hist.png").exists()
    rc, _, err = run_cli(capsys, *argv, "--plot", tmp_path / "hist.nope")
    assert rc == 1 and not (tmp_path / "hist.nope").exists()
    one_line_error(err, "hist.nope")


SIGTERM_DURING_PRUNE = """
import os, signal, sys, time
import morphonnx.api
from morphonnx.cli import main

def check(path, shown):  # the signal arrives while the output is being written
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)

morphonnx.api.check_pruned = check
sys.exit(main(["prune", *sys.argv[1:]]))
"""


def test_4_sigterm_leaves_no_temporary_files(tmp_path: Path, capsys: object) -> None:
    src, out = external_data_case(tmp_path)
    mask = mask_for(src, tmp_path / "mask.json", ALL)
    assert run_cli(capsys, "prune", src, "--mask", mask, "-o", out)[0] == 0
    before = snapshot(tmp_path)
    argv = [src, "--mask", mask, "-o", out]
    rc, _, err = finish(start_cli(*argv, cwd=tmp_path, script=SIGTERM_DURING_PRUNE))
    assert rc == 128 + 15, err
    assert err.strip() == "morphonnx: terminated (SIGTERM)"
    assert snapshot(tmp_path) == before


def test_4_concurrent_prunes_to_one_output(tmp_path: Path) -> None:
    src, out = external_data_case(tmp_path)
    mask = mask_for(src, tmp_path / "mask.json", ALL)
    procs = [start_cli("prune", src, "--mask", mask, "-o", out, cwd=tmp_path) for _ in range(3)]
    for p in procs:
        rc, _, err = finish(p)
        assert rc == 0, err
    assert outputs(out).shape == (1, 2, 8, 8)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert onnx.load(out, load_external_data=False).graph.initializer[0].data_location == 1


# --- 5. a dense cycle is reported in linear time ---------------------------------------------


def test_5_dense_cycle_is_reported_quickly(tmp_path: Path, capsys: object) -> None:
    path = dense_cycle(tmp_path / "cycle.onnx")
    assert path.stat().st_size < 1000
    rc, _, err = run_cli(capsys, "analyze", path, seconds=20)
    assert rc == 1
    line = one_line_error(err, path, "cycle")
    assert line.count("->") >= 2  # the nodes of one cycle, in order


# --- 6. declared sizes are checked before anything is allocated ----------------------------


def test_6_huge_declarations_fail_without_allocating(tmp_path: Path) -> None:
    """In subprocesses limited to a few GB: a billion-filter weight with no data, one made by
    ConstantOfShape, and a verification input of 4.8 GB."""
    weight = huge_initializer(tmp_path / "weight.onnx")
    wide = huge_constant_weight(tmp_path / "wide.onnx")
    model = conv_chain(tmp_path / "model.onnx")
    mask = mask_for(model, tmp_path / "mask.json", HALF)
    big = "x=1,3,20000,20000"
    runs = [
        (start_cli("analyze", weight, cwd=tmp_path), [weight, "'w'", "needs"]),
        (start_cli("analyze", wide, cwd=tmp_path), [wide, "over the limit"]),
        (
            start_cli(
                "prune",
                model,
                "--mask",
                mask,
                "-o",
                tmp_path / "p.onnx",
                "--input-shape",
                big,
                cwd=tmp_path,
            ),
            [model, "too large to verify"],
        ),
    ]
    for proc, names in runs:
        rc, _, err = finish(proc, 180)
        assert rc == 1, err
        one_line_error(err, *names)
    assert not (tmp_path / "p.onnx").exists()


def test_6_typed_data_count_is_checked(tmp_path: Path, model: Path, capsys: object) -> None:
    def wrong_count(m: onnx.ModelProto) -> None:
        t = onnx.TensorProto(
            name="w2", data_type=TensorProto.FLOAT, dims=[2, 4, 1, 1], float_data=[1.0] * 5
        )
        m.graph.initializer[1].CopyFrom(t)

    bad = edit_model(model, tmp_path / "count.onnx", wrong_count)
    rc, _, err = run_cli(capsys, "analyze", bad)
    assert rc == 1
    one_line_error(err, bad, "'w2' holds 5 values", "needs 8")


# --- 11. names and paths are printed literally -------------------------------------------------


def test_11_names_are_printed_literally(tmp_path: Path, capsys: object) -> None:
    path = conv_chain(
        tmp_path / "names.onnx",
        names=("c[/bold]1", "r1", "\x1b[31mc2", "r2"),
        weights=("block[conv].weight", "w2"),
    )
    rc, out, err = run_cli(capsys, "analyze", path)
    assert rc == 0, err
    assert "c[/bold]1" in out and "block[conv].weight" in out
    assert "\x1b" not in out and "\\x1b[31mc2" in out
    (tmp_path / "o[").mkdir()
    target = tmp_path / "o[/x].json"
    rc, out, err = run_cli(capsys, "spec", path, "-o", target)
    assert rc == 0, err
    assert target.is_file() and f"wrote {target}" in out


def test_11_errors_stay_on_one_line(tmp_path: Path, model: Path, capsys: object) -> None:
    mask = mask_for(model, tmp_path / "mask.json", {"g0\nfake line\x1b[2J": [True]})
    rc, _, err = run_cli(capsys, "prune", model, "--mask", mask, "-o", tmp_path / "p.onnx")
    assert rc == 1
    line = one_line_error(err, mask, "g0\\nfake line\\x1b[2J")
    assert "\x1b" not in line


# --- 12. bad input is a one-line error naming the file, never an internal error -------------


def _profile(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_12_bad_inputs_give_one_line_errors(tmp_path: Path, model: Path, capsys: object) -> None:
    ext = with_external_data(model, tmp_path / "ext.onnx", "ext.data")
    spec = tmp_path / "spec.json"
    assert run_cli(capsys, "spec", model, "-o", spec)[0] == 0
    doc = json.loads(spec.read_text())
    doc["groups"][0]["channels"] = 2
    for key in ("gammas", "weights"):
        for e in doc["groups"][0]["regularize"][key]:
            e["positions"] = e["positions"][:2]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    deep = nested_json(tmp_path / "deep.json")
    mask = mask_for(model, tmp_path / "mask.json", HALF)

    def nul(m: onnx.ModelProto) -> None:
        set_external(m, "location", "ext\x00.data")

    def short(m: onnx.ModelProto) -> None:
        set_external(m, "length", "8")

    def wide_weight(m: onnx.ModelProto) -> None:
        w = np.ones((2, 5, 1, 1), np.float32)
        m.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(w, "w2"))

    out = tmp_path / "out.json"
    cases = [
        (["analyze", edit_model(ext, tmp_path / "nul.onnx", nul)], ["nul.onnx", "file name"]),
        (["analyze", edit_model(ext, tmp_path / "short.onnx", short)], ["short.onnx", "length 8"]),
        (["analyze", edit_model(model, tmp_path / "wide.onnx", wide_weight)], ["wide.onnx"]),
        (["mask", model, "--spec", edited, "--auto", "-o", out], [edited, "edited"]),
        (["mask", model, "--spec", deep, "--auto", "-o", out], [deep, "nested too deeply"]),
        (["prune", model, "--mask", deep, "-o", tmp_path / "p.onnx"], [deep]),
        (["prune", model, "--mask", tmp_path, "-o", tmp_path / "p.onnx"], [tmp_path]),
        (["analyze", model, "--device", deep], [deep]),
        (["prune", model, "--mask", mask, "-o", ""], ["empty output file name"]),
    ]
    for peak in ("1e308", "1e-310", "0.0000000001"):
        profile = _profile(
            tmp_path,
            f"p{len(cases)}.toml",
            f"name='x'\npeak_gflops={peak}\nmem_bandwidth_gbps=100\n",
        )
        cases.append((["analyze", model, "--device", profile], [profile, "peak_gflops"]))
    shadow = _profile(tmp_path, "v.toml", "name='V100'\npeak_gflops=1\nmem_bandwidth_gbps=1\n")
    cases.append((["analyze", model, "--device", shadow], [shadow, "built-in"]))
    cases.append((["analyze", model, "--device", "V100", "--device", "v100"], ["given twice"]))
    for argv, names in cases:
        before = snapshot(tmp_path)
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 1, (argv, err)
        one_line_error(err, *names)
        assert snapshot(tmp_path) == before, argv


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_12_unreadable_mask(tmp_path: Path, model: Path, capsys: object) -> None:
    mask = mask_for(model, tmp_path / "mask.json", HALF)
    mask.chmod(0)
    rc, _, err = run_cli(capsys, "prune", model, "--mask", mask, "-o", tmp_path / "p.onnx")
    assert rc == 1
    one_line_error(err, mask, "cannot read")


def test_12_duplicate_node_names_prune_and_opset_99_fails_quietly(tmp_path: Path) -> None:
    """onnxruntime refuses repeated node names: the pruned model gets unique ones. It cannot run
    opset 99: one line naming the model, none of onnxruntime's own log lines."""
    dup = conv_chain(tmp_path / "dup.onnx", names=("c", "c", "c", "c"))
    future = conv_chain(tmp_path / "future.onnx", opset=99)
    runs = []
    for path in (dup, future):
        mask = mask_for(path, tmp_path / f"{path.stem}.json", HALF)
        out = tmp_path / f"{path.stem}_pruned.onnx"
        runs.append((path, out, start_cli("prune", path, "--mask", mask, "-o", out, cwd=tmp_path)))
    (_, dup_out, p1), (_, future_out, p2) = runs
    rc, _, err = finish(p1)
    assert rc == 0, err
    assert outputs(dup_out).shape == (1, 2, 8, 8)
    rc, _, err = finish(p2)
    assert rc == 1
    one_line_error(err, future_out, "onnxruntime fails")
    assert not future_out.exists()


# --- 7-10: verdicts ------------------------------------------------------------------------------


def _chain(b: Builder, *, bn_eps: float | None = None, div: bool = False) -> tuple[str, str]:
    """x -> Conv(w1, 16) [-> BN] [-> Div by a per-channel constant] -> Relu -> Conv(w2, 2) -> y;
    returns (the first conv's output, the tensor the second conv reads)."""
    x = b.input("x", [1, 3, 8, 8])
    a = b.conv(x, 3, WIDTH, prefix="c1")
    h = a
    if bn_eps is not None:
        h = b.node(
            "BatchNormalization",
            [
                h,
                *[b.init(f"bn.{p}", [WIDTH]) for p in ("weight", "bias", "mean")],
                b.init("bn.var", np.random.default_rng(1).random(WIDTH).astype(np.float32) + 0.5),
            ],
            "bn.out",
            epsilon=bn_eps,
        )
    if div:
        c = b.init(
            "scale", np.random.default_rng(2).random((1, WIDTH, 1, 1)).astype(np.float32) + 1
        )
        h = b.node("Div", [h, c], "div.out")
    r = b.relu(h)
    b.output(b.conv(r, WIDTH, 2, k=1, prefix="c2"))
    return a, r


def _groups(path: Path) -> dict[str, tuple[str, int, bool, str | None]]:
    """Producer weight -> (group id, channels, prunable, reason)."""
    from morphonnx.analysis import analyze

    found = {}
    for g in analyze(path).solution.groups:
        for m in g.members:
            if m.role == "producer":
                found[m.tensor] = (g.id, g.channels, g.prunable, g.reason)
    return found


def _save(b: Builder, path: Path) -> Path:
    onnx.save(b.model(check=False), path)
    return path


def test_7_subgraph_reads_of_a_constant_if_stop_the_group(tmp_path: Path, capsys: object) -> None:
    """If(constant condition) whose branches read the first conv's output: not a constant."""
    b = Builder()
    a, _ = _chain(b)
    cond = b.init("cond", np.array(True))
    branches = {}
    for side in ("then", "else"):
        out = onnx.helper.make_tensor_value_info(f"{side}_out", TensorProto.FLOAT, None)
        node = onnx.helper.make_node("Identity", [a], [f"{side}_out"])
        branches[f"{side}_branch"] = onnx.helper.make_graph([node], side, [], [out])
    b.node("If", [cond], "z", name="branch", **branches)
    b.output("z")
    path = _save(b, tmp_path / "if.onnx")
    gid, _, prunable, reason = _groups(path)["c1.weight"]
    assert not prunable and reason is not None and "If" in reason, reason
    mask = mask_for(path, tmp_path / "mask.json", {gid: [k % 2 == 0 for k in range(WIDTH)]})
    rc, _, err = run_cli(
        capsys, "prune", path, "--mask", mask, "-o", tmp_path / "p.onnx", "--no-verify"
    )
    assert rc == 1
    one_line_error(err, mask, "not prunable")


@pytest.mark.parametrize("start", [None, 2])
def test_8_shape_of_a_pruned_tensor_as_graph_output(
    tmp_path: Path, capsys: object, start: int | None
) -> None:
    """Shape(a) as a graph output changes with a's width: the group stops. Shape(a)[2:] (the
    spatial dims) does not: the group prunes, and that output is compared and equal."""
    b = Builder()
    a, _ = _chain(b)
    b.node("Shape", [a], "s", **({} if start is None else {"start": start}))
    b.output("s", TensorProto.INT64)
    path = _save(b, tmp_path / "shape.onnx")
    gid, _, prunable, reason = _groups(path)["c1.weight"]
    if start is None:
        assert not prunable and reason is not None and "width of `c1.out`" in reason, reason
        return
    assert prunable, reason
    mask = mask_for(path, tmp_path / "mask.json", {gid: [k % 2 == 0 for k in range(WIDTH)]})
    rc, out, err = run_cli(capsys, "prune", path, "--mask", mask, "-o", tmp_path / "p.onnx")
    assert rc == 0, err
    assert "verification passed" in out
    x = np.zeros((1, 3, 8, 8), np.float32)
    s = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    assert s.run(["s"], {"x": x})[0].tolist() == [8, 8]


def test_8_value_of_a_weight_alone_as_graph_output(tmp_path: Path) -> None:
    """ReduceSum(gamma) as a graph output: slicing gamma changes it in the pruned model and in
    the zeroed reference alike, so verification cannot see it; the group stops."""
    b = Builder()
    _chain(b, bn_eps=1e-5)
    b.node("ReduceSum", ["bn.weight"], "gamma_sum", keepdims=0)
    b.output("gamma_sum")
    path = _save(b, tmp_path / "gamma.onnx")
    _, _, prunable, reason = _groups(path)["c1.weight"]
    assert not prunable and reason is not None and "ReduceSum" in reason, reason


@pytest.mark.parametrize("kind", ["bn_epsilon_0", "div_by_constant"])
def test_9_no_false_failure_where_the_reference_divides_by_zero(
    tmp_path: Path, capsys: object, kind: str
) -> None:
    b = Builder()
    _chain(b, bn_eps=0.0 if kind == "bn_epsilon_0" else None, div=kind == "div_by_constant")
    path = _save(b, tmp_path / f"{kind}.onnx")
    gid, _, prunable, reason = _groups(path)["c1.weight"]
    assert prunable, reason
    keep = [k % 2 == 0 for k in range(WIDTH)]
    mask = mask_for(path, tmp_path / "mask.json", {gid: keep})
    out = tmp_path / "p.onnx"
    rc, stdout, err = run_cli(capsys, "prune", path, "--mask", mask, "-o", out)
    assert rc == 0, err
    assert "verification passed" in stdout
    # independently: the pruned model is the original with the dead channels' outputs removed
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert np.isfinite(sess.run(None, {"x": x})[0]).all()


def test_10_identity_of_an_equal_bias_prunes_with_any_mask(tmp_path: Path, capsys: object) -> None:
    """PyTorch writes ``b2 = Identity(b1)`` for equal initializers: each group prunes alone."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    w1 = b.init("w1", [WIDTH, 3, 3, 3])
    bias = b.init("b1", np.linspace(0.1, 1.0, WIDTH).astype(np.float32))
    b2 = b.node("Identity", [bias], "b2")
    h = b.relu(b.node("Conv", [x, w1, bias], "a", pads=[1, 1, 1, 1]))
    w2 = b.init("w2", [WIDTH, WIDTH, 1, 1])
    h = b.relu(b.node("Conv", [h, w2, b2], "c"))
    b.output(b.node("Conv", [h, b.init("w3", [2, WIDTH, 1, 1])], "y"))
    path = _save(b, tmp_path / "alias.onnx")
    groups = _groups(path)
    half = [k % 2 == 0 for k in range(WIDTH)]
    for producers in (["w1"], ["w2"], ["w1", "w2"]):
        masks = {groups[p][0]: half for p in producers}
        assert all(groups[p][2] for p in producers), groups
        mask = mask_for(path, tmp_path / "mask.json", masks)
        out = tmp_path / "p.onnx"
        rc, stdout, err = run_cli(capsys, "prune", path, "--mask", mask, "-o", out)
        assert rc == 0, (producers, err)
        assert "verification passed" in stdout
        onnx.checker.check_model(onnx.load(out), full_check=True)
