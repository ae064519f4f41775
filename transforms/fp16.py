"""fp16 variants of the fp32 graphs, with fp32 islands where accuracy needs them.

TensorRT 11 builds only strongly typed networks, so a graph's precision is its ONNX types.
`convert_fp16(src, dst)` writes an fp16 copy of an fp32 graph:

* the graph's inputs and outputs keep their dtypes (float32 stays float32; Casts at the
  boundary), so the manifest's I/O contract holds for every precision; except those named in
  `half_io`, which are float16 at the boundary with no Cast there (`float16_boundary`): the
  decoder's KV cache, which the runtime hands from one step to the next, crosses in float16
  (half the cache's memory and traffic) and its values are those the fp32-boundary graph rounds
  to float16 inside anyway, so the results are the same;
* these stay float32 ("islands", planned by `plan_fp32_islands`):
  - op types in `keep_fp32` (default `DEFAULT_KEEP_FP32`: LayerNormalization, Softmax, and the
    index arithmetic ops Range and CumSum);
  - "rms_norm": the variance chain of an RMSNorm (LLaMA): Pow(x, 2) -> ReduceMean -> Add(eps) ->
    Sqrt -> Reciprocal/Div -> the Mul/Div by x; x**2 overflows fp16 past |x| = 256;
  - "mask": every node reading a constant fp16 cannot hold (finfo(float32).min, +-inf, anything
    past 65504) and the cheap ops downstream of it up to the Softmax (the Add of the scores and
    the mask, Where, Clip, Unsqueeze...), so masks are never -inf and fully masked rows stay finite;
  - "rotary": Sin/Cos and the position arithmetic feeding them (Cast of the int64 positions,
    Mul by inv_freq): an angle of 1000 rad has a spacing of 0.5 rad in fp16;
* a float16 weight read through Cast(to=FLOAT) (the streamed decoder stores the checkpoint's
  float16 so, vsal.export.streaming) is already float16: its Cast is folded away before the
  conversion and its bytes are copied as they are (one behind fp32 islands only gets its one
  Cast back), so no Cast pair and no float32 copy is left around it;
* Cast pairs float32 -> float16 -> float32 the converter leaves between islands are removed (the
  value goes through in float32), a mask leaving its island for a float16 node is clipped to
  +-65504 before its Cast (never -inf), and the nodes are topologically sorted again.

The conversion itself is ONNX Runtime's float16 converter (`onnxruntime.transformers.float16`,
the maintained fork of onnxconverter-common's: it retypes Cast/ConstantOfShape, clamps constants
to +-65504 and keeps initializers only fp32 nodes read in float32), run on the graph's structure
only: weights in external data files are never loaded as a whole, they are converted tensor by
tensor into the output's data file. The output is written under temporary names and renamed when
complete. Torch-free: the build step runs it without the export extra.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from vsal.runtime.errors import VsalError
from vsal.transforms.graph_index import (
    GraphIndex,
    drop_unread,
    name_nodes,
    node_inputs,
    rename_inputs,
    toposort,
)
from vsal.transforms.onnx_io import (
    StoredData,
    graph_bytes,
    is_external,
    save_onnx,
    stash_data,
    stored_data,
)

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_MIN_POSITIVE = 5.96e-08  # smallest fp16 subnormal: smaller magnitudes are raised to it

# Op types kept float32 whatever the pattern rules find.
DEFAULT_KEEP_FP32 = ("LayerNormalization", "Softmax", "Range", "CumSum")
PATTERNS = ("rms_norm", "mask", "rotary")

# Cheap ops a mask flows through between its constant and the Softmax.
_MASK_FLOW = {
    "Add", "Sub", "Mul", "Div", "Where", "Clip", "Min", "Max", "Neg", "Unsqueeze", "Squeeze",
    "Reshape", "Expand", "Transpose", "Concat", "Slice", "Gather", "Tile", "Identity", "Cast", "Flatten",
}  # fmt: skip
_MASK_DEPTH = 8
# Ops of an RMSNorm's variance chain after the reduction.
_NORM_FLOW = {"Add", "Sqrt", "Reciprocal", "Div", "Mul", "Max", "Clip"}
_NORM_DEPTH = 6
_REDUCTIONS = {"ReduceMean", "ReduceSum"}
_CONSTANT_ELEMENTS = 1 << 20  # constants up to this size are scanned for values fp16 cannot hold
_FLOAT = TensorProto.FLOAT
_HALF = TensorProto.FLOAT16


class Fp16Error(VsalError):
    """A graph the fp16 conversion cannot handle, or whose result is not a valid graph."""


@dataclass
class Fp16Report:
    src: str
    dst: str
    kept_fp32: dict[str, int]  # op type -> nodes computing in float32 (on float tensors)
    reasons: dict[str, int]  # why: "op type", "rms_norm", "mask", "rotary", "node"
    nodes_before: int
    nodes_after: int
    casts_added: int  # Cast nodes the output has beyond the source's (less its folded weight Casts)
    bytes_before: int  # graph file + external data
    bytes_after: int
    external_data: bool  # the output's weights are in a side file
    clamped_values: int  # initializer values past +-65504 clamped (islands' constants are not)
    seconds: float
    # weights the source stored float16 behind a Cast(to=FLOAT) (the streamed decoder's): kept as
    # they are, their Casts gone (and not counted in casts_added)
    float16_weights: int = 0
    fp32_nodes: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for the build report: what stayed fp32, and why."""
        kept = ", ".join(f"{op} x{n}" for op, n in sorted(self.kept_fp32.items())) or "none"
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(self.reasons.items()))
        return f"fp32 islands: {kept} ({why}); +{self.casts_added} casts"


