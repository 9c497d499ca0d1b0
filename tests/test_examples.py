"""The digits examples (``examples/digits_morphnet.py``, ``examples/digits_keras.py``) in their
``--quick`` mode, run as a user runs them: as scripts, in a subprocess, on real data.

Each run checks itself (the script stops if the pruned ONNX model or the sliced model differs
from the framework model with its dead channels zeroed); here the written results are checked
against what must hold whatever the training did: the regularizer's predicted cost equals the
FLOPs that ``analyze`` counts on the pruned file, and pruning with ``--fold-constants`` keeps
what the regularized model learned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "framework", "needs"),
    [
        ("digits_morphnet.py", "torch", ["torch", "matplotlib"]),
        ("digits_keras.py", "keras", ["tensorflow", "tf2onnx"]),
    ],
)
def test_digits_example_quick(
    tmp_path: Path, script: str, framework: str, needs: list[str]
) -> None:
    for module in ["sklearn", "onnxruntime", *needs]:
        pytest.importorskip(module)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / f"results_{framework}.json").read_text())
    base = res["baseline"]["flops"]
    (run,) = res["runs"]
    assert run["flops"] < 0.8 * base
    assert run["flops"] == run["predicted_flops"]
    assert run["percent_of_baseline"] == pytest.approx(100.0 * run["flops"] / base)
    assert run["max_abs_diff_onnx_vs_zeroed"] <= 1e-4
    assert run["max_abs_diff_sliced_vs_zeroed"] <= 1e-4
    # pruned with the fold, the model keeps what it learned (without: the BN shifts are lost)
    assert abs(run["acc_pruned_folded"] - run["acc_regularized"]) <= 1.0
    # the table's last column is the accuracy after fine-tuning, printed against the baseline
    delta = run["acc_finetuned"] - res["baseline"]["accuracy"]
    assert f"{run['acc_finetuned']:.2f} {delta:+7.2f}" in r.stdout
    if framework == "torch":
        assert (out / "accuracy_vs_flops.png").stat().st_size > 0
        assert (out / "flops_vs_step.png").stat().st_size > 0
