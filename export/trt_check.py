"""`vsal-export check`: will TensorRT 10 and 11 parse this package's graphs? Checked without a GPU.

Each graph of a model package is compared with TensorRT's *documented* ONNX support: the ONNX
parser's operator table (operator, data types, restrictions), its opset range, the data types it
accepts, and what TensorRT 11 removed (weak typing, implicit INT8 calibration). The package is
checked too: every file against its sha256, and every graph's inputs against the manifest (names,
dtypes, static dims, named dynamic axes, optimisation profiles). Nothing here runs TensorRT, so a
clean report means "expected to parse", never "verified on TensorRT": build on the target to know.

Sources of the tables below (read for this module; re-read them when a new TensorRT ships):
- TensorRT 10.x: onnx/onnx-tensorrt `docs/operators.md`, the TensorRT 10.15 revision ("TensorRT
  10.15 supports operators in the inclusive range of opset 9 to opset 24"; the stored copy does not
  name its commit). The 10.0 revision (onnx/onnx-tensorrt@96e781103cfc, tag release/10.1-GA) gives
  the opset ceiling of early 10.x (20) and, with `docs/Changelog.md`, the minor release that added
  each operator (`_SINCE_10`).
- TensorRT 11.x: onnx/onnx-tensorrt `docs/operators.md` and `docs/Changelog.md` at
  2f3fa349247d9ff52d7662cb995c82278df31a86 ("TensorRT 11.0 supports operators in the inclusive range
  of opset 9 to opset 24"; 11.0 adds `Swish`). Later 11.x: NVIDIA/TensorRT release notes 11.2 (DFT
  through a cuFFT plugin) and 11.5 (opset 25).
- TensorRT 11 removals: NVIDIA "Migrating from TensorRT 10.x to 11.x" (docs.nvidia.com/deeplearning/
  tensorrt/11.x/api/migration/tensorrt-10x-to-11x.html): strongly typed networks only, the
  FP16/INT8/BF16 builder flags and IInt8Calibrator removed (explicit Q/DQ instead); JetPack is not
  supported by 11.x, Jetson stays on 10.x (JetPack 6.x ships TensorRT 10.3). TensorRT 10 C++ API
  "deprecated" list: the INT8 calibrators are deprecated since 10.1; 10.12 release notes: weak-typing
  APIs deprecated.
"""

from __future__ import annotations

import ast
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto
from vsal.runtime.manifest import (
    GraphInfo,
    Manifest,
    PackageError,
    TensorInfo,
    check_runnable,
    load_manifest,
    verify_files,
)

VERSIONS = ("10", "11")
BASIS = (
    "checked against TensorRT's published ONNX support (onnx-tensorrt docs/operators.md of TensorRT "
    "10.15 and 11.0, NVIDIA's 10.x-to-11.x migration guide), not against a real TensorRT: "
    "build an engine on the target to confirm"
)
SOURCES = {
    "10": "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 revision (10.0 revision at 96e781103cfc)",
    "11": "onnx/onnx-tensorrt docs/operators.md @ 2f3fa349247d (TensorRT 11.0); TensorRT 11.2/11.5 notes",
}

