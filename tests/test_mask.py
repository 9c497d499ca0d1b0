"""``morphonnx mask``: from trained weights to alive/dead channels.

Gammas and filters are set by hand in small PyTorch models before export, so every expected mask
is known exactly: ``--threshold`` keeps |gamma| > T, ``--auto`` finds the gap of a bimodal set and
keeps everything when there is none, a threshold that would empty a group keeps its strongest
channel, group LASSO serves models without batch norm, and residual sources combine by OR. The
costs the command prints must be those of the model ``prune`` then writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_runner import run

from morphonnx.report import seconds, si

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch_models import randomize_bn  # noqa: E402

from morphonnx.adapters.torch import export_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "tiny_resnet.onnx"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BNNet(nn.Module):
    """conv1-bn1-relu -> conv2-bn2-relu -> pool -> fc: two prunable groups, one gamma each."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Any) -> Any:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class PlainNet(nn.Module):
    """The same without batch norm: only group LASSO on the filters can rank channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Any) -> Any:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ResidualNet(nn.Module):
    """y = relu(bn_a(conv_a(x))); out = relu(y + bn_b(conv_b(y))): one group, two gammas."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Any) -> Any:
        y = torch.relu(self.bn_a(self.conv_a(x)))
        out = torch.relu(y + self.bn_b(self.conv_b(y)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def export(net: nn.Module, path: Path, **params: list[float] | np.ndarray) -> Path:
    """Seeded weights, distinct BN statistics, then ``params`` (name -> values) set by hand."""
    randomize_bn(net)
    with torch.no_grad():
        state = dict(net.named_parameters())
        for name, values in params.items():
            state[name.replace("__", ".")].copy_(torch.as_tensor(np.asarray(values)))
    export_onnx(
        net.eval(), torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)), path
    )
    return path


