"""The torch MorphNet regularizer (``morphonnx.adapters.torch.Regularizer``) on real torch models.

Costs and losses are checked against MorphNet's formulas written out by hand for each model (conv
geometry, alive counts, sums of |gamma|), not against the spec's own coefficients; pruning is
checked numerically: the sliced torch model, the zeroed torch model and onnxruntime on the output
of ``morphonnx prune`` agree.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402
from torch_models import ALL_MODELS, example_input  # noqa: E402

from morphonnx.adapters.torch import Regularizer, export_onnx, export_spec, torch_ops  # noqa: E402
from morphonnx.analysis import analyze  # noqa: E402
from morphonnx.cli import main as cli  # noqa: E402

V100_PEAK, V100_BW = 125000e9, 900e9
T = 1e-2  # threshold used throughout


# --------------------------------------------------------------------------- tiny models


class Chain(nn.Module):
    """conv(3->4) -> bn -> relu -> conv(4->5) -> bn -> relu -> pool -> linear(5->2), 6x6 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


class Depthwise(nn.Module):
    """1x1 (3->4) -> bn -> 3x3 depthwise (4) -> bn -> 1x1 (4->6) -> bn -> pool -> linear, 5x5."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(3, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.pw2 = nn.Conv2d(4, 6, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.pw1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.pw2(x)))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    """stem conv(3->4)-bn-relu; conv-bn-relu-conv-bn added to the stem; pool; linear. 6x6."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.c2(torch.relu(self.bn1(self.c1(s)))))
        return self.fc(torch.relu(s + y).mean((2, 3)))


class Roofline(nn.Module):
    """conv(3->128) 3x3 -> conv(128->128) 3x3 (compute-bound on V100) -> conv(128->4) 1x1
    (memory-bound) -> pool -> linear, 32x32 input; bn + relu after each conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 128, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(128)
        self.b = nn.Conv2d(128, 128, 3, padding=1, bias=False)
        self.bnb = nn.BatchNorm2d(128)
        self.c = nn.Conv2d(128, 4, 1, bias=False)
        self.bnc = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bna(self.a(x)))
        x = torch.relu(self.bnb(self.b(x)))
        x = torch.relu(self.bnc(self.c(x)))
        return self.fc(x.mean((2, 3)))


def _set(model: nn.Module, **values: list[float]) -> None:
    """Set BN gammas by module name (``bn1=[...]``)."""
    with torch.no_grad():
        for name, v in values.items():
            getattr(model, name).weight.copy_(torch.tensor(v))


def _randomize(model: nn.Module, seed: int = 0, dead: float = 0.4) -> None:
    """Random BN statistics and gammas, a share ``dead`` of them below the threshold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                alive = torch.rand(n, generator=g) > dead
                m.weight.copy_(torch.where(alive, torch.rand(n, generator=g) + 0.1, 1e-3))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _spec(model: nn.Module, x: torch.Tensor, tmp: Path, **export_kwargs: object) -> Path:
    path = tmp / "spec.json"
    export_spec(model, x, path, **export_kwargs)
    return path


def _conv_gemm_flops(path: Path) -> int:
    ops = analyze(path).costs
    return sum(c.flops for c in ops if c.op_type in ("Conv", "Gemm", "MatMul"))


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _alive_sum(v: list[float]) -> tuple[int, float]:
    """(alive count, sum of |v|) of a regularization vector."""
    a = [abs(x) for x in v]
    return sum(x > T for x in a), sum(a)


# --------------------------------------------------------------------------- closed forms


def test_pair_terms_flops_and_size(tmp_path: Path) -> None:
    model = Chain()
    x = torch.randn(1, 3, 6, 6)
    spec = _spec(model, x, tmp_path)
    g1, g2 = [1.0, -0.5, 0.001, 0.2], [0.3, 0.0, -2.0, 0.005, 0.1]
    _set(model, bn1=g1, bn2=g2)
    a1, r1 = _alive_sum(g1)
    a2, r2 = _alive_sum(g2)
    assert (a1, a2) == (3, 3)
    k = 2 * 6 * 6 * 9  # FLOPs per (in, out) channel pair of a 3x3 conv on 6x6

    reg = Regularizer(model, spec, cost="flops", threshold=T)
    assert reg.cost() == k * 3 * a1 + k * a1 * a2 + 2 * a2 * 2
    loss = reg.loss()
    want = k * 3 * r1 + k * (a1 * r2 + a2 * r1) + 2 * 2 * r2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()  # d/d gamma = sign(gamma) * (sum of coefficients times the other side's A)
    g1_grad = np.sign(g1) * (k * 3 + k * a2)
    g2_grad = np.sign(g2) * (k * a1 + 2 * 2)
    np.testing.assert_allclose(model.bn1.weight.grad.numpy(), g1_grad, rtol=1e-6)
    np.testing.assert_allclose(model.bn2.weight.grad.numpy(), g2_grad, rtol=1e-6)

    size = Regularizer(model, spec, cost="size", threshold=T)
    assert size.cost() == 9 * 3 * a1 + 9 * a1 * a2 + 1 * a2 * 2
    want = 9 * 3 * r1 + 9 * (a1 * r2 + a2 * r1) + 1 * 2 * r2
    assert size.loss().item() == pytest.approx(want, rel=1e-6)


