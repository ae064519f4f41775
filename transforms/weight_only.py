"""Int8 weight-only graphs (the LLM decoder): DequantizeLinear(int8 weight) -> MatMul, no calibration.

Every MatMul whose B is a weight [K, N] reads DequantizeLinear(int8 [K, N], float32 scale [N],
zero point 0, axis=1) instead; activations and every other op stay float. A weight is a float32
2-D initializer, or a float16 one read through Cast(to=FLOAT): the streamed decoder stores the
checkpoint's float16 so (vsal.export.streaming), and the Cast goes once nothing else reads it, so
the MatMul sees float32 as before. A plain ONNX form that TensorRT parses as weight-only Q/DQ and
that ONNX Runtime 1.32 fuses into its MatMulNBits (8-bit) kernel at session load. Static int8 of
the encoders is vsal.transforms.int8; int4 (vsal.transforms.int4) takes the same weights.

Memory: a weight is read a block of rows at a time, twice (its scales, then its int8 values,
made as `save_onnx` streams them into the output): neither a whole weight in float32 nor the
int8 model (13 GB at 13B) is ever held.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from vsal.transforms.graph_index import drop_unread, name_nodes
from vsal.transforms.int8 import WEIGHT_ONLY, Int8Report, check_graph, match_any
from vsal.transforms.onnx_io import (
    CHUNK_ELEMENTS,
    INLINE_BYTES,
    ArrayData,
    StoredData,
    declared,
    is_external,
    move_into,
    save_onnx,
    stash_data,
    stored_data,
)

QMAX = 127  # symmetric: values in [-127, 127]


def quantize_weights_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    exclude_nodes: Iterable[str] = (),
    min_elements: int = 4096,
    check: bool = True,
) -> Int8Report:
    """Int8 weight-only: every MatMul whose B is a weight [K, N] (`weight_targets`, at least
    `min_elements`) reads DequantizeLinear(int8 [K, N], scale [N], zero point 0, axis=1) instead.

    Symmetric per output channel (scale = max|W[:, n]| / 127 in float32, values in [-127, 127]).
    Weights shared by several MatMuls are quantized once. Activations and every other op stay
    float. A graph with external data (the 13B decoder) is written with its int8 weights in
    `<dst>.data`, one block of rows in memory at a time.
    """
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    name_nodes(graph)
    external = any(is_external(t) for t in graph.initializer)
    excluded, targets = weight_targets(graph, list(exclude_nodes), min_elements)
    still_read = {x for n in graph.node for x in n.input} & set(targets)  # shared with another op

    data = stash_data(model, src.parent, INLINE_BYTES)
    initializers, dq_nodes = [], []
    for tensor in list(graph.initializer):
        if tensor.name not in targets:
            initializers.append(tensor)
            continue
        stashed = data.pop(tensor.name, None)
        stored = stashed or stored_data(tensor, src.parent)
        scale = channel_scales(stored)
        base = tensor.name
        names = [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"]
        initializers.append(_int8_tensor(names[0], stored.dims))
        data[names[0]] = Int8Rows(stored, scale)  # made as it is written
        for name, values in zip(names[1:], (scale, np.zeros(scale.shape, np.int8)), strict=True):
            initializers.append(declared(name, values))
            data[name] = ArrayData(values)
        if base in still_read:
            initializers.append(tensor)
            if stashed is not None:
                data[base] = stashed
        dq_nodes.append(
            helper.make_node(
                "DequantizeLinear", names, [targets[base]], name=f"{base}_DequantizeLinear", axis=1
            )
        )
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    for i, n in enumerate(dq_nodes):  # DQ nodes first: the graph stays topologically sorted
        graph.node.insert(i, n)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as work:
        staged = save_onnx(model, Path(work) / dst.name, data, external=True if external else None)
        del model, data
        if check:
            check_graph(staged[0], src)
        files = move_into(staged, dst.parent)
    return Int8Report.written(
        src,
        dst,
        files,
        start,
        method=WEIGHT_ONLY,
        excluded=excluded,
        calibration_samples=0,
        notes=[f"{len(targets)} weight tensors int8 (per output channel, symmetric)"],
    )


def _int8_tensor(name: str, shape: tuple[int, ...]) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.INT8)
    tensor.dims.extend(shape)
    return tensor


def _rows_per_block(stored: StoredData) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, stored.dims[1]))


def channel_scales(stored: StoredData) -> np.ndarray:
    """float32 [N] for a weight [K, N]: max|W[:, n]| / 127 (1 for an all-zero column)."""
    amax = np.zeros(stored.dims[1], np.float32)
    for block in stored.row_blocks(_rows_per_block(stored)):
        np.maximum(amax, np.abs(block).max(axis=0), out=amax)
    return np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Int8Rows:
    """A weight's int8 values (`TensorData` of onnx_io), quantized a block of rows at a time from
    its stored float data as they are written."""

    source: StoredData
    scale: np.ndarray  # float32 [N]

    @property
    def nbytes(self) -> int:
        return self.source.count

    def chunks(self) -> Iterator[bytes]:
        for block in self.source.row_blocks(_rows_per_block(self.source)):
            values = np.divide(block, self.scale, dtype=np.float32)
            np.clip(np.rint(values, out=values), -QMAX, QMAX, out=values)
            yield values.astype(np.int8).tobytes()


def weight_targets(graph: onnx.GraphProto, exclude_nodes: list[str], min_elements: int):
    """Point each quantizable MatMul at its weight's DequantizeLinear output. A weight is a float32
    2-D initializer B, or a float16 2-D initializer that B is the Cast(to=FLOAT) of; such a Cast is
    removed once no node reads it. Returns (the MatMuls left float, with why; weight name -> its
    DequantizeLinear output)."""
    inits = {t.name: t for t in graph.initializer}
    widened = {n.output[0]: inits[n.input[0]] for n in graph.node if _widens_half_weight(n, inits)}
    excluded, targets = [], {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = widened.get(node.input[1]) or inits.get(node.input[1])
        if weight is None:
            continue  # activation x activation (attention)
        reason = None
        if match_any(node.name, exclude_nodes):
            reason = "excluded by name"
        elif len(weight.dims) != 2 or not (weight.data_type == TensorProto.FLOAT or node.input[1] in widened):
            reason = "weight not float32 (or float16 read through a Cast) 2-D"
        elif int(np.prod(weight.dims)) < min_elements:
            reason = f"fewer than {min_elements} weights"
        if reason:
            excluded.append({"node": node.name, "op_type": "MatMul", "reason": reason})
            continue
        targets.setdefault(weight.name, f"{weight.name}_dequantized")
        node.input[1] = targets[weight.name]
    casts = {name for name, weight in widened.items() if weight.name in targets}
    drop_unread(graph, lambda n: n.op_type == "Cast" and n.output[0] in casts)
    return excluded, targets


def _widens_half_weight(node: onnx.NodeProto, inits: dict[str, TensorProto]) -> bool:
    """Cast(to=FLOAT) of a float16 initializer."""
    if node.op_type != "Cast" or not node.input or node.input[0] not in inits:
        return False
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return to == TensorProto.FLOAT and inits[node.input[0]].data_type == TensorProto.FLOAT16
