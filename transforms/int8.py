"""INT8 graphs for TensorRT 10/11 and ONNX Runtime: explicit Q/DQ from calibration, int8 weight-only.

TensorRT 11 builds only strongly typed networks, so int8 lives in the ONNX graph as
QuantizeLinear/DequantizeLinear nodes (design.md, "Precision"). Two forms:

* `quantize_int8` (the five encoder graphs): static PTQ with ONNX Runtime's `quantize_static`
  (QDQ format), calibrated on feeds recorded from real media (`vsal.calib.collect`). Q/DQ go on the
  inputs of MatMul/Conv/Gemm only, as TensorRT wants them: activations per tensor, symmetric int8
  (zero point 0); weights int8 initializers, per output channel, symmetric, behind a
  DequantizeLinear. Outputs are not quantized. ONNX Runtime hands a fake-quantized tensor to every
  consumer; the non-quantized ones (residual Add, LayerNormalization, mask arithmetic) are rewired
  to the float tensor afterwards.
* `quantize_weights_int8` (the LLM decoder): int8 weight-only, DequantizeLinear(int8 weight,
  scale per output channel, zero point 0) -> MatMul; activations stay float, no calibration. A
  plain ONNX form that TensorRT parses as weight-only Q/DQ and that ONNX Runtime 1.32 fuses into
  its MatMulNBits (8-bit) kernel at session load.

Defaults, decided by measurement (cosine vs fp32 on held-out inputs; small preset with random
weights, calibration recorded by the runtime Pipeline from 8 generated clips, 4 other clips held
out; and, because random weights have no outliers, Whisper tiny.en's real encoder on espeak speech):

* method "percentile" (99.999): best or tied everywhere; on real Whisper (attention excluded)
  1-cos 7.4e-3 vs 9.6e-3 entropy (= ModelOpt's default) vs 1.3e-2 minmax. With the default
  exclusions the three calibrators tie (1-cos 1.2e-3). ModelOpt's int8 PTQ (0.47, the same ORT
  quantizer underneath) matches ORT with the same placement; its own placement quantizes the
  attention MatMuls with a fixed 1/127 scale on the softmax output, which costs cosine 0.953
  (vision), 0.967 (BEATs), 0.998 (frame Q-Former) on the small preset, and its entropy calibrator
  fails on the MRC Q-Former (a constant activation: "Too many bins for data range").
* exclude "attention" (activation x activation MatMuls): on real Whisper, quantizing them drops the
  cosine to 0.72-0.83 and breaks transcripts (2/6 equal); excluded: 0.987-0.993.
* exclude "mlp_down" (MLP down projections / Whisper conv2, fed by GELU): real Whisper, per-node
  sensitivity: the last layer's fc2 alone is 2/3 of the error; excluded: 1-cos 7.4e-3 -> 1.2e-3.
* exclude "first_conv" and "last_layer" (patch embeddings / Whisper conv1; the final projection):
  <1 % of the FLOPs; small preset 1-cos: vision 1.4e-4 -> 0.7e-4, BEATs 1.9e-4 -> 0.6e-4, Whisper
  5.4e-5 -> 1.6e-5, MRC 8.3e-5 -> 1.3e-5; real Whisper 1.2e-3 -> 0.8e-3.
* float inputs for every non-quantized op (the rewiring): leaving ORT's shared fake-quant on the
  post-LN Q-Formers' residual Add/LayerNorm inputs triples the error (MRC 1-cos 0.95e-4 -> 2.9e-4,
  frame Q-Former 0.3e-4 -> 4.5e-4, BEATs 2.1e-4 -> 5.2e-4).

Every output is written under a temporary name and renamed when complete; the graph's inputs and
outputs (names, dtypes, shapes) are unchanged, so an int8 graph drops in beside its fp32 twin.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from vsal.runtime.backends import ORT_LOG_FATAL
from vsal.runtime.errors import BuildError
from vsal.transforms.onnx_io import EXTERNAL_DATA_THRESHOLD, graph_bytes, save_onnx

QUANTIZED_OPS = ("MatMul", "Conv", "Gemm")  # op types whose inputs get Q/DQ (TensorRT's int8 GEMM/conv)

# Op types whose inputs stay float (never a Q/DQ'd tensor), and why. Only MatMul/Conv/Gemm are
# quantized, so these never get Q/DQ of their own; where they share a tensor with a quantized
# MatMul they are rewired to the float tensor (measured: see the module docstring). The rest follow
# TensorRT's placement (Q/DQ only where an int8 kernel consumes it; elsewhere it adds error and a
# reformat).
DEFAULT_EXCLUDE_OPS: dict[str, str] = {
    "Softmax": "attention probabilities stay float (see the 'attention' group)",
    "LayerNormalization": "normalisation statistics of the residual stream (measured: shared fake-quant "
    "on post-LN inputs triples the error)",
    "Add": "residual sums and biases: the residual stream carries the outliers (measured, as above)",
    "Sub": "mask and position arithmetic (MRC slot masks, BEATs relative positions)",
    "Mul": "scales, gates and mask arithmetic",
    "Div": "attention scaling and normalisation",
    "Clip": "the MRC mask clamp",
    "Where": "attention-mask selection",
    "Concat": "concatenations of streams with different ranges",
    "ReduceMean": "RMSNorm statistics",
    "Pow": "RMSNorm statistics",
    "Sqrt": "RMSNorm statistics",
    "Sigmoid": "gates (BEATs GRU position bias, SiLU)",
    "Erf": "GELU",
}

# Node groups (`node_groups`) left float by default; the module docstring has the measurements.
DEFAULT_EXCLUDE_GROUPS: tuple[str, ...] = ("attention", "mlp_down", "first_conv", "last_layer")
GROUP_REASONS = {
    "attention": "activation x activation MatMul (Q.K^T, probabilities.V): one per-tensor scale cannot "
    "serve sharp and diffuse heads (real Whisper: cosine 0.72 when quantized)",
    "mlp_down": "fed by an activation function (MLP down projection, Whisper conv2): activation "
    "outliers (real Whisper: the last fc2 alone is 2/3 of the error)",
    "first_layer": "first weighted layer (input projection / patch embedding)",
    "first_conv": "first convolution on the raw input (patch embedding, Whisper conv1): <1 % of FLOPs, "
    "halves the error on vision/BEATs",
    "last_layer": "final projection: its error reaches the output unnormalised (MRC error / 6)",
}

METHODS = ("percentile", "minmax", "entropy", "modelopt", "modelopt-max")
WEIGHT_ONLY = "weight-only"


class QuantizeError(BuildError, ValueError):
    """A graph or calibration set that cannot be quantized; the message names the file."""


@dataclass
class Int8Report:
    """What `quantize_int8` / `quantize_weights_int8` did to one graph."""

    src: str
    dst: str
    method: str  # minmax / entropy / percentile / modelopt / modelopt-max / weight-only
    quantized: dict[str, int]  # op type -> nodes with a dequantized input (activation or weight)
    qdq: dict[str, int]  # QuantizeLinear / DequantizeLinear node counts
    excluded: list[dict[str, str]]  # {"node", "op_type", "reason"}: candidates left in float
    kept_float_ops: dict[str, int]  # op type -> nodes of DEFAULT_EXCLUDE_OPS-like types left float
    calibration_samples: int
    src_bytes: int
    dst_bytes: int
    files: list[str] = field(default_factory=list)  # written files (the graph, any external data)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.quantized.items()))
        ratio = self.dst_bytes / self.src_bytes if self.src_bytes else 0.0
        return (
            f"{Path(self.dst).name}: {self.method}, quantized {ops or 'nothing'}; "
            f"{len(self.excluded)} excluded; {self.calibration_samples} calibration feeds; "
            f"{self.src_bytes / 1e6:.1f} MB -> {self.dst_bytes / 1e6:.1f} MB ({ratio:.2f}x)"
        )


# --- graph analysis ----------------------------------------------------------------------------------


def _constants(model) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _is_weighted(node, constants: set[str]) -> bool:
    return node.op_type in QUANTIZED_OPS and len(node.input) > 1 and node.input[1] in constants


def node_groups(model) -> dict[str, list[str]]:
    """Named groups of quantizable nodes (MatMul/Conv/Gemm), for exclusion:

    attention     MatMuls of two activations (Q·K^T, probabilities·V): no weight
    first_layer   weighted nodes with no weighted node upstream (patch embeddings, Whisper's conv1,
                  the MRC/frame Q-Former's first projections of their inputs)
    first_conv    the Conv nodes among them (patch embeddings, Whisper's conv1, BEATs' patch conv)
    last_layer    weighted nodes with no weighted node downstream (final projections)
    mlp_down      weighted nodes whose input comes from an activation function (GELU's Erf,
                  SiLU's Sigmoid, ...): the MLP down projections (fc2)
    """
    constants = _constants(model)
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    quantizable = [i for i, n in enumerate(nodes) if n.op_type in QUANTIZED_OPS]
    weighted = {i for i in quantizable if _is_weighted(nodes[i], constants)}

    def reaches(start: int, step, targets: set[int]) -> bool:
        seen, stack = set(), list(step(start))
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if i in targets:
                return True
            stack.extend(step(i))
        return False

    def ups(i: int) -> list[int]:
        return [producer[x] for x in nodes[i].input if x in producer]

    def downs(i: int) -> list[int]:
        return [c for o in nodes[i].output for c in consumers.get(o, [])]

    activations = {"Erf", "Sigmoid", "Tanh", "Relu", "Gelu", "Softplus"}
    passthrough = {"Mul", "Div", "Add", "Reshape", "Cast", "Transpose"}

    def after_activation(i: int) -> bool:  # input 0 computed from an activation function
        frontier, depth = [nodes[i].input[0]], 0
        while frontier and depth < 4:
            found = [producer[x] for x in frontier if x in producer]
            if any(nodes[j].op_type in activations for j in found):
                return True
            frontier = [x for j in found if nodes[j].op_type in passthrough for x in nodes[j].input]
            depth += 1
        return False

    first = [i for i in sorted(weighted) if not reaches(i, ups, weighted)]
    return {
        "attention": [nodes[i].name for i in quantizable if i not in weighted],
        "mlp_down": [nodes[i].name for i in sorted(weighted) if after_activation(i)],
        "first_layer": [nodes[i].name for i in first],
        "first_conv": [nodes[i].name for i in first if nodes[i].op_type == "Conv"],
        "last_layer": [nodes[i].name for i in sorted(weighted) if not reaches(i, downs, weighted)],
    }


def _name_nodes(model) -> None:
    """Give unnamed nodes unique names (the quantizer selects nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or re.fullmatch(p, name) for p in patterns)


def _is_qdq(node) -> bool:
    return node.op_type in ("QuantizeLinear", "DequantizeLinear")


def _keep_float_inputs(model, quantized: set[str]) -> int:
    """Rewire every node outside `quantized` (and not a Q/DQ) that reads a fake-quantized activation
    (DequantizeLinear(QuantizeLinear(x))) to read x; drop the Q/DQ left without consumers.
    Returns the number of inputs rewired."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    source = {}  # DQ output -> float tensor it approximates
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                source[n.output[0]] = q.input[0]
    rewired = 0
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.name in quantized:
            continue
        for i, name in enumerate(n.input):
            if name in source:
                n.input[i] = source[name]
                rewired += 1
    outputs = {o.name for o in graph.output}
    while True:  # remove Q/DQ nodes whose outputs nothing reads
        used = {x for n in graph.node for x in n.input} | outputs
        dead = [_is_qdq(n) and not any(o in used for o in n.output) for n in graph.node]
        if not any(dead):
            break
        keep_nodes = [n for n, d in zip(graph.node, dead, strict=True) if not d]
        del graph.node[:]
        graph.node.extend(keep_nodes)
    used = {x for n in graph.node for x in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return rewired


def _census(model, exclude_ops: Iterable[str]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Op type -> nodes with a DequantizeLinear input; Q/DQ counts; op type -> float exclude_ops nodes."""
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized, qdq, kept = Counter(), Counter(), Counter()
    exclude_ops = set(exclude_ops)
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qdq[n.op_type] += 1
            continue
        if any(x in producer and producer[x].op_type == "DequantizeLinear" for x in n.input):
            quantized[n.op_type] += 1
        elif n.op_type in exclude_ops:
            kept[n.op_type] += 1
    return dict(quantized), dict(qdq), dict(kept)


# --- saving --------------------------------------------------------------------------------------------


def _has_external_data(model) -> bool:
    return any(t.data_location == 1 for t in model.graph.initializer)


def _commit(staged: list[Path], folder: Path) -> list[Path]:
    """Move a graph (and its data file) from a staging folder on the same file system into
    `folder`: data first, the graph last, each by an atomic rename."""
    final = [Path(folder) / p.name for p in staged]
    for src, dst in reversed(list(zip(staged, final, strict=True))):
        os.replace(src, dst)
    return final


def check_graph(path: Path, reference: Path | None = None) -> None:
    """onnx.checker, ONNX Runtime CPU loads it, and (given the fp32 graph) the same inputs/outputs."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    onnx.checker.check_model(str(path))
    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_FATAL  # its errors come back as exceptions
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if reference is not None:
        ref = onnx.load(str(reference), load_external_data=False)
        got = onnx.load(str(path), load_external_data=False)

        def io(values):
            return [(v.name, v.type.SerializeToString()) for v in values]

        if io(ref.graph.input) != io(got.graph.input) or io(ref.graph.output) != io(got.graph.output):
            raise QuantizeError(f"{path}: inputs/outputs differ from {reference}")
    del session


# --- calibration feeds -----------------------------------------------------------------------------------


class _Feeds:
    """An ONNX Runtime CalibrationDataReader over a list of feed dicts (with set_range for strides)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]):
        self.feeds = [{k: np.ascontiguousarray(f[k]) for k in names} for f in feeds]
        self.set_range(0, len(self.feeds))

    def get_next(self):
        if self.pos >= self.end:
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]

    def get_first(self):  # ModelOpt's readers have it (it probes shapes with the first feed)
        return self.feeds[0]

    def __iter__(self):
        return iter(self.feeds[self.pos : self.end])

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index, min(end_index, len(self.feeds))

    def rewind(self) -> None:
        self.set_range(0, len(self.feeds))