def test_cost_follows_the_weights_between_calls(tmp_path: Path) -> None:
    """Coefficients are cached per set of alive counts: a channel dying or reviving updates both
    the cost and the loss, and the cached and the node-by-node evaluations agree."""
    model = Chain()
    spec = _spec(model, torch.randn(1, 3, 6, 6), tmp_path)
    k = 2 * 6 * 6 * 9
    reg = Regularizer(model, spec, threshold=T)
    for g1 in ([1.0, 0.5, 0.3, 0.2], [1.0, 0.005, 0.3, 0.2], [1.0, 0.5, 0.3, 0.2]):
        _set(model, bn1=g1, bn2=[0.3, 0.4, 0.5, 0.6, 0.7])
        a1, r1 = _alive_sum(g1)
        assert reg.cost() == k * 3 * a1 + k * a1 * 5 + 2 * 5 * 2
        assert reg.last_cost == reg.cost()
        want = k * 3 * r1 + k * (a1 * 2.5 + 5 * r1) + 2 * 2 * 2.5
        assert reg.loss().item() == pytest.approx(want, rel=1e-6)
    assert len(reg._coefficients) == 2


@pytest.mark.parametrize("cost", ["flops", "size", "latency"])
@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet_v2", "tiny_inception"])
def test_cached_linear_form_equals_direct_evaluation(name: str, cost: str, tmp_path: Path) -> None:
    model = ALL_MODELS[name]()
    spec = _spec(model, example_input(name), tmp_path)
    _randomize(model, seed=4)
    for kind in ("gamma", "group_lasso"):
        reg = Regularizer(model, spec, kind=kind, cost=cost, device="V100", l1_fraction=0.3)
        fast_cost, fast = reg.cost_and_loss()
        fast_grads = torch.autograd.grad(fast, list(reg._sources.values()))
        slow_cost, slow = reg._direct(reg.vectors())
        slow_grads = torch.autograd.grad(slow, list(reg._sources.values()))
        assert fast_cost == pytest.approx(slow_cost, rel=1e-12)
        assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
        for a, b in zip(fast_grads, slow_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_group_lasso_pair_terms(tmp_path: Path) -> None:
    model = Chain()
    x = torch.randn(1, 3, 6, 6)
    spec = _spec(model, x, tmp_path)
    with torch.no_grad():
        model.conv1.weight[1].mul_(1e-4)  # a dead filter
        model.conv2.weight[3].zero_()
    n1 = model.conv1.weight.detach().pow(2).mean((1, 2, 3)).sqrt().tolist()
    n2 = model.conv2.weight.detach().pow(2).mean((1, 2, 3)).sqrt().tolist()
    a1, r1 = _alive_sum(n1)
    a2, r2 = _alive_sum(n2)
    assert (a1, a2) == (3, 4)
    k = 2 * 6 * 6 * 9
    reg = Regularizer(model, spec, kind="group_lasso", threshold=T)
    assert reg.cost() == k * 3 * a1 + k * a1 * a2 + 2 * a2 * 2
    want = k * 3 * r1 + k * (a1 * r2 + a2 * r1) + 2 * 2 * r2
    loss = reg.loss()
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()  # the zeroed filter: a subgradient of 0, not sqrt's NaN at 0
    assert model.conv1.weight.grad.isfinite().all() and model.conv2.weight.grad.isfinite().all()
    assert not model.conv2.weight.grad[3].any() and model.conv2.weight.grad[2].any()
    l1 = Regularizer(model, spec, kind="group_lasso", threshold=T, l1_fraction=0.25)
    m1 = model.conv1.weight.detach().abs().mean((1, 2, 3))
    v1 = 0.75 * torch.tensor(n1) + 0.25 * m1
    got = l1.vectors()
    gid = next(g for g in got if got[g].shape[0] == 4)
    torch.testing.assert_close(got[gid].detach(), v1)


@pytest.mark.parametrize(
    ("shape", "axis"), [((4, 3, 2, 2), 0), ((5, 7), 1), ((3, 2, 4), 1), ((6,), 0)]
)
def test_filter_rms_value_and_gradient(shape: tuple[int, ...], axis: int) -> None:
    """The RMS group LASSO reads: torch's autograd check of its one-pass backward against finite
    differences, values against numpy, and gradient 0 (not NaN) at a filter of zeros."""
    rms = torch_ops().rms
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda t: rms(t, axis), (x.requires_grad_(),))
    others = tuple(a for a in range(len(shape)) if a != axis)
    v = x.detach().numpy()
    want = np.sqrt((v**2).mean(others)) if others else np.abs(v)
    np.testing.assert_allclose(rms(x, axis).detach().numpy(), want, rtol=1e-12)
    dead = x.detach().clone()
    dead.select(axis, 1).zero_()
    dead.requires_grad_()
    rms(dead, axis).sum().backward()
    assert dead.grad.isfinite().all() and not dead.grad.select(axis, 1).any()


