"""``Regularizer.slice_model(fold_constants=True)``: stage 2 starts from the trained function.

Real torch models whose dead channels have gammas exactly zero (so the model *is* its own
scale-zeroed version): the folded slice must compute what the model computes; the plain slice
must not (the dead channels' batch-norm shifts are lost)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from morphonnx.adapters.torch import Regularizer, export_spec  # noqa: E402


def conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class Net(nn.Module):
    def __init__(self, k2: int) -> None:
        super().__init__()
        self.a = conv_bn(3, 4, 3)
        self.b = conv_bn(4, 6, k2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def trained_like(tmp_path: Path, k2: int) -> tuple[Net, Regularizer, torch.Tensor]:
    """Random weights and BN statistics; gammas of a's channels 1, 3 and b's 2, 5 exactly zero."""
    torch.manual_seed(0)
    model = Net(k2)
    with torch.no_grad():
        for bn, dead in ((model.a[1], [1, 3]), (model.b[1], [2, 5])):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0.2, 1.0)  # positive: survives the ReLU
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight[dead] = 0
    model.eval()
    x = torch.randn(8, 3, 6, 6)
    export_spec(model, x[:1], tmp_path / "spec.json")
    return model, Regularizer(model, tmp_path / "spec.json", threshold=1e-2), x


def test_folded_slice_computes_the_trained_function(tmp_path: Path) -> None:
    model, reg, x = trained_like(tmp_path, 1)
    with torch.no_grad():
        want = model(x).numpy()
        plain = reg.slice_model().eval()(x).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 1x1 convs and a Linear: exact, no border warning
            small = reg.slice_model(fold_constants=True).eval()
        got = small(x).numpy()
    assert small.a[0].out_channels == 2 and small.b[0].out_channels == 4
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(plain - want).max() > 1e-2  # without the fold the shifts are lost
    assert small.b[0].bias is not None  # a bias was created where the conv had none


def test_padded_consumer_folds_the_interior_value_and_warns(tmp_path: Path) -> None:
    model, reg, _ = trained_like(tmp_path, 3)
    with pytest.warns(UserWarning, match="zero-padded borders"):
        small = reg.slice_model(fold_constants=True)
    # the interior of conv b sees every tap of the dead channels' constant (BN with gamma 0 in
    # eval mode outputs its shift, then ReLU)
    w = model.b[0].weight.detach().numpy()[[0, 1, 3, 4]][:, [1, 3]]  # kept outputs, dead inputs
    dead = torch.relu(model.a[1].bias.detach()[[1, 3]]).numpy()
    want = w.sum(axis=(2, 3)) @ dead
    np.testing.assert_allclose(small.b[0].bias.detach().numpy(), want, rtol=1e-5)


def test_folded_slice_of_linears_on_token_inputs(tmp_path: Path) -> None:
    """A transformer MLP on (batch, tokens, dim), group LASSO: dead hidden units have zero weight
    rows but a bias, so each outputs GELU(bias) on every token; the folded slice adds that,
    through fc2 (exported as ``MatMul(x, Transpose(fc2.weight))``), to fc2's bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].weight[[2, 7, 11]] = 0
        model[0].bias[[2, 7, 11]] = torch.tensor([0.5, -0.3, 1.2])
    x = torch.randn(2, 5, 8)
    export_spec(model, x, tmp_path / "spec.json")
    reg = Regularizer(model, tmp_path / "spec.json", kind="group_lasso")
    with torch.no_grad():
        want = model(x).numpy()
        plain = reg.slice_model().eval()(x).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no padding: exact, no border warning
            small = reg.slice_model(fold_constants=True, example_inputs=x).eval()
        got = small(x).numpy()
    assert small[0].out_features == 13 and small[2].in_features == 13
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(plain - want).max() > 1e-2
