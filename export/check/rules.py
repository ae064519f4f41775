"""Per-graph rules of `vsal-export check`: the ONNX checker, the opset, every operator and its data
types against TensorRT's tables (vsal.export.check.tables), the documented per-node restrictions,
the tensor types, the precision the manifest claims (read from its row in vsal.runtime.precisions)
and symmetric zero points."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto
from vsal.export.check.report import GraphReport
from vsal.export.check.tables import (
    ACCEPTED_TYPES,
    LATER_11,
    QUANTIZED_TYPES,
    SINCE_10,
    SOURCE_ALSO,
    TABLES,
    TRT_CUSTOM_11,
    doc_dtype,
)
from vsal.runtime import precisions
from vsal.runtime.errors import ConfigError
from vsal.runtime.manifest import GraphInfo, Manifest
from vsal.transforms.graph_index import DEFAULT_DOMAINS, GraphIndex, attribute, initializers, walk


def check_model_validity(model: onnx.ModelProto, path: Path, report: GraphReport) -> None:
    try:
        onnx.checker.check_model(str(path))  # by path: large external weights are not read
    except Exception as exc:  # onnx.checker.ValidationError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.add("error", "both", f"ONNX checker: {first}")


def _default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    return None


def check_opset(model: onnx.ModelProto, manifest: Manifest, info: GraphInfo, report: GraphReport) -> None:
    opset = report.opset = _default_opset(model)
    if opset is None:
        report.add("error", "both", "the graph imports no default ONNX opset")
        return
    # A variant may raise the opset to what its precision's ops need (int4's block DequantizeLinear: 21).
    raised = info.precision in precisions.names() and opset == precisions.get(info.precision).min_opset
    if manifest.opset and manifest.opset != opset and not raised:
        report.add("warning", "both", f"opset {opset} differs from the manifest's opset {manifest.opset}")
    for v, table in TABLES.items():
        if opset < table.opset_min:
            report.add("error", v, f"opset {opset} is below TensorRT {v}'s minimum {table.opset_min}")
        elif opset > table.opset_max_later:
            report.add(
                "error",
                v,
                f"opset {opset} is above every documented TensorRT {v}.x (at most {table.opset_max_later})",
            )
        elif opset > table.opset_max:
            report.add(
                "warning",
                v,
                f"opset {opset} is above TensorRT {table.documented}'s {table.opset_max}: "
                f"only later {v}.x releases (up to opset {table.opset_max_later}) document it",
            )
        elif opset > table.opset_max_early:
            report.add(
                "warning",
                v,
                f"opset {opset} is within TensorRT {table.documented}'s range but above {v}.0's "
                f"{table.opset_max_early}: early {v}.x releases (JetPack 6.x ships 10.3) may reject it",
            )


def infer(model: onnx.ModelProto, report: GraphReport) -> onnx.ModelProto:
    """The model with inferred value types; the model itself when inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:
        report.add(
            "info", "both", f"shape inference failed ({type(exc).__name__}); node dtypes partly unknown"
        )
        return model


def check_nodes(model: onnx.ModelProto, report: GraphReport) -> None:
    functions = {(f.domain, f.name): f for f in model.functions}
    index = GraphIndex.of(model.graph)
    types = index.types
    opset = report.opset or 0
    counts: Counter[str] = Counter()
    dtype_problems: dict[tuple[str, str, str, str], int] = {}  # (level, version, op, message) -> count
    unknown_dtype = 0
    constants = index.constants
    for node, graph in walk(model.graph, functions):
        domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
        counts[node.op_type if not domain else f"{domain}:{node.op_type}"] += 1
        if domain:
            continue  # judged once per op type below
        if graph is not None:  # nodes of local functions see their own formal inputs only
            for level, version, message in _node_restrictions(node, constants):
                report.add(level, version, message)
        checked = _checked_inputs(node, opset)
        if not checked:
            continue
        seen_types = {types[name] for name in checked if name in types}
        if node.op_type in ("Cast", "CastLike"):  # the target type counts as much as the source
            seen_types |= {types[o] for o in node.output[:1] if o in types}
        if len(seen_types) < 1:
            unknown_dtype += 1
        for elem in seen_types:
            for level, version, message in _dtype_verdicts(node.op_type, doc_dtype(elem)):
                key = (level, version, node.op_type, message)
                dtype_problems[key] = dtype_problems.get(key, 0) + 1
    report.nodes = sum(counts.values())
    report.op_counts = dict(counts)
    for (level, version, _op, message), n in dtype_problems.items():
        report.add(level, version, f"{message} ({n} node(s))")
    if unknown_dtype:
        report.add(
            "info", "both", f"{unknown_dtype} node(s) with input dtypes shape inference could not tell"
        )
    for key in sorted(counts):
        domain, _, op = key.rpartition(":")
        for level, version, message in _op_verdicts(domain, op):
            report.add(level, version, f"{message} ({counts[key]} node(s))")