def test_depthwise_term(tmp_path: Path) -> None:
    model = Depthwise()
    x = torch.randn(1, 3, 5, 5)
    spec = _spec(model, x, tmp_path)
    b1, b2 = [0.5, 0.001, 0.002, -0.3], [0.004, 0.2, 0.003, 0.1]
    b3 = [0.7, 0.0, 0.02, -0.001, 0.4, 0.005]
    _set(model, bn1=b1, bn2=b2, bn3=b3)
    d = [max(abs(p), abs(q)) for p, q in zip(b1, b2, strict=True)]  # one group: dw ties in, out
    ad, rd = _alive_sum(d)
    ae, re_ = _alive_sum(b3)
    assert (ad, ae) == (3, 3)
    hw = 5 * 5
    pw, dw = 2 * hw * 1, 2 * hw * 9
    reg = Regularizer(model, spec, threshold=T)
    assert reg.cost() == pw * 3 * ad + dw * ad + pw * ad * ae + 2 * ae * 2
    want = pw * 3 * rd + dw * (rd + rd) + pw * (ad * re_ + ae * rd) + 2 * 2 * re_
    assert reg.loss().item() == pytest.approx(want, rel=1e-6)
    assert {t["kind"] for t in reg.spec["costs"]} == {"pair", "depthwise"}


def test_residual_group_takes_max_over_sources(tmp_path: Path) -> None:
    model = Residual()
    x = torch.randn(1, 3, 6, 6)
    spec = _spec(model, x, tmp_path)
    b0, b2 = [0.5, 0.001, 0.0, -0.02], [0.1, 0.3, 0.005, 0.001]
    b1 = [0.2, 0.003, 0.4, 0.05]
    _set(model, bn0=b0, bn1=b1, bn2=b2)
    s = [max(abs(p), abs(q)) for p, q in zip(b0, b2, strict=True)]
    a_s, r_s = _alive_sum(s)
    a_b, r_b = _alive_sum(b1)
    assert (a_s, a_b) == (3, 3)
    k = 2 * 6 * 6 * 9
    reg = Regularizer(model, spec, threshold=T)
    assert reg.cost() == k * 3 * a_s + 2 * k * a_s * a_b + 2 * a_s * 2
    loss = reg.loss()
    want = k * 3 * r_s + 2 * k * (a_s * r_b + a_b * r_s) + 2 * 2 * r_s
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()  # the max routes each channel's gradient to its larger source only
    g0, g2 = model.bn0.weight.grad, model.bn2.weight.grad
    assert g0[0] != 0 and g2[0] == 0
    assert g0[1] == 0 and g2[1] != 0
    assert g0[3] != 0 and g2[3] == 0


def _roofline_op(hw_in, hw_out, k2, a_in, a_out, r_in, r_out, bias=0.0):
    """(cost, loss, branch) of one pair op on V100, fp32: MorphNet's roofline by hand."""
    flops = 2 * hw_out * k2 * a_in * a_out
    nbytes = 4 * (hw_in * a_in + hw_out * a_out + k2 * a_in * a_out + bias * a_out)
    if flops / V100_PEAK >= nbytes / V100_BW:
        return flops / V100_PEAK, 2 * hw_out * k2 * (a_in * r_out + a_out * r_in) / V100_PEAK, "c"
    mem = 4 * (hw_in * r_in + hw_out * r_out + k2 * (a_in * r_out + a_out * r_in) + bias * r_out)
    return nbytes / V100_BW, mem / V100_BW, "m"


