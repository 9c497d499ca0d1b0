"""What every training adapter's ``Regularizer`` shares, framework-neutral: the spec's names
mapped to the model's, options and binding, masks and mask files, stage 2's slice plans (which
parameter loses or keeps which indices along which framework axis) and the biases that absorb
dead channels' constants, and export + spec. An adapter keeps export, tensor ops and stage 2's
framework work (zeroing, freezing, slicing layers).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from morphonnx.binding import Binding, Param, cached, check_options, load_spec
from morphonnx.formats import Attention
from morphonnx.regularize import ArrayOps

Slices = dict[str, dict[int, list[int]]]  # framework name -> framework axis -> indices


def onnx_fingerprint(path: str | os.PathLike[str]) -> str:
    import onnx

    from morphonnx.formats import fingerprint

    return fingerprint(onnx.load(os.fspath(path), load_external_data=False))


def export_and_spec(
    export: Callable[[str], None],
    spec_path: str | os.PathLike[str],
    attention: Attention = "dims",
) -> dict[str, Any]:
    """Run an adapter's ``export(path)`` into a temporary folder, analyse the file (attention
    grouped as ``attention``, as ``morphonnx spec --attention``) and write its group spec to
    ``spec_path``; returns the spec."""
    from morphonnx.api import make_spec
    from morphonnx.formats import write_json

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export(path)
        spec = make_spec(path, devices=(), attention=attention)
    write_json(spec_path, spec)
    return spec


def strip_segments(name: str, leading: Iterable[str], anywhere: Iterable[str] = ()) -> str:
    """A dotted name without wrapper segments: leading ones (``module.`` of DDP) and ones that
    may sit anywhere (``_orig_mod.`` of ``torch.compile``, also on compiled submodules)."""
    parts = name.split(".")
    lead, inner = set(leading), set(anywhere)
    while len(parts) > 1 and parts[0] in lead:
        parts.pop(0)
    return ".".join(p for p in parts if p not in inner) or name


def map_names(
    own: Iterable[str], spec: Mapping[str, Any], canonical: Callable[[str], str]
) -> dict[str, str]:
    """Spec tensor name -> the model's own name: the same name, else the one name whose
    ``canonical`` form equals the spec name's (two such names: not mapped)."""
    names = list(own)
    exact = set(names)
    canon: dict[str, str | None] = {}
    for n in names:
        c = canonical(n)
        canon[c] = n if canon.get(c, n) == n else None  # ambiguous -> None
    mapping: dict[str, str] = {}
    for g in spec["groups"]:
        for m in g["members"]:
            t = m["tensor"]
            hit = t if t in exact else canon.get(canonical(t))
            if hit:
                mapping[t] = hit
    return mapping


