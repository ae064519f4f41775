"""INT8 graphs for TensorRT 10/11 and ONNX Runtime: explicit Q/DQ from calibration, int8 weight-only.

TensorRT 11 builds only strongly typed networks, so int8 lives in the ONNX graph as
QuantizeLinear/DequantizeLinear nodes (design.md, "Precision"). Two forms (the second is
vsal.transforms.weight_only's):

* `quantize_int8` (the five encoder graphs): static PTQ with ONNX Runtime's `quantize_static`
  (QDQ format), calibrated on feeds recorded from real media (`vsal.calib.collect`); the ranges
  are recorded by `vsal.transforms.int8_ranges` for only the tensors that get quantized. Q/DQ go on the
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from vsal.runtime.errors import BuildError
from vsal.transforms.graph_index import (
    GraphIndex,
    drop_unread,
    drop_unread_initializers,
    feed_inputs,
    name_nodes,
)
from vsal.transforms.int8_ranges import activation_ranges, quantized_activations
from vsal.transforms.onnx_io import (
    EXTERNAL_DATA_THRESHOLD,
    graph_bytes,
    is_external,
    move_into,
    save_onnx,
)

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

    @classmethod
    def written(cls, src: Path, dst: Path, files: Iterable[Path], start: float, **fields) -> Int8Report:
        """The report of a graph written to `dst` (`files`), with its census and sizes."""
        structure = onnx.load(str(dst), load_external_data=False)
        quantized, qdq, kept = _census(structure, fields.pop("exclude_ops", ()))
        return cls(
            src=str(src),
            dst=str(dst),
            quantized=quantized,
            qdq=qdq,
            kept_float_ops=kept,
            src_bytes=graph_bytes(src),
            dst_bytes=graph_bytes(dst),
            files=[str(f) for f in files],
            seconds=time.perf_counter() - start,
            **fields,
        )

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
    index = GraphIndex.of(model.graph)
    quantizable = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    weighted = [n for n in quantizable if _is_weighted(n, index.constants)]
    weighted_ids = {id(n) for n in weighted}

    def reaches(start, step) -> bool:  # a weighted node up- or downstream of `start`
        seen, stack = set(), list(step(start))
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if id(node) in weighted_ids:
                return True
            stack.extend(step(node))
        return False

    activations = {"Erf", "Sigmoid", "Tanh", "Relu", "Gelu", "Softplus"}
    passthrough = {"Mul", "Div", "Add", "Reshape", "Cast", "Transpose"}

    def after_activation(node) -> bool:  # input 0 computed from an activation function
        frontier, depth = [node.input[0]], 0
        while frontier and depth < 4:
            found = [index.producer[x] for x in frontier if x in index.producer]
            if any(n.op_type in activations for n in found):
                return True
            frontier = [x for n in found if n.op_type in passthrough for x in n.input]
            depth += 1
        return False

    first = [n for n in weighted if not reaches(n, index.sources)]
    return {
        "attention": [n.name for n in quantizable if id(n) not in weighted_ids],
        "mlp_down": [n.name for n in weighted if after_activation(n)],
        "first_layer": [n.name for n in first],
        "first_conv": [n.name for n in first if n.op_type == "Conv"],
        "last_layer": [n.name for n in weighted if not reaches(n, index.users)],
    }


def match_any(name: str, patterns: Iterable[str]) -> bool:
    """`name` is one of `patterns` or fully matches one as a regular expression."""
    return any(name == p or re.fullmatch(p, name) for p in patterns)


def _is_qdq(node) -> bool:
    return node.op_type in ("QuantizeLinear", "DequantizeLinear")


def _keep_float_inputs(model, quantized: set[str]) -> int:
    """Rewire every node outside `quantized` (and not a Q/DQ) that reads a fake-quantized activation
    (DequantizeLinear(QuantizeLinear(x))) to read x; drop the Q/DQ left without consumers.
    Returns the number of inputs rewired."""
    graph = model.graph
    producer = GraphIndex.of(graph).producer
    source = {}  # DQ output -> float tensor it approximates
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                source[n.output[0]] = q.input[0]
    rewired = 0
    for n in graph.node:
        if _is_qdq(n) or n.name in quantized:
            continue
        for i, name in enumerate(n.input):
            if name in source:
                n.input[i] = source[name]
                rewired += 1
    drop_unread(graph, _is_qdq)
    drop_unread_initializers(graph)
    return rewired


def _census(model, exclude_ops: Iterable[str]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Op type -> nodes with a DequantizeLinear input; Q/DQ counts; op type -> float exclude_ops nodes."""
    producer = GraphIndex.of(model.graph).producer
    quantized, qdq, kept = Counter(), Counter(), Counter()
    exclude_ops = set(exclude_ops)
    for n in model.graph.node:
        if _is_qdq(n):
            qdq[n.op_type] += 1
            continue
        if any(x in producer and producer[x].op_type == "DequantizeLinear" for x in n.input):
            quantized[n.op_type] += 1
        elif n.op_type in exclude_ops:
            kept[n.op_type] += 1
    return dict(quantized), dict(qdq), dict(kept)


