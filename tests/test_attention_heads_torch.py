"""Whole attention heads in torch exports: timm's ViT/DeiT attention (fused qkv reshaped 5-D,
unbind; written out or through scaled_dot_product_attention), Hugging Face BERT's (separate
q, k, v, ``view`` targets from sizes, an additive mask input), ``nn.MultiheadAttention``
(scaled_dot_product_attention, and the explicit path when the weights are asked for) and the
zoo's ViT with separate q, k, v; static and dynamic batch. Heads found with no hint, pruned by
random sets of heads and verified in onnxruntime, MACs of each pruned model equal to a hand
count."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from group_patterns import prune_verified
from onnx_builders import group_of, member
from test_attention_heads import attention_macs, dropping, head_blocks, saved

from morphonnx.analysis import Analysis, analyze

torch = pytest.importorskip("torch")
nn = torch.nn


class TimmAttention(nn.Module):
    """timm's ViT / DeiT attention: one qkv Linear, reshape [B, N, 3, H, D], permute, unbind;
    ``fused``: torch's scaled_dot_product_attention (timm's default), else written out."""

    def __init__(self, dim: int, heads: int, head_dim: int, fused: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, head_dim, fused
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            y = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class BertAttention(nn.Module):
    """Hugging Face BERT's self-attention: q, k, v Linears, ``view(size()[:-1] + (H, D))`` and
    permute, scores divided by sqrt(D), plus the additive attention mask ``[B, 1, 1, N]``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.size()[:-1] + (self.heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        y = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).contiguous()
        return self.o(y.view(y.size()[:-2] + (self.heads * self.head_dim,)))


class GroupedQueryAttention(nn.Module):
    """Llama-style grouped-query attention: ``kv_heads`` k and v heads, each repeated for
    ``heads // kv_heads`` q heads (``expand`` + ``reshape``, as ``repeat_kv`` does)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q, self.o = nn.Linear(dim, heads * head_dim), nn.Linear(heads * head_dim, dim)
        self.k, self.v = (nn.Linear(dim, kv_heads * head_dim) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        q = self.q(x).view(b, n, h, d).transpose(1, 2)
        k, v = (p(x).view(b, n, kvh, d).transpose(1, 2) for p in (self.k, self.v))
        k, v = (t[:, :, None].expand(b, kvh, h // kvh, n, d).reshape(b, h, n, d) for t in (k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, h * d))


class MultiQueryAttention(nn.Module):
    """Multi-query attention (PaLM, Falcon): one k and one v head shared by every q head,
    broadcast in q·kᵀ and ·v (``[B, 1, N, D]`` against ``[B, H, N, D]``)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q, self.o = nn.Linear(dim, heads * head_dim), nn.Linear(heads * head_dim, dim)
        self.k, self.v = nn.Linear(dim, head_dim), nn.Linear(dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.q(x).view(b, n, h, d).transpose(1, 2)
        k, v = (p(x).view(b, n, 1, d).transpose(1, 2) for p in (self.k, self.v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, h * d))


class Block(nn.Module):
    """Linear in, attention with a residual add, Linear out (E = heads·head_dim for torch's
    MultiheadAttention); BERT's attention also reads the mask input."""

    def __init__(self, attn: nn.Module, need_weights: bool = False) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, 12), attn, nn.Linear(12, 5)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.inp(x)
        if isinstance(self.attn, nn.MultiheadAttention):
            z = self.attn(y, y, y, need_weights=self.need_weights)[0]
        elif mask is not None:
            z = self.attn(y, mask)
        else:
            z = self.attn(y)
        return self.out(y + z)


OUT_PROJ = ("attn.out_proj.weight", 1)  # MultiheadAttention: a Gemm with transB
TORCH_ATTENTION: dict[str, tuple[Callable[[], nn.Module], tuple[str, int]]] = {
    # the exporter's Transpose of a Linear weight is folded: the member is its output
    "timm": (lambda: Block(TimmAttention(12, 3, 4)), ("/attn/proj/Transpose_output_0", 0)),
    "timm_sdpa": (
        lambda: Block(TimmAttention(12, 3, 4, True)),
        ("/attn/proj/Transpose_output_0", 0),
    ),
    "bert": (lambda: Block(BertAttention(12, 3)), ("/attn/o/Transpose_output_0", 0)),
    "mha_sdpa": (lambda: Block(nn.MultiheadAttention(12, 3, batch_first=True)), OUT_PROJ),
    "mha_weights": (
        lambda: Block(nn.MultiheadAttention(12, 3, batch_first=True), True),
        OUT_PROJ,
    ),
}
"""Each model, and the output projection's weight with the axis of its input rows."""


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return TORCH_ATTENTION[name][0]().eval()