# --- the documented tables -------------------------------------------------------------------------
# One row per operator of docs/operators.md (TensorRT 10.15): name | Y/N | supported types | restriction.
# Restrictions are shortened from the document's wording. "F3" abbreviates "FP32, FP16, BF16" and
# "I" abbreviates "INT32, INT64" (the document spells them out on every row).
_TABLE_10_15 = """
Abs | Y | F3, I |
Acos | Y | F3 |
Acosh | Y | F3 |
Add | Y | F3, I |
AffineGrid | N | |
And | Y | BOOL |
ArgMax | Y | F3, I |
ArgMin | Y | F3, I |
Asin | Y | F3 |
Asinh | Y | F3 |
Atan | Y | F3 |
Atanh | Y | F3 |
Attention | Y | F3, INT8, FP8 | Q, K, V and attn_mask must be 4D; inputs past_key, past_value, \
nonpad_kv_seqlen, outputs present_key, present_value, qk_matmul_output and attributes \
qk_matmul_output_mode, softcap are unsupported
AveragePool | Y | F3 | 2D or 3D pooling only; dilations must be empty or all ones
BatchNormalization | Y | F3 |
Bernoulli | N | |
BitShift | N | |
BitwiseAnd | N | |
BitwiseNot | N | |
BitwiseOr | N | |
BitwiseXor | N | |
BlackmanWindow | Y | FP32, FP16 |
Cast | Y | F3, I, UINT8, BOOL |
CastLike | Y | F3, I, UINT8, BOOL |
Ceil | Y | F3 |
Col2Im | N | |
Celu | Y | F3 |
CenterCropPad | N | |
Clip | Y | F3 |
Compress | N | |
Concat | Y | F3, I, BOOL |
ConcatFromSequence | N | |
Constant | Y | F3, FP8, FP4, INT4, I, BOOL | sparse_value, value_string and value_strings are unsupported
ConstantOfShape | Y | F3, FP8, FP4, INT4, I, BOOL |
Conv | Y | F3 |
ConvInteger | N | |
ConvTranspose | Y | F3 |
Cos | Y | F3 |
Cosh | Y | F3 |
CumSum | Y | F3 | axis must be a build-time constant
DFT | N | |
DeformConv | Y | FP32, FP16 | 1D or 2D spatial input only; begin and end pads equal on each spatial axis
DepthToSpace | Y | F3, I |
DequantizeLinear | Y | INT8, FP8, FP4, INT4 | x_zero_point must be zero
Det | N | |
Div | Y | F3, I |
Dropout | Y | F3 | is_training must be an initializer that evaluates to False
DynamicQuantizeLinear | N | | compose it from ONNX operators as a model-local function instead
Einsum | Y | F3 |
Elu | Y | F3 |
Equal | Y | F3, I |
Erf | Y | F3 |
Exp | Y | F3 |
Expand | Y | F3, I, BOOL |
EyeLike | Y | F3, I, BOOL | input must have static dimensions
Flatten | Y | F3, I, BOOL |
Floor | Y | F3 |
Gather | Y | F3, I, BOOL |
GatherElements | Y | F3, I, BOOL |
GatherND | Y | F3, I, BOOL |
Gelu | Y | F3, INT8, I |
Gemm | Y | F3 |
GlobalAveragePool | Y | F3 |
GlobalLpPool | Y | F3 |
GlobalMaxPool | Y | F3 |
Greater | Y | F3, I |
GreaterOrEqual | Y | F3, I |
GridSample | Y | FP32, FP16 | input must be 4D
GroupNormalization | Y | F3 |
GRU | Y | F3 | bidirectional GRUs need the same activations in both directions
HammingWindow | Y | FP32, FP16 |
HannWindow | Y | FP32, FP16 |
HardSigmoid | Y | F3 |
HardSwish | Y | F3 |
Hardmax | Y | F3 | the axis dimension of the input must be a build-time constant
Identity | Y | F3, I, BOOL |
If | Y | F3, I, BOOL | both branches' outputs must have the same rank and different names
ImageScaler | Y | F3 |
ImageDecoder | N | |
InstanceNormalization | Y | F3 |
IsInf | Y | F3 |
IsNaN | Y | F3, I |
LayerNormalization | Y | F3 | only the first output Y is supported
LeakyRelu | Y | F3 |
Less | Y | F3, I |
LessOrEqual | Y | F3, I |
Log | Y | F3 |
LogSoftmax | Y | F3 |
Loop | Y | F3, I, BOOL | scan output length cannot be dynamic; loop-carried shapes must not change
LRN | Y | F3 |
LSTM | Y | F3 | same activations in both directions; input_forget must be 0; layout must be 0
LpNormalization | Y | F3 |
LpPool | Y | F3 | dilations must be empty or all ones
MatMul | Y | F3 |
MatMulInteger | N | |
Max | Y | F3, I |
MaxPool | Y | F3 | 2D or 3D pooling only; no Indices output; dilations must be empty or all ones
MaxRoiPool | N | |
MaxUnpool | N | |
Mean | Y | F3, FP8, I |
MeanVarianceNormalization | Y | F3 |
MelWeightMatrix | N | |
Min | Y | F3, I |
Mish | Y | FP32, FP16 |
Mod | Y | F3, I |
Mul | Y | F3, I |
Multinomial | N | |
Neg | Y | F3, I |
NegativeLogLikelihoodLoss | N | |
NonMaxSuppression | Y | FP32, FP16 |
NonZero | Y | FP32, FP16 |
Not | Y | BOOL |
OneHot | Y | F3, I, BOOL | depth must be a build-time constant
Optional | N | |
OptionalGetElement | N | |
OptionalHasElement | N | |
Or | Y | BOOL |
Pad | Y | F3, I |
ParametricSoftplus | Y | F3 |
Pow | Y | F3, I |
PRelu | Y | F3 |
QLinearConv | N | |
QLinearMatMul | N | |
QuantizeLinear | Y | F3 | y_zero_point must be 0
RandomNormal | Y | F3 | the seed is ignored
RandomNormalLike | Y | F3 | the seed is ignored
RandomUniform | Y | F3 | the seed is ignored
RandomUniformLike | Y | F3 | the seed is ignored
Range | Y | F3, I |
Reciprocal | Y | F3 |
ReduceL1 | Y | F3, I | axes must be an initializer
ReduceL2 | Y | F3, I | axes must be an initializer
ReduceLogSum | Y | F3, I | axes must be an initializer
ReduceLogSumExp | Y | F3, I | axes must be an initializer
ReduceMax | Y | F3, I | axes must be an initializer
ReduceMean | Y | F3, I | axes must be an initializer
ReduceMin | Y | F3, I | axes must be an initializer
ReduceProd | Y | F3, I | axes must be an initializer
ReduceSum | Y | F3, I | axes must be an initializer
ReduceSumSquare | Y | F3, I | axes must be an initializer
RegexFullMatch | N | |
Relu | Y | F3, I |
Reshape | Y | F3, I, BOOL |
Resize | Y | F3 | coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, \
align_corners; modes nearest, linear; aspect ratio policy stretch; no antialiasing
ReverseSequence | Y | F3, I, BOOL |
RMSNormalization | Y | F3 |
RNN | Y | F3 | bidirectional RNNs need the same activations in both directions
RoiAlign | Y | FP32, FP16 |
RotaryEmbedding | Y | F3 | position_ids must be INT64
Round | Y | F3 |
STFT | Y | FP32 | frame_step and window must be initializers; real-valued input only
ScaledTanh | Y | F3 |
Scan | Y | F3 |
Scatter | Y | F3, I |
ScatterElements | Y | F3, I |
ScatterND | Y | F3, I | reduction other than none is unsupported
Selu | Y | F3 |
SequenceAt | N | |
SequenceConstruct | N | |
SequenceEmpty | N | |
SequenceErase | N | |
SequenceInsert | N | |
SequenceLength | N | |
SequenceMap | N | |
Shape | Y | F3, I, BOOL |
Shrink | Y | F3, I |
Sigmoid | Y | F3 |
Sign | Y | F3, I |
Sin | Y | F3 |
Sinh | Y | F3 |
Size | Y | F3, I, BOOL |
Slice | Y | F3, I, BOOL |
Softmax | Y | F3 |
SoftmaxCrossEntropyLoss | N | |
Softplus | Y | F3 |
Softsign | Y | F3 |
SpaceToDepth | Y | F3, I |
Split | Y | F3, I, BOOL |
SplitToSequence | N | |
Sqrt | Y | F3 |
Squeeze | Y | F3, I, BOOL | axes must be resolvable to a constant
StringConcat | N | |
StringNormalizer | N | |
StringSplit | N | |
Sub | Y | F3, I |
Sum | Y | F3, I |
Tan | Y | F3 |
Tanh | Y | F3 |
TensorScatter | Y | F3, INT32 | past_cache and update must be 4D; axis must be -2
TfIdfVectorizer | N | |
ThresholdedRelu | Y | F3 |
Tile | Y | F3, I, BOOL |
TopK | Y | F3, I | sorted must be 1; K must be less than 3840
Transpose | Y | F3, I, BOOL |
Trilu | Y | F3, I, BOOL |
Unique | N | |
Unsqueeze | Y | F3, I, BOOL | axes must be resolvable to a constant
Upsample | Y | F3 |
Where | Y | F3, I, BOOL |
Xor | Y | BOOL |
"""

