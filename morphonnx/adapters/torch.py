"""PyTorch -> ONNX export tuned for structure analysis.

``morphonnx`` analyses ONNX graphs, so the export must keep the structure the
analysis needs: BatchNormalization nodes are *not* folded into convolutions (their
gammas carry the MorphNet regularisation signal) and initializer names stay equal
to ``state_dict()`` keys (so a pruning spec maps back onto the PyTorch model).

torch is imported only inside functions: importing this module must not require
torch, and the core package never imports it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = ["Regularizer", "export_onnx", "export_spec", "torch_ops", "unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Wrappers would prefix parameter names (``module.``/``_orig_mod.``) and, for
    compiled modules, route export through the compiler; the bare module gives
    initializer names that match the user's own ``state_dict()``.
    """
    import torch

    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, parallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            break
    return model


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration; restores every submodule's own training flag after.

    Restoring per submodule (not ``model.train(flag)``) keeps deliberately frozen
    parts (e.g. BN layers kept in eval during fine-tuning) as the caller left them.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    kind = type(example_inputs).__name__
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {kind}")


def _count_outputs(model: torch.nn.Module, args: tuple[Any, ...]) -> int | None:
    """Number of flat tensor outputs, or None when the output structure is not a flat tuple."""
    import torch

    with torch.no_grad():
        out = model(*args)
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return len(out)
    return None


def _default_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def export_onnx(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = False,
    opset: int = 17,
) -> None:
    """Export ``model`` to ONNX at ``path``, keeping BN nodes and state_dict names.

    Uses the TorchScript exporter (``dynamo=False``) without constant folding: that
    combination leaves BatchNormalization unfused and names initializers after
    ``state_dict()`` keys. The model runs in eval mode (its training flags are restored
    afterwards) and DDP/DataParallel/``torch.compile`` wrappers are removed first.

    Unnamed inputs/outputs become ``input``/``output`` (``input_0``, ``input_1``...
    when there are several). ``dynamic_batch`` marks axis 0 of every input and output
    as ``batch``. The file is written to a temp file next to ``path`` and moved into
    place with ``os.replace`` so readers never see a half-written model.

    The exporter de-duplicates tensors with *identical values* behind Identity nodes: fresh
    batch norms (all ones/zeros), and also trained ones that stay equal for good, such as the
    biases of two batch norms feeding the same residual Add (they get the same gradient). That
    would make the graph's structure (its fingerprint, see ``morphonnx spec``) depend on weight
    values, so every such Identity whose output is a ``state_dict()`` key is replaced by a copy of
    the tensor under that key: each parameter and buffer is its own initializer, always.
    """
    import torch

    model = unwrap_model(model)
    args = _as_tuple(example_inputs)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))

    with _eval_mode(model):
        in_names = (
            list(input_names) if input_names is not None else _default_names("input", len(args))
        )
        out_names: list[str] | None
        if output_names is not None:
            out_names = list(output_names)
        else:
            n_out = _count_outputs(model, args)
            out_names = _default_names("output", n_out) if n_out is not None else None

        dynamic_axes: dict[str, dict[int, str]] | None = None
        if dynamic_batch:
            dynamic_axes = {name: {0: "batch"} for name in [*in_names, *(out_names or [])]}

        # A fresh unique name (not mkstemp, whose 0600 mode would survive os.replace).
        tmp_path = os.path.join(
            directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        )
        try:
            with warnings.catch_warnings():
                # dynamo=False is deliberate (see docstring); silence its deprecation notice.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
                torch.onnx.export(
                    model,
                    args,
                    tmp_path,
                    dynamo=False,
                    do_constant_folding=False,
                    opset_version=opset,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_axes=dynamic_axes,
                )
            keys = [k for k, _ in model.named_parameters(remove_duplicate=False)]
            keys += [k for k, _ in model.named_buffers(remove_duplicate=False)]
            _reduplicate(tmp_path, keys)
            os.replace(tmp_path, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp_path)
            raise


_REDUPLICATE_LIMIT = 1_800_000_000
"""Above this file size the export is left as the exporter wrote it (protobuf's 2 GB limit)."""