def _check_calibration(model, calibration: Sequence[Mapping[str, np.ndarray]], src: Path) -> list[str]:
    names = [i.name for i in model.graph.input if i.name not in _constants(model)]
    if not calibration:
        raise QuantizeError(f"{src}: no calibration feeds (give at least one feed dict)")
    for k, feed in enumerate(calibration):
        missing = sorted(set(names) - set(feed))
        if missing:
            raise QuantizeError(f"{src}: calibration feed {k} lacks inputs {missing}")
    return names


# --- static int8 (encoders) ------------------------------------------------------------------------------


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration: Sequence[Mapping[str, np.ndarray]],
    *,
    exclude_ops: Iterable[str] = tuple(DEFAULT_EXCLUDE_OPS),
    exclude: Iterable[str] = DEFAULT_EXCLUDE_GROUPS,
    exclude_nodes: Iterable[str] = (),
    method: str = "percentile",
    percentile: float = 99.999,
    quantize_ops: Sequence[str] = QUANTIZED_OPS,
    keep_float_inputs: bool = True,
    check: bool = True,
) -> Int8Report:
    """Explicit Q/DQ int8 of the graph `src` into `dst`, calibrated on `calibration` (feed dicts).

    method       percentile (default; `percentile` of |x| per tensor), minmax, entropy: ONNX Runtime
                 quantize_static, QDQ; or modelopt / modelopt-max: NVIDIA ModelOpt's ONNX PTQ (entropy
                 / max calibration; needs nvidia-modelopt; run in a child process because it patches
                 ONNX Runtime's quantizer module-wide)
    quantize_ops op types whose inputs get Q/DQ (MatMul, Conv, Gemm)
    exclude_ops  op types whose inputs stay float: never quantized, and rewired to the float tensor
                 where they share one with a quantized MatMul (every non-quantized node is)
    exclude      node groups left float (`node_groups`; default DEFAULT_EXCLUDE_GROUPS)
    exclude_nodes  node names or regular expressions left float
    keep_float_inputs  rewire non-quantized consumers to float tensors (False: ONNX Runtime's own
                 placement, the fake-quantized tensor shared with every consumer; for comparison)
    check        onnx.checker, ONNX Runtime CPU loads it, same inputs/outputs: before `dst` is written

    Calibration feeds are run one at a time (ranges/histograms merged), so memory is bounded by
    one feed's activations.
    """
    import onnx

    src, dst = Path(src), Path(dst)
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=True)
    names = _check_calibration(model, calibration, src)
    _name_nodes(model)
    exclude_ops = list(exclude_ops)
    groups = node_groups(model)
    unknown = set(exclude) - set(groups)
    if unknown:
        raise QuantizeError(f"unknown node groups {sorted(unknown)}; choose from {sorted(groups)}")
    reasons: dict[str, str] = {}
    for group in exclude:
        for name in groups[group]:
            reasons.setdefault(name, GROUP_REASONS[group])
    exclude_nodes = list(exclude_nodes)
    candidates = [n for n in model.graph.node if n.op_type in quantize_ops]
    for n in candidates:
        if n.op_type in exclude_ops:
            reasons.setdefault(n.name, DEFAULT_EXCLUDE_OPS.get(n.op_type, "excluded op type"))
        elif _match(n.name, exclude_nodes):
            reasons.setdefault(n.name, "excluded by name")
    to_quantize = [n.name for n in candidates if n.name not in reasons]
    size = sum(t.ByteSize() for t in model.graph.initializer)
    external = _has_external_data(model) or size >= EXTERNAL_DATA_THRESHOLD

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as work:
        work = Path(work)
        named = work / "named.onnx"
        onnx.save_model(model, named, save_as_external_data=external, location="named.onnx.data")
        out = work / "quantized.onnx"
        reader = _Feeds(calibration, names)
        if method.startswith("modelopt"):
            _modelopt(named, out, calibration, names, list(reasons), method, external)
        else:
            _ort_static(named, out, reader, to_quantize, list(quantize_ops), method, percentile, external)
        q = onnx.load(str(out), load_external_data=True)
        rewired = _keep_float_inputs(q, set(to_quantize)) if keep_float_inputs else 0
        del model
        staged = save_onnx(q, work / dst.name)
        if check:
            check_graph(staged[0], src)
        files = _commit(staged, dst.parent)
    quantized, qdq, kept = _census(q, exclude_ops)
    excluded = [
        {"node": n.name, "op_type": n.op_type, "reason": reasons[n.name]}
        for n in candidates
        if n.name in reasons
    ]
    notes = [f"{rewired} inputs of non-quantized nodes rewired to float tensors"] if rewired else []
    report = Int8Report(
        src=str(src),
        dst=str(dst),
        method=method,
        quantized=quantized,
        qdq=qdq,
        excluded=excluded,
        kept_float_ops=kept,
        calibration_samples=len(calibration),
        src_bytes=graph_bytes(src),
        dst_bytes=graph_bytes(dst),
        files=[str(f) for f in files],
        seconds=time.perf_counter() - start,
        notes=notes,
    )
    return report


