"""int8 Q/DQ graphs on x86 CPUs: the same values with uint8 activations, so ONNX Runtime fuses them.

The int8 graphs quantize activations to int8 with zero point 0 (symmetric), as TensorRT requires.
ONNX Runtime's CPU provider on x86 fuses a DequantizeLinear -> MatMul pair into its integer kernel
(MatMulIntegerToFloat, MLAS u8s8) only when the activation is uint8: with int8 activations it
leaves most of them as DequantizeLinear (weights dequantized again at every run) + fp32 MatMul, so
the int8 graph runs no faster than fp32 (`session.qdqisint8allowed=1` does fuse them, into s8s8
kernels that are 2-3x slower still on x86). Measured on the small preset's MRC Q-Former: 20 of 52
quantized MatMuls fused with int8 activations, 52 of 52 with uint8, 1.9x faster, the same output.

Re-encoding is exact: q_int8 = clip(round(x / s), -128, 127) with zero point 0 and
q_uint8 = clip(round(x / s) + 128, 0, 255) with zero point 128 dequantize to the same values. Only
activation Q/DQ pairs change (weights stay int8, as the u8s8 kernels want). Needs the `onnx`
package (a core dependency) and a graph under protobuf's 2 GiB; without either the graph runs as it
is. On ARM ONNX Runtime fuses int8 activations itself, so nothing is done there.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

MAX_BYTES = 1_800_000_000  # the rewritten model is handed over as one protobuf message (< 2 GiB)


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _file_bytes(path: Path) -> int:
    """The graph file and every other file beside it that it may name as external data."""
    return path.stat().st_size + sum(
        p.stat().st_size for p in path.parent.glob(f"{path.name}*") if p != path and p.is_file()
    )


def uint8_activations(path: str | os.PathLike) -> tuple[bytes, int] | None:
    """(serialized model, activation Q/DQ nodes re-encoded), or None when there is nothing to do
    (no int8 activation Q/DQ, not x86, no `onnx` package, a graph too large to re-serialize)."""
    path = Path(path)
    if not is_x86() or _file_bytes(path) > MAX_BYTES:
        return None
    try:
        import numpy as np
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}

    def int8_zero_point(node) -> bool:
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        return zp is not None and zp.data_type == onnx.TensorProto.INT8

    nodes = [
        n
        for n in graph.node
        if (n.op_type == "QuantizeLinear" or (n.op_type == "DequantizeLinear" and n.input[0] not in inits))
        and int8_zero_point(n)
    ]
    if not nodes:
        return None
    onnx.load_external_data_for_model(model, str(path.parent))
    inits = {i.name: i for i in graph.initializer}
    renamed: dict[str, str] = {}
    for node in nodes:
        name = node.input[2]
        if name not in renamed:
            shifted = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
            new = numpy_helper.from_array(shifted.astype(np.uint8), f"{name}__uint8")
            graph.initializer.append(new)
            renamed[name] = new.name
        node.input[2] = renamed[name]
    return model.SerializeToString(), len(nodes)