def _reduplicate(path: str, keys: list[str]) -> None:
    """Undo the exporter's value de-duplication: ``Identity(init) -> key`` becomes an initializer
    ``key`` (a copy), for every output ``key`` that names a parameter or buffer of the model.
    Initializers named after ``keys`` are then put in ``keys`` order (others after them, as they
    were), so the file does not depend on which tensors happened to be equal."""
    import onnx

    if os.path.getsize(path) > _REDUPLICATE_LIMIT:
        return
    model = onnx.load(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    known = set(keys)
    aliases = [
        n
        for n in g.node
        if n.op_type == "Identity"
        and len(n.input) == 1
        and n.input[0] in inits
        and n.output[0] in known
        and n.output[0] not in inits
        and n.output[0] not in graph_outputs
    ]
    for n in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[n.input[0]])
        copy.name = n.output[0]
        g.initializer.append(copy)
    drop = {id(n) for n in aliases}
    nodes = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    rank = {k: i for i, k in enumerate(keys)}
    order = sorted(
        range(len(g.initializer)), key=lambda i: (rank.get(g.initializer[i].name, len(rank)), i)
    )
    if not aliases and order == sorted(order):
        return
    tensors = [g.initializer[i] for i in order]
    del g.initializer[:]
    g.initializer.extend(tensors)
    onnx.save(model, path)


# --------------------------------------------------------------------------- MorphNet regularizer

_WRAPPER_PREFIXES = ("module", "_orig_mod")
_COVERED = (
    "Conv1d/2d/3d (incl. grouped and depthwise), ConvTranspose1d/2d/3d (groups=1), Linear, "
    "BatchNorm1d/2d/3d, SyncBatchNorm"
)


def torch_ops() -> Any:
    """:class:`morphonnx.regularize.ArrayOps` for torch tensors (counts carry no gradient).

    Cheap on the common case: a gather by identity positions (one slice per channel, in order:
    every plain conv/BN channel) is a view, and a max over a singleton axis a squeeze, so their
    backward passes cost nothing. Where the core's ``ArrayOps`` takes an ``index`` function
    (positions -> index array), index tensors are built once per spec entry and reused."""
    from dataclasses import fields

    import numpy as np
    import torch

    from morphonnx.regularize import ArrayOps, positions_index

    moved: dict[tuple[int, str], tuple[Any, Any]] = {}

    def take(x: Any, idx: Any) -> Any:
        if isinstance(idx, _Index):
            if idx.identity and idx.n == x.shape[0]:
                return x.unsqueeze(1)
            idx = idx.tensor
        elif not isinstance(idx, torch.Tensor):
            if idx.shape[1] == 1 and idx.shape[0] == x.shape[0]:
                if np.array_equal(idx[:, 0], np.arange(idx.shape[0])):
                    return x.unsqueeze(1)
            return x[torch.as_tensor(idx, device=x.device)]
        if idx.device != x.device:
            key = (id(idx), str(x.device))
            if key not in moved:
                moved[key] = (idx, idx.to(x.device))  # holding idx keeps its id unique
            idx = moved[key][1]
        return x[idx]

    def amax(x: Any, axis: int) -> Any:
        return x.squeeze(axis) if x.shape[axis] == 1 else torch.amax(x, dim=axis)

    extra: dict[str, Any] = {}
    if "index" in {f.name for f in fields(ArrayOps)}:
        built: dict[int, tuple[Any, _Index]] = {}

        def index(positions: list[list[int]]) -> _Index:
            hit = built.get(id(positions))
            if hit is None or hit[0] is not positions:
                hit = built[id(positions)] = (positions, _Index(positions_index(positions)))
            return hit[1]

        extra["index"] = index

    return ArrayOps(
        rows=lambda x, axis: torch.movedim(x, axis, 0).reshape(x.shape[axis], -1),
        take=take,
        amax=amax,
        maximum=torch.maximum,
        count=lambda x: float(x.sum().item()),
        **extra,
    )


class _Index:
    """A positions index built once: the torch tensor, and whether it is the identity."""

    def __init__(self, idx: Any) -> None:
        import numpy as np
        import torch

        self.n = idx.shape[0]
        self.identity = idx.shape[1] == 1 and bool(np.array_equal(idx[:, 0], np.arange(self.n)))
        self.tensor = torch.from_numpy(idx)


