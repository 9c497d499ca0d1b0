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

__all__ = ["export_onnx", "unwrap_model"]


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

    Note: the exporter de-duplicates *identical* tensors (e.g. freshly initialised BN
    statistics), replacing them with Identity nodes; trained models are unaffected.
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
            os.replace(tmp_path, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp_path)
            raise