# TensorRT 11.0's operators.md is the 10.15 table plus these rows.
_ADDED_11_0 = """
Swish | Y | F3 |
"""

# Minor 10.x release that added an operator (docs/Changelog.md); JetPack 6.x ships TensorRT 10.3.
_SINCE_10 = {
    "DeformConv": "10.1",
    "BlackmanWindow": "10.4",
    "HammingWindow": "10.4",
    "HannWindow": "10.4",
    "STFT": "10.5",
    "Attention": "10.14",
    "RMSNormalization": "10.15",
    "RotaryEmbedding": "10.15",
    "TensorScatter": "10.15",
}
# Operators that the 11.0 table marks N but a later 11.x release note adds.
_LATER_11 = {"DFT": "11.2 (through a cuFFT plugin)"}
# TensorRT's own custom operators (docs/TRT_custom_ops.md @ 2f3fa349247d, TensorRT 11.0).
_TRT_CUSTOM_11 = {"TRT_QuantizedAttention", "TRT_Attention", "TRT_MoE", "TRT_KVCacheUpdate"}

# Where operators.md's type column is narrower than the parser: onnxOpImporters.cpp at
# onnx/onnx-tensorrt@96e781103cfc (10.1 GA), Clip importer: "For INT32 and multi-input clips, use
# elementwise operators instead" and it accepts INT64 the same way. Reported as warnings, not errors.
_SOURCE_ALSO = {("Clip", "INT32"), ("Clip", "INT64")}