# --- planning ---------------------------------------------------------------------------------


@dataclass
class _Graph(GraphIndex):
    """The graph index, with the float tests and the small constant values the planning reads."""

    weights: Mapping[str, StoredData] = field(default_factory=dict)  # data held outside the proto
    _out_of_range: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def build(cls, model: onnx.ModelProto, weights: Mapping[str, StoredData] | None = None) -> _Graph:
        g = cls.of(model.graph)
        g.weights = weights or {}
        return g

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == _FLOAT

    def touches_float(self, node: onnx.NodeProto) -> bool:
        return any(self.is_float(n) for n in (*node.input, *node.output) if n)

    def small_values(self, name: str) -> np.ndarray | None:
        """A float32 constant's values when small enough to be a mask or a scalar (<= 1M values)."""
        tensor = self.constant_values.get(name)
        if tensor is None or tensor.data_type != _FLOAT:
            return None
        if int(np.prod(tensor.dims, dtype=np.int64)) > _CONSTANT_ELEMENTS:
            return None
        if name in self.weights:
            return self.weights[name].array()
        if is_external(tensor):
            return None
        return numpy_helper.to_array(tensor)

    def out_of_fp16(self, name: str) -> bool:
        """A float32 constant holding a value fp16 cannot (|v| > 65504, inf, NaN)."""
        if name not in self._out_of_range:
            values = self.small_values(name) if name else None
            self._out_of_range[name] = values is not None and _out_of_fp16(values)
        return self._out_of_range[name]


def _out_of_fp16(values: np.ndarray) -> bool:
    return bool(values.size) and bool((~np.isfinite(values) | (np.abs(values) > FP16_MAX)).any())


def plan_fp32_islands(
    model: onnx.ModelProto,
    keep_fp32: Iterable[str] = DEFAULT_KEEP_FP32,
    patterns: Iterable[str] = PATTERNS,
    keep_nodes: Iterable[str] = (),
    weights: Mapping[str, StoredData] | None = None,
) -> dict[str, str]:
    """Node name -> why it stays float32. `model` must carry types (shape inference run);
    `weights`: initializers whose data is held outside the proto (`onnx_io.stash_data`)."""
    patterns = set(patterns)
    unknown = patterns - set(PATTERNS)
    if unknown:
        raise ValueError(f"unknown fp32 patterns {sorted(unknown)}; known: {PATTERNS}")
    keep_fp32 = set(keep_fp32)
    g = _Graph.build(model, weights)
    plan: dict[str, str] = {}
    for name in keep_nodes:
        plan[name] = "node"
    for node in model.graph.node:
        if node.op_type in keep_fp32:
            plan.setdefault(node.name, "op type")
    if "rms_norm" in patterns:
        _plan_rms_norm(g, plan)
    if "mask" in patterns:
        _plan_masks(g, plan, keep_fp32)
    if "rotary" in patterns:
        _plan_rotary(g, plan)
    return plan