def test_latency_compute_and_memory_bound(tmp_path: Path) -> None:
    model = Roofline()
    x = torch.randn(1, 3, 32, 32)
    spec = _spec(model, x, tmp_path)
    g = torch.Generator().manual_seed(0)
    va = (torch.rand(128, generator=g) + 0.1) * (torch.rand(128, generator=g) > 0.1)
    vb = (torch.rand(128, generator=g) + 0.1) * (torch.rand(128, generator=g) > 0.05)
    vc = [0.3, 0.001, 0.8, 0.2]
    _set(model, bna=va.tolist(), bnb=vb.tolist(), bnc=vc)
    aa, ra = _alive_sum(va.tolist())
    ab, rb = _alive_sum(vb.tolist())
    ac, rc = _alive_sum(vc)
    hw = 32 * 32
    ops = [
        _roofline_op(hw, hw, 9, 3, aa, 0.0, ra),
        _roofline_op(hw, hw, 9, aa, ab, ra, rb),
        _roofline_op(hw, hw, 1, ab, ac, rb, rc),
        _roofline_op(1, 1, 1, ac, 2, rc, 0.0, bias=1),
    ]
    assert [o[2] for o in ops] == ["m", "c", "m", "m"]  # both branches are exercised
    reg = Regularizer(model, spec, cost="latency", device="V100", threshold=T)
    assert reg.cost() == pytest.approx(sum(o[0] for o in ops), rel=1e-9)
    assert reg.loss().item() == pytest.approx(sum(o[1] for o in ops), rel=1e-5)
    # the latency of the full model agrees with `analyze` on V100 (all channels alive)
    full = Roofline()
    _set(full, bna=[1.0] * 128, bnb=[1.0] * 128, bnc=[1.0] * 4)
    export_onnx(full, x, tmp_path / "full.onnx")
    from morphonnx.devices import resolve_device

    a = analyze(tmp_path / "full.onnx", devices=[resolve_device("V100")])
    want = sum(c.latency(resolve_device("V100")) for c in a.costs if c.op_type in ("Conv", "Gemm"))
    got = Regularizer(full, spec, cost="latency", device="V100", threshold=T).cost()
    assert got == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------- cost == pruned cost


@pytest.mark.parametrize(
    "name", ["tiny_resnet", "tiny_mobilenet_v2", "tiny_inception", "tiny_densenet"]
)
def test_cost_equals_flops_of_pruned_model(name: str, tmp_path: Path) -> None:
    model = ALL_MODELS[name]()
    x = example_input(name)
    spec = _spec(model, x, tmp_path)
    _randomize(model, seed=3)
    sp = json.loads(spec.read_text())
    lone = next(g for g in sp["groups"] if g["prunable"] and len(g["regularize"]["gammas"]) == 1)
    with torch.no_grad():  # a group the threshold empties: the mask keeps its strongest channel
        model.get_parameter(lone["regularize"]["gammas"][0]["tensor"]).mul_(1e-4)
    export_onnx(model, x, tmp_path / "trained.onnx")
    reg = Regularizer(model, spec, threshold=T, onnx_path=tmp_path / "trained.onnx")
    result = reg.write_mask(tmp_path / "mask.json")
    assert result.rescued  # the emptied group kept one channel
    assert cli(["prune", str(tmp_path / "trained.onnx"), "--mask", str(tmp_path / "mask.json"),
                "-o", str(tmp_path / "pruned.onnx")]) == 0  # fmt: skip
    pruned = _conv_gemm_flops(tmp_path / "pruned.onnx")
    assert pruned < _conv_gemm_flops(tmp_path / "trained.onnx")
    assert reg.cost() == pruned

    # the mask is the one `morphonnx mask --threshold` makes from the trained export
    assert cli(["mask", str(tmp_path / "trained.onnx"), "--spec", str(spec), "--threshold",
                str(T), "-o", str(tmp_path / "cli_mask.json")]) == 0  # fmt: skip
    mine = json.loads((tmp_path / "mask.json").read_text())
    theirs = json.loads((tmp_path / "cli_mask.json").read_text())
    assert mine["groups"] == theirs["groups"]
    assert mine["model_fingerprint"] == theirs["model_fingerprint"]


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["gamma", "group_lasso"])
def test_gradients_reach_only_regularization_targets(kind: str, tmp_path: Path) -> None:
    model = ALL_MODELS["tiny_resnet"]()
    x = example_input("tiny_resnet")
    spec = _spec(model, x, tmp_path)
    Regularizer(model, spec, kind=kind).loss().backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    modules = dict(model.named_modules())
    want_type = nn.BatchNorm2d if kind == "gamma" else nn.Conv2d
    # fc is a graph output (not prunable): its weight is no target; nor are BN biases
    want = {f"{m}.weight" for m, mod in modules.items() if isinstance(mod, want_type)}
    assert graded == want
    assert any(model.get_parameter(n).grad.any() for n in want)


def test_exclude_counts_group_whole_and_stops_its_gradient(tmp_path: Path) -> None:
    model = Chain()
    x = torch.randn(1, 3, 6, 6)
    spec = _spec(model, x, tmp_path)
    _set(model, bn1=[1.0, 0.001, 0.002, 0.2], bn2=[0.3, 0.5, 2.0, 0.7, 0.1])
    sp = json.loads(spec.read_text())
    gid = next(
        g["id"] for g in sp["groups"] if any(m["tensor"] == "bn1.weight" for m in g["members"])
    )
    reg = Regularizer(model, spec, exclude=[gid])
    k = 2 * 6 * 6 * 9
    assert reg.cost() == k * 3 * 4 + k * 4 * 5 + 2 * 5 * 2  # bn1's group counts all 4 channels
    reg.loss().backward()
    assert model.bn1.weight.grad is None and model.bn2.weight.grad.any()
    assert set(reg.vectors()) == {g["id"] for g in sp["groups"] if g["prunable"]} - {gid}