def spec_and_mask(
    capsys: pytest.CaptureFixture[str], model: Path, *how: object
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``spec`` then ``mask ... how``: (spec, mask document, mask stdout)."""
    spec_path, mask_path = model.with_suffix(".spec.json"), model.with_suffix(".mask.json")
    assert run(capsys, "spec", model, "-o", spec_path)[0] == 0
    rc, out, err = run(capsys, "mask", model, "--spec", spec_path, *how, "-o", mask_path)
    assert rc == 0, err
    return json.loads(spec_path.read_text()), json.loads(mask_path.read_text()), out


def gid_of(spec: dict[str, Any], gamma_or_weight: str) -> str:
    for g in spec["groups"]:
        reg = g["regularize"]
        if any(s["tensor"] == gamma_or_weight for s in reg["gammas"] + reg["weights"]):
            return g["id"]
    raise KeyError(gamma_or_weight)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


# --------------------------------------------------------------------------- thresholds


def test_threshold_keeps_exactly_the_gammas_above_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gammas = [0.01, 0.5, -0.02, 0.3, 0.25, -0.6, 0.2, 0.001]  # 0.25 == T: not above, dies
    model = export(BNNet(), tmp_path / "bn.onnx", bn1__weight=gammas, bn2__weight=[1.0] * 8)
    spec, mask, out = spec_and_mask(capsys, model, "--threshold", "0.25")
    assert mask["format"] == "morphonnx.mask" and mask["version"] == 1
    assert mask["model_fingerprint"] == spec["model"]["fingerprint"]
    assert mask["threshold"] == 0.25 and mask["kind"] == "gamma" and mask["rescued"] == []
    g1, g2 = gid_of(spec, "bn1.weight"), gid_of(spec, "bn2.weight")
    assert mask["groups"][g1] == [abs(g) > 0.25 for g in gammas]
    assert mask["groups"][g2] == [True] * 8
    prunable = {g["id"] for g in spec["groups"] if g["prunable"]}
    assert set(mask["groups"]) == prunable == {g1, g2}
    assert "strongest" not in out


def test_auto_threshold_in_the_gap_of_a_bimodal_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    dead = [True, False] * 4
    bn1 = [1e-4 * (1 + rng.random()) if d else 0.5 + 0.3 * rng.random() for d in dead]
    bn2 = [1e-4 * (1 + rng.random()) if not d else 0.5 + 0.3 * rng.random() for d in dead]
    model = export(BNNet(), tmp_path / "bimodal.onnx", bn1__weight=bn1, bn2__weight=bn2)
    spec, mask, out = spec_and_mask(capsys, model, "--auto")
    low = max(v for v in bn1 + bn2 if v < 0.01)
    assert low < mask["threshold"] < 0.5
    assert mask["groups"][gid_of(spec, "bn1.weight")] == [not d for d in dead]
    assert mask["groups"][gid_of(spec, "bn2.weight")] == dead
    assert "widest gap" in out and "8 of 16 channels below" in out


def test_auto_threshold_keeps_everything_without_a_gap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    model = export(
        BNNet(),
        tmp_path / "unimodal.onnx",
        bn1__weight=0.5 + rng.random(8),
        bn2__weight=0.5 + rng.random(8),
    )
    _, mask, out = spec_and_mask(capsys, model, "--auto")
    assert all(all(keep) for keep in mask["groups"].values())
    assert "keeping all" in out


def test_auto_threshold_keeps_zero_gammas_without_a_gap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """All-zero gammas are not bimodal either: 'keeping all' must keep them all."""
    model = export(BNNet(), tmp_path / "zeros.onnx", bn1__weight=[0.0] * 8, bn2__weight=[0.0] * 8)
    _, mask, out = spec_and_mask(capsys, model, "--auto")
    assert "keeping all" in out
    assert all(all(keep) for keep in mask["groups"].values())
    assert mask["rescued"] == []


def test_threshold_that_empties_a_group_keeps_its_strongest_channel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bn1 = [0.01, 0.02, 0.03, 0.01, 0.05, 0.08, -0.09, 0.02]  # all below 0.1; strongest: index 6
    bn2 = [0.5, 0.01, 0.5, 0.01, 0.5, 0.01, 0.5, 0.01]
    model = export(BNNet(), tmp_path / "rescue.onnx", bn1__weight=bn1, bn2__weight=bn2)
    plot = tmp_path / "hist.png"
    spec, mask, out = spec_and_mask(capsys, model, "--threshold", "0.1", "--plot", plot)
    g1, g2 = gid_of(spec, "bn1.weight"), gid_of(spec, "bn2.weight")
    assert mask["groups"][g1] == [i == 6 for i in range(8)]
    assert mask["groups"][g2] == [v > 0.1 for v in bn2]
    assert mask["rescued"] == [g1]
    line = next(line for line in out.splitlines() if "kills every channel" in line)
    assert g1 in line and g2 not in line and "strongest" in line
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert f"wrote {plot}" in out


# --------------------------------------------------------------------------- group LASSO


def test_group_lasso_without_batch_norm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1[[1, 4, 6]] *= 1e-5  # three filters trained to ~zero
    model = export(PlainNet(), tmp_path / "plain.onnx", conv1__weight=w1)
    spec, mask, out = spec_and_mask(capsys, model, "--kind", "group_lasso", "--auto")
    g1, g2 = gid_of(spec, "conv1.weight"), gid_of(spec, "conv2.weight")
    regularize = {g["id"]: g["regularize"] for g in spec["groups"]}
    assert regularize[g1]["gammas"] == regularize[g2]["gammas"] == []
    assert mask["kind"] == "group_lasso"
    assert mask["groups"][g1] == [i not in (1, 4, 6) for i in range(8)]
    assert all(mask["groups"][g2])

    # --threshold on the norms by hand: per filter sqrt(mean(w^2)), mixed with mean|w| by L1
    rms = np.sqrt((w1.astype(np.float64) ** 2).reshape(8, -1).mean(1))
    l1 = np.abs(w1.astype(np.float64)).reshape(8, -1).mean(1)
    for fraction, values in ((0.0, rms), (0.5, 0.5 * rms + 0.5 * l1), (1.0, l1)):
        t = float(np.sort(values)[5] + np.sort(values)[6]) / 2  # keeps exactly two
        mask_path = tmp_path / f"l1_{fraction}.json"
        argv = ["mask", model, "--spec", model.with_suffix(".spec.json"), "--kind", "group_lasso"]
        argv += ["--l1-fraction", fraction, "--threshold", t, "-o", mask_path]
        rc, _, err = run(capsys, *argv)
        assert rc == 0, err
        got = json.loads(mask_path.read_text())["groups"][g1]
        assert got == (values > t).tolist() and sum(got) == 2

    # the default kind falls back to group LASSO where a group has no gamma
    argv = ["mask", model, "--spec", model.with_suffix(".spec.json"), "--auto"]
    rc, _, _ = run(capsys, *argv, "-o", tmp_path / "default.json")
    assert rc == 0
    assert json.loads((tmp_path / "default.json").read_text())["groups"] == mask["groups"]
    rc, _, err = run(capsys, *argv, "--l1-fraction", "2", "-o", tmp_path / "bad.json")
    assert rc == 1 and "--l1-fraction" in err and not (tmp_path / "bad.json").exists()


# --------------------------------------------------------------------------- combined sources


def test_residual_sources_combine_by_or(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ga = [0.5, 0.01, 0.01, 0.5, 0.02, 0.3, 0.01, 0.01]
    gb = [0.01, 0.5, 0.01, 0.5, 0.01, 0.01, 0.4, 0.02]
    model = export(ResidualNet(), tmp_path / "res.onnx", bn_a__weight=ga, bn_b__weight=gb)
    spec, mask, _ = spec_and_mask(capsys, model, "--threshold", "0.1")
    gid = gid_of(spec, "bn_a.weight")
    assert gid == gid_of(spec, "bn_b.weight")  # both gammas regularize one group
    assert mask["groups"][gid] == [a > 0.1 or b > 0.1 for a, b in zip(ga, gb, strict=True)]
    pruned = tmp_path / "res_pruned.onnx"
    rc, out, err = run(
        capsys, "prune", model, "--mask", model.with_suffix(".mask.json"), "-o", pruned
    )
    assert rc == 0, err
    assert "verification passed" in out


# --------------------------------------------------------------------------- printed costs


def _row(out: str, title: str, label: str) -> list[str]:
    table = out[out.index(title) :]
    line = next(line for line in table.splitlines() if line.startswith(f"│ {label} "))
    return [cell.strip() for cell in line.split("│")[2:-1]]


def test_printed_costs_are_those_of_the_pruned_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(BUNDLED, model)
    spec_path, mask_path = tmp_path / "s.json", tmp_path / "k.json"
    assert run(capsys, "spec", model, "-o", spec_path)[0] == 0
    argv = ["mask", model, "--spec", spec_path, "--threshold", "0.9", "-o", mask_path]
    rc, out, err = run(capsys, *argv, "--device", "V100", "--device", "T4")
    assert rc == 0, err
    title = "Costs before and after"
    macs_before, macs_after = (int(v.replace(",", "")) for v in _row(out, title, "MACs"))
    params_before, params_after = (int(v.replace(",", "")) for v in _row(out, title, "params"))

    pruned, report = tmp_path / "p.onnx", tmp_path / "p.json"
    assert run(capsys, "prune", model, "--mask", mask_path, "-o", pruned)[0] == 0
    argv = ["analyze", pruned, "--device", "V100", "--device", "T4", "--json", report]
    assert run(capsys, *argv)[0] == 0
    after = json.loads(report.read_text())["totals"]
    argv = ["analyze", model, "--json", tmp_path / "o.json"]
    assert run(capsys, *argv)[0] == 0
    before = json.loads((tmp_path / "o.json").read_text())["totals"]

    assert (macs_before, params_before) == (before["macs"], before["params"])
    assert (macs_after, params_after) == (after["macs"], after["params"])
    assert macs_after < macs_before
    assert _row(out, title, "FLOPs") == [si(before["flops"]), si(after["flops"])]
    for dev in ("V100", "T4"):
        shown = _row(out, title, f"latency {dev}")[1]
        assert shown == seconds(after["latency_s"][dev])

    kept = json.loads(mask_path.read_text())["groups"]
    total = _row(out, "Channels kept per group", "total")
    assert int(total[0]) == sum(sum(v) for v in kept.values())


def test_mask_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "s.json"
    assert run(capsys, "spec", BUNDLED, "-o", spec)[0] == 0
    out = tmp_path / "m.json"
    for how in (["--threshold", "0.1", "--auto"], [], ["--threshold", "nan"]):
        rc, _, err = run(capsys, "mask", BUNDLED, "--spec", spec, *how, "-o", out)
        assert rc != 0
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists()