def _ort_static(src, dst, reader, nodes, op_types, method, percentile, external) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    all_ops = sorted({n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node})
    extra = {
        "ActivationSymmetric": True,  # TensorRT: int8 activations with zero point 0
        "WeightSymmetric": True,
        "QuantizeBias": False,  # biases stay float (TensorRT fuses them)
        "OpTypesToExcludeOutputQuantization": all_ops,  # Q/DQ on inputs only, TensorRT's placement
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Conv": 0},  # output channels
        "DedicatedQDQPair": False,
        "QDQDisableWeightAdjustForInt32Bias": True,
        "CalibStridedMinMax": 1,  # one feed at a time: bounded memory, ranges merged
        "CalibPercentile": percentile,
        "CalibTensorRangeSymmetric": True,
    }
    with _quiet_ort_quantizer():
        quantize_static(
            str(src),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            nodes_to_quantize=nodes,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            use_external_data_format=external,
            extra_options=extra,
        )


@contextlib.contextmanager
def _quiet_ort_quantizer():
    """ONNX Runtime's quantizer prints histogram settings and advises pre-processing (symbolic shape
    inference, optimisation) that exported, slimmed graphs do not need: neither is for our users."""

    def advice(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(advice)


def _modelopt_child(args_path: str) -> None:
    """Entry of the child process (`python -c`): ModelOpt patches ONNX Runtime's quantizer
    module-wide, so it never runs in the caller's process."""
    from modelopt.onnx.quantization import quantize

    args = json.loads(Path(args_path).read_text())
    data = np.load(args["feeds"])
    names = args["names"]
    feeds = [{n: data[f"{i}/{n}"] for n in names} for i in range(args["count"])]
    quantize(
        args["src"],
        quantize_mode="int8",
        calibration_data_reader=_Feeds(feeds, names),
        calibration_method="max" if args["method"] == "modelopt-max" else "entropy",
        calibration_eps=["cpu"],
        nodes_to_exclude=[re.escape(n) for n in args["exclude"]],
        high_precision_dtype="fp32",  # keep the fp32 graph; precision is int8 Q/DQ only
        dq_only=True,  # weights as int8 initializers behind a DequantizeLinear
        use_external_data_format=args["external"],
        output_path=args["dst"],
        log_level="ERROR",
    )


def _modelopt(src, dst, calibration, names, excluded, method, external) -> None:
    import subprocess
    import sys

    work = Path(dst).parent
    feeds = work / "feeds.npz"
    np.savez(feeds, **{f"{i}/{n}": np.asarray(f[n]) for i, f in enumerate(calibration) for n in names})
    args = {
        "src": str(src),
        "dst": str(dst),
        "feeds": str(feeds),
        "count": len(calibration),
        "names": list(names),
        "exclude": list(excluded),
        "method": method,
        "external": external,
    }
    args_path = work / "modelopt.json"
    args_path.write_text(json.dumps(args))
    code = f"from vsal.transforms.int8 import _modelopt_child; _modelopt_child({str(args_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0 or not Path(dst).is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise QuantizeError(f"{src}: ModelOpt int8 PTQ failed:\n{tail}")


# --- int8 weight-only (LLM decoder) -----------------------------------------------------------------------


def quantize_weights_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    exclude_nodes: Iterable[str] = (),
    min_elements: int = 4096,
    check: bool = True,
) -> Int8Report:
    """Int8 weight-only: every MatMul whose B is a float 2-D initializer [K, N] (at least
    `min_elements`) reads DequantizeLinear(int8 [K, N], scale [N], zero point 0, axis=1) instead.

    Symmetric per output channel (scale = max|W[:, n]| / 127, values in [-127, 127]). Weights
    shared by several MatMuls are quantized once. Activations and every other op stay float.
    Tensors are processed one at a time: a graph with external data (the 13B decoder: ~52 GB fp32)
    is written with its int8 weights in `<dst>.data` without holding the model in memory.
    """
    import onnx
    from onnx import helper

    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=False)
    _name_nodes(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    exclude_nodes = list(exclude_nodes)
    excluded, targets = [], {}  # weight name -> DequantizeLinear output
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue  # activation x activation (attention)
        weight = inits[node.input[1]]
        reason = None
        if _match(node.name, exclude_nodes):
            reason = "excluded by name"
        elif weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != 2:
            reason = "weight not float32 2-D"
        elif int(np.prod(weight.dims)) < min_elements:
            reason = f"fewer than {min_elements} weights"
        if reason:
            excluded.append({"node": node.name, "op_type": "MatMul", "reason": reason})
            continue
        targets.setdefault(weight.name, f"{weight.name}_dequantized")
        node.input[1] = targets[weight.name]
    still_float = {x for n in graph.node for x in n.input} & set(targets)  # shared with another op

    dq_nodes = []
    tensors = []  # (TensorProto without data, numpy array or None to copy the source's bytes)
    for tensor in list(graph.initializer):
        if tensor.name not in targets:
            tensors.append(tensor)
            continue
        w = _tensor_array(tensor, src.parent)
        amax = np.abs(w).max(axis=0)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        base = tensor.name
        names = [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"]
        tensors += [(names[0], q), (names[1], scale), (names[2], np.zeros(scale.shape, np.int8))]
        if base in still_float:
            tensors.append(tensor)
        dq = helper.make_node(
            "DequantizeLinear", names, [targets[base]], name=f"{base}_DequantizeLinear", axis=1
        )
        dq_nodes.append(dq)
        del w, q
    for i, n in enumerate(dq_nodes):  # DQ nodes first: the graph stays topologically sorted
        graph.node.insert(i, n)
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = _has_external_data(model) or sum(_tensor_bytes(t) for t in tensors) >= EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as work:
        staged = _write_streaming(model, tensors, src.parent, Path(work) / dst.name, external)
        del model, tensors
        if check:
            check_graph(staged[0], src)
        files = _commit(staged, dst.parent)
    quantized, qdq, kept = _census(onnx.load(str(dst), load_external_data=False), ())
    return Int8Report(
        src=str(src),
        dst=str(dst),
        method=WEIGHT_ONLY,
        quantized=quantized,
        qdq=qdq,
        excluded=excluded,
        kept_float_ops=kept,
        calibration_samples=0,
        src_bytes=graph_bytes(src),
        dst_bytes=graph_bytes(dst),
        files=[str(f) for f in files],
        seconds=time.perf_counter() - start,
        notes=[f"{len(targets)} weight tensors int8 (per output channel, symmetric)"],
    )


def _tensor_array(tensor, base_dir: Path) -> np.ndarray:
    from onnx import numpy_helper

    if tensor.data_location == 1:  # external: read just this tensor
        tensor = _with_external_bytes(tensor, base_dir)
    return numpy_helper.to_array(tensor)


def _with_external_bytes(tensor, base_dir: Path):
    """A copy of an external-data tensor with its bytes inline."""
    import onnx

    info = {e.key: e.value for e in tensor.external_data}
    with open(Path(base_dir) / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        length = int(info["length"]) if "length" in info else -1
        raw = f.read(length)
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    del copy.external_data[:]
    copy.data_location = onnx.TensorProto.DEFAULT
    copy.raw_data = raw
    return copy


def _tensor_bytes(item) -> int:
    if isinstance(item, tuple):
        return item[1].nbytes
    info = {e.key: e.value for e in item.external_data}
    return int(info.get("length", 0)) if item.data_location == 1 else item.ByteSize()


def _write_streaming(model, tensors, base_dir: Path, dst: Path, external: bool) -> list[Path]:
    """Write `model` with `tensors` as its initializers: inline when small, else one tensor at a
    time into `<dst>.data`. Temporary names, renamed when complete (data first, graph last)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    del graph.initializer[:]
    if not external:
        for item in tensors:
            if isinstance(item, tuple):
                graph.initializer.append(numpy_helper.from_array(item[1], item[0]))
            elif item.data_location == 1:
                graph.initializer.append(_with_external_bytes(item, base_dir))
            else:
                graph.initializer.append(item)
        return save_onnx(model, dst)
    data = dst.with_name(dst.name + ".data")
    tmp, tmp_data = dst.with_name(f".{dst.name}.partial"), data.with_name(f".{data.name}.partial")
    with open(tmp_data, "wb") as out:
        for item in tensors:
            if isinstance(item, tuple):
                tensor = numpy_helper.from_array(item[1], item[0])
            elif item.data_location == 1:
                tensor = _with_external_bytes(item, base_dir)
            else:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(item)
            raw = tensor.raw_data if tensor.HasField("raw_data") else None
            if raw is not None and len(raw) >= 1024:
                offset = out.tell()
                pad = (-offset) % 4096  # aligned, as onnx writes it (mmap-friendly)
                out.write(b"\0" * pad)
                out.write(raw)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", offset + pad), ("length", len(raw))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
            graph.initializer.append(tensor)
    onnx.save_model(model, tmp)
    os.replace(tmp_data, data)
    os.replace(tmp, dst)
    return [dst, data]


def write_report(reports: Iterable[Int8Report], path: str | os.PathLike) -> Path:
    """Write reports as JSON (temporary name, renamed when complete)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps([r.to_dict() for r in reports], indent=2) + "\n")
    os.replace(tmp, path)
    return path
