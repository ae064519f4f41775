"""ONNX export of one graph from its spec, and its validation against the PyTorch module.

`export_graph` traces with torch.onnx's dynamo exporter at the spec's export sizes, with every
axis dynamic, and names the graph's dynamic dimensions as the spec does ("N", "S*32", "3*S").
`validate_graph` runs the ONNX graph in ONNX Runtime (CPU) at the spec's validation sizes, which
differ from the traced ones (a graph can export fine and still be silently static), compares
every output with the PyTorch module, collects every mismatch and raises them together.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from vsal.export.specs import GraphSpec, TensorSpec
from vsal.runtime.backends import ort_session
from vsal.runtime.errors import VsalError
from vsal.runtime.shapes import evaluate, linear
from vsal.transforms.onnx_io import EXTERNAL_DATA_THRESHOLD, save_onnx

DEFAULT_OPSET = 18


class ExportError(VsalError):
    """An export that failed or does not match its PyTorch module."""


@dataclass(frozen=True)
class Mismatch:
    kind: str  # "shape" | "tolerance" | "nonfinite" | "runtime" | "unknown axis"
    graph: str
    output: str
    sizes: dict[str, int]
    detail: str

    def __str__(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{self.graph}.{self.output} at {where}: {self.kind}: {self.detail}"


class ValidationError(ExportError):
    def __init__(self, mismatches: list[Mismatch]):
        self.mismatches = mismatches
        lines = "\n  ".join(str(m) for m in mismatches)
        super().__init__(f"{len(mismatches)} mismatch(es) between ONNX and PyTorch:\n  {lines}")


@dataclass
class CaseResult:
    sizes: dict[str, int]
    max_abs_error: dict[str, float]  # per output
    max_abs_reference: dict[str, float]
    seconds_onnx: float
    seconds_torch: float


@dataclass
class GraphValidation:
    graph: str
    atol: float
    rtol: float
    cases: list[CaseResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def worst(self) -> float:
        return max((e for c in self.cases for e in c.max_abs_error.values()), default=0.0)


# --- export -----------------------------------------------------------------------------------


def input_dims(spec: GraphSpec) -> list[dict[int, object]]:
    """torch.export Dims per input: one Dim per axis, shared across inputs; multiples as derived
    dims; a dimension over several axes ("P+T") gets a Dim of its own, its range from the axes'
    (torch.export ties it to the expression while tracing; the runtime checks the relation)."""
    from torch.export import Dim

    base = {}
    for axis in spec.axes:
        m = axis.multiple
        if m == 1:
            base[axis.name] = (Dim(axis.name, min=axis.min, max=axis.max), 1)
        else:
            base[axis.name] = (Dim(f"{axis.name}_by{m}", min=-(-axis.min // m), max=axis.max // m), m)
    lows = {a.name: a.min for a in spec.axes}
    highs = {a.name: a.max for a in spec.axes}
    shapes = []
    for tensor in spec.inputs:
        dims = {}
        for i, dim in enumerate(tensor.shape):
            if isinstance(dim, int):
                continue
            terms = linear(dim)
            if terms is None:
                low, high = max(1, evaluate(dim, lows)), evaluate(dim, highs)
                dims[i] = Dim(f"{tensor.name.replace('.', '_')}_{i}", min=low, max=high)
                continue
            name, coef, const = terms
            dim_obj, mult = base[name]
            scale = coef * mult
            expr = dim_obj if scale == 1 else scale * dim_obj
            dims[i] = expr + const if const else expr
        shapes.append(dims)
    return shapes


def dynamic_shapes(spec: GraphSpec, module: nn.Module, args: tuple[torch.Tensor, ...]):
    """`dynamic_shapes` for torch.onnx.export, nested as the module's signature needs (*args too)."""
    from torch.export import ShapesCollection

    collection = ShapesCollection()
    for arg, dims in zip(args, input_dims(spec), strict=True):
        collection[arg] = dims
    return collection.dynamic_shapes(module, args)


def _torch_inputs(spec: GraphSpec, arrays: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(arrays[t.name])) for t in spec.inputs)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs every step and warns about torchvision; keep the screen for progress."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _name_dims(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give the graph's I/O the spec's dimension names (the exporter invents some, like "30*s74")."""
    for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        by_name = {t.name: t for t in tensors}
        for value in values:
            tensor: TensorSpec = by_name[value.name]
            dims = value.type.tensor_type.shape.dim
            if len(dims) != len(tensor.shape):
                raise ExportError(
                    f"{spec.name}.{value.name}: graph rank {len(dims)}, spec rank {len(tensor.shape)}"
                )
            for dim, want in zip(dims, tensor.shape, strict=True):
                if isinstance(want, str):
                    dim.dim_param = want.replace(" ", "")
                elif dim.HasField("dim_param"):
                    raise ExportError(
                        f"{spec.name}.{value.name}: dimension {dim.dim_param} should be static {want}"
                    )


