"""PyTorch models as ONNX files a spec can be made from and mapped back: BatchNormalization kept
as its own node (its gamma carries MorphNet's signal), initializers named after ``state_dict()``
keys (torch's layouts equal ONNX's, so the axis map is the identity), wrappers (DDP,
``torch.compile``) removed, the exporter's de-duplication of equal tensors undone. torch is
imported only inside functions.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from morphonnx.formats import Attention

__all__ = ["export_onnx", "export_spec", "unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, so
    names match the user's own ``state_dict()``."""
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
    """Eval mode for the duration; every submodule's own training flag is restored after (parts
    deliberately kept in eval stay so)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _names(prefix: str, count: int | None) -> list[str] | None:
    if count is None:
        return None
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _count_outputs(out: Any) -> int | None:
    """Number of flat tensor outputs, or None when the output structure is not a flat tuple."""
    import torch

    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return len(out)
    return None


def _io(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_batch: bool,
) -> dict[str, Any]:
    """The exporter's naming arguments: given names, else ``input``/``output`` (numbered when
    there are several; outputs counted by running the model once), and ``batch`` as axis 0 of
    each with ``dynamic_batch``."""
    import torch

    inputs = list(input_names) if input_names is not None else _names("input", len(args))
    outputs: list[str] | None = None
    if output_names is not None:
        outputs = list(output_names)
    else:
        with torch.no_grad():
            outputs = _names("output", _count_outputs(model(*args)))
    axes = None
    if dynamic_batch:
        axes = {n: {0: "batch"} for n in [*(inputs or []), *(outputs or [])]}
    return {"input_names": inputs, "output_names": outputs, "dynamic_axes": axes}


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

    TorchScript exporter (``dynamo=False``) without constant folding: BatchNormalization stays
    unfused and initializers are named after ``state_dict()`` keys. Eval mode for the export,
    wrappers removed first. Unnamed inputs/outputs become ``input``/``output`` (``input_0``...
    when there are several); ``dynamic_batch`` marks axis 0 of each as ``batch``. Written
    atomically. The exporter's de-duplication of equal tensors is undone
    (:func:`morphonnx.export_fix.reduplicate`), so the structure never depends on weight values.
    """
    import torch

    from morphonnx.export_fix import reduplicate
    from morphonnx.formats import atomic_write

    model = unwrap_model(model)
    if isinstance(example_inputs, torch.Tensor):
        args: tuple[Any, ...] = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        kind = type(example_inputs).__name__
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {kind}")

    with _eval_mode(model):
        io = _io(model, args, input_names, output_names, dynamic_batch)
        keys = [k for k, _ in model.named_parameters(remove_duplicate=False)]
        keys += [k for k, _ in model.named_buffers(remove_duplicate=False)]

        def write(tmp: Path) -> None:
            with warnings.catch_warnings():
                # dynamo=False is deliberate (see docstring); silence its deprecation notice.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
                torch.onnx.export(
                    model,
                    args,
                    str(tmp),
                    dynamo=False,
                    do_constant_folding=False,
                    opset_version=opset,
                    **io,
                )
            reduplicate(str(tmp), keys)

        atomic_write(path, write)


def export_spec(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    spec_path: str | os.PathLike[str],
    attention: Attention = "dims",
    **export_kwargs: Any,
) -> dict[str, Any]:
    """Export ``model`` with :func:`export_onnx` and write its group spec; returns the spec.

    Weight values do not matter (an untrained model is fine): the spec fits every later export
    of the same architecture. Cost coefficients use ``example_inputs``' batch. ``attention``:
    ``"heads"`` groups attention by whole heads (``morphonnx spec --attention``).
    ``export_kwargs`` go to :func:`export_onnx` (use the same ones for the trained export).
    """
    from morphonnx.adapterbase import export_and_spec

    return export_and_spec(
        lambda p: export_onnx(model, example_inputs, p, **export_kwargs), spec_path, attention
    )
