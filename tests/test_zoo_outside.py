"""Robustness sweep over architectures from outside torchvision (``zoo_outside``): PyTorch
re-implementations exported as ``export_onnx`` writes them, and Keras applications exported with
tf2onnx (NHWC, BN folded; skipped without TensorFlow). For each:

- ``analyze`` succeeds and its MACs equal an independent count (torch forward hooks plus the
  attention MatMuls by hand; for Keras, the layer configs by formula);
- at least the groups the architecture obviously allows are prunable, and every other says why;
- a random mask keeping about half of every prunable group prunes to a model that passes
  ``onnx.checker``, equals the zeroed original tensor by tensor and costs what ``predict`` said.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from group_patterns import prune_verified  # noqa: E402
from torch_models import torch_macs_params  # noqa: E402
from zoo_models import extra_matmul_macs  # noqa: E402
from zoo_outside import (  # noqa: E402
    KERAS_INPUT,
    KERAS_OUTSIDE,
    TORCH_OUTSIDE,
    build_keras,
    build_torch,
    example_torch,
    keras_macs,
)

from morphonnx.adapters.torch import export_onnx  # noqa: E402
from morphonnx.analysis import analyze  # noqa: E402

MIN_PRUNABLE: dict[str, int] = {
    # stem; per bottleneck the reduce width, the split-attention width (position p of every
    # (cardinal, radix) block, with fc2's) and fc1's hidden width; the residual width
    "resnest": 8,
    # stem; per ghost module the primary width (its cheap depthwise copy is tied to it), the SE
    # squeeze, the stride-2 shortcut depthwise; the head conv
    "ghostnet": 7,
    # the widths after each stride (the 1x1 and 3x3 branches and the identity BN are summed)
    "repvgg": 3,
    # every conv but the stem-to-C3 residual widths: C3 cv1/cv2/cv3, bottleneck cv1, SPPF
    "cspdarknet": 19,
    # per block the MLP hidden width, q/k head dims and v head dims; the residual stream meets
    # LayerNorm
    "vit_mha": 6,
    # per block the token-mixing and channel-mixing hidden widths
    "mlp_mixer": 4,
    # the two branch widths and their inner convs through the exchange units, the fuse conv
    "hrnet": 7,
    # the MLP hidden width of each block; the stage widths meet LayerNorm
    "convnext": 2,
    # stem-and-residual width, per block the hierarchical chunks, the last conv
    "res2net": 11,
    # every pointwise width (the depthwise convs are tied to them); the logits meet Softmax
    "keras_mobilenet": 14,
    # expanded widths, SE squeezes, stage widths, the head
    "keras_mobilenet_v3_small": 27,
    "keras_efficientnet_b0": 40,
}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo_outside")


_EXPORTED: dict[str, tuple[Path, int]] = {}


def exported(name: str, folder: Path) -> tuple[Path, int]:
    """The model's ONNX file, exported once per session, with its independent MACs count."""
    if name not in _EXPORTED:
        path = folder / f"{name}.onnx"
        if name in TORCH_OUTSIDE:
            model, x = build_torch(name), example_torch(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(model, x, path)
            macs = torch_macs_params(model, x)[0] + extra_matmul_macs(model, x)
        else:
            tf = pytest.importorskip("tensorflow")
            tf2onnx = pytest.importorskip("tf2onnx")
            model = build_keras(name)
            spec = (tf.TensorSpec((1, *KERAS_INPUT), tf.float32, name="input"),)
            tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(path))
            macs = keras_macs(model)
        _EXPORTED[name] = (path, macs)
    return _EXPORTED[name]


NAMES = [*TORCH_OUTSIDE, *KERAS_OUTSIDE]


@pytest.mark.parametrize("name", NAMES)
def test_analyze_counts_and_groups(name: str, zoo_dir: Path) -> None:
    path, macs = exported(name, zoo_dir)
    a = analyze(path)
    assert a.totals.macs == macs
    prunable = [g for g in a.solution.groups if g.prunable]
    assert len(prunable) >= MIN_PRUNABLE[name], [(g.channels, g.reason) for g in a.solution.groups]
    assert all(g.prunable or g.reason for g in a.solution.groups)


@pytest.mark.parametrize("name", NAMES)
def test_random_mask_prunes_exactly(name: str, zoo_dir: Path) -> None:
    path, _ = exported(name, zoo_dir)
    prune_verified(path, seeds=(0,))