class RegularizerBase:
    """What every adapter's ``Regularizer`` shares: options, spec and binding, masks, mask files
    and the dead slices of stage 2. An adapter supplies :meth:`_params` (its parameters as
    :class:`Param`), :meth:`cost_and_loss` and :meth:`_values64` (float64 channel values)."""

    def __init__(
        self,
        model: Any,
        spec: str | os.PathLike[str] | dict[str, Any],
        kind: str = "gamma",
        cost: str = "flops",
        threshold: float = 1e-2,
        device: Any = None,
        l1_fraction: float = 0.0,
        exclude: str | Sequence[str] = (),
        onnx_path: str | os.PathLike[str] | None = None,
    ) -> None:
        options = check_options(kind, cost, threshold, device, l1_fraction, exclude)
        fp = None if onnx_path is None else onnx_fingerprint(onnx_path)
        loaded, where = load_spec(spec, fp, os.fspath(onnx_path or ""))
        self.model = model
        self.binding = Binding(loaded, where, self._params(loaded), options)
        self.spec, self.where, self.groups = loaded, where, self.binding.groups
        self.kind, self.cost_kind, self.threshold = kind, cost, options.threshold
        self.device, self.l1_fraction = options.device, options.l1_fraction
        self.fingerprint, self.unmapped = self.binding.fingerprint, self.binding.unmapped
        self.last_cost: float | None = None
        self._consts: dict[Any, Any] = {}

    def _const(self, key: Any, make: Callable[[], Any]) -> Any:
        """A framework constant (index arrays, coefficients on a device), made once."""
        return cached(self._consts, key, make)

    def _params(self, spec: dict[str, Any]) -> dict[str, Param]:
        raise NotImplementedError

    def _values64(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def cost_and_loss(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _array_ops(self) -> ArrayOps:
        raise NotImplementedError

    def _zeroed_copy(self, keep: Mapping[str, Sequence[bool]]) -> Any:
        """A copy of the model with the dead slices zeroed (the original untouched)."""
        raise NotImplementedError

    def _outputs(self, model: Any, inputs: Any) -> list[np.ndarray]:
        """``model``'s outputs on ``inputs`` in inference mode, as numpy arrays, computed as
        exactly as the framework allows (the check compares two models' reassociations)."""
        raise NotImplementedError

    def _check_rtol(self) -> float:
        """How far :meth:`_outputs` of the sliced and the zeroed model may drift apart."""
        from morphonnx.verify import RTOL

        return RTOL

    def _direct(self, vectors: Mapping[str, Any]) -> tuple[float, Any]:
        """The core's formula evaluated group by group on ``vectors`` (a reference for the fast
        path of :meth:`cost_and_loss`)."""
        from morphonnx.regularize import cost_and_loss

        value, loss = cost_and_loss(
            self._array_ops(),
            self.spec,
            vectors,
            cost=self.cost_kind,
            threshold=self.threshold,
            device=self.device,
        )
        self.last_cost = value
        return value, loss

    def loss(self) -> Any:
        """MorphNet's differentiable cost loss; add ``strength * reg.loss()`` to the task loss.
        The cost it saw is kept in ``last_cost`` (for logging without a second pass)."""
        return self.cost_and_loss()[1]

    def mask(self, threshold: float | None = None, round_to: int | None = None) -> Any:
        """The ``morphonnx.mask.MaskResult`` of the current weights (float64, like ``morphonnx
        mask``); a group the threshold would empty keeps its strongest channel; ``round_to=K``:
        alive counts to multiples of K, as ``morphonnx mask --round-to``."""
        from morphonnx.mask import make_mask

        t = self.threshold if threshold is None else threshold
        return make_mask(self._values64(), t, round_to)

    def write_mask(
        self,
        path: str | os.PathLike[str],
        threshold: float | None = None,
        round_to: int | None = None,
    ) -> Any:
        """Write the mask JSON (``morphonnx prune`` input) with the spec's fingerprint."""
        from morphonnx.formats import write_json

        result = self.mask(threshold, round_to)
        write_json(path, result.document(self.fingerprint, self.kind, self.binding.attention))
        return result

    def _cuts(self, keep: Any, strict: bool) -> tuple[dict[str, list[bool]], Slices]:
        """(the mask, framework name -> framework axis -> dead indices); ``keep`` is a mask dict,
        ``MaskResult`` or mask file, None for the current mask. Unbound members are an error when
        ``strict``, else a warning (a dead channel's consumers are zeroed, so such a constant
        cannot reach the outputs)."""
        keep = self.mask().keep if keep is None else self.binding.keep(keep)
        cuts, missing = self.binding.dead_slices(keep, strict)
        if missing:
            warnings.warn(
                "dead channels have slices in tensors that are not parameters or buffers of the "
                f"model (constants computed in forward?): {', '.join(missing)}; left as they are",
                stacklevel=3,
            )
        return keep, cuts

    def _kept(self, keep: Any) -> tuple[dict[str, list[bool]], Slices]:
        """Stage 2's slice plan: (the mask, framework name -> framework axis -> kept indices,
        ascending) for every parameter that loses channels; every member must be bound."""
        keep, cuts = self._cuts(keep, strict=True)
        params = {p.name: p for p in self.binding.params.values()}
        kept: Slices = {}
        for name, axes in cuts.items():
            for axis, dead in axes.items():
                gone = set(dead)
                kept.setdefault(name, {})[axis] = [
                    i for i in range(params[name].extent(axis)) if i not in gone
                ]
        return keep, kept

    def _example_arrays(self, required: bool) -> list[np.ndarray] | None:
        """Inputs of the spec's shapes and types, for stage 2 to run the model on (made as
        verification makes them: standard normal floats, zeros for integers and booleans). An
        input without a fixed shape is an error when ``required`` (the fold exports on them),
        else a warning that the sliced model is not checked, and None."""
        from morphonnx.verify import random_input

        model = self.spec["model"]
        types = model.get("input_types") or {}
        rng = np.random.default_rng(0)
        arrays = []
        for name, shape in model.get("inputs", {}).items():
            if not all(isinstance(d, int) and d > 0 for d in shape):
                problem = f"{self.where}: input '{name}' has no fixed shape {shape}"
                if required:
                    raise ValueError(f"{problem}; pass example inputs")
                warnings.warn(
                    f"slice_model: {problem}: the sliced model is not checked (pass example "
                    "inputs like those given to export_spec)",
                    stacklevel=3,
                )
                return None
            arrays.append(
                random_input(rng, shape, np.dtype(types[name]) if types.get(name) else None)
            )
        return arrays

    def _check_sliced(self, small: Any, keep: Mapping[str, Sequence[bool]], inputs: Any) -> None:
        """Stage 2 checks itself: the sliced model must compute what the zeroed one does. A
        forward that keeps a count of its own (a hard-coded view, split or slice, an attention
        module's head count, a branch on a channel count) fails here, with the reason, instead of
        in the user's next run. Skipped with a warning when the model does not run on
        ``inputs``: there is nothing to judge by."""
        from morphonnx.verify import compare_outputs

        hint = (
            "its forward keeps a channel or head count of its own (a view, split or chunk that "
            "assumes the full width or equal parts; an attention module's num_heads / head_dim): "
            "keep training the zeroed model (zero_dead_) or prune the ONNX model instead "
            "(check=False skips this check)"
        )
        try:
            want = self._outputs(self._zeroed_copy(keep), inputs)
        except Exception as e:
            warnings.warn(
                "slice_model: a zeroed copy of the model does not run on the example inputs "
                f"({_first_line(e)}); the sliced model is not checked (pass example inputs like "
                "those given to export_spec)",
                stacklevel=3,
            )
            return
        try:
            got = self._outputs(small, inputs)
        except Exception as e:
            raise ValueError(
                f"slice_model: the sliced model fails where the zeroed one runs "
                f"({_first_line(e)}): {hint}"
            ) from e
        problem = compare_outputs(want, got, self._check_rtol())
        if problem:
            raise ValueError(
                f"slice_model: the sliced model does not compute what the zeroed one does "
                f"({problem}): {hint}"
            )

    def _bias_deltas(
        self, keep: Any, export: Callable[[str], None]
    ) -> list[tuple[str, np.ndarray]]:
        """(framework name of a consumer's weight, what its layer's bias must add) for every
        layer a dead channel's constant reaches (``morphonnx.foldconst.plan_fold`` on
        ``export(path)``, an export of the current model). Exact away from zero-padded borders;
        a warning says how far off a border gets."""
        from morphonnx.api import analyze_file
        from morphonnx.foldconst import plan_fold

        keep = self.mask().keep if keep is None else self.binding.keep(keep)
        with tempfile.TemporaryDirectory(prefix="morphonnx-fold-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            export(path)
            a = analyze_file(path)
            theirs = {
                g.id: {a.graph.stored(m.tensor, m.axis)[0] for m in g.members}
                for g in a.solution.groups
            }
            for g in self.spec["groups"]:
                if g["id"] in keep and theirs.get(g["id"]) != {m["tensor"] for m in g["members"]}:
                    raise ValueError(
                        f"slice_model: an export of the model does not match {self.where} (group "
                        f"{g['id']}); pass example_inputs like those given to export_spec"
                    )
            plan = plan_fold(a, keep, self.kind)
            stored = {c.weight: a.graph.stored(c.weight, 0)[0] for c in plan.corrections}
        deltas = []
        for c in plan.corrections:
            weight = stored[c.weight]
            if weight not in self.binding.params:
                raise ValueError(f"slice_model: no layer owns `{weight}` to fold a constant into")
            deltas.append((self.binding.params[weight].name, c.interior))
        border = max((c.border for c in plan.corrections), default=0.0)
        if border > 0 and not all(c.uniform for c in plan.corrections):
            warnings.warn(
                f"slice_model: folded constants are exact away from zero-padded borders only "
                f"(up to {border:.3g} off there)",
                stacklevel=3,
            )
        return deltas


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
