"""Int8 weight-only graphs (the LLM decoder): DequantizeLinear(int8 weight) -> MatMul, no calibration.

Every MatMul whose B is a float 2-D initializer [K, N] reads DequantizeLinear(int8 [K, N], scale
[N], zero point 0, axis=1) instead; activations and every other op stay float. A plain ONNX form
that TensorRT parses as weight-only Q/DQ and that ONNX Runtime 1.32 fuses into its MatMulNBits
(8-bit) kernel at session load. Static int8 of the encoders is vsal.transforms.int8.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from vsal.transforms.graph_index import name_nodes
from vsal.transforms.int8 import WEIGHT_ONLY, Int8Report, check_graph, match_any
from vsal.transforms.onnx_io import (
    INLINE_BYTES,
    ArrayData,
    declared,
    is_external,
    move_into,
    read_array,
    save_onnx,
    stash_data,
)


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
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    name_nodes(graph)
    external = any(is_external(t) for t in graph.initializer)
    excluded, targets = weight_targets(graph, list(exclude_nodes), min_elements)
    still_float = {x for n in graph.node for x in n.input} & set(targets)  # shared with another op

    data = stash_data(model, src.parent, INLINE_BYTES)
    initializers, dq_nodes = [], []
    for tensor in list(graph.initializer):
        if tensor.name not in targets:
            initializers.append(tensor)
            continue
        stored = data.pop(tensor.name, None)
        w = stored.array() if stored is not None else read_array(tensor, src.parent)
        amax = np.abs(w).max(axis=0)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        base = tensor.name
        names = [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"]
        for name, values in zip(names, (q, scale, np.zeros(scale.shape, np.int8)), strict=True):
            initializers.append(declared(name, values))
            data[name] = ArrayData(values)
        if base in still_float:
            initializers.append(tensor)
            if stored is not None:
                data[base] = stored
        dq = helper.make_node(
            "DequantizeLinear", names, [targets[base]], name=f"{base}_DequantizeLinear", axis=1
        )
        dq_nodes.append(dq)
        del w
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


def weight_targets(graph: onnx.GraphProto, exclude_nodes: list[str], min_elements: int):
    """Point each quantizable MatMul at its weight's DequantizeLinear output. Returns (the MatMuls
    left float, with why; weight name -> its DequantizeLinear output)."""
    inits = {t.name: t for t in graph.initializer}
    excluded, targets = [], {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue  # activation x activation (attention)
        weight = inits[node.input[1]]
        reason = None
        if match_any(node.name, exclude_nodes):
            reason = "excluded by name"
        elif weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            reason = "weight not float32 2-D"
        elif int(np.prod(weight.dims)) < min_elements:
            reason = f"fewer than {min_elements} weights"
        if reason:
            excluded.append({"node": node.name, "op_type": "MatMul", "reason": reason})
            continue
        targets.setdefault(weight.name, f"{weight.name}_dequantized")
        node.input[1] = targets[weight.name]
    return excluded, targets
