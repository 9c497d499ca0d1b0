"""Every command on a generated set of malformed and adversarial files.

Truncated and bit-flipped models, huge declared dims, cycles, escaping or broken external data,
bad masks, specs and device profiles, and outputs that are not regular files. Each run must end
with exit 1 and one stderr line naming a file it was given (a bit flip may also leave a valid
model: then exit 0), no traceback, in bounded time, and leave every file as it was except the
output of a successful run. Most cases run in-process (fast); a representative subset runs as real
subprocesses with limited address space, which also shows that nothing but our one line (no
onnxruntime log line) reaches stderr.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
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
    run_cli,
    set_external,
    snapshot,
    start_cli,
    with_external_data,
)

from morphonnx.formats import MASK_FORMAT, SPEC_FORMAT


@dataclass
class Case:
    name: str
    argv: list[object]
    output: Path | None  # what a successful run may create
    may_succeed: bool = False  # a bit flip can leave a valid model


@dataclass
class Corpus:
    root: Path
    model: Path
    spec: Path
    mask: Path
    models: dict[str, Path]
    masks: dict[str, Path]
    specs: dict[str, Path]
    profiles: dict[str, Path]
    outputs: dict[str, Path]


def _write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _bad_models(d: Path, model: Path) -> dict[str, Path]:
    data = model.read_bytes()
    found: dict[str, Path] = {}
    for cut in (1, 7, 40, len(data) // 4, len(data) // 2, len(data) - 30, len(data) - 1):
        found[f"truncated{cut}"] = _write(d / f"truncated{cut}.onnx", data[:cut])
    rng = np.random.default_rng(8)
    for k in range(12):
        flipped = bytearray(data)
        bit = int(rng.integers(len(data) * 8))
        flipped[bit // 8] ^= 1 << (bit % 8)
        found[f"flip{k}"] = _write(d / f"flip{k}.onnx", bytes(flipped))
    found["empty"] = _write(d / "empty.onnx", b"")
    found["text"] = _write(d / "text.onnx", "not a model\n")
    found["zeros"] = _write(d / "zeros.onnx", bytes(4096))
    found["cycle"] = dense_cycle(d / "cycle.onnx")
    found["huge_weight"] = huge_initializer(d / "huge_weight.onnx")
    found["huge_fill"] = huge_constant_weight(d / "huge_fill.onnx")
    folder = d / "folder.onnx"
    folder.mkdir()
    found["folder"] = folder
    fifo = d / "fifo.onnx"
    os.mkfifo(fifo)
    found["fifo"] = fifo

    ext_dir = d / "ext"
    ext_dir.mkdir()
    ext = with_external_data(model, ext_dir / "ext.onnx", "ext.data")
    (d / "outside.data").write_bytes(bytes(4096))
    (ext_dir / "link.data").symlink_to(d / "outside.data")
    (ext_dir / "dir.data").mkdir()
    edits: dict[str, Callable[[onnx.ModelProto], None]] = {
        "ext_escape": lambda m: set_external(m, "location", "../outside.data"),
        "ext_absolute": lambda m: set_external(m, "location", str(d / "outside.data")),
        "ext_link": lambda m: set_external(m, "location", "link.data"),
        "ext_missing": lambda m: set_external(m, "location", "nope.data"),
        "ext_folder": lambda m: set_external(m, "location", "dir.data"),
        "ext_nul": lambda m: set_external(m, "location", "ext\x00.data"),
        "ext_short": lambda m: set_external(m, "length", "8"),
        "ext_offset": lambda m: set_external(m, "offset", str(10**12)),
        "ext_negative": lambda m: set_external(m, "offset", "-4"),
        "ext_not_number": lambda m: set_external(m, "length", "many"),
    }
    for name, edit in edits.items():
        found[name] = edit_model(ext, ext_dir / f"{name}.onnx", edit)

    def wrong_count(m: onnx.ModelProto) -> None:
        t = onnx.TensorProto(name="w2", data_type=1, dims=[2, WIDTH, 1, 1], float_data=[1.0])
        m.graph.initializer[1].CopyFrom(t)

    def wide_weight(m: onnx.ModelProto) -> None:
        w = np.ones((2, WIDTH + 1, 1, 1), np.float32)
        m.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(w, "w2"))

    def bad_type(m: onnx.ModelProto) -> None:
        m.graph.initializer[1].data_type = 999

    def negative_dims(m: onnx.ModelProto) -> None:
        m.graph.initializer[1].dims[0] = -2

    def dangling(m: onnx.ModelProto) -> None:
        m.graph.node[1].input[0] = "nothing"

    for name, edit in {
        "wrong_count": wrong_count,
        "wide_weight": wide_weight,
        "bad_type": bad_type,
        "negative_dims": negative_dims,
        "dangling": dangling,
    }.items():
        found[name] = edit_model(model, d / f"{name}.onnx", edit)
    return found


def _bad_masks(d: Path, model: Path, good: Path) -> dict[str, Path]:
    doc = json.loads(good.read_text())
    found = {
        "nested": nested_json(d / "nested_mask.json"),
        "truncated": _write(d / "truncated_mask.json", good.read_text()[:30]),
        "binary": _write(d / "binary_mask.json", bytes(range(256))),
        "empty": _write(d / "empty_mask.json", b""),
        "list": _write(d / "list_mask.json", "[1, 2]"),
        "spec_format": _write(d / "spec_format.json", json.dumps({**doc, "format": SPEC_FORMAT})),
        "version": _write(d / "version_mask.json", json.dumps({**doc, "version": 99})),
    }
    for name, groups in {
        "groups_list": [True],
        "newline_id": {"g0\nsecond line": [True] * WIDTH},
        "escape_id": {"\x1b[2Jg0": [True] * WIDTH},
        "short": {"g0": [True] * (WIDTH - 1)},
        "long": {"g0": [True] * 10**5},
        "strings": {"g0": ["true"] * WIDTH},
        "none_kept": {"g0": [False] * WIDTH},
        "unprunable": {"g1": [True, False, True]},
    }.items():
        doc2 = {**doc, "groups": groups}
        found[name] = _write(d / f"{name}_mask.json", json.dumps(doc2))
    found["nan"] = _write(d / "nan_mask.json", good.read_text().replace("true", "NaN", 1))
    found["other_model"] = mask_for(
        conv_chain(d / "other.onnx", opset=13), d / "other_mask.json", {}
    )
    return found


def _bad_specs(d: Path, good: Path) -> dict[str, Path]:
    doc = json.loads(good.read_text())
    found = {
        "nested": nested_json(d / "nested_spec.json"),
        "truncated": _write(d / "truncated_spec.json", good.read_text()[:100]),
        "mask_format": _write(d / "mask_format.json", json.dumps({**doc, "format": MASK_FORMAT})),
    }

    def edited(name: str, edit: Callable[[dict[str, object]], None]) -> None:
        copy = json.loads(json.dumps(doc))
        edit(copy["groups"][0])
        found[name] = _write(d / f"{name}_spec.json", json.dumps(copy))

    def fewer_channels(g: dict[str, object]) -> None:
        g["channels"] = 2
        reg = g["regularize"]
        assert isinstance(reg, dict)
        for entries in reg.values():
            for e in entries:
                e["positions"] = e["positions"][:2]

    def far_position(g: dict[str, object]) -> None:
        reg = g["regularize"]
        assert isinstance(reg, dict)
        reg["weights"][0]["positions"][0] = [10**9]

    def not_a_weight(g: dict[str, object]) -> None:
        reg = g["regularize"]
        assert isinstance(reg, dict)
        reg["weights"][0]["tensor"] = "x"

    def bad_axis(g: dict[str, object]) -> None:
        reg = g["regularize"]
        assert isinstance(reg, dict)
        reg["weights"][0]["axis"] = 7

    edited("fewer_channels", fewer_channels)
    edited("far_position", far_position)
    edited("not_a_weight", not_a_weight)
    edited("bad_axis", bad_axis)
    return found


def _bad_profiles(d: Path) -> dict[str, Path]:
    def toml(name: str, body: str) -> Path:
        return _write(d / f"{name}.toml", body)

    rest = "mem_bandwidth_gbps = 100\n"
    return {
        "huge_peak": toml("huge_peak", f"name = 'a'\npeak_gflops = 1e308\n{rest}"),
        "denormal": toml("denormal", f"name = 'a'\npeak_flops = 5e-324\n{rest}"),
        "negative": toml("negative", f"name = 'a'\npeak_gflops = -3\n{rest}"),
        "text_peak": toml("text_peak", f"name = 'a'\npeak_gflops = 'fast'\n{rest}"),
        "builtin_name": toml("builtin", f"name = 'v100'\npeak_gflops = 1\n{rest}"),
        "garbage": toml("garbage", "name = = =\n"),
        "binary": _write(d / "binary.toml", bytes(range(256))),
        "nested": nested_json(d / "nested_profile.json"),
        "list": _write(d / "list.json", "[]"),
        "unknown_key": toml("unknown", f"name = 'a'\npeak_gflops = 1\n{rest}speed = 2\n"),
    }


def _special_outputs(d: Path, model: Path) -> dict[str, Path]:
    fifo = d / "fifo.json"
    os.mkfifo(fifo)
    (d / "stdout.json").symlink_to("/proc/self/fd/1")
    (d / "real.json").write_text("precious")
    (d / "link.json").symlink_to(d / "real.json")
    (d / "folder.json").mkdir()
    found = {
        "fifo": fifo,
        "stdout_link": d / "stdout.json",
        "file_link": d / "link.json",
        "folder": d / "folder.json",
        "no_folder": d / "missing" / "out.json",
        "input": model,
        "empty": Path(""),
    }
    if os.geteuid() == 0:  # a private character device (the same as /dev/null)
        os.mknod(d / "null.json", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        found["device"] = d / "null.json"
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("hostile")
    good = root / "good"
    good.mkdir()
    model = conv_chain(good / "model.onnx")
    from morphonnx.cli import main

    spec = good / "spec.json"
    assert main(["spec", str(model), "-o", str(spec)]) == 0
    mask = mask_for(model, good / "mask.json", {"g0": [k % 2 == 0 for k in range(WIDTH)]})
    dirs = {name: root / name for name in ("models", "masks", "specs", "profiles", "outputs")}
    for p in dirs.values():
        p.mkdir()
    (root / "work").mkdir()
    return Corpus(
        root=root,
        model=model,
        spec=spec,
        mask=mask,
        models=_bad_models(dirs["models"], model),
        masks=_bad_masks(dirs["masks"], model, mask),
        specs=_bad_specs(dirs["specs"], spec),
        profiles=_bad_profiles(dirs["profiles"]),
        outputs=_special_outputs(dirs["outputs"], model),
    )


MEMORY_BOMBS = ("huge_weight", "huge_fill")
"""Declared sizes only a subprocess with limited memory may try (the in-process run checks that
they fail before allocating, too: see the subprocess test)."""


def cases(c: Corpus) -> list[Case]:
    work = c.root / "work"
    found: list[Case] = []
    for name, m in c.models.items():
        flip = name.startswith("flip")
        out = work / f"{name}.json"
        found += [
            Case(f"analyze-{name}", ["analyze", m, "--json", out], out, flip),
            Case(f"spec-{name}", ["spec", m, "-o", out], out, flip),
            Case(f"mask-{name}", ["mask", m, "--spec", c.spec, "--auto", "-o", out], out, flip),
            Case(
                f"prune-{name}",
                ["prune", m, "--mask", c.mask, "-o", work / f"{name}.onnx"],
                work / f"{name}.onnx",
                flip,
            ),
        ]
    for name, mask in c.masks.items():
        out = work / "pruned.onnx"
        found.append(Case(f"prune-mask-{name}", ["prune", c.model, "--mask", mask, "-o", out], out))
    for name, spec in c.specs.items():
        out = work / "mask.json"
        argv: list[object] = ["mask", c.model, "--spec", spec, "--threshold", "0.1", "-o", out]
        found.append(Case(f"mask-spec-{name}", argv, out))
    for name, profile in c.profiles.items():
        found.append(
            Case(f"analyze-profile-{name}", ["analyze", c.model, "--device", profile], None)
        )
    for name, out in c.outputs.items():
        found += [
            Case(f"spec-out-{name}", ["spec", c.model, "-o", out], None),
            Case(f"prune-out-{name}", ["prune", c.model, "--mask", c.mask, "-o", out], None),
            Case(
                f"mask-plot-{name}",
                ["mask", c.model, "--spec", c.spec, "--auto", "-o", work / "m.json", "--plot", out],
                None,
            ),
        ]
    return found


def check_run(c: Corpus, case: Case, rc: int, err: str, before: dict[str, object]) -> None:
    assert "Traceback" not in err, (case.name, err)
    if rc == 0 and case.may_succeed:
        assert case.output is not None and case.output.exists(), case.name
        after = snapshot(c.root)
        created = set(after) - set(before)
        assert created <= {str(case.output), str(case.output) + ".data"}, (case.name, created)
        assert {k: v for k, v in after.items() if k in before} == before, case.name
        for p in created:
            Path(p).unlink()
        return
    assert rc == 1, (case.name, rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("morphonnx: error: "), (case.name, err)
    given = [str(a) for a in case.argv if isinstance(a, Path) and str(a)]
    assert any(g in lines[0] for g in given) or "empty output file name" in lines[0], (
        case.name,
        err,
    )
    assert snapshot(c.root) == before, case.name


def test_every_command_on_every_bad_file(
    corpus: Corpus, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process: about 200 runs, each bounded to 30 s."""
    ran = 0
    for case in cases(corpus):
        if any(case.name.endswith(b) for b in MEMORY_BOMBS):
            continue
        before = snapshot(corpus.root)
        rc, _, err = run_cli(capsys, *case.argv, seconds=30)
        check_run(corpus, case, rc, err, before)
        ran += 1
    assert ran > 150


SUBPROCESS_CASES = (
    "analyze-huge_weight",
    "prune-huge_fill",
    "analyze-cycle",
    "prune-truncated40",
    "prune-ext_escape",
    "prune-mask-nested",
    "analyze-profile-denormal",
    "prune-out-fifo",
)


def test_representative_cases_as_bounded_subprocesses(corpus: Corpus) -> None:
    """Real processes, in parallel, each limited to a few GB of address space and two minutes:
    the memory bombs fail before allocating, and stderr holds our one line only."""
    chosen = [case for case in cases(corpus) if case.name in SUBPROCESS_CASES]
    assert len(chosen) == len(SUBPROCESS_CASES)
    before = snapshot(corpus.root)
    procs = [(case, start_cli(*case.argv, cwd=corpus.root)) for case in chosen]
    for case, proc in procs:
        rc, _, err = finish(proc, 180)
        check_run(corpus, case, rc, err, before)