def _op_verdicts(domain: str, op: str) -> Iterator[tuple[str, str, str]]:
    """(level, version, message) for one operator type, against each table."""
    if domain == "com.microsoft":
        yield (
            "error",
            "both",
            (
                f"com.microsoft:{op} is an ONNX Runtime contrib op: TensorRT's ONNX parser does not "
                "implement it (export with standard ONNX ops only)"
            ),
        )
        return
    if op in TRT_CUSTOM_11:
        yield "info", "11", f"{op}: a TensorRT 11 custom operator (docs/TRT_custom_ops.md)"
        yield "error", "10", f"{op}: TensorRT 11 custom operator, not in the TensorRT 10.15 documents"
        return
    if domain:
        yield (
            "error",
            "both",
            (
                f"{domain}:{op}: custom domain {domain!r}; TensorRT parses it only through a plugin of that "
                "name, and vsal ships none"
            ),
        )
        return
    for v, table in TABLES.items():
        support = table.ops.get(op)
        if support is None:
            yield "error", v, f"{op} is not in TensorRT {table.documented}'s ONNX operator table"
        elif not support.supported:
            later = LATER_11.get(op) if v == "11" else None
            if later:
                yield (
                    "warning",
                    v,
                    f"{op} is unsupported in TensorRT 11.0; the release notes add it in {later}",
                )
            else:
                note = f" ({support.restriction})" if support.restriction else ""
                yield "error", v, f"{op} is unsupported by TensorRT {table.documented}{note}"
        else:
            since = SINCE_10.get(op) if v == "10" else None
            if since:
                yield (
                    "warning",
                    v,
                    (
                        f"{op} is supported from TensorRT {since}: older 10.x releases "
                        "(JetPack 6.x ships 10.3) cannot parse it"
                    ),
                )
            if support.restriction and op not in _CHECKED_RESTRICTIONS:
                yield "info", v, f"{op}: documented restriction, not checked here: {support.restriction}"


def _dtype_verdicts(op: str, dtype: str) -> Iterator[tuple[str, str, str]]:
    for v, table in TABLES.items():
        support = table.ops.get(op)
        if support is None or not support.supported or dtype in support.dtypes:
            continue  # unknown/unsupported ops are reported once, by _op_verdicts
        if dtype == "DOUBLE":
            yield "warning", v, f"{op} on DOUBLE: TensorRT casts DOUBLE down to FLOAT (clamping to +-FLT_MAX)"
        elif (op, dtype) in SOURCE_ALSO:
            yield (
                "warning",
                v,
                (
                    f"{op} on {dtype}: not in operators.md's types, but the 10.x parser's source "
                    "implements it (elementwise); confirm on the target"
                ),
            )
        else:
            allowed = ", ".join(sorted(support.dtypes))
            yield "error", v, f"{op} on {dtype}: TensorRT {table.documented} documents {allowed} only"


def _checked_inputs(node: onnx.NodeProto, opset: int) -> list[str]:
    """The inputs the table's 'Supported Types' column is about: those of the op's main type.

    The main type is that of the first input whose type constraint allows several types (Where's
    condition is always bool; Gather's indices, Reshape's shape or Resize's sizes are not the data).
    """
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:  # not an ONNX op at this opset: reported by _op_verdicts
        return [n for n in node.input[:1] if n]
    allowed = {c.type_param_str: len(c.allowed_type_strs) for c in schema.type_constraints}
    formal = [p.type_str for p in schema.inputs]
    if not formal:
        return []
    main = next((t for t in formal if allowed.get(t, 1) > 1), formal[0])
    names = []
    for i, name in enumerate(node.input):
        param = formal[min(i, len(formal) - 1)]  # variadic inputs share the last formal parameter
        if name and param == main:
            names.append(name)
    return names


# Restrictions from the table that _node_restrictions verifies (others are reported as "not checked").
_REDUCE = {
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
}
_CHECKED_RESTRICTIONS = _REDUCE | {
    "CumSum",
    "OneHot",
    "Dropout",
    "LayerNormalization",
    "MaxPool",
    "TopK",
    "ScatterND",
    "Squeeze",
    "Unsqueeze",
}