def test_frozen_parameters_are_regularized_without_gradient(tmp_path: Path) -> None:
    """``requires_grad=False`` (a frozen backbone): same cost and loss, no gradient there."""
    model = Chain()
    _set(model, bn1=[1.0, -0.5, 0.001, 0.2], bn2=[0.3, 0.0, -2.0, 0.005, 0.1])
    spec = _spec(model, torch.randn(1, 3, 6, 6), tmp_path)
    want = Regularizer(model, spec)
    want_cost, want_loss = want.cost(), want.loss().item()
    for p in (*model.conv1.parameters(), *model.bn1.parameters()):
        p.requires_grad_(False)
    reg = Regularizer(model, spec)
    loss = reg.loss()
    assert (reg.cost(), loss.item()) == (want_cost, pytest.approx(want_loss, rel=1e-6))
    loss.backward()
    assert model.bn1.weight.grad is None and model.bn2.weight.grad.any()


# --------------------------------------------------------------------------- wrappers


def _ddp_worker(rank: int, world: int, store: str, spec: str, out: str) -> None:
    import torch.distributed as dist

    # a file store and the loopback device: no port to race for, no interface guessing
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Chain()
    _set(model, bn1=[1.0, -0.5, 0.001, 0.2], bn2=[0.3, 0.0, -2.0, 0.005, 0.1])
    ddp = nn.parallel.DistributedDataParallel(model)
    reg = Regularizer(ddp, spec)
    loss = reg.loss()
    task = ddp(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(rank)))
    (task.sum() + 1e-4 * loss).backward()  # a real DDP step: gradients all-reduced
    result = {"loss": loss.item(), "cost": reg.cost(), "grad": model.bn1.weight.grad.tolist()}
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # neither process leaves while the other still talks to it
    # Leave without gloo's teardown: on a loaded machine its threads can abort the process at
    # exit ("terminate called without an active exception") after the results are written.
    os._exit(0)


def test_ddp_two_processes_same_loss_as_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Chain()
    _set(model, bn1=[1.0, -0.5, 0.001, 0.2], bn2=[0.3, 0.0, -2.0, 0.005, 0.1])
    spec = _spec(model, torch.randn(1, 3, 6, 6), tmp_path)
    plain = Regularizer(model, spec)
    want_loss, want_cost = plain.loss().item(), plain.cost()
    torch.multiprocessing.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "ddp_store"), str(spec), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["loss"] == pytest.approx(want_loss, rel=1e-6)
        assert r["cost"] == want_cost
    assert results[0]["grad"] == pytest.approx(results[1]["grad"])  # DDP kept replicas in step


def test_prefixed_spec_names_and_data_parallel(tmp_path: Path) -> None:
    model = Chain()
    spec = _spec(model, torch.randn(1, 3, 6, 6), tmp_path)
    want = Regularizer(model, spec).loss().item()
    sp = json.loads(spec.read_text())  # as if exported from a DDP-wrapped, compiled model
    for g in sp["groups"]:
        for m in g["members"] + g["regularize"]["gammas"] + g["regularize"]["weights"]:
            m["tensor"] = "module._orig_mod." + m["tensor"]
    assert Regularizer(model, sp).loss().item() == pytest.approx(want)
    assert Regularizer(nn.DataParallel(model), sp).loss().item() == pytest.approx(want)
    assert Regularizer(nn.DataParallel(model), spec).loss().item() == pytest.approx(want)


def test_torch_compile_names_map(tmp_path: Path) -> None:
    model = ALL_MODELS["tiny_resnet"]()
    x = example_input("tiny_resnet", batch=2)
    spec = _spec(model, x[:1], tmp_path)
    want = Regularizer(model, spec).loss().item()
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    reg = Regularizer(compiled, spec)
    assert reg.loss().item() == pytest.approx(want)
    reg.loss().backward()
    assert model.bn1.weight.grad is not None
    model.layer2 = torch.compile(model.layer2, backend="eager")  # compiled submodule
    assert any("_orig_mod" in n for n, _ in model.named_parameters())
    model(x)
    assert Regularizer(model, spec).loss().item() == pytest.approx(want)


# --------------------------------------------------------------------------- stage 2


def _dead_member_slices(spec: dict, keep: dict[str, list[bool]]):
    """(tensor, axis, index) of every member slice of every dead channel, from the spec."""
    by_id = {g["id"]: g for g in spec["groups"]}
    for gid, alive in keep.items():
        for m in by_id[gid]["members"]:
            idx = [i for k, a in enumerate(alive) if not a for i in m["positions"][k]]
            if idx:
                yield m["tensor"], m["axis"], idx