class _Linear:
    """``constant + sum_g terms[g] * R_g``: what the core's loss is, given the alive counts.
    Only linear operations are defined; anything else is a TypeError."""

    __slots__ = ("constant", "terms")

    def __init__(self, terms: dict[str, float] | None = None, constant: float = 0.0) -> None:
        self.terms = terms or {}
        self.constant = constant

    @staticmethod
    def of(x: Any) -> _Linear:
        if isinstance(x, _Linear):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return _Linear(constant=float(x))
        raise TypeError(f"not a linear form: {type(x).__name__}")

    def __add__(self, other: Any) -> _Linear:
        o = _Linear.of(other)
        terms = dict(self.terms)
        for k, v in o.terms.items():
            terms[k] = terms.get(k, 0.0) + v
        return _Linear(terms, self.constant + o.constant)

    __radd__ = __add__

    def __mul__(self, other: Any) -> _Linear:
        if isinstance(other, _Linear) or not isinstance(other, (int, float)):
            raise TypeError("a product of two sums is not linear")
        f = float(other)
        return _Linear({k: v * f for k, v in self.terms.items()}, self.constant * f)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> _Linear:
        if isinstance(other, _Linear) or not isinstance(other, (int, float)):
            raise TypeError("division by a sum is not linear")
        return self * (1.0 / float(other))

    def __neg__(self) -> _Linear:
        return self * -1.0

    def __sub__(self, other: Any) -> _Linear:
        return self + (-_Linear.of(other))

    def __rsub__(self, other: Any) -> _Linear:
        return _Linear.of(other) + (-self)


class _SymbolicVector:
    """A group's regularization vector as the cost formula sees it: its alive count (already
    thresholded, at least 1) and a symbolic sum."""

    __slots__ = ("alive", "gid")

    def __init__(self, gid: str, alive: float) -> None:
        self.gid = gid
        self.alive = alive

    def __gt__(self, threshold: Any) -> float:
        return self.alive

    def sum(self) -> _Linear:
        return _Linear({self.gid: 1.0})


def _symbolic_ops() -> Any:
    from morphonnx.regularize import ArrayOps

    def unused(*_: Any) -> Any:
        raise TypeError("the cost formula used a vector operation")

    return ArrayOps(rows=unused, take=unused, amax=unused, maximum=unused, count=float)