def export(name: str, dynamic: bool, folder: Path) -> Path:
    from morphonnx.adapters.torch import export_onnx

    model = build(name)
    path = folder / f"{name}.onnx"
    x = torch.randn(1, 6, 8)
    inputs = (x, torch.zeros(1, 1, 1, 6)) if name == "bert" else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, inputs, path, dynamic_batch=dynamic)
    return path


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", sorted(TORCH_ATTENTION))
def test_torch_attention_whole_heads(name: str, dynamic: bool, tmp_path: Path) -> None:
    """Three heads of 4 found with no hint, pruned by random sets of heads and verified, MACs
    of each pruned model equal to the hand count (Linears plus the attention MatMuls). Torch's
    MultiheadAttention exported with a dynamic batch splits its heads into ``batch x heads``,
    computed at run time: that group stops with the reason, the rest still prunes."""
    path = export(name, dynamic, tmp_path)
    proj, axis = TORCH_ATTENTION[name][1]
    sol = analyze(path, attention="heads").solution
    g = group_of(sol, proj, axis)
    if dynamic and name.startswith("mha"):
        assert not g.prunable
        assert any("target computed at run time" in (h.reason or "") for h in sol.groups)
        prune_verified(path, seeds=(0,), attention="heads")
        return
    assert g.prunable and g.channels == 3
    assert member(g, proj, axis).positions == head_blocks(3, 4)
    masks = dropping(proj, axis)
    a = analyze(path, attention="heads")
    for seed, model in enumerate(prune_verified(path, (0, 1), "heads", masks)):
        kept = sum(masks(a, seed)[g.id])
        n, e = 6, 12
        linears = n * 8 * e + n * e * 5
        b = analyze(saved(model, tmp_path / f"pruned{seed}.onnx"))
        assert b.totals.macs == linears + attention_macs(kept, 4, e=e, n=n)
        assert attention_heads(b) == {kept}


def attention_heads(a: Analysis) -> set[int]:
    """The head count of every MatMul between two activations (q·kᵀ, ·v): the axis before
    their matrices ([B, H, N, N], or torch's [B*H, N, N] at batch 1)."""
    g = a.graph
    found = set()
    for node in g.nodes:
        if node.op_type == "MatMul" and not any(g.is_const(t) for t in node.inputs):
            shape = g.shape(node.outputs[0])
            assert shape is not None
            found.add(shape[-3])
    return found


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_grouped_query_attention(dynamic: bool, tmp_path: Path) -> None:
    """Four q heads over two k/v heads: each k/v head and its two q heads are one channel of
    the heads group (pruned whole), and per head dim q·k and v dims prune as before; the
    ``expand`` shape, computed at run time with the count as a constant, is rewritten."""
    from morphonnx.adapters.torch import export_onnx

    torch.manual_seed(0)
    model = Block(GroupedQueryAttention(12, 4, 2, 3)).eval()
    path = tmp_path / "gqa.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, torch.randn(1, 6, 8), path, dynamic_batch=dynamic)
    proj = ("/attn/o/Transpose_output_0", 0)
    g = group_of(analyze(path, attention="heads").solution, *proj)
    assert g.prunable and g.channels == 2
    assert member(g, *proj).positions == [list(range(6)), list(range(6, 12))]
    assert member(g, "attn.k.bias", 0).positions == head_blocks(2, 3)
    masks = dropping(*proj)
    a = analyze(path, attention="heads")
    for seed, pruned in enumerate(prune_verified(path, (0,), "heads", masks)):
        kept = 2 * sum(masks(a, seed)[g.id])  # q heads
        b = analyze(saved(pruned, tmp_path / "pruned.onnx"))
        kv = 6 * 12 * 2 * kept // 2 * 3  # k and v projections: half as many heads
        q_o = 6 * 12 * kept * 3 * 2  # q and output projections
        attn = 2 * 6 * 6 * kept * 3
        assert b.totals.macs == 6 * 8 * 12 + 6 * 12 * 5 + kv + q_o + attn
        assert attention_heads(b) == {kept}
    dims = analyze(path).solution
    assert [g.channels for g in dims.groups if g.prunable] == [12, 3, 3]
    prune_verified(path, seeds=(0,))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_multi_query_attention(dynamic: bool, tmp_path: Path) -> None:
    """Whole q heads prune while the one shared k and v head (broadcast against them) stays,
    with that reason; MACs by hand. Per head dim, q·k dims and v dims prune as usual."""
    from morphonnx.adapters.torch import export_onnx

    torch.manual_seed(0)
    model = Block(MultiQueryAttention(12, 4, 3)).eval()
    path = tmp_path / "mqa.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, torch.randn(1, 6, 8), path, dynamic_batch=dynamic)
    proj = ("/attn/o/Transpose_output_0", 0)
    sol = analyze(path, attention="heads").solution
    g = group_of(sol, *proj)
    assert g.prunable and g.channels == 4
    assert member(g, *proj).positions == head_blocks(4, 3)
    shared = [h for h in sol.groups if "one shared head" in (h.reason or "")]
    assert sorted(h.channels for h in shared) == [3, 3] and not any(h.prunable for h in shared)
    masks = dropping(*proj)
    a = analyze(path, attention="heads")
    for seed, pruned in enumerate(prune_verified(path, (0, 1), "heads", masks)):
        kept = sum(masks(a, seed)[g.id])
        b = analyze(saved(pruned, tmp_path / "pruned.onnx"))
        q_o = 2 * 6 * 12 * 3 * kept  # q and output projections
        k_v = 2 * 6 * 12 * 3
        attn = 2 * 6 * 6 * 3 * kept
        assert b.totals.macs == 6 * 8 * 12 + q_o + k_v + attn + 6 * 12 * 5
        assert attention_heads(b) == {kept}
    dims = analyze(path).solution
    assert sorted(g.channels for g in dims.groups if g.prunable) == [3, 3, 12]
    prune_verified(path, seeds=(0,))


