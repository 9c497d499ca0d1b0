"""Bad files for the hostile-input tests, built in code: a small valid model to start from, then
models, masks, specs and device profiles broken in the ways a careless or hostile user would, and
helpers to run the CLI (in-process or as a bounded subprocess) and to snapshot a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cli_runner import run
from onnx import TensorProto, helper, numpy_helper

from morphonnx.formats import MASK_FORMAT, VERSION, fingerprint

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 16
"""Channels of :func:`conv_chain`'s prunable group ``g0``."""
MEMORY_LIMIT = 3 << 30
"""Address space a CLI subprocess may use (onnxruntime alone maps about 1 GB)."""


def conv_chain(
    path: Path,
    *,
    names: Sequence[str] = ("c1", "r1", "c2", "r2"),
    weights: Sequence[str] = ("w1", "w2"),
    opset: int = 17,
) -> Path:
    """x[1,3,8,8] -> Conv(16x3x3x3) -> Relu -> Conv(2x16x1x1) -> Relu -> y[1,2,8,8]: one
    prunable group ``g0`` of 16 channels (w1's filters, w2's inputs); w1 is big enough (1.7 kB)
    to be kept in external data when the model has some."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(
        rng.standard_normal((WIDTH, 3, 3, 3)).astype(np.float32), weights[0]
    )
    w2 = numpy_helper.from_array(
        rng.standard_normal((2, WIDTH, 1, 1)).astype(np.float32), weights[1]
    )
    nodes = [
        helper.make_node("Conv", ["x", weights[0]], ["a"], name=names[0], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name=names[1]),
        helper.make_node("Conv", ["b", weights[1]], ["c"], name=names[2]),
        helper.make_node("Relu", ["c"], ["y"], name=names[3]),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def with_external_data(src: Path, dst: Path, location: str) -> Path:
    """``src`` saved as ``dst`` with every weight in the file ``location`` beside it."""
    model = onnx.load(src)
    onnx.save_model(model, dst, save_as_external_data=True, location=location, size_threshold=0)
    return dst


def mask_for(model: Path, path: Path, groups: dict[str, list[bool]], **extra: Any) -> Path:
    doc = {
        "format": MASK_FORMAT,
        "version": VERSION,
        "model_fingerprint": fingerprint(onnx.load(model, load_external_data=False)),
        "groups": groups,
        **extra,
    }
    path.write_text(json.dumps(doc))
    return path


def edit_model(src: Path, dst: Path, edit: Any) -> Path:
    """``src`` loaded without its external data, changed by ``edit(model)``, saved as ``dst``."""
    model = onnx.load(src, load_external_data=False)
    edit(model)
    onnx.save(model, dst)
    return dst


def set_external(model: onnx.ModelProto, key: str, value: str) -> None:
    for kv in model.graph.initializer[0].external_data:
        if kv.key == key:
            kv.value = value
            return
    model.graph.initializer[0].external_data.add(key=key, value=value)


def huge_initializer(path: Path) -> Path:
    """A conv whose weight declares 1e9 filters and stores nothing (a few hundred bytes)."""
    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10**9, 3, 3, 3])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def huge_constant_weight(path: Path) -> Path:
    """A conv whose weight is ``ConstantOfShape([1e9, 3, 1, 1])``: a billion filters declared
    by a few bytes, no initializer to check against."""
    shape = numpy_helper.from_array(np.array([10**9, 3, 1, 1], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["w"], name="fill"),
            helper.make_node("Conv", ["x", "w"], ["a"], name="c"),
            helper.make_node("Relu", ["a"], ["y"], name="r"),
        ],
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [shape],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def dense_cycle(path: Path, n: int = 12) -> Path:
    """``n`` Sum nodes, each reading every other one's output: one strongly connected blob whose
    simple cycles are astronomically many."""
    outs = [f"t{i}" for i in range(n)]
    nodes = [
        helper.make_node("Sum", ["x"] + [o for j, o in enumerate(outs) if j != i], [outs[i]])
        for i in range(n)
    ]
    graph = helper.make_graph(
        nodes,
        "cycle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def nested_json(path: Path, depth: int = 200_000) -> Path:
    path.write_text("[" * depth + "]" * depth)
    return path


# --- running -------------------------------------------------------------------------------------


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in this (main) thread after ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(capsys: Any, *argv: object, seconds: float = 60) -> tuple[int, str, str]:
    """``morphonnx argv`` in-process, bounded in time: (exit status, stdout, stderr)."""
    with time_limit(seconds):
        return run(capsys, *argv)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def start_cli(*argv: object, cwd: Path, script: str | None = None) -> subprocess.Popen[str]:
    """``python -m morphonnx argv`` (or ``python -c script argv``) with at most
    :data:`MEMORY_LIMIT` of address space; the caller waits with a timeout."""
    head = ["-c", script] if script is not None else ["-m", "morphonnx"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MORPHONNX_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, *head, *[str(a) for a in argv]],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit_memory,
    )


def finish(proc: subprocess.Popen[str], seconds: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args}: still running after {seconds} s") from None
    return proc.returncode, out, err


def one_line_error(err: str, *names: object) -> str:
    """The single stderr line of a clean failure, checked to name every one of ``names``."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("morphonnx: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, err)
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every entry under ``folder``: kind, size, mtime and content hash (for regular files)."""
    found = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            found[str(p)] = ("link", 0, st.st_mtime_ns, os.readlink(p))
        elif p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            found[str(p)] = ("file", st.st_size, st.st_mtime_ns, digest)
        elif p.is_dir():  # its mtime moves when a temporary file comes and goes
            found[str(p)] = ("folder", 0, 0, "")
        else:
            found[str(p)] = ("other", 0, st.st_mtime_ns, oct(st.st_mode))
    return found