def _node_restrictions(node: onnx.NodeProto, constants: set[str]) -> Iterator[tuple[str, str, str]]:
    """The documented per-node restrictions that can be read off the graph."""
    op, inputs = node.op_type, list(node.input)

    def const_input(i: int) -> bool:
        return i >= len(inputs) or not inputs[i] or inputs[i] in constants

    label = f"{op} node {node.name or node.output[0]!r}"
    # Reductions take axes as an input from opset 18 (ReduceSum from 13).
    if op in _REDUCE and not const_input(1):
        yield "error", "both", f"{label}: axes must be an initializer (it is computed at run time)"
    if op in ("CumSum", "OneHot") and not const_input(1):
        what = "axis" if op == "CumSum" else "depth"
        yield "error", "both", f"{label}: {what} must be a build-time constant"
    if op == "Dropout" and not const_input(2):
        yield "error", "both", f"{label}: training_mode must be an initializer evaluating to False"
    if op in ("Squeeze", "Unsqueeze") and not const_input(1):
        yield "warning", "both", f"{label}: axes is computed; TensorRT needs it resolvable to a constant"
    if op == "LayerNormalization" and any(node.output[1:]):
        yield "error", "both", f"{label}: only the first output (Y) is supported; Mean/InvStdDev are used"
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        yield "error", "both", f"{label}: the Indices output is unsupported"
    if op == "TopK" and attribute(node, "sorted", 1) != 1:
        yield "error", "both", f"{label}: sorted must be 1"
    if op == "ScatterND" and attribute(node, "reduction", b"none") not in (b"none", "none"):
        yield "error", "both", f"{label}: reduction other than none is unsupported"


def check_tensor_types(model: onnx.ModelProto, report: GraphReport) -> None:
    """Graph inputs/outputs and weights must be of a type TensorRT's parser accepts."""
    graph = model.graph
    io = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    for name, elem in io.items():
        dtype = doc_dtype(elem)
        if dtype not in ACCEPTED_TYPES:
            report.add("error", "both", f"graph input/output {name} is {dtype}: TensorRT has no such type")
        elif dtype in QUANTIZED_TYPES:
            report.add(
                "warning",
                "both",
                f"graph input/output {name} is {dtype}: quantized types come only from Q/DQ",
            )
        elif dtype == "DOUBLE":
            report.add("warning", "both", f"graph input/output {name} is DOUBLE: TensorRT casts it to FLOAT")
    odd = Counter(doc_dtype(t.data_type) for t in initializers(graph))
    for dtype, n in odd.items():
        if dtype not in ACCEPTED_TYPES:
            report.add("error", "both", f"{n} weight tensor(s) of type {dtype}: TensorRT has no such type")
        elif dtype == "DOUBLE":
            report.add("warning", "both", f"{n} weight tensor(s) are DOUBLE: TensorRT casts them to FLOAT")


# --- precision: TensorRT 11 builds strongly typed networks only ------------------------------------


def check_precision(model: onnx.ModelProto, info: GraphInfo, report: GraphReport) -> None:
    """What the precision's registry row promises must be in the graph, since TensorRT 11 builds
    strongly typed networks only: float16 activations as FLOAT16 tensors, fewer than 16 weight bits
    as Q/DQ nodes, and at least the row's opset."""
    try:
        row = precisions.get(info.precision)
    except ConfigError:
        known = ", ".join(precisions.names())
        report.add("warning", "both", f"unknown precision {info.precision!r} (expected {known})")
        return
    name = row.name
    if row.weight_bits < 16 and not set(report.op_counts) & {"QuantizeLinear", "DequantizeLinear"}:
        message = f"precision {name} without Q/DQ nodes"
        report.add("error", "11", f"{message}: TensorRT 11 removed implicit INT8 calibration")
        report.add(
            "warning",
            "10",
            f"{message} needs an INT8 calibrator (deprecated since TensorRT 10.1)",
        )
    types = set(GraphIndex.of(model.graph).types.values())
    if row.activation == "float16" and TensorProto.FLOAT16 not in types:
        report.add(
            "error",
            "11",
            f"precision {name} but no float16 tensors: TensorRT 11 builds strongly typed networks only, "
            "so this graph would build in FP32",
        )
        report.add(
            "warning",
            "10",
            f"precision {name} but no float16 tensors: needs the weak-typing builder flag (deprecated "
            "since TensorRT 10.12)",
        )
    if report.opset is not None and report.opset < row.min_opset:
        wanted = f"opset {row.min_opset} or later"
        report.add("error", "both", f"precision {name} needs {wanted}, the graph has {report.opset}")


def check_zero_points(model: onnx.ModelProto, report: GraphReport) -> None:
    """TensorRT takes symmetric quantization only: every Q/DQ zero point must be zero. They are small
    initializers (never external data), so this is read off the graph instead of left to the target."""
    values = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not nodes:
        return
    nonzero = []
    for node in nodes:
        if len(node.input) > 2 and node.input[2]:
            tensor = values.get(node.input[2])
            if tensor is None or onnx.external_data_helper.uses_external_data(tensor):
                continue  # computed or external: left to the documented restriction below
            if onnx.numpy_helper.to_array(tensor).any():
                nonzero.append(node.name or node.output[0])
    report.findings = [f for f in report.findings if "zero_point must be" not in f.message]
    if nonzero:
        report.add(
            "error",
            "both",
            f"{len(nonzero)} Q/DQ node(s) with a non-zero zero point (TensorRT quantizes symmetrically "
            f"only), e.g. {nonzero[0]!r}",
        )
    else:
        report.add("info", "both", f"{len(nodes)} Q/DQ node(s), all with zero zero points (symmetric)")