def _plan_rms_norm(g: _Graph, plan: dict[str, str]) -> None:
    for node in g.graph.node:
        if node.op_type not in _REDUCTIONS or not node.input or not g.is_float(node.input[0]):
            continue
        square = g.producer.get(node.input[0])
        if square is None or not _is_square(g, square):
            continue
        x = square.input[0]
        plan.setdefault(square.name, "rms_norm")
        plan.setdefault(node.name, "rms_norm")
        frontier, depth = [node], 0
        while frontier and depth < _NORM_DEPTH:
            nxt = []
            for cur in frontier:
                for out in cur.output:
                    for user in g.consumers.get(out, []):
                        if user.op_type not in _NORM_FLOW or not g.touches_float(user):
                            continue
                        plan.setdefault(user.name, "rms_norm")
                        if x not in user.input:  # the node that scales x ends the chain
                            nxt.append(user)
            frontier, depth = nxt, depth + 1


def _is_square(g: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    if node.op_type == "Pow" and len(node.input) == 2:
        exponent = g.small_values(node.input[1])
        return exponent is not None and exponent.size == 1 and float(exponent.ravel()[0]) == 2.0
    return False


def _plan_masks(g: _Graph, plan: dict[str, str], keep_fp32: set[str]) -> None:
    seeds = []
    for node in g.graph.node:
        if node.op_type == "Constant":
            if g.out_of_fp16(node.output[0]):
                plan.setdefault(node.name, "mask")
            continue
        if any(g.out_of_fp16(name) for name in node.input):
            plan.setdefault(node.name, "mask")  # a heavy op (a weight past 65504) stays fp32 alone
            if node.op_type in _MASK_FLOW:
                seeds.append(node)
    frontier, depth, seen = seeds, 0, {n.name for n in seeds}
    while frontier and depth < _MASK_DEPTH:
        nxt = []
        for cur in frontier:
            for out in cur.output:
                for user in g.consumers.get(out, []):
                    if user.name in seen or user.op_type in keep_fp32 or user.op_type not in _MASK_FLOW:
                        continue  # Softmax (kept) or a heavy op ends the mask's path
                    seen.add(user.name)
                    plan.setdefault(user.name, "mask")
                    nxt.append(user)
        frontier, depth = nxt, depth + 1


def _plan_rotary(g: _Graph, plan: dict[str, str]) -> None:
    """Sin/Cos, and the float nodes before them that depend on no float graph input (positions)."""
    # A tensor is index-derived when it depends on constants and non-float inputs only; the graph's
    # nodes are topologically sorted, so one pass settles every tensor.
    derived = {name: True for name in g.constant_values}
    derived.update({name: not g.is_float(name) for name in g.inputs})
    for node in g.graph.node:
        value = all(derived.get(i, False) for i in node_inputs(node))
        for out in node.output:
            derived[out] = value

    for node in g.graph.node:
        if node.op_type not in ("Sin", "Cos"):
            continue
        plan.setdefault(node.name, "rotary")
        queue = deque(i for i in node.input if i)
        seen = set()
        while queue:
            name = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            prod = g.producer.get(name)
            if prod is None or not g.is_float(name) or not derived.get(name, False):
                continue
            plan.setdefault(prod.name, "rotary")
            queue.extend(i for i in prod.input if i)


# --- conversion -------------------------------------------------------------------------------


@contextlib.contextmanager
def _shape_only_value_info() -> Iterator[Any]:
    """The converter reads each converted initializer's data for its shape; take it from `dims` so
    initializers left in external data files are never read."""
    from onnxruntime.transformers import float16

    original = float16.make_value_info_from_tensor

    def from_dims(tensor: TensorProto) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    float16.make_value_info_from_tensor = from_dims
    try:
        yield float16
    finally:
        float16.make_value_info_from_tensor = original


def _infer(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=strict, strict_mode=strict)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise Fp16Error(f"type inference failed: {str(exc).strip()[:500]}") from exc


def _remove_cast_pairs(model: onnx.ModelProto) -> None:
    """Cast(to=fp32)(Cast(to=fp16)(x: fp32)) -> x, and Cast(to=fp16)(Cast(to=fp32)(x: fp16)) -> x;
    then drop Casts nothing reads."""
    graph = model.graph
    g = _Graph.build(model)
    outputs = {v.name for v in graph.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or not node.input:
            continue
        to = helper.get_node_attr_value(node, "to")
        inner = g.producer.get(node.input[0])
        if inner is None or inner.op_type != "Cast":
            continue
        inner_to = helper.get_node_attr_value(inner, "to")
        source = inner.input[0]
        if not (
            (to == _FLOAT and inner_to == _HALF and g.types.get(source) == _FLOAT)
            or (to == _HALF and inner_to == _FLOAT and g.types.get(source) == _HALF)
        ):
            continue
        if node.output[0] in outputs:  # a graph output keeps its name: pass the value through
            node.op_type = "Identity"
            del node.attribute[:]
            node.input[0] = source
        else:
            rename[node.output[0]] = source
    rename_inputs(graph, rename)
    drop_unread(graph, lambda node: node.op_type == "Cast")


def _saturate_mask_exits(model: onnx.ModelProto, mask_nodes: set[str]) -> int:
    """A float32 mask (finfo.min) cast to float16 would be -inf: clip it to +-65504 first."""
    graph = model.graph
    producer = GraphIndex.of(graph).producer
    low, high = "fp16_saturate_min", "fp16_saturate_max"
    count = 0
    for node in list(graph.node):
        if node.op_type != "Cast" or helper.get_node_attr_value(node, "to") != _HALF:
            continue
        source = producer.get(node.input[0])
        if source is None or source.name not in mask_nodes:
            continue
        clipped = f"{node.input[0]}_saturated"
        clip = helper.make_node("Clip", [node.input[0], low, high], [clipped], name=f"{node.name}_saturate")
        graph.node.append(clip)
        node.input[0] = clipped
        count += 1
    if count:
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(-FP16_MAX, dtype=np.float32), low),
                numpy_helper.from_array(np.array(FP16_MAX, dtype=np.float32), high),
            ]
        )
    return count