# Data types TensorRT's ONNX parser accepts at all ("TensorRT supports the following ONNX data types").
_QUANTIZED = {"INT8", "INT4", "FP8", "FP4"}  # only through Q/DQ from a wider float type
_ACCEPTED = {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL", "DOUBLE"} | _QUANTIZED

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpSupport:
    supported: bool
    dtypes: frozenset[str]
    restriction: str = ""


@dataclass(frozen=True)
class TrtTable:
    """What one TensorRT major version documents for its ONNX parser."""

    version: str  # "10" | "11"
    documented: str  # the release whose operators.md the table is
    opset_min: int
    opset_max: int  # of the documented release
    opset_max_early: int  # of the major's first release (older minors may stop here)
    opset_max_later: int  # of the newest minor's release notes
    ops: dict[str, OpSupport]


def _parse_table(text: str) -> dict[str, OpSupport]:
    expand = {"F3": ("FP32", "FP16", "BF16"), "I": ("INT32", "INT64")}
    ops = {}
    for line in text.replace("\\\n", "").strip().splitlines():
        name, flag, types, restriction = (part.strip() for part in line.split("|"))
        dtypes = {
            t for tag in types.split(",") if tag.strip() for t in expand.get(tag.strip(), (tag.strip(),))
        }
        ops[name] = OpSupport(flag == "Y", frozenset(dtypes), restriction)
    return ops


TRT10 = TrtTable("10", "10.15", 9, 24, 20, 24, _parse_table(_TABLE_10_15))
TRT11 = TrtTable("11", "11.0", 9, 24, 24, 25, {**TRT10.ops, **_parse_table(_ADDED_11_0)})
TABLES = {"10": TRT10, "11": TRT11}


def _doc_dtype(elem_type: int) -> str:
    """ONNX element type -> the document's spelling (FP32, INT64, FP8 ...)."""
    names = {
        TensorProto.FLOAT: "FP32",
        TensorProto.FLOAT16: "FP16",
        TensorProto.BFLOAT16: "BF16",
        TensorProto.FLOAT8E4M3FN: "FP8",
        TensorProto.FLOAT4E2M1: "FP4",
    }
    if elem_type in names:
        return names[elem_type]
    return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.")


def _numpy_dtype(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):
        return _doc_dtype(elem_type).lower()


# --- the report ----------------------------------------------------------------------------------


@dataclass
class Finding:
    level: str  # "error" | "warning" | "info"
    version: str  # "10" | "11" | "both"
    message: str


@dataclass
class GraphReport:
    name: str
    file: str
    opset: int | None = None
    nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)  # "Op" or "domain:Op" -> count
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, version: str, message: str) -> None:
        self.findings.append(Finding(level, version, message))

    def errors(self, version: str | None = None) -> list[Finding]:
        return [
            f
            for f in self.findings
            if f.level == "error" and (version is None or f.version in (version, "both"))
        ]

    def parses(self, version: str) -> bool:
        """Expected (from the documents) to parse and build on TensorRT `version`."""
        return not self.errors(version)