def export_graph(spec: GraphSpec, module: nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> list[Path]:
    """Export `module` to `path` (ONNX); returns the files written (the graph and any external data)."""
    module.eval()
    rng = np.random.default_rng(0)
    args = _torch_inputs(spec, spec.make_inputs(spec.export_sizes(), rng))
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes(spec, module, args),
                opset_version=opset,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; name the graph, keep the cause
            raise ExportError(f"{spec.name}: torch.onnx export failed: {type(exc).__name__}: {exc}") from exc
    if _initializer_bytes(program) < EXTERNAL_DATA_THRESHOLD:
        model = program.model_proto
        _name_dims(model, spec)
        return save_onnx(model, path)
    return _save_large(program, spec, path)


def _initializer_bytes(program) -> int:
    return sum(
        v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None
    )


def _save_large(program, spec: GraphSpec, path: Path) -> list[Path]:
    """A graph past protobuf's 2 GiB: onnx_ir writes its weights one tensor at a time from the
    module's own tensors into `<name>.data` (`program.model_proto` would copy them all into one
    proto, which cannot be serialized), in a staging folder; the dims are named on the structure;
    both files move beside `path` when complete."""
    import onnx_ir as ir
    from vsal.transforms.onnx_io import move_into

    side = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as work:
        staged = Path(work) / path.name
        ir.save(program.model, staged, external_data=side)
        model = onnx.load(str(staged), load_external_data=False)
        _name_dims(model, spec)
        onnx.save_model(model, staged)  # the structure only: the weights stay in the side file
        return move_into([staged, Path(work) / side], path.parent)


# --- validation ----------------------------------------------------------------------------------


def validate_graph(
    spec: GraphSpec, module: nn.Module | Callable[[], nn.Module], path: Path, seed: int = 1
) -> GraphValidation:
    """Run ONNX and PyTorch at every validation size; raise ValidationError listing every mismatch.

    ONNX Runtime runs every case first and its session is freed before PyTorch runs, so the two
    never hold the weights at once. `module` may be a function that builds it: a caller that freed
    a large module after the export builds it again only then (peak: one copy of the weights)."""
    import time

    session = ort_session(path)
    declared = {i.name for i in session.get_inputs()}
    wanted = {t.name for t in spec.inputs}
    if declared != wanted:
        raise ExportError(f"{spec.name}: graph inputs {sorted(declared)}, spec inputs {sorted(wanted)}")
    result = GraphValidation(spec.name, spec.atol, spec.rtol)
    mismatches: list[Mismatch] = []
    rng = np.random.default_rng(seed)
    runs = []  # (sizes, inputs, ONNX outputs, seconds)
    for sizes in spec.validation_sizes():
        arrays = spec.make_inputs(sizes, rng)
        start = time.perf_counter()
        try:
            got = session.run([t.name for t in spec.outputs], {t.name: arrays[t.name] for t in spec.inputs})
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            first = str(exc).strip().splitlines()[0][:300]
            mismatches.append(Mismatch("runtime", spec.name, "*", sizes, f"ONNX Runtime failed: {first}"))
            continue
        runs.append((sizes, arrays, got, time.perf_counter() - start))
    del session
    if runs and not isinstance(module, nn.Module):
        module = module()
    for sizes, arrays, got, seconds_onnx in runs:
        start = time.perf_counter()
        with torch.no_grad():
            ref = module(*_torch_inputs(spec, arrays))
        seconds_torch = time.perf_counter() - start
        refs = [r.numpy() for r in (ref if isinstance(ref, tuple | list) else (ref,))]
        case = CaseResult(dict(sizes), {}, {}, seconds_onnx, seconds_torch)
        for tensor, onnx_out, torch_out in zip(spec.outputs, got, refs, strict=True):
            try:
                want_shape = tensor.resolve(sizes)
            except KeyError as exc:
                mismatches.append(Mismatch("unknown axis", spec.name, tensor.name, sizes, str(exc)))
                continue
            if onnx_out.shape != want_shape or torch_out.shape != want_shape:
                mismatches.append(
                    Mismatch(
                        "shape",
                        spec.name,
                        tensor.name,
                        sizes,
                        f"expected {want_shape}, ONNX gave {onnx_out.shape}, PyTorch {torch_out.shape}",
                    )
                )
                continue
            if not np.isfinite(onnx_out).all():
                mismatches.append(
                    Mismatch("nonfinite", spec.name, tensor.name, sizes, "ONNX output has NaN/inf")
                )
                continue
            err = float(np.abs(onnx_out.astype(np.float64) - torch_out).max()) if onnx_out.size else 0.0
            scale = float(np.abs(torch_out).max()) if torch_out.size else 0.0
            case.max_abs_error[tensor.name] = err
            case.max_abs_reference[tensor.name] = scale
            limit = spec.atol + spec.rtol * scale
            if err > limit:
                mismatches.append(
                    Mismatch(
                        "tolerance",
                        spec.name,
                        tensor.name,
                        sizes,
                        f"max abs error {err:.3g} > {limit:.3g} "
                        f"(atol {spec.atol:g} + rtol {spec.rtol:g} x {scale:.3g})",
                    )
                )
        result.cases.append(case)
    if mismatches:
        raise ValidationError(mismatches)
    return result