def _canonical(name: str) -> str:
    """A tensor name without wrapper segments: leading ``module.`` (DDP/DataParallel) and any
    ``_orig_mod.`` (torch.compile, also on compiled submodules)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in _WRAPPER_PREFIXES:
        parts.pop(0)
    return ".".join(p for p in parts if p != "_orig_mod") or name


def _onnx_fingerprint(path: str | os.PathLike[str]) -> str:
    import onnx

    from morphonnx.formats import fingerprint

    return fingerprint(onnx.load(os.fspath(path), load_external_data=False))


def _channel_index(member: dict[str, Any], channels: Sequence[int]) -> list[int]:
    return [i for k in channels for i in member["positions"][k]]


class Regularizer:
    """MorphNet's differentiable cost regularizer for a PyTorch model, driven by a group spec.

    ``spec`` is the ``morphonnx spec`` JSON (a path or the loaded dict) of the model's export
    (:func:`export_onnx`, or :func:`export_spec`). Spec tensor names are ``state_dict()`` keys; DDP
    (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes are handled on both sides.

    * ``kind``: ``gamma`` (|batch-norm scale|; groups without one fall back to group LASSO) or
      ``group_lasso`` (per-filter ``sqrt(mean(w^2))`` of the producing weights, mixed with
      ``mean(|w|)`` by ``l1_fraction``).
    * ``cost``: ``flops``, ``size`` (weights) or ``latency`` (roofline on ``device``: a built-in
      name such as ``"V100"``, a ``.json``/``.toml`` profile path or a ``Device``).
    * ``threshold``: a channel is alive while its value exceeds it (counts in cost and loss).
    * ``exclude``: group ids or regexes (full match) not to regularize; they count fully alive.
    * ``onnx_path``: the model's export; when given, the spec must carry its fingerprint.

    The formulas are :mod:`morphonnx.regularize`'s; this class only maps names and wraps torch.
    A group never counts fewer than one alive channel (``write_mask`` keeps the strongest one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: str | os.PathLike[str] | dict[str, Any],
        kind: str = "gamma",
        cost: str = "flops",
        threshold: float = 1e-2,
        device: Any = None,
        l1_fraction: float = 0.0,
        exclude: str | Sequence[str] = (),
        onnx_path: str | os.PathLike[str] | None = None,
    ) -> None:
        from morphonnx.devices import Device, resolve_device
        from morphonnx.regularize import COSTS, KINDS, select_groups, source_tensors
        from morphonnx.spec import read_spec

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        if not 0.0 <= l1_fraction <= 1.0:
            raise ValueError(f"l1_fraction must be within 0..1, got {l1_fraction}")
        if isinstance(device, (str, os.PathLike)):
            device = resolve_device(os.fspath(device))
        elif device is not None and not isinstance(device, Device):
            raise TypeError("device must be a name, a profile path or a morphonnx Device")
        if cost == "latency" and device is None:
            raise ValueError("cost='latency' needs device= (e.g. 'V100' or a profile file)")
        where = "spec" if isinstance(spec, dict) else os.fspath(spec)
        if not isinstance(spec, dict):
            spec = read_spec(spec)
        if onnx_path is not None:
            fp = _onnx_fingerprint(onnx_path)
            if spec["model"].get("fingerprint") != fp:
                raise ValueError(
                    f"{where} was made for another model: fingerprint "
                    f"{spec['model'].get('fingerprint')} != {fp} of {os.fspath(onnx_path)}"
                )

        self.model = model
        self.spec = spec
        self.kind = kind
        self.cost_kind = cost
        self.threshold = float(threshold)
        self.device = device
        self.l1_fraction = float(l1_fraction)
        self.where = where
        self.groups = select_groups(spec, [exclude] if isinstance(exclude, str) else exclude)
        self.fingerprint: str = spec["model"].get("fingerprint", "")
        self._ops = torch_ops()
        self._hooks: list[Any] = []
        self._linear = True  # see cost_and_loss
        self._coefficients: dict[tuple[float, ...], Any] = {}

        bare = unwrap_model(model)
        self._names = self._map_names(bare)
        params = {id(p) for p in bare.parameters()}
        sources = source_tensors({"groups": self.groups}, kind)
        bad = [n for n in sources if n not in self._names or id(self._get(bare, n)) not in params]
        if bad:
            raise ValueError(
                f"{where}: {len(bad)} regularization tensor(s) of the spec are not parameters of "
                f"the model (is the spec for this architecture?): {', '.join(bad)}"
            )
        self._check_shapes(bare)
        self._sources = {n: self._get(bare, n) for n in sources}
        self.unmapped = sorted(
            {m["tensor"] for g in spec["groups"] for m in g["members"]} - set(self._names)
        )
        if not self.vectors():
            raise ValueError(
                f"{where}: no prunable group left to regularize (all excluded, or none has a "
                "batch-norm gamma or producing weight); the loss would stay 0"
            )
        self.last_cost: float | None = None

    # ------------------------------------------------------------------ names

    def _map_names(self, bare: torch.nn.Module) -> dict[str, str]:
        """Spec tensor name -> the model's own name (parameter or buffer)."""
        own = [n for n, _ in bare.named_parameters(remove_duplicate=False)]
        own += [n for n, _ in bare.named_buffers(remove_duplicate=False)]
        exact = set(own)
        canon: dict[str, str | None] = {}
        for n in own:
            c = _canonical(n)
            canon[c] = n if canon.get(c, n) == n else None  # ambiguous -> None
        mapping: dict[str, str] = {}
        for g in self.spec["groups"]:
            for m in g["members"]:
                t = m["tensor"]
                if t in exact:
                    mapping[t] = t
                elif canon.get(_canonical(t)):
                    mapping[t] = canon[_canonical(t)]  # type: ignore[assignment]
        return mapping

    def _get(self, module: torch.nn.Module, spec_name: str) -> Any:
        path, _, attr = self._names[spec_name].rpartition(".")
        return getattr(module.get_submodule(path) if path else module, attr)

    def _check_shapes(self, bare: torch.nn.Module) -> None:
        covered: dict[tuple[str, int], set[int]] = {}
        for g in self.spec["groups"]:
            for m in g["members"]:
                if m["tensor"] in self._names:
                    key = (m["tensor"], int(m["axis"]))
                    covered.setdefault(key, set()).update(i for p in m["positions"] for i in p)
        for (name, axis), idx in covered.items():
            shape = tuple(self._get(bare, name).shape)
            if axis >= len(shape) or len(idx) != shape[axis] or max(idx) >= shape[axis]:
                raise ValueError(
                    f"{self.where}: spec does not fit the model: '{name}' has shape "
                    f"{list(shape)} in the model, the spec covers {len(idx)} channel slices "
                    f"up to index {max(idx)} on axis {axis} (is it another architecture?)"
                )

    # ------------------------------------------------------------------ cost and loss

    def vectors(self, tensors: dict[str, Any] | None = None) -> dict[str, Any]:
        """Regularization vector (one value per channel) of every regularized group."""
        from morphonnx.regularize import group_vector

        src = self._sources if tensors is None else tensors
        out = {}
        for g in self.groups:
            vec = group_vector(self._ops, g, src, self.kind, self.l1_fraction)
            if vec is not None:
                out[g["id"]] = vec
        return out

    def cost_and_loss(self) -> tuple[float, torch.Tensor]:
        """(cost of the alive structure, differentiable MorphNet loss) in one pass.

        The loss is linear in the regularization vectors once the alive counts are fixed (they
        carry no gradient), so it is ``sum_g c_g * sum(vector_g)``. The coefficients ``c_g`` and
        the cost come from :func:`morphonnx.regularize.cost_and_loss` itself, evaluated on
        symbolic sums, and are cached per set of alive counts, which changes rarely: a step costs
        the vectors, one count per group and one dot product. Should the core's formula ever
        stop being linear in the sums, the loss is evaluated directly instead."""
        import torch

        vectors = self.vectors()
        if not self._linear:
            return self._direct(vectors)
        with torch.no_grad():
            alive = torch.stack([(v > self.threshold).sum() for v in vectors.values()])
            counts = tuple(max(1.0, float(c)) for c in alive.tolist())
        hit = self._coefficients.get(counts)
        if hit is None:
            try:
                hit = self._symbolic(vectors, counts)
            except TypeError:
                self._linear = False
                return self._direct(vectors)
            if len(self._coefficients) > 4096:
                self._coefficients.clear()
            self._coefficients[counts] = hit
        value, constant, coefficients = hit
        flat = torch.cat([v.reshape(-1) for v in vectors.values()])
        dtype = torch.promote_types(flat.dtype, torch.float32)  # coefficients overflow fp16
        key = (str(flat.device), dtype)
        if key not in coefficients:
            coefficients[key] = coefficients["cpu64"].to(device=flat.device, dtype=dtype)
        loss = torch.dot(flat.to(dtype), coefficients[key])
        loss = loss + constant if constant else loss
        self.last_cost = value
        return value, loss

    def _symbolic(self, vectors: dict[str, Any], counts: tuple[float, ...]) -> Any:
        import torch

        from morphonnx.regularize import cost_and_loss

        sym = {gid: _SymbolicVector(gid, c) for gid, c in zip(vectors, counts, strict=True)}
        value, form = cost_and_loss(
            _symbolic_ops(),
            self.spec,
            sym,
            cost=self.cost_kind,
            threshold=self.threshold,
            device=self.device,
        )
        form = _Linear.of(form)
        per_group = [
            torch.full((v.numel(),), form.terms.get(gid, 0.0), dtype=torch.float64)
            for gid, v in vectors.items()
        ]
        return value, form.constant, {"cpu64": torch.cat(per_group)}

    def _direct(self, vectors: dict[str, Any]) -> tuple[float, torch.Tensor]:
        """The core's formula evaluated on torch tensors, node by node."""
        import torch

        from morphonnx.regularize import cost_and_loss

        value, loss = cost_and_loss(
            self._ops,
            self.spec,
            vectors,
            cost=self.cost_kind,
            threshold=self.threshold,
            device=self.device,
        )
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), device=next(iter(self._sources.values())).device)
        self.last_cost = value
        return value, loss

    def loss(self) -> torch.Tensor:
        """MorphNet's differentiable cost loss; add ``strength * reg.loss()`` to the task loss.
        The cost it saw is kept in ``last_cost`` (for logging without a second pass)."""
        return self.cost_and_loss()[1]

    def cost(self) -> float:
        """Cost of the currently alive structure (FLOPs, weights or seconds, as ``analyze``)."""
        import torch

        with torch.no_grad():
            return self.cost_and_loss()[0]

    # ------------------------------------------------------------------ masks

    def mask(self, threshold: float | None = None) -> Any:
        """The ``morphonnx.mask.MaskResult`` of the current weights (float64, like ``morphonnx
        mask``); a group the threshold would empty keeps its strongest channel."""
        import torch

        from morphonnx.mask import make_mask

        with torch.no_grad():
            double = {n: t.detach().double() for n, t in self._sources.items()}
            values = {k: v.cpu().numpy() for k, v in self.vectors(double).items()}
        return make_mask(values, self.threshold if threshold is None else float(threshold))

    def write_mask(self, path: str | os.PathLike[str], threshold: float | None = None) -> Any:
        """Write the mask JSON (``morphonnx prune`` input) with the spec's fingerprint."""
        from morphonnx.formats import write_json

        result = self.mask(threshold)
        write_json(path, result.document(self.fingerprint, self.kind))
        return result

    def _keep(self, keep: Any) -> dict[str, list[bool]]:
        from morphonnx.formats import read_mask

        if keep is None:
            return self.mask().keep
        if hasattr(keep, "keep"):
            return dict(keep.keep)
        if isinstance(keep, (str, os.PathLike)):
            fp, groups = read_mask(keep)
            if self.fingerprint and fp != self.fingerprint:
                raise ValueError(f"{os.fspath(keep)}: mask was made for another model")
            return groups
        return {k: list(v) for k, v in keep.items()}

    def _dead_slices(self, keep: Any, strict: bool) -> dict[str, dict[int, list[int]]]:
        """Spec tensor -> axis -> indices of dead slices, for every dead channel of ``keep``.

        Members that are no parameter or buffer of the model (constants computed in ``forward``,
        e.g. PReLU's reshaped slope) are an error when ``strict``, otherwise a warning: a dead
        channel's consumers are zeroed, so such a constant cannot reach the outputs."""
        by_id = {g["id"]: g for g in self.spec["groups"]}
        out: dict[str, dict[int, list[int]]] = {}
        missing: list[str] = []
        for gid, alive in self._keep(keep).items():
            g = by_id.get(gid)
            if g is None or not g["prunable"]:
                raise ValueError(f"group '{gid}' is not a prunable group of the spec")
            if len(alive) != g["channels"] or not any(alive):
                raise ValueError(f"group '{gid}': mask must list {g['channels']} flags, one true")
            dead = [k for k, a in enumerate(alive) if not a]
            if not dead:
                continue
            for m in g["members"]:
                if m["tensor"] not in self._names:
                    missing.append(m["tensor"])
                    continue
                slot = out.setdefault(m["tensor"], {}).setdefault(int(m["axis"]), [])
                slot.extend(_channel_index(m, dead))
        if missing:
            msg = (
                "dead channels have slices in tensors that are not parameters or buffers of the "
                f"model (constants computed in forward?): {', '.join(sorted(set(missing)))}"
            )
            if strict:
                raise ValueError(msg)
            warnings.warn(msg + "; left as they are", stacklevel=3)
        return out

    # ------------------------------------------------------------------ stage 2

    def zero_dead_(self, keep: Any = None) -> dict[str, list[bool]]:
        """Set every member slice of every dead channel to zero, in place (parameters and running
        statistics). ``keep``: a mask dict, ``MaskResult`` or mask file; default: the current one.
        The zeroed model computes what the pruned ONNX model computes. Returns the mask."""
        import torch

        keep = self._keep(keep)
        bare = unwrap_model(self.model)
        with torch.no_grad():
            for name, cuts in self._dead_slices(keep, strict=False).items():
                t = self._get(bare, name)
                for axis, idx in cuts.items():
                    t.index_fill_(axis, torch.as_tensor(idx, device=t.device), 0)
        return keep

    def freeze_dead(self, keep: Any = None, optimizer: Any = None) -> dict[str, list[bool]]:
        """Keep dead slices at zero while training on: gradient hooks zero their gradients.

        With momentum (or Adam) an optimizer's running state can still move a weight whose
        gradient is zero: pass ``optimizer`` to clear its state at the dead slices and re-zero
        them after every ``step()`` (or create the optimizer after this call). ``unfreeze()``
        removes the hooks. Call ``zero_dead_`` first to zero the slices themselves."""
        import torch

        self.unfreeze()
        keep = self._keep(keep)
        bare = unwrap_model(self.model)
        masks: list[tuple[Any, Any]] = []
        for name, cuts in self._dead_slices(keep, strict=False).items():
            t = self._get(bare, name)
            if not isinstance(t, torch.nn.Parameter):
                continue  # running statistics follow the zeroed inputs by themselves
            m = torch.ones_like(t)
            for axis, idx in cuts.items():
                m.index_fill_(axis, torch.as_tensor(idx, device=t.device), 0)
            masks.append((t, m))
            self._hooks.append(t.register_hook(lambda grad, m=m: grad * m))
        if optimizer is not None:
            with torch.no_grad():
                for p, m in masks:
                    for v in optimizer.state.get(p, {}).values():
                        if isinstance(v, torch.Tensor) and v.shape == p.shape:
                            v.mul_(m)

            def rezero(*_: Any) -> None:
                with torch.no_grad():
                    for p, m in masks:
                        p.mul_(m)

            self._hooks.append(optimizer.register_step_post_hook(rezero))
        return keep

    def unfreeze(self) -> None:
        """Remove the hooks of ``freeze_dead``."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def slice_model(self, keep: Any = None) -> torch.nn.Module:
        """A deep copy of the (unwrapped) model with the dead channels physically removed.

        Covered: Conv1d/2d/3d (incl. grouped and depthwise), ConvTranspose1d/2d/3d (groups=1),
        Linear, BatchNorm1d/2d/3d and SyncBatchNorm. Their weights, biases, running statistics
        and size attributes (``in_channels``/``out_channels``/``groups``,
        ``in_features``/``out_features``, ``num_features``) are sliced or updated. Any other
        module owning a sliced tensor is a ``TypeError`` naming it. The forward code must not
        hard-code channel counts (views to a fixed width, ``split`` sizes). The copy computes
        what ``zero_dead_`` computes.
        """
        import copy

        import torch

        cuts = self._dead_slices(keep, strict=True)
        small = copy.deepcopy(unwrap_model(self.model))
        touched: dict[str, torch.nn.Module] = {}
        for name, axes in cuts.items():
            path, _, attr = self._names[name].rpartition(".")
            module = small.get_submodule(path) if path else small
            _check_covered(path, module)
            old = getattr(module, attr)
            new = old.detach()
            for axis, dead in axes.items():
                dead_set = set(dead)
                kept = [i for i in range(new.shape[axis]) if i not in dead_set]
                new = new.index_select(axis, torch.as_tensor(kept, device=new.device))
            if isinstance(old, torch.nn.Parameter):
                param = torch.nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
                for mod in small.modules():  # tied parameters stay tied
                    for key, p in list(mod._parameters.items()):
                        if p is old:
                            mod._parameters[key] = param
            else:
                module._buffers[attr] = new.contiguous()
            touched[path] = module
        for path, module in touched.items():
            _resize(path, module)
        return small


def _check_covered(path: str, module: Any) -> None:
    import torch
    from torch import nn

    ok = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, torch.nn.modules.batchnorm._BatchNorm)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    if isinstance(module, transposed) and module.groups == 1:
        return
    if not isinstance(module, ok):
        raise TypeError(
            f"slice_model: cannot slice module '{path}' ({type(module).__name__}); "
            f"covered layer types: {_COVERED}"
        )


def _resize(path: str, m: Any) -> None:
    """Update a sliced module's size attributes from its new weights."""
    from torch import nn

    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        out, per_group = m.weight.shape[0], m.weight.shape[1]
        if m.groups > 1 and per_group == 1 and m.groups == m.in_channels:  # depthwise
            mult = m.out_channels // m.groups
            m.groups = out // mult
            m.in_channels = m.groups
        else:
            m.in_channels = per_group * m.groups
        m.out_channels = out
        if out % m.groups:
            raise ValueError(f"slice_model: '{path}' would get {out} outputs for {m.groups} groups")
    elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1]
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    else:  # batch norm
        ref = m.weight if m.weight is not None else m.running_mean
        m.num_features = ref.shape[0]


# --------------------------------------------------------------------------- spec helper


def export_spec(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    spec_path: str | os.PathLike[str],
    **export_kwargs: Any,
) -> dict[str, Any]:
    """Export ``model`` with :func:`export_onnx` and write its group spec; returns the spec.

    The weights' values do not matter (an untrained model is fine): the spec fits every later
    export of the same architecture. Cost coefficients use ``example_inputs``' batch.
    ``export_kwargs`` go to :func:`export_onnx` (use the same ones for the trained export).
    """
    import tempfile

    from morphonnx.api import make_spec
    from morphonnx.formats import write_json

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, example_inputs, path, **export_kwargs)
        spec = make_spec(path, devices=())
    write_json(spec_path, spec)
    return spec