def _toposort(graph: onnx.GraphProto) -> None:
    try:
        toposort(graph)
    except ValueError:
        raise Fp16Error("the converted graph has a cycle") from None


_STASH_BYTES = 1 << 16  # weights this large leave the proto while the graph is converted


def _to_fp16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 -> float16 as the converter does: finite values clamped to +-65504, magnitudes below
    the smallest subnormal raised to it (not flushed to 0). Also the count of clamped values."""
    finite = np.isfinite(values)
    clamped = int((finite & (np.abs(values) > FP16_MAX)).sum())
    out = np.where((values > 0) & (values < FP16_MIN_POSITIVE), FP16_MIN_POSITIVE, values)
    out = np.where((out < 0) & (out > -FP16_MIN_POSITIVE), -FP16_MIN_POSITIVE, out)
    return np.where(finite, np.clip(out, -FP16_MAX, FP16_MAX), out).astype(np.float16), clamped


def convert_fp16(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    keep_fp32: Iterable[str] = DEFAULT_KEEP_FP32,
    *,
    patterns: Iterable[str] = PATTERNS,
    keep_nodes: Iterable[str] = (),
    half_io: Iterable[str] = (),
    check: bool = True,
) -> Fp16Report:
    """Write an fp16 copy of the fp32 graph `src` to `dst`, with fp32 islands; see the module doc.

    `keep_fp32`: op types computed in float32. `patterns`: which of `PATTERNS` to keep float32
    besides (rms_norm, mask, rotary). `keep_nodes`: further node names kept float32 (for a node
    an accuracy measurement shows is too sensitive). `half_io`: float32 graph inputs and outputs
    that become float16 at the boundary (the decoder's past and present: the manifest's KVLayout
    names them). `check`: run onnx.checker on the result.

    Weights: the converter and type inference see the graph's structure only; every weight of
    64 KiB or more is converted on its own afterwards (a float16 one behind a Cast(to=FLOAT), as
    the streamed decoder stores them, is copied as it is). A source with external data gets
    `<dst name>.data` beside `dst`, written one tensor at a time (peak memory: the structure plus
    the largest tensor, whatever the model's size); so does an inline source whose fp16 weights
    reach 1 GiB. An inline source (below protobuf's 2 GiB) is read whole, once.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise Fp16Error(f"{dst}: the fp16 graph must not overwrite its source")
    model = onnx.load_model(src, load_external_data=False)
    bytes_before = graph_bytes(src)
    nodes_before = len(model.graph.node)
    external_source = any(is_external(t) for t in model.graph.initializer)
    stash = stash_data(model, src.parent, _STASH_BYTES)
    half_weights = _fold_weight_casts(model, stash, src.parent)
    # the folded Casts widened weights, not activations: the report counts the Casts fp16 adds
    casts_before = sum(1 for n in model.graph.node if n.op_type == "Cast")
    if any(t.data_type == _HALF for t in model.graph.initializer):
        raise Fp16Error(f"{src}: already holds float16 initializers (converted before?)")

    name_nodes(model.graph)
    # The converter keeps the types of what it does not convert from value_info: start clean.
    del model.graph.value_info[:]
    model = _infer(model)
    plan = plan_fp32_islands(model, keep_fp32, patterns, keep_nodes, stash)
    names = {n.name for n in model.graph.node}
    missing = sorted(set(keep_nodes) - names)
    if missing:
        raise Fp16Error(f"{src}: keep_nodes names no node of the graph: {missing[:5]}")
    g = _Graph.build(model)
    fp32_nodes = [n for n in model.graph.node if n.name in plan and g.touches_float(n)]

    # Values past +-65504 in the small initializers the converter converts itself.
    clamp_small = {}
    for tensor in model.graph.initializer:
        if tensor.data_type == _FLOAT and tensor.name not in stash:
            values = numpy_helper.to_array(tensor)
            clamp_small[tensor.name] = int((np.isfinite(values) & (np.abs(values) > FP16_MAX)).sum())

    with _shape_only_value_info() as float16:
        model = float16.convert_float_to_float16(
            model,
            min_positive_val=FP16_MIN_POSITIVE,
            max_finite_val=FP16_MAX,
            keep_io_types=True,
            disable_shape_infer=True,
            op_block_list=[],
            node_block_list=sorted(plan),
        )
    _unfold_fp32_weights(model, half_weights)
    _toposort(model.graph)
    del model.graph.value_info[:]
    model = _infer(model)
    _remove_cast_pairs(model)
    _saturate_mask_exits(model, {name for name, why in plan.items() if why == "mask"})
    _retype_boundary(model, half_io, where=str(src))
    _toposort(model.graph)
    del model.graph.value_info[:]
    model = _infer(model, strict=True)  # a float16/float32 mix-up anywhere fails here
    clamped = sum(clamp_small.get(t.name, 0) for t in model.graph.initializer if t.data_type == _HALF)
    nodes_after = len(model.graph.node)
    casts_after = sum(1 for n in model.graph.node if n.op_type == "Cast")
    more_clamped = [0]
    data = _retyped(model, stash, more_clamped)
    files = save_onnx(model, dst, data, external=True if external_source else None)
    if check:
        try:
            onnx.checker.check_model(str(dst))
        except onnx.checker.ValidationError as exc:
            raise Fp16Error(f"{dst}: onnx.checker rejects the fp16 graph: {exc}") from exc
    counts = Counter(n.op_type for n in fp32_nodes)
    return Fp16Report(
        src=str(src),
        dst=str(dst),
        kept_fp32=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        reasons=dict(Counter(plan[n.name] for n in fp32_nodes)),
        nodes_before=nodes_before,
        nodes_after=nodes_after,
        casts_added=casts_after - casts_before,
        bytes_before=bytes_before,
        bytes_after=graph_bytes(dst),
        external_data=len(files) > 1,
        clamped_values=clamped + more_clamped[0],
        seconds=time.perf_counter() - start,
        float16_weights=len(half_weights),
        fp32_nodes=[n.name for n in fp32_nodes],
    )


def _fold_weight_casts(model: onnx.ModelProto, stash: dict[str, StoredData], folder: Path) -> set[str]:
    """A float16 initializer read only through Cast(to=FLOAT) (the streamed decoder stores the
    checkpoint's float16 weights so) is already what fp16 wants: its readers read it directly and
    the converter sees it as a float32 weight, typed FLOAT over its float16 data, which stays in
    `stash` (`_retyped` writes it unchanged). Returns the names of the weights so folded."""
    graph = model.graph
    g = GraphIndex.of(graph)
    outputs = {v.name for v in graph.output}
    rename: dict[str, str] = {}
    for name, tensor in g.initializers.items():
        readers = g.consumers.get(name, [])
        if tensor.data_type != _HALF or not readers or name in outputs:
            continue
        if not all(_widens(n) and n.output[0] not in outputs for n in readers):
            continue
        rename.update({n.output[0]: name for n in readers})
        if name not in stash:  # small ones too: the proto must not hold float16 bytes typed FLOAT
            stash[name] = stored_data(tensor, folder)
            tensor.ClearField("raw_data")
            del tensor.float_data[:], tensor.int32_data[:]
        tensor.data_type = _FLOAT
    rename_inputs(graph, rename)
    drop_unread(graph, lambda node: node.op_type == "Cast" and node.output[0] in rename)
    return set(rename.values())


def _unfold_fp32_weights(model: onnx.ModelProto, half_weights: set[str]) -> None:
    """A folded weight the converter left float32 (only fp32 islands read it) is float16 data
    again, read through one Cast(to=FLOAT): never a float32 copy of it on disk."""
    graph = model.graph
    rename = {}
    for tensor in graph.initializer:
        if tensor.name in half_weights and tensor.data_type == _FLOAT:
            tensor.data_type = _HALF
            rename[tensor.name] = f"{tensor.name}/to_float"
    rename_inputs(graph, rename)
    for name, wide in rename.items():
        graph.node.append(helper.make_node("Cast", [name], [wide], name=f"{name}/Cast", to=_FLOAT))


def _widens(node: onnx.NodeProto) -> bool:
    return node.op_type == "Cast" and helper.get_node_attr_value(node, "to") == _FLOAT


@dataclass(frozen=True)
class _AsFp16:
    """A float32 weight written as float16, clamped as the converter clamps; counts the clamped."""

    source: StoredData
    clamped: list[int]  # one counter shared by every weight

    @property
    def nbytes(self) -> int:
        return self.source.count * 2

    def chunks(self) -> Iterator[bytes]:
        for values in self.source.arrays():
            half, count = _to_fp16(values)
            self.clamped[0] += count
            yield half.tobytes()


def _retyped(model: onnx.ModelProto, stash: Mapping[str, StoredData], clamped: list[int]) -> dict:
    """The stashed weights' data for the converted graph: float16 where the converter made them so."""
    data = {}
    for tensor in model.graph.initializer:
        stored = stash.get(tensor.name)
        if stored is None:
            continue
        if stored.data_type == tensor.data_type:
            data[tensor.name] = stored
        elif stored.data_type == _FLOAT and tensor.data_type == _HALF:
            data[tensor.name] = _AsFp16(stored, clamped)
        else:
            raise Fp16Error(
                f"initializer {tensor.name}: unexpected retyping {stored.data_type} -> {tensor.data_type}"
            )
    return data


# --- a float16 boundary -----------------------------------------------------------------------


def float16_boundary(path: str | os.PathLike, names: Iterable[str]) -> int:
    """Make the float32 graph inputs and outputs `names` of the graph file `path` float16 at the
    boundary, in place (the graph's structure is rewritten and replaced atomically; its weights,
    inline or in external data, are kept as they are). For a graph `convert_fp16` wrote (the
    build's fp16 decoder: its past and present). Returns how many Casts fewer it has; Fp16Error for a name
    that is no float32 graph input or output, or a graph that no longer type-checks."""
    from vsal.runtime.package_lock import replacing

    path = Path(path)
    model = onnx.load_model(path, load_external_data=False)
    casts = sum(1 for n in model.graph.node if n.op_type == "Cast")
    model = _infer(model)  # the types of the values at the boundary
    _retype_boundary(model, names, where=str(path))
    _toposort(model.graph)
    del model.graph.value_info[:]
    model = _infer(model, strict=True)
    with replacing(path) as tmp:
        onnx.save_model(model, tmp)
    return casts - sum(1 for n in model.graph.node if n.op_type == "Cast")


def _retype_boundary(model: onnx.ModelProto, names: Iterable[str], where: str) -> None:
    """The graph inputs/outputs `names` become float16: a Cast to float16 reading such an input is
    bypassed (other readers get one Cast to float32), an output a Cast to float32 makes from a
    float16 value becomes that value (any other output gets a Cast to float16 at the end)."""
    names = list(dict.fromkeys(names))
    if not names:
        return
    graph = model.graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    wrong = [
        n for n in names if (inputs.get(n) or outputs.get(n)) is None
        or (inputs.get(n) or outputs.get(n)).type.tensor_type.elem_type not in (_FLOAT, _HALF)
    ]  # fmt: skip
    if wrong:
        raise Fp16Error(f"{where}: no float graph input or output named {wrong[:5]}")
    for name in names:
        value = inputs.get(name) or outputs[name]
        if value.type.tensor_type.elem_type == _HALF:
            continue  # float16 already
        if name in inputs:
            _half_input(graph, name)
        else:
            _half_output(graph, name)
        value.type.tensor_type.elem_type = _HALF
    drop_unread(graph, lambda node: node.op_type == "Cast")


def _half_input(graph: onnx.GraphProto, name: str) -> None:
    readers = [n for n in graph.node if name in n.input]
    rename: dict[str, str] = {}
    others = []
    for node in readers:
        if node.op_type == "Cast" and helper.get_node_attr_value(node, "to") == _HALF:
            rename[node.output[0]] = name  # the Cast is left unread, then dropped
        else:
            others.append(node)
    rename_inputs(graph, rename)
    if others:  # a reader that computes in float32 gets the value back in float32
        wide = f"{name}_fp32"
        for node in others:
            node.input[:] = [wide if i == name else i for i in node.input]
        graph.node.append(helper.make_node("Cast", [name], [wide], name=f"{wide}_cast", to=_FLOAT))


def _half_output(graph: onnx.GraphProto, name: str) -> None:
    producer = next(n for n in graph.node if name in n.output)
    inputs = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    is_widening = producer.op_type == "Cast" and helper.get_node_attr_value(producer, "to") == _FLOAT
    source = producer.input[0] if is_widening else None
    source_type = GraphIndex.of(graph).types.get(source) if source else None
    if is_widening and source_type == _HALF and source not in inputs and source not in outputs:
        # The float16 value itself is the output: its producer writes it under the output's name.
        graph.node.remove(producer)
        rename_inputs(graph, {source: name})
        for node in graph.node:
            node.output[:] = [name if o == source else o for o in node.output]
        return
    narrow = f"{name}_fp32"
    producer.output[:] = [narrow if o == name else o for o in producer.output]
    rename_inputs(graph, {name: narrow})
    graph.node.append(helper.make_node("Cast", [narrow], [name], name=f"{name}_to_fp16", to=_HALF))