def test_zero_dead_and_freeze_dead_survive_sgd_momentum(tmp_path: Path) -> None:
    model = ALL_MODELS["tiny_resnet"]().train()
    x = example_input("tiny_resnet", batch=4)
    y = torch.tensor([0, 1, 2, 3])
    spec = _spec(model, x[:1], tmp_path)
    _randomize(model, seed=1)
    reg = Regularizer(model, spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    def step() -> None:
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + 1e-7 * reg.loss()).backward()
        opt.step()

    for _ in range(2):  # momentum buffers are non-zero everywhere
        step()
    keep = reg.zero_dead_()
    state = dict(model.state_dict())
    sp = reg.spec
    slices = list(_dead_member_slices(sp, keep))
    assert slices
    for t, axis, idx in slices:
        assert not state[t].index_select(axis, torch.tensor(idx)).any()

    def dead_values() -> float:
        sd = model.state_dict()
        return max(float(sd[t].index_select(a, torch.tensor(i)).abs().max()) for t, a, i in slices)

    # without the optimizer, its momentum moves the zeroed weights again (why it is an argument)
    reg.freeze_dead(keep)
    step()
    assert dead_values() > 0.0

    reg.zero_dead_(keep)
    reg.freeze_dead(keep, optimizer=opt)
    for _ in range(3):
        step()
    assert dead_values() == 0.0
    assert reg.mask().keep == keep  # the dead stay dead, the rescued stay alive

    # a fresh optimizer created after freeze_dead needs nothing more
    reg.zero_dead_(keep)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        step()
    assert dead_values() == 0.0
    reg.unfreeze()


SLICE_MODELS = [
    "chain",
    "depthwise",
    "residual",
    "tiny_resnet",
    "tiny_se_resnet",
    "tiny_mobilenet_v2",
    "tiny_densenet",
    "tiny_inception",
    "tiny_grouped_conv",
    "tiny_flatten_head",
    "conv_transpose",
]


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    local = {"chain": (Chain, (3, 6, 6)), "depthwise": (Depthwise, (3, 5, 5))}
    local["residual"] = (Residual, (3, 6, 6))
    local["conv_transpose"] = (Upsampler, (3, 6, 6))
    if name in local:
        torch.manual_seed(0)
        cls, shape = local[name]
        return cls().eval(), torch.randn(4, *shape)
    return ALL_MODELS[name](), example_input(name, batch=4)


@pytest.mark.parametrize("name", SLICE_MODELS)
def test_slice_model_equals_zeroed_model_and_pruned_onnx(name: str, tmp_path: Path) -> None:
    model, x = _build(name)
    spec = _spec(model, x[:1], tmp_path, dynamic_batch=True)
    _randomize(model, seed=2)
    if name == "tiny_grouped_conv":  # a group channel is one channel of each of the 4 groups
        with torch.no_grad():
            model.features[0][1].weight[1::4] = 1e-3
            model.features[1][1].weight[2::4] = 1e-3
            model.features[1][1].weight[3::4] = 1e-3
    trained = tmp_path / "trained.onnx"
    export_onnx(model, x[:1], trained, dynamic_batch=True)
    reg = Regularizer(model, spec, onnx_path=trained)
    reg.write_mask(tmp_path / "mask.json")
    pruned = tmp_path / "pruned.onnx"
    assert (
        cli(["prune", str(trained), "--mask", str(tmp_path / "mask.json"), "-o", str(pruned)]) == 0
    )

    assert any(not all(k) for k in reg.mask().keep.values())
    reg.zero_dead_(tmp_path / "mask.json")
    small = reg.slice_model(tmp_path / "mask.json")
    convs = zip(model.modules(), small.modules(), strict=True)
    for big, cut in ((a, b) for a, b in convs if isinstance(a, nn.Conv2d) and a.groups > 1):
        depthwise = big.groups == big.in_channels
        assert cut.groups == (cut.in_channels if depthwise else big.groups)
    if name in ("tiny_grouped_conv", "tiny_mobilenet_v2", "depthwise"):
        assert any(
            isinstance(a, nn.Conv2d) and a.groups > 1 and b.out_channels < a.out_channels
            for a, b in zip(model.modules(), small.modules(), strict=True)
        )
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        want = model.eval()(x)
        got = small.eval()(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_ort(pruned, x), got.numpy(), atol=1e-5, rtol=0)
    for mod in small.modules():  # size attributes follow the weights
        if isinstance(mod, nn.Conv2d):
            assert mod.out_channels == mod.weight.shape[0]
            assert mod.in_channels == mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear):
            assert (mod.out_features, mod.in_features) == tuple(mod.weight.shape)
        elif isinstance(mod, nn.BatchNorm2d):
            assert mod.num_features == mod.weight.shape[0] == mod.running_var.shape[0]
    small.train()  # and it trains (stage 2)
    nn.functional.cross_entropy(small(x), torch.arange(4) % 2).backward()
    torch.optim.SGD(small.parameters(), lr=0.01).step()
    # the original is untouched by slicing
    assert sum(p.numel() for p in model.parameters()) > n_small


