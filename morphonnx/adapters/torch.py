"""PyTorch side of MorphNet's training: the regularizer's tensor ops and stage 2 (zeroing,
freezing, slicing modules), on the framework-neutral core (:mod:`morphonnx.binding`,
:mod:`morphonnx.adapterbase`). The export is :mod:`morphonnx.adapters.torch_export` (re-exported
here). torch is imported only inside functions.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from morphonnx.adapterbase import RegularizerBase, map_names, strip_segments
from morphonnx.adapters.torch_export import export_onnx, export_spec, unwrap_model
from morphonnx.binding import Indices, Param

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = ["Regularizer", "export_onnx", "export_spec", "torch_ops", "unwrap_model"]

_WRAPPERS = ("module", "_orig_mod")  # DDP / DataParallel, torch.compile


_COVERED = (
    "Conv1d/2d/3d (incl. grouped and depthwise), ConvTranspose1d/2d/3d (groups=1), Linear, "
    "BatchNorm1d/2d/3d, SyncBatchNorm"
)


@functools.cache
def torch_ops() -> Any:
    """:class:`morphonnx.regularize.ArrayOps` for torch tensors (counts carry no gradient)."""
    import torch

    from morphonnx.regularize import ArrayOps

    def take(x: torch.Tensor, idx: Any) -> torch.Tensor:
        idx = torch.as_tensor(idx, device=x.device)
        return x.index_select(0, idx) if idx.dim() == 1 else x[idx]

    class RootMeanSquare(torch.autograd.Function):
        """RMS over every axis but one. Its backward is one pass over the weights (x times a
        per-filter scale; vector_norm's takes three: div, mul, masked_fill), which halves group
        LASSO's time, and gives 0 at a filter of zeros."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, axis: int) -> torch.Tensor:
            others = [a for a in range(x.dim()) if a != axis]
            ctx.count = x.numel() // x.shape[axis]
            r = torch.linalg.vector_norm(x, dim=others, keepdim=True) / math.sqrt(ctx.count)
            ctx.save_for_backward(x, r)
            return r.reshape(-1)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            x, r = ctx.saved_tensors
            scale = grad.reshape(r.shape) / (r.clamp_min(torch.finfo(r.dtype).tiny) * ctx.count)
            return x * torch.where(r > 0, scale, 0.0), None

    def rms(x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.abs() if x.dim() == 1 else RootMeanSquare.apply(x, axis)

    return ArrayOps(
        rows=lambda x, axis: torch.movedim(x, axis, 0).reshape(x.shape[axis], -1),
        take=take,
        amax=lambda x, axis: torch.amax(x, dim=axis),
        mean=lambda x, axis: x.mean(axis),
        rms=rms,
        maximum=torch.maximum,
        count=lambda x: float(x.sum().item()),
        cat=lambda xs: torch.cat(list(xs)),
        reshape=torch.reshape,
        transpose=torch.permute,
    )


class Regularizer(RegularizerBase):
    """MorphNet's differentiable cost regularizer for a PyTorch model, driven by a group spec.

    ``spec``: the ``morphonnx spec`` JSON (path or dict) of the model's :func:`export_onnx`; its
    tensor names are ``state_dict()`` keys (DDP ``module.`` and ``torch.compile`` ``_orig_mod.``
    prefixes are handled on both sides). ``kind``, ``cost``, ``threshold``, ``device``,
    ``l1_fraction``, ``exclude``, ``onnx_path``: see docs/torch.md.
    """

    def __init__(self, model: torch.nn.Module, spec: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, spec, *args, **kwargs)
        reshaped = sorted(p.name for p in self.binding.params.values() if p.view is not None)
        if reshaped:  # torch's exports write parameters as they are (transposed at most)
            raise ValueError(
                f"{self.where}: spec shapes differ from the model's for {', '.join(reshaped)} "
                "(is the spec from another export?)"
            )
        self._sources = {
            s.tensor: _get(self._bare, self._names[s.tensor]) for s in self.binding.sources
        }
        self._coefficients = self.binding.cache
        self._hooks: list[Any] = []

    def _array_ops(self) -> Any:
        return torch_ops()

    @property
    def _bare(self) -> torch.nn.Module:
        return unwrap_model(self.model)

    def _params(self, spec: dict[str, Any]) -> dict[str, Param]:
        bare = self._bare
        own = [n for n, _ in bare.named_parameters(remove_duplicate=False)]
        own += [n for n, _ in bare.named_buffers(remove_duplicate=False)]
        self._names = map_names(own, spec, lambda n: strip_segments(n, _WRAPPERS, _WRAPPERS[1:]))
        params = {id(p) for p in bare.parameters()}
        bound = {}
        for spec_name, name in self._names.items():
            t = _get(bare, name)
            bound[spec_name] = Param(name, tuple(t.shape), tuple(range(t.dim())), id(t) in params)
        return bound

    def _indices(self, device: Any) -> Indices:
        import torch

        return self._const(  # type: ignore[no-any-return]
            ("index", str(device)),
            lambda: self.binding.indices(lambda a: torch.from_numpy(a).to(device)),
        )

    def _flat(self, tensors: dict[str, Any]) -> Any:
        """Every regularized channel's value in the plan's order (the core's few array ops)."""
        xs = [tensors[s.tensor] for s in self.binding.sources]
        return self.binding.values(torch_ops(), xs, self._indices(xs[0].device))

    def vectors(self, tensors: dict[str, Any] | None = None) -> dict[str, Any]:
        """Regularization vector (one value per channel) of every regularized group."""
        flat = self._flat(self._sources if tensors is None else tensors)
        return self.binding.split(torch_ops(), flat, self._indices(flat.device))

    def cost_and_loss(self) -> tuple[float, torch.Tensor]:
        """(cost of the alive structure, differentiable MorphNet loss) in one pass: the channel
        values, one segment count and one dot product with the core's coefficients (cached per
        set of alive counts, which changes rarely)."""
        import torch

        flat = self._flat(self._sources)
        dev = flat.device
        with torch.no_grad():
            alive = torch.bincount(
                self._indices(dev).segment,
                weights=(flat > self.threshold).double(),
                minlength=len(self.binding.gids),
            )
            counts = self.binding.counts(alive.tolist())
        value, coefficients = self.binding.coefficients(counts)
        dtype = torch.promote_types(flat.dtype, torch.float32)  # coefficients overflow fp16
        coef = self._const(
            ("coef", counts, str(dev), dtype),
            lambda: torch.from_numpy(coefficients).to(device=dev, dtype=dtype),
        )
        self.last_cost = value
        return value, (flat.to(dtype) * coef).sum()  # not BLAS dot: its thread pool wakes slowly

    def cost(self) -> float:
        """Cost of the currently alive structure (FLOPs, weights or seconds, as ``analyze``)."""
        import torch

        with torch.no_grad():
            return self.cost_and_loss()[0]

    def _values64(self) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            double = {n: t.detach().double() for n, t in self._sources.items()}
            return {k: v.cpu().numpy() for k, v in self.vectors(double).items()}

    # ------------------------------------------------------------------ stage 2

    def zero_dead_(self, keep: Any = None) -> dict[str, list[bool]]:
        """Set every member slice of every dead channel to zero, in place (parameters and running
        statistics). ``keep``: a mask dict, ``MaskResult`` or mask file; default: the current one.
        The zeroed model computes what the pruned ONNX model computes. Returns the mask."""
        keep, cuts = self._cuts(keep, strict=False)
        _zero_slices(self._bare, cuts)
        return keep

    def freeze_dead(self, keep: Any = None, optimizer: Any = None) -> dict[str, list[bool]]:
        """Keep dead slices at zero while training on: gradient hooks zero their gradients.

        Pass ``optimizer`` to clear its momentum/Adam state at the dead slices and re-zero them
        after every ``step()`` (or create the optimizer after this call). ``unfreeze()`` removes
        the hooks. Call ``zero_dead_`` first to zero the slices themselves."""
        import torch

        self.unfreeze()
        keep, cuts = self._cuts(keep, strict=False)
        masks: list[tuple[Any, Any]] = []
        for name, axes in cuts.items():
            t = _get(self._bare, name)
            if not isinstance(t, torch.nn.Parameter):
                continue  # running statistics follow the zeroed inputs by themselves
            m = _fill_zero(torch.ones_like(t), axes)
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

    def slice_model(
        self,
        keep: Any = None,
        fold_constants: bool = False,
        example_inputs: Any = None,
        check: bool = True,
    ) -> torch.nn.Module:
        """A deep copy of the (unwrapped) model with the dead channels physically removed; it
        computes what ``zero_dead_`` computes. ``fold_constants``: each dead channel's constant
        output is added to the biases of the layers it feeds (as ``morphonnx prune
        --fold-constants``; exact away from zero-padded borders, which a warning sizes), found
        on an export of the current model. ``check``: before the fold, run the sliced and the
        zeroed model (copies, in eval mode) on ``example_inputs`` (default: random inputs of the
        spec's shapes and types) and raise a ``ValueError`` if they differ or only the sliced
        one fails. A module of a type not covered (docs/torch.md) is a ``TypeError``."""
        import copy

        import torch

        keep, kept = self._kept(keep)
        small = copy.deepcopy(self._bare)
        touched: dict[str, torch.nn.Module] = {}
        for name, axes in kept.items():
            path, _, attr = name.rpartition(".")
            module = small.get_submodule(path) if path else small
            _check_covered(path, module)
            old = getattr(module, attr)
            new = old.detach()
            for axis, idx in axes.items():
                new = new.index_select(axis, torch.as_tensor(idx, device=new.device))
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
        if example_inputs is None and (check or fold_constants):
            device = next(self._bare.parameters()).device
            arrays = self._example_arrays(required=fold_constants) or []
            example_inputs = tuple(torch.from_numpy(a).to(device) for a in arrays) or None
        if check and example_inputs is not None:
            self._check_sliced(small, keep, example_inputs)
        if fold_constants:
            export = lambda p: export_onnx(self._bare, example_inputs, p)  # noqa: E731
            for weight, delta in self._bias_deltas(keep, export):
                module = small.get_submodule(weight.rpartition(".")[0])
                w = module.get_parameter("weight")
                add = torch.as_tensor(delta, dtype=w.dtype, device=w.device)
                with torch.no_grad():
                    if module.bias is None:
                        module.bias = torch.nn.Parameter(torch.zeros_like(add))
                    module.get_parameter("bias").add_(add)
        return small

    def _zeroed_copy(self, keep: Any) -> torch.nn.Module:
        import copy

        zeroed = copy.deepcopy(self._bare)
        _zero_slices(zeroed, self._cuts(keep, strict=True)[1])
        return zeroed

    def _outputs(self, model: torch.nn.Module, inputs: Any) -> list[np.ndarray]:
        """A float64 copy on the CPU in eval mode: TF32, half precision and GPU kernels that
        differ by width would blur a comparison of two models' reassociations."""
        import copy

        import torch

        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        args = tuple(a.to("cpu", torch.float64) if a.is_floating_point() else a.cpu() for a in args)
        exact = copy.deepcopy(model).to("cpu", torch.float64).eval()
        with torch.no_grad():
            return _arrays(exact(*args))


def _arrays(out: Any) -> list[np.ndarray]:
    """A forward's tensors (alone, or in tuples, lists and dicts), as numpy arrays."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, (tuple, list)):
        return [a for item in out for a in _arrays(item)]
    if isinstance(out, dict):
        return [a for key in out for a in _arrays(out[key])]
    return []


def _zero_slices(model: torch.nn.Module, cuts: dict[str, dict[int, list[int]]]) -> None:
    """Zero the dead slices (own name -> axis -> indices) of ``model``'s tensors, in place."""
    import torch

    with torch.no_grad():
        for name, axes in cuts.items():
            _fill_zero(_get(model, name), axes)


def _fill_zero(t: torch.Tensor, axes: dict[int, list[int]]) -> torch.Tensor:
    """``t`` with the given indices along each axis set to zero, in place."""
    import torch

    for axis, idx in axes.items():
        t.index_fill_(axis, torch.as_tensor(idx, device=t.device), 0)
    return t


def _get(module: torch.nn.Module, own: str) -> Any:
    path, _, attr = own.rpartition(".")
    return getattr(module.get_submodule(path) if path else module, attr)


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