# --- checking ------------------------------------------------------------------------------------------


def check_graph(path: Path, reference: Path | None = None) -> None:
    """onnx.checker, ONNX Runtime CPU loads it, and (given the fp32 graph) the same inputs/outputs.
    The session is unoptimised: loading is the check, and full optimisation would repack every
    weight (26 GB for the 13B decoder's int8; 64 MB unoptimised, measured on 2 layers at 13b width)."""
    from vsal.runtime.backends import ort_session

    path = Path(path)
    onnx.checker.check_model(str(path))
    session = ort_session(path, optimization="disable")
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


def _leading_axis_inputs(graph: onnx.GraphProto) -> list[str]:
    """The inputs whose first dimension is the graph's batch axis: a named dimension, the one most
    inputs lead with (frames N, batch B); inputs with a fixed first dimension are not among them."""
    leads = {}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            leads.setdefault(dims[0].dim_param, []).append(value.name)
    return max(leads.values(), key=len) if leads else []


def single_items(feeds: Sequence[Mapping[str, np.ndarray]], leading: Sequence[str]) -> Iterator[dict]:
    """Each feed dict split into one dict per item along axis 0 of the `leading` inputs (the others
    as they are): the same values, a feed's activations a fraction of the size."""
    for feed in feeds:
        sizes = {np.shape(feed[name])[0] for name in leading if name in feed}
        if len(sizes) != 1 or sizes == {1}:
            yield dict(feed)
            continue
        for i in range(sizes.pop()):
            yield {k: (v[i : i + 1] if k in leading else v) for k, v in feed.items()}


def _check_calibration(model, calibration: Sequence[Mapping[str, np.ndarray]], src: Path) -> list[str]:
    names = [v.name for v in feed_inputs(model.graph)]
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

    Calibration feeds are run one at a time (ranges/histograms merged), and only the inputs of the
    nodes to quantize are recorded, so memory is bounded by those of one feed.
    """

    src, dst = Path(src), Path(dst)
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=True)
    names = _check_calibration(model, calibration, src)
    name_nodes(model.graph)
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
        elif match_any(n.name, exclude_nodes):
            reasons.setdefault(n.name, "excluded by name")
    to_quantize = [n.name for n in candidates if n.name not in reasons]
    size = sum(t.ByteSize() for t in model.graph.initializer)
    external = any(is_external(t) for t in model.graph.initializer) or size >= EXTERNAL_DATA_THRESHOLD

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as work:
        work = Path(work)
        named = work / "named.onnx"
        save_onnx(model, named, external=external)
        leading = _leading_axis_inputs(model.graph) if external else []
        del model  # ONNX Runtime's quantizer loads its own copy
        out = work / "quantized.onnx"
        if method.startswith("modelopt"):
            _modelopt(named, out, calibration, names, list(reasons), method, external)
        else:
            # A large graph calibrates one item at a time (EVA-ViT-g: a clip's 19 frames of recorded
            # activations at once are about 3 GB)
            feeds = _Feeds(list(single_items(calibration, leading)), names)
            ranges = _record_ranges(named, to_quantize, feeds, method, percentile, work / "ranges.json")
            _ort_static(named, out, ranges, to_quantize, list(quantize_ops), method, external)
        q = onnx.load(str(out), load_external_data=True)
        rewired = _keep_float_inputs(q, set(to_quantize)) if keep_float_inputs else 0
        staged = save_onnx(q, work / dst.name)
        if check:
            check_graph(staged[0], src)
        files = move_into(staged, dst.parent)
    excluded = [
        {"node": n.name, "op_type": n.op_type, "reason": reasons[n.name]}
        for n in candidates
        if n.name in reasons
    ]
    notes = [f"{rewired} inputs of non-quantized nodes rewired to float tensors"] if rewired else []
    return Int8Report.written(
        src,
        dst,
        files,
        start,
        exclude_ops=exclude_ops,
        method=method,
        excluded=excluded,
        calibration_samples=len(calibration),
        notes=notes,
    )


def _record_ranges(src: Path, nodes, feeds, method: str, percentile: float, dst: Path) -> Path:
    """The activation ranges of `nodes`' inputs over `feeds`, written to `dst` as ONNX Runtime's
    calibration cache."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    tensors = quantized_activations(onnx.load(str(src), load_external_data=False), nodes)
    with _quiet_ort_quantizer():
        save_tensors_data(activation_ranges(src, tensors, feeds, method, percentile), dst)
    return dst


def _ort_static(src, dst, ranges, nodes, op_types, method, external) -> None:
    """ONNX Runtime's QDQ quantizer on `src`, with the activation ranges of the file `ranges`
    (`activation_ranges`, in its calibration-cache form) instead of its own calibrator."""
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
    }
    with _quiet_ort_quantizer():
        quantize_static(
            str(src),
            str(dst),
            None,
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
            calibration_cache_path=str(ranges),
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