@pytest.mark.parametrize("name", ["mha_sdpa", "timm_sdpa"])
def test_torch_sdpa_scale_stops_head_dims(name: str, tmp_path: Path) -> None:
    """Per head dim, torch's scaled_dot_product_attention reads ``1/sqrt(head_dim)`` from q's
    shape: removing dims would change the scale, so the q·k dims stop with that reason (whole
    heads keep the head dim and prune, above)."""
    path = export(name, False, tmp_path)
    sol = analyze(path).solution
    stopped = [g for g in sol.groups if "used as data at node" in (g.reason or "")]
    assert stopped and all(g.channels == 4 and not g.prunable for g in stopped)
    prune_verified(path, seeds=(0,))


def test_vit_with_separate_qkv_prunes_whole_heads(tmp_path: Path) -> None:
    """The zoo's ViT (separate q, k, v Linears, torch ``view`` targets from shapes, blocks of
    3 and 2 heads): one group of whole heads per block, pruned with random masks and verified."""
    from zoo_outside import build_torch, example_torch

    from morphonnx.adapters.torch import export_onnx

    path = tmp_path / "vit.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(build_torch("vit_mha"), example_torch("vit_mha"), path)
    sol = analyze(path, attention="heads").solution
    heads = [group_of(sol, f"blocks.{i}.attn.q.bias", 0) for i in range(2)]
    assert [(g.prunable, g.channels) for g in heads] == [(True, 3), (True, 2)]
    assert member(heads[0], "blocks.0.attn.v.bias", 0).positions == head_blocks(3, 8)
    assert member(heads[1], "/blocks/blocks.1/attn/out/Transpose_output_0", 0).positions == (
        head_blocks(2, 6)
    )
    prune_verified(path, seeds=(0,), attention="heads")


@pytest.mark.parametrize("name", ["timm", "bert"])
def test_adapter_regularizes_and_masks_whole_heads(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The torch adapter on a spec of whole heads: every weight binds (a Linear on 3-D inputs
    exports a folded Transpose of its parameter; the spec names the parameter), a head's value
    is the largest RMS of its q, k and v rows (computed here from the torch weights), and the
    mask it writes prunes that head and verifies."""
    from cli_runner import run

    from morphonnx.adapters.torch import Regularizer, export_onnx, export_spec

    model, x = build(name), torch.randn(1, 6, 8)
    inputs = (x, torch.zeros(1, 1, 1, 6)) if name == "bert" else x
    attn = model.attn
    weights = [attn.qkv.weight] if name == "timm" else [attn.q.weight, attn.k.weight, attn.v.weight]
    with torch.no_grad():
        for w in weights:  # rows of head h: h*4 .. h*4+3 of each 12 (q, k, v); head 1 dies
            w[[r for r in range(w.shape[0]) if r % 12 // 4 == 1]] *= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = export_spec(model, inputs, tmp_path / "spec.json", attention="heads")
        export_onnx(model, inputs, tmp_path / "trained.onnx")
    assert spec["attention"] == "heads"
    (heads,) = [g for g in spec["groups"] if g["prunable"] and g["channels"] == 3]
    reg = Regularizer(model, tmp_path / "spec.json", kind="group_lasso")
    assert reg.unmapped == []
    want = [
        max(
            w.detach()
            .double()[[r for r in range(w.shape[0]) if r % 12 // 4 == h]]
            .pow(2)
            .mean(1)
            .sqrt()
            .max()
            .item()
            for w in weights
        )
        for h in range(3)
    ]
    np.testing.assert_allclose(reg.mask().values[heads["id"]], want, rtol=1e-6)
    reg.write_mask(tmp_path / "mask.json")
    mask = json.loads((tmp_path / "mask.json").read_text())
    assert mask["attention"] == "heads" and mask["groups"][heads["id"]] == [True, False, True]
    rc, _, err = run(
        capsys,
        "prune",
        tmp_path / "trained.onnx",
        "--mask",
        tmp_path / "mask.json",
        "-o",
        tmp_path / "pruned.onnx",
    )
    assert rc == 0, err
    assert attention_heads(analyze(tmp_path / "pruned.onnx")) == {2}
    # torch's slice_model cannot change the module's own head count: it says so, it does not
    # hand back a model whose next forward fails
    with pytest.raises(ValueError, match="fails where the zeroed one runs .*num_heads"):
        reg.slice_model(tmp_path / "mask.json", example_inputs=inputs)
    unchecked = reg.slice_model(tmp_path / "mask.json", example_inputs=inputs, check=False)
    with pytest.raises(RuntimeError):
        unchecked(*inputs) if name == "bert" else unchecked(inputs)
