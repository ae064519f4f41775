"""Package integrity for `vsal-export check`: weights in side files hold every byte their tensors
declare, each graph's inputs and outputs match the manifest, every dynamic axis has a sound
optimisation profile, and the package is one `vsal run` can load."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import onnx
from vsal.export.check.report import Finding, GraphReport
from vsal.export.check.tables import numpy_dtype
from vsal.runtime import shapes
from vsal.runtime.manifest import GraphInfo, Manifest, PackageError, TensorInfo, check_runnable
from vsal.transforms.graph_index import external_tensors, feed_inputs
from vsal.transforms.onnx_io import extent_problem, external_entries


def runnable(manifest: Manifest, folder: Path) -> list[Finding]:
    """What Pipeline.load refuses (the same checks), so that check never passes a package `vsal run`
    cannot run. A package of none of the runtime's graphs is one for TensorRT checks only: a warning."""
    from vsal.runtime.graphs import REQUIRED_GRAPHS
    from vsal.runtime.pipeline import check_required_graphs, load_tokenizers

    if not manifest.graphs:
        return [
            Finding("error", "both", f"{folder}: the manifest names no graphs (export the package again)")
        ]
    if not any(g in manifest.graphs for g in REQUIRED_GRAPHS):
        return [
            Finding(
                "warning",
                "both",
                f"none of the runtime's graphs ({', '.join(REQUIRED_GRAPHS)}): checked for TensorRT "
                "only, `vsal run` cannot run this package",
            )
        ]
    try:
        check_required_graphs(manifest, folder)  # first, as Pipeline.load does: check_runnable reads them
        check_runnable(manifest, folder)
        load_tokenizers(manifest, folder)
    except PackageError as exc:  # TokenizerFileError is one
        return [Finding("error", "both", str(exc))]
    return []


def check_external_data(model: onnx.ModelProto, info: GraphInfo, folder: Path, report: GraphReport) -> None:
    """Weights in side files must exist, be covered by the manifest's sha256 list, and hold every
    byte their tensors declare (a sha256 fixed after truncating the file proves nothing)."""
    listed = {os.path.realpath(folder / f) for f in info.external_data}
    names: dict[str, str] = {}  # real path -> the name shown
    outside: dict[str, list[str]] = {}  # real path -> its tensors' extents past its end
    for tensor in external_tensors(model.graph):
        location = external_entries(tensor).get("location", "")
        # Resolved as the kernel does (symlinks before what follows them); load_manifest refused
        # locations that resolve outside the package.
        real = os.path.realpath(os.path.join(os.path.dirname(folder / info.file), location))
        if real not in names:
            names[real] = posixpath.normpath(posixpath.join(posixpath.dirname(info.file), location))
            if not os.path.isfile(real):
                report.add("error", "both", f"external weight file {names[real]} is missing")
            if real not in listed:
                message = f"external weight file {names[real]} is not in the manifest's external_data"
                report.add("error", "both", message)
        if os.path.isfile(real):
            problem = extent_problem(tensor, os.path.getsize(real))
            if problem:
                outside.setdefault(real, []).append(problem)
    for real, problems in outside.items():
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        report.add("error", "both", f"external weight file {names[real]}: {problems[0]}{more}")


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """[int | dim_param | None (unnamed dynamic)], or None when the rank is unknown."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param.replace(" ", ""))
        else:
            out.append(None)
    return out


def _compare(kind: str, value: onnx.ValueInfoProto, declared: TensorInfo, report: GraphReport) -> None:
    """One graph input/output against its manifest entry: dtype, rank, every dimension."""
    where = f"{kind} {value.name}"
    onnx_dtype = numpy_dtype(value.type.tensor_type.elem_type)
    if onnx_dtype != declared.dtype:
        report.add("error", "both", f"{where}: ONNX dtype {onnx_dtype}, manifest says {declared.dtype}")
    dims = _dims(value)
    if dims is None:
        report.add(
            "error" if kind == "input" else "warning", "both", f"{where}: the ONNX graph gives no shape"
        )
        return
    if len(dims) != len(declared.shape):
        report.add("error", "both", f"{where}: ONNX rank {len(dims)}, manifest rank {len(declared.shape)}")
        return
    soft = "error" if kind == "input" else "warning"  # output shapes follow from the inputs
    for i, (got, want) in enumerate(zip(dims, declared.shape, strict=True)):
        at = f"{where} dim {i}"
        if got is None:
            report.add(soft, "both", f"{at}: unnamed dynamic dimension (manifest: {want})")
        elif isinstance(got, int) and isinstance(want, int):
            if got != want:
                report.add("error", "both", f"{at}: ONNX size {got}, manifest size {want}")
        elif isinstance(got, int):
            report.add("error", "both", f"{at}: static {got} in ONNX but dynamic {want!r} in the manifest")
        elif isinstance(want, int):
            report.add("error", "both", f"{at}: dynamic {got!r} in ONNX but static {want} in the manifest")
        elif not shapes.same(got, want):
            report.add(soft, "both", f"{at}: ONNX names it {got!r}, the manifest {want!r}")


def check_io(graph: onnx.GraphProto, info: GraphInfo, report: GraphReport) -> None:
    for kind, values, declared in (
        ("input", feed_inputs(graph), info.inputs),
        ("output", list(graph.output), info.outputs),
    ):
        by_name = {v.name: v for v in values}
        wanted = {t.name: t for t in declared}
        for name in sorted(wanted.keys() - by_name.keys()):
            report.add("error", "both", f"manifest {kind} {name} is not a graph {kind}")
        for name in sorted(by_name.keys() - wanted.keys()):
            report.add("error", "both", f"graph {kind} {name} is not in the manifest")
        for name in by_name.keys() & wanted.keys():
            _compare(kind, by_name[name], wanted[name], report)


def check_profile(graph: onnx.GraphProto, info: GraphInfo, report: GraphReport) -> None:
    """Every dynamic input dimension needs min <= opt <= max for each of its axes (in steps, if any)."""
    used: set[str] = set()
    for value in feed_inputs(graph):
        for d in _dims(value) or []:
            if isinstance(d, str):
                used |= shapes.dim_axes(d)
    for axis in sorted(used - info.profile.keys()):
        report.add(
            "error", "both", f"dynamic axis {axis} has no optimisation profile (TensorRT needs min/opt/max)"
        )
    for axis, bounds in sorted(info.profile.items()):
        keys = ("min", "opt", "max")
        values = [bounds.get(k) if isinstance(bounds, dict) else None for k in keys]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            report.add("error", "both", f"profile of {axis} needs integer min, opt and max, got {bounds!r}")
            continue
        lo, opt, hi = values
        if not 0 <= lo <= opt <= hi:
            report.add(
                "error", "both", f"profile of {axis}: need 0 <= min <= opt <= max, got {lo}, {opt}, {hi}"
            )
        step = info.axis_multiples.get(axis, 1)
        if step > 1 and any(v % step for v in values):
            report.add("error", "both", f"profile of {axis}: {lo}/{opt}/{hi} must be multiples of {step}")
        if axis not in used:
            report.add(
                "warning", "both", f"profile axis {axis} names no dynamic dimension of any graph input"
            )
    for axis in sorted(info.axis_multiples.keys() - info.profile.keys()):
        report.add("warning", "both", f"axis_multiples names {axis}, which has no profile")
