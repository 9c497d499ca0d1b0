"""``expand`` (one width multiplier back to a cost budget), ``--round-to`` and the widths plot.

Every expanded structure is written as ONNX, checked by onnx.checker, run in onnxruntime and
re-analyzed: the costs ``analyze`` finds in the file must be within one rounding step under the
budget. Rounding is checked against a hand-written table and against the channel values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_cli import assert_one_line_error, run
from torch_models import build_model, example_input

from morphonnx.adapters.torch import Regularizer, export_onnx, export_spec
from morphonnx.analysis import Analysis, analyze
from morphonnx.devices import resolve_device
from morphonnx.expand import scaled
from morphonnx.formats import mask_document, read_mask
from morphonnx.mask import make_mask, rounded_count

PNG = b"\x89PNG\r\n\x1a\n"
PROFILE = 'name = "box"\npeak_gflops = 50\nmem_bandwidth_gbps = 10\noverhead_us = 2\n' + (
    "[peak_gflops_by_op]\nconv = 40\ndepthwise = 4\ngemm = 80\n"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("expand")
    for name in ("tiny_mobilenet_v2", "tiny_resnet"):
        export_onnx(build_model(name), example_input(name), out / f"{name}.onnx")
    (out / "box.toml").write_text(PROFILE)
    return out


def half_mask(a: Analysis, path: Path) -> dict[str, list[bool]]:
    """Every prunable group keeps every other channel; written as a mask file."""
    keep = {g.id: [i % 2 == 0 for i in range(g.channels)] for g in a.solution.groups if g.prunable}
    path.write_text(json.dumps(mask_document(a.fingerprint, keep)))
    return keep


def cost_of(a: Analysis, target: str) -> float:
    t = a.totals
    return float(t.flops) if target == "flops" else t.latency["box"]


@pytest.mark.parametrize("name", ["tiny_mobilenet_v2", "tiny_resnet"])
@pytest.mark.parametrize("target, round_to", [("flops", None), ("latency", None), ("flops", 4)])
def test_expand_hits_the_budget_within_one_step(
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    target: str,
    round_to: int | None,
) -> None:
    model, box = folder / f"{name}.onnx", folder / "box.toml"
    dev = resolve_device(str(box))
    a = analyze(model, devices=[dev])
    keep = half_mask(a, tmp_path / "mask.json")
    widths_json, out = tmp_path / "widths.json", tmp_path / "expanded.onnx"
    argv = ["expand", model, "--mask", tmp_path / "mask.json", "--target", target]
    argv += ["--device", box, "-o", widths_json, "--onnx", out]
    argv += ["--round-to", round_to] if round_to else []
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    doc = json.loads(widths_json.read_text())
    budget = cost_of(a, target)  # default budget: what the original costs
    assert doc["budget"] == pytest.approx(budget)

    onnx.checker.check_model(str(out), full_check=True)
    x = example_input(name).numpy()
    y = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    assert np.isfinite(y).all()
    b = analyze(out, devices=[dev])
    got = cost_of(b, target)
    assert got <= budget and got == pytest.approx(doc["cost"])

    # the structure is the mask's, scaled: each group's producer conv has the group's width
    step = round_to or 1
    widths = {gid: g["width"] for gid, g in doc["groups"].items()}
    for gid, w in widths.items():
        assert w % step == 0
        assert w == scaled(sum(keep[gid]), doc["multiplier"], round_to)
        producer = next(m.tensor for m in a.solution.group(gid).members if m.role == "producer")
        assert b.graph.shape(producer)[0] == w

    # one rounding step more in every group would exceed the budget
    wider = {gid: w + step for gid, w in widths.items()}
    _, t = a.costs_at(a.resized_shapes(wider))
    assert (float(t.flops) if target == "flops" else t.latency["box"]) > budget


def test_expand_to_a_budget_and_errors(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = folder / "tiny_resnet.onnx"
    a = analyze(model)
    keep = half_mask(a, tmp_path / "mask.json")
    budget = a.predict(keep)[1].flops * 0.7  # below what the mask costs: the widths shrink
    out = tmp_path / "w.json"
    argv = ["expand", model, "--mask", tmp_path / "mask.json", "--target", "flops", "-o", out]
    rc, _, err = run(capsys, *argv, "--budget", budget)
    assert rc == 0, err
    doc = json.loads(out.read_text())
    assert doc["cost"] <= budget and doc["multiplier"] < 1
    out.unlink()
    rc, _, err = run(capsys, *argv, "--budget", 10)
    assert rc == 1 and not out.exists()
    assert_one_line_error(err, "narrowest structure")


@pytest.mark.parametrize(
    "alive, channels, k, want",
    [(5, 16, 4, 4), (6, 16, 4, 8), (1, 16, 4, 4), (15, 16, 8, 16), (15, 12, 8, 8), (3, 3, 8, 3)],
)
def test_rounded_count(alive: int, channels: int, k: int, want: int) -> None:
    assert rounded_count(alive, channels, k) == want


def test_round_to_keeps_the_strongest_channels() -> None:
    rng = np.random.default_rng(0)
    values = {f"g{i}": rng.uniform(0, 1, n) for i, n in enumerate((16, 24, 10, 3, 64))}
    for k in (2, 4, 8):
        result = make_mask(values, 0.5, round_to=k)
        for gid, keep in result.keep.items():
            vec, alive = values[gid], np.array(keep)
            n = int(alive.sum())
            assert n % k == 0 or n == len(vec)
            assert n == rounded_count(max(1, int((vec > 0.5).sum())), len(vec), k)
            if 0 < n < len(vec):  # every kept channel is stronger than every dropped one
                assert vec[alive].min() > vec[~alive].max()


def test_mask_cli_and_torch_adapter_round_alike(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = build_model("tiny_resnet")
    spec = tmp_path / "spec.json"
    export_spec(net, example_input("tiny_resnet"), spec)
    model = folder / "tiny_resnet.onnx"
    out = tmp_path / "mask.json"
    argv = ["mask", model, "--spec", spec, "--threshold", "0.8", "--round-to", "4", "-o", out]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    _, groups = read_mask(out)
    for keep in groups.values():
        assert sum(keep) % 4 == 0 or sum(keep) == len(keep)
    reg = Regularizer(net, str(spec), threshold=0.8)
    adapter = tmp_path / "adapter.json"
    reg.write_mask(adapter, round_to=4)
    assert read_mask(adapter)[1] == groups


def test_prune_plot_widths(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = folder / "tiny_mobilenet_v2.onnx"
    a = analyze(model)
    half_mask(a, tmp_path / "mask.json")
    png = tmp_path / "widths.png"
    argv = ["prune", model, "--mask", tmp_path / "mask.json", "-o", tmp_path / "p.onnx"]
    rc, _, err = run(capsys, *argv, "--no-verify", "--plot", png)
    assert rc == 0, err
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 1000