class ChannelScale(nn.Module):
    """A per-channel learned scale: a member of the channel group, in no covered layer type."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Upsampler(nn.Module):
    """conv-bn-relu -> [scale] -> ConvTranspose2d (x2) -> bn-relu -> pool -> linear."""

    def __init__(self, scale: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.scale = ChannelScale(6) if scale else nn.Identity()
        self.up = nn.ConvTranspose2d(6, 5, 2, stride=2, bias=True)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.relu(self.bn2(self.up(x))).mean((2, 3)))


def test_slice_model_refuses_uncovered_layers(tmp_path: Path) -> None:
    model = Upsampler(scale=True)
    spec = _spec(model, torch.randn(1, 3, 6, 6), tmp_path)
    _randomize(model, seed=5)
    reg = Regularizer(model, spec)
    assert any(not all(k) for k in reg.mask().keep.values())
    with pytest.raises(TypeError, match=r"cannot slice module 'scale' \(ChannelScale\)"):
        reg.slice_model()
    reg.zero_dead_()  # zeroing works for any member that is a parameter
    assert (model.scale.scale.detach()[0, :, 0, 0] == 0).any()


class TokenMLP(nn.Module):
    """A transformer MLP on (batch, tokens, dim): torch exports each Linear on 3-D inputs as
    ``MatMul(x, Transpose(weight))``, a folded view of the parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def test_linear_on_token_inputs_binds_the_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = TokenMLP().eval(), torch.randn(2, 5, 8)
    spec = json.loads(_spec(model, x, tmp_path).read_text())
    weights = {w["tensor"]: w["axis"] for g in spec["groups"] for w in g["regularize"]["weights"]}
    assert weights == {"fc1.weight": 0, "fc2.weight": 0, "head.weight": 0}
    with torch.no_grad():
        model.fc1.weight[[1, 4, 9]] = 1e-5
    reg = Regularizer(model, tmp_path / "spec.json", kind="group_lasso")
    assert reg.unmapped == []
    (hidden,) = [g for g in spec["groups"] if g["prunable"]]
    want = model.fc1.weight.detach().double().pow(2).mean(1).sqrt().numpy()
    np.testing.assert_allclose(reg.mask().values[hidden["id"]], want, rtol=1e-6)
    assert [i for i, k in enumerate(reg.mask().keep[hidden["id"]]) if not k] == [1, 4, 9]

    trained = tmp_path / "trained.onnx"
    export_onnx(model, x, trained)
    reg.write_mask(tmp_path / "mask.json")
    pruned = tmp_path / "pruned.onnx"
    assert (
        cli(["prune", str(trained), "--mask", str(tmp_path / "mask.json"), "-o", str(pruned)]) == 0
    )
    reg.zero_dead_()
    small = reg.slice_model()
    assert tuple(small.fc1.weight.shape) == (13, 8) and tuple(small.fc2.weight.shape) == (8, 13)
    with torch.no_grad():
        want_out, got = model(x), small(x)
    torch.testing.assert_close(got, want_out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_ort(pruned, x), got.numpy(), atol=1e-5, rtol=0)


class CountBranch(Chain):
    """A forward that branches on a channel count: the export traces the branch taken at the
    full width, so the ONNX prunes exactly, but the sliced torch model takes the other one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y * 2 if y.shape[1] == 4 else y
        return self.fc(torch.relu(self.bn2(self.conv2(y))).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean")
def test_slice_model_checks_itself_against_the_zeroed_model(tmp_path: Path) -> None:
    model = CountBranch()
    _set(model, bn1=[1.0, -0.5, 0.001, 0.2], bn2=[0.3, 0.0, -2.0, 0.005, 0.1])
    spec = _spec(model, torch.randn(1, 3, 6, 6), tmp_path)
    reg = Regularizer(model, spec)
    with pytest.raises(ValueError, match=r"does not compute what the zeroed one does \(output 0"):
        reg.slice_model()
    small = reg.slice_model(check=False)  # what the check saw: 2x off in the conv2 branch
    x = torch.randn(2, 3, 6, 6)
    reg.zero_dead_()
    with torch.no_grad():
        assert not torch.allclose(small.eval()(x), model.eval()(x), atol=1e-3)
    # the unmodified Chain slices and passes the same check, in train mode, and stays so
    plain = Chain()
    _set(plain, bn1=[1.0, -0.5, 0.001, 0.2], bn2=[0.3, 0.0, -2.0, 0.005, 0.1])
    plain.train().bn2.eval()
    spec = _spec(plain, torch.randn(1, 3, 6, 6), tmp_path)
    small = Regularizer(plain, spec).slice_model()
    assert small.conv1.out_channels == 3 and small.training and not small.bn2.training
    # a spec input without a fixed shape: nothing to run the check on, and a warning says so
    loose = json.loads(spec.read_text())
    loose["model"]["inputs"]["input"][0] = None
    with pytest.warns(UserWarning, match=r"input 'input' has no fixed shape .*not checked"):
        assert Regularizer(plain, loose).slice_model().conv1.out_channels == 3
    with pytest.raises(ValueError, match="has no fixed shape .*; pass example inputs"):
        Regularizer(plain, loose).slice_model(fold_constants=True)


class TokenIds(nn.Module):
    """Token ids (int64) -> Embedding -> Linear -> GELU -> Linear -> mean -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        return self.head((x + self.fc2(nn.functional.gelu(self.fc1(x)))).mean(1))