@dataclass
class CheckReport:
    folder: str
    package: list[Finding] = field(default_factory=list)  # integrity and manifest-level findings
    graphs: dict[str, GraphReport] = field(default_factory=dict)
    basis: str = BASIS

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.package) and all(
            not g.errors() for g in self.graphs.values()
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "ok": self.ok,
            "basis": self.basis,
            "sources": SOURCES,
            "package": [asdict(f) for f in self.package],
            "graphs": {
                name: {**asdict(g), "parses": {v: g.parses(v) for v in VERSIONS}}
                for name, g in self.graphs.items()
            },
        }

    def format(self) -> str:
        lines = [f"vsal-export check {self.folder}", f"  ({self.basis})", ""]
        errors = [f for f in self.package if f.level == "error"]
        lines.append(
            "package: " + ("files match the manifest" if not errors else f"{len(errors)} problem(s)")
        )
        lines += [_format_finding(f) for f in self.package]
        for g in self.graphs.values():
            opset = f"opset {g.opset}" if g.opset is not None else "opset ?"
            lines += ["", f"{g.name}  ({g.file}, {opset}, {g.nodes} nodes, {len(g.op_counts)} op types)"]
            if g.op_counts:
                lines.append("  ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(g.op_counts.items())))
            verdicts = []
            for v in VERSIONS:
                count = len(g.errors(v))
                verdicts.append(f"TensorRT {v}: " + ("yes" if not count else f"no ({count} error(s))"))
            lines.append("  expected to parse and build: " + "; ".join(verdicts))
            order = {"error": 0, "warning": 1, "info": 2}
            lines += [_format_finding(f) for f in sorted(g.findings, key=lambda f: order[f.level])]
        n_err = sum(f.level == "error" for f in self._all())
        n_warn = sum(f.level == "warning" for f in self._all())
        verdict = "OK" if self.ok else "PROBLEMS"
        lines += [
            "",
            f"result: {verdict} ({n_err} error(s), {n_warn} warning(s)); documents, not a real TensorRT",
        ]
        return "\n".join(lines)

    def _all(self) -> Iterator[Finding]:
        yield from self.package
        for g in self.graphs.values():
            yield from g.findings


def _format_finding(f: Finding) -> str:
    where = "TRT 10+11" if f.version == "both" else f"TRT {f.version}"
    return f"  {f.level:7s} [{where}] {f.message}"


# --- entry points ----------------------------------------------------------------------------------


def check_package(folder: str | Path, only: set[str] | None = None) -> CheckReport:
    """Check a model package's files and graphs; PackageError if it has no readable manifest.

    `only`: just these graphs ("vision_encoder", "vision_encoder.int8", ...), without the package-wide
    sha256 pass (what `vsal-export build` checks of the graphs it has just written)."""
    folder = Path(folder)
    manifest = load_manifest(folder)  # raises PackageError (missing folder, corrupt manifest)
    report = CheckReport(str(folder))
    if only is None:
        problems = verify_files(manifest, folder)
        report.package += [Finding("error", "both", p) for p in problems]
        report.package += _runnable(manifest, folder)
    for name, info in manifest.graphs.items():
        if only is None or name in only:
            report.graphs[name] = _check_graph(name, info, manifest, folder)
        for precision, variant in info.variants.items():  # what `vsal-export build` added
            if only is not None and f"{name}.{precision}" not in only:
                continue
            as_graph = replace(
                info,
                file=variant.file,
                sha256=variant.sha256,
                precision=precision,
                external_data=variant.external_data,
                variants={},
            )
            label = f"{name}.{precision}"
            report.graphs[label] = _check_graph(label, as_graph, manifest, folder)
    return report


def main_check(folder: str | Path, as_json: bool) -> int:
    """Print the report (or its JSON); 0 when no errors, 1 otherwise. PackageError propagates."""
    import click

    report = check_package(folder)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    return 0 if report.ok else 1


def _runnable(manifest: Manifest, folder: Path) -> list[Finding]:
    """What Pipeline.load refuses (the same checks), so that check never passes a package `vsal run`
    cannot run. A package of none of the runtime's graphs is one for TensorRT checks only: a warning."""
    from vsal.runtime.pipeline import REQUIRED_GRAPHS, check_required_graphs, load_tokenizers

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


# --- one graph -------------------------------------------------------------------------------------


def _check_graph(name: str, info: GraphInfo, manifest: Manifest, folder: Path) -> GraphReport:
    report = GraphReport(name, info.file)
    path = folder / info.file  # confined to the package by load_manifest (vsal.runtime.package_paths)
    if not path.is_file():
        report.add("error", "both", f"graph file {info.file} is missing: nothing else checked")
        return report
    try:
        # Weights stay on disk: ops, dtypes and shapes are all in the graph proto.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError
        report.add("error", "both", f"{info.file} is not a readable ONNX model ({type(exc).__name__}: {exc})")
        return report
    _check_model_validity(model, path, report)
    _check_opset(model, manifest, report)
    _check_external_data(model, info, folder, report)
    inferred = _infer(model, report)
    _check_nodes(inferred, report)
    _check_tensor_types(inferred, report)
    _check_io(inferred.graph, info, report)
    _check_profile(inferred.graph, info, report)
    _check_precision(inferred, info, report)
    _check_zero_points(model, report)
    _merge_versions(report)
    return report


def _check_model_validity(model: onnx.ModelProto, path: Path, report: GraphReport) -> None:
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


def _check_opset(model: onnx.ModelProto, manifest: Manifest, report: GraphReport) -> None:
    opset = report.opset = _default_opset(model)
    if opset is None:
        report.add("error", "both", "the graph imports no default ONNX opset")
        return
    if manifest.opset and manifest.opset != opset:
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


def _check_external_data(model: onnx.ModelProto, info: GraphInfo, folder: Path, report: GraphReport) -> None:
    """Weights in side files must exist, be covered by the manifest's sha256 list, and hold every
    byte their tensors declare (a sha256 fixed after truncating the file proves nothing)."""
    listed = {os.path.realpath(folder / f) for f in info.external_data}
    names: dict[str, str] = {}  # real path -> the name shown
    outside: dict[str, list[str]] = {}  # real path -> its tensors' extents past its end
    for tensor in _external_tensors(model.graph):
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
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
            problem = _extent_problem(tensor, entries, os.path.getsize(real))
            if problem:
                outside.setdefault(real, []).append(problem)
    for real, problems in outside.items():
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        report.add("error", "both", f"external weight file {names[real]}: {problems[0]}{more}")


def _external_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor ONNX Runtime would read from a side file: initializers and node attributes
    (Constant's value), in subgraphs too."""
    candidates = [*graph.initializer]
    for node in graph.node:
        for attr in node.attribute:
            candidates += [attr.t] if attr.type == onnx.AttributeProto.TENSOR else list(attr.tensors)
    yield from (t for t in candidates if t.data_location == TensorProto.EXTERNAL)
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _external_tensors(sub)


_HALF_BYTE_TYPES = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1}  # two per byte


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes a tensor's shape and dtype need; None for strings and types onnx cannot size."""
    count = 1
    for dim in tensor.dims:
        count *= dim
    if tensor.data_type in _HALF_BYTE_TYPES:
        return (count + 1) // 2
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def _extent_problem(tensor: onnx.TensorProto, entries: dict[str, str], file_size: int) -> str | None:
    """Why ONNX Runtime could not read `tensor` from its side file of `file_size` bytes, or None."""
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        return f"tensor {tensor.name} declares a non-integer offset or length"
    needed = _tensor_bytes(tensor)
    if length is not None and needed is not None and length != needed:
        return f"tensor {tensor.name} declares {length} bytes, its shape {list(tensor.dims)} needs {needed}"
    size = length if length is not None else needed
    if offset < 0 or size is None:
        return None if offset >= 0 else f"tensor {tensor.name} declares offset {offset}"
    if offset + size > file_size:
        return (
            f"tensor {tensor.name} is bytes {offset} to {offset + size}, the file has {file_size} "
            "(truncated, or not this graph's weights)"
        )
    return None


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _initializers(sub)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _infer(model: onnx.ModelProto, report: GraphReport) -> onnx.ModelProto:
    """The model with inferred value types; the model itself when inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:
        report.add(
            "info", "both", f"shape inference failed ({type(exc).__name__}); node dtypes partly unknown"
        )
        return model


# --- operators and their dtypes --------------------------------------------------------------------


def _types(graph: onnx.GraphProto, out: dict[str, int] | None = None) -> dict[str, int]:
    """Tensor name -> ONNX element type, over the graph and its subgraphs."""
    out = {} if out is None else out
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            out[value.name] = value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        out[tensor.name] = tensor.data_type
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                out[node.output[0]] = attr.t.data_type
        for sub in _subgraphs(node):
            _types(sub, out)
    return out


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Names whose value is known when the engine is built (initializers, Constant outputs).

    Subgraphs included: a branch of an If may use its parent's weights.
    """
    names = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            names.add(node.output[0])
        for sub in _subgraphs(node):
            names |= _constants(sub)
    return names


def _walk(
    graph: onnx.GraphProto, functions: dict[tuple[str, str], onnx.FunctionProto]
) -> Iterator[tuple[onnx.NodeProto, onnx.GraphProto | None]]:
    """Every node TensorRT would import: subgraphs included, model-local functions expanded."""
    for node in graph.node:
        key = (node.domain, node.op_type)
        if key in functions:  # TensorRT imports local functions by inlining their bodies
            for inner in functions[key].node:
                yield inner, None
            continue
        yield node, graph
        for sub in _subgraphs(node):
            yield from _walk(sub, functions)


def _check_nodes(model: onnx.ModelProto, report: GraphReport) -> None:
    functions = {(f.domain, f.name): f for f in model.functions}
    types = _types(model.graph)
    opset = report.opset or 0
    counts: Counter[str] = Counter()
    dtype_problems: dict[tuple[str, str, str, str], int] = {}  # (level, version, op, message) -> count
    unknown_dtype = 0
    constants = _constants(model.graph)
    for node, graph in _walk(model.graph, functions):
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
            for level, version, message in _dtype_verdicts(node.op_type, _doc_dtype(elem)):
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
    if op in _TRT_CUSTOM_11:
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
            later = _LATER_11.get(op) if v == "11" else None
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
            since = _SINCE_10.get(op) if v == "10" else None
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
        elif (op, dtype) in _SOURCE_ALSO:
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


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


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
    if op == "TopK" and _attr(node, "sorted", 1) != 1:
        yield "error", "both", f"{label}: sorted must be 1"
    if op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
        yield "error", "both", f"{label}: reduction other than none is unsupported"


def _check_tensor_types(model: onnx.ModelProto, report: GraphReport) -> None:
    """Graph inputs/outputs and weights must be of a type TensorRT's parser accepts."""
    graph = model.graph
    io = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    for name, elem in io.items():
        dtype = _doc_dtype(elem)
        if dtype not in _ACCEPTED:
            report.add("error", "both", f"graph input/output {name} is {dtype}: TensorRT has no such type")
        elif dtype in _QUANTIZED:
            report.add(
                "warning",
                "both",
                f"graph input/output {name} is {dtype}: quantized types come only from Q/DQ",
            )
        elif dtype == "DOUBLE":
            report.add("warning", "both", f"graph input/output {name} is DOUBLE: TensorRT casts it to FLOAT")
    odd = Counter(_doc_dtype(t.data_type) for t in _initializers(graph))
    for dtype, n in odd.items():
        if dtype not in _ACCEPTED:
            report.add("error", "both", f"{n} weight tensor(s) of type {dtype}: TensorRT has no such type")
        elif dtype == "DOUBLE":
            report.add("warning", "both", f"{n} weight tensor(s) are DOUBLE: TensorRT casts them to FLOAT")


# --- inputs, outputs and profiles against the manifest ---------------------------------------------


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


def _axis_names(expr: str) -> set[str]:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return {expr}  # a dim_param that is no expression names one opaque axis
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _same_expr(a: str, b: str) -> bool:
    """Same shape expression ("S*32" and "32*S" are), judged by evaluating both at a few sizes."""
    from vsal.export.specs import evaluate

    a, b = a.replace(" ", ""), b.replace(" ", "")
    if a == b:
        return True
    names = _axis_names(a)
    if names != _axis_names(b):
        return False
    for k, primes in enumerate(((2, 3, 5, 7), (11, 13, 17, 19), (23, 29, 31, 37))):
        sizes = {n: primes[i % 4] + k for i, n in enumerate(sorted(names))}
        try:
            if evaluate(a, sizes) != evaluate(b, sizes):
                return False
        except (KeyError, ValueError, SyntaxError):
            return False
    return True


def _compare(kind: str, value: onnx.ValueInfoProto, declared: TensorInfo, report: GraphReport) -> None:
    """One graph input/output against its manifest entry: dtype, rank, every dimension."""
    where = f"{kind} {value.name}"
    onnx_dtype = _numpy_dtype(value.type.tensor_type.elem_type)
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
        elif not _same_expr(got, want):
            report.add(soft, "both", f"{at}: ONNX names it {got!r}, the manifest {want!r}")


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    weights = {t.name for t in graph.initializer}  # old IR versions list weights as inputs too
    return [v for v in graph.input if v.name not in weights]


def _check_io(graph: onnx.GraphProto, info: GraphInfo, report: GraphReport) -> None:
    for kind, values, declared in (
        ("input", _graph_inputs(graph), info.inputs),
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


def _check_profile(graph: onnx.GraphProto, info: GraphInfo, report: GraphReport) -> None:
    """Every dynamic input dimension needs min <= opt <= max for each of its axes (in steps, if any)."""
    used: set[str] = set()
    for value in _graph_inputs(graph):
        for d in _dims(value) or []:
            if isinstance(d, str):
                used |= _axis_names(d)
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


# --- precision: TensorRT 11 builds strongly typed networks only ------------------------------------


def _check_precision(model: onnx.ModelProto, info: GraphInfo, report: GraphReport) -> None:
    ops = set(report.op_counts)
    if info.precision == "int8":
        if not ops & {"QuantizeLinear", "DequantizeLinear"}:
            report.add(
                "error",
                "11",
                "precision int8 without Q/DQ nodes: TensorRT 11 removed implicit INT8 calibration",
            )
            report.add(
                "warning",
                "10",
                "precision int8 without Q/DQ nodes needs an INT8 calibrator (deprecated since TensorRT 10.1)",
            )
    elif info.precision in ("fp16", "bf16"):
        want = TensorProto.FLOAT16 if info.precision == "fp16" else TensorProto.BFLOAT16
        if want not in set(_types(model.graph).values()):
            report.add(
                "error",
                "11",
                f"precision {info.precision} but no {info.precision} tensors: TensorRT 11 builds strongly "
                "typed networks only, so this graph would build in FP32",
            )
            report.add(
                "warning",
                "10",
                f"precision {info.precision} but no {info.precision} tensors: needs the weak-typing builder "
                "flag (deprecated since TensorRT 10.12)",
            )
    elif info.precision != "fp32":
        report.add(
            "warning", "both", f"unknown precision {info.precision!r} (expected fp32, fp16, bf16, int8)"
        )


def _check_zero_points(model: onnx.ModelProto, report: GraphReport) -> None:
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


def _merge_versions(report: GraphReport) -> None:
    """One finding for both versions where 10 and 11 say the same thing; no duplicates."""
    by_key: dict[tuple[str, str], set[str]] = {}
    order: list[tuple[str, str]] = []
    for f in report.findings:
        key = (f.level, f.message)
        if key not in by_key:
            by_key[key] = set()
            order.append(key)
        by_key[key].add(f.version)
    merged = []
    for level, message in order:
        versions = by_key[(level, message)]
        if "both" in versions or versions >= set(VERSIONS):
            merged.append(Finding(level, "both", message))
        else:
            merged += [Finding(level, v, message) for v in VERSIONS if v in versions]
    report.findings = merged


__all__ = [
    "BASIS",
    "CheckReport",
    "Finding",
    "GraphReport",
    "OpSupport",
    "SOURCES",
    "TABLES",
    "TRT10",
    "TRT11",
    "TrtTable",
    "check_package",
    "main_check",
]