def test_slice_model_example_inputs_follow_the_input_types(tmp_path: Path) -> None:
    """The spec records input element types: ``slice_model`` (its check and its fold) feeds
    token ids as int64 zeros, not random floats an Embedding cannot take."""
    torch.manual_seed(0)
    model, ids = TokenIds().eval(), torch.randint(0, 20, (2, 5))
    spec = json.loads(_spec(model, ids, tmp_path).read_text())
    assert spec["model"]["input_types"] == {"input": "int64"}
    with torch.no_grad():
        model.fc1.weight[[2, 7]] = 1e-5
    reg = Regularizer(model, tmp_path / "spec.json", kind="group_lasso")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a check that could not run would warn
        small = reg.slice_model()
        folded = reg.slice_model(fold_constants=True)
    assert small.fc1.out_features == 14 == folded.fc1.out_features
    reg.zero_dead_()
    with torch.no_grad():
        torch.testing.assert_close(small(ids), model(ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- errors


def test_spec_of_another_width_is_refused(tmp_path: Path) -> None:
    from torch_models import TinyResNet

    spec = _spec(TinyResNet(width=8), torch.randn(1, 3, 16, 16), tmp_path)
    with pytest.raises(ValueError, match=r"does not fit the model: 'conv1.weight' has shape"):
        Regularizer(TinyResNet(width=16), spec)


def test_spec_with_reshaped_shapes_is_refused(tmp_path: Path) -> None:
    """torch's exports write parameters as they are: a spec saying a parameter was reshaped
    (as Keras' attention kernels are) comes from another export, and slicing it as if it were
    torch's would cut the wrong entries."""
    model = Chain()
    spec = json.loads(_spec(model, torch.randn(1, 3, 6, 6), tmp_path).read_text())
    c, i, kh, kw = spec["tensors"]["conv1.weight"]
    spec["tensors"]["conv1.weight"] = [c, i, kh * kw]
    with pytest.raises(ValueError, match="spec shapes differ from the model's for conv1.weight"):
        Regularizer(model, spec)


def test_spec_of_another_architecture_lists_missing_parameters(tmp_path: Path) -> None:
    spec = _spec(ALL_MODELS["tiny_mobilenet_v2"](), example_input("tiny_mobilenet_v2"), tmp_path)
    with pytest.raises(ValueError, match="not parameters of the model") as err:
        Regularizer(ALL_MODELS["tiny_resnet"](), spec)
    assert "stem.1.weight" in str(err.value) and "head.1.weight" in str(err.value)


def test_fingerprint_check_against_the_export(tmp_path: Path) -> None:
    model = Chain()
    x = torch.randn(1, 3, 6, 6)
    spec = _spec(model, x, tmp_path)
    export_onnx(Residual(), x, tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="was made for another model"):
        Regularizer(model, spec, onnx_path=tmp_path / "other.onnx")
    export_onnx(model, x, tmp_path / "mine.onnx")
    Regularizer(model, spec, onnx_path=tmp_path / "mine.onnx")


def test_bad_arguments(tmp_path: Path) -> None:
    model = Chain()
    spec = _spec(model, torch.randn(1, 3, 6, 6), tmp_path)
    with pytest.raises(ValueError, match="needs device"):
        Regularizer(model, spec, cost="latency")
    with pytest.raises(ValueError, match="kind must be"):
        Regularizer(model, spec, kind="l2")
    with pytest.raises(ValueError, match="no prunable group left"):
        Regularizer(model, spec, exclude=".*")


def test_export_structure_does_not_depend_on_equal_values(tmp_path: Path) -> None:
    """Biases of batch norms feeding one Add get equal gradients and stay equal through training;
    the exporter would alias them behind an Identity and change the fingerprint."""
    from morphonnx.formats import fingerprint

    model = Residual()
    x = torch.randn(1, 3, 6, 6)
    prints = []
    for fill in ("distinct", "equal", "fresh"):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    if fill == "fresh":
                        m.reset_parameters()
                        m.reset_running_stats()
                    else:
                        m.bias.copy_(torch.randn(4) if fill == "distinct" else torch.ones(4))
        export_onnx(model, x, tmp_path / f"{fill}.onnx")
        import onnx

        proto = onnx.load(str(tmp_path / f"{fill}.onnx"))
        assert not [n for n in proto.graph.node if n.op_type == "Identity"]
        prints.append(fingerprint(proto))
        with torch.no_grad():
            np.testing.assert_allclose(_ort(tmp_path / f"{fill}.onnx", x), model.eval()(x).numpy(),
                                       atol=1e-5)  # fmt: skip
    assert len(set(prints)) == 1
