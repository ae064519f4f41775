"""int8 Q/DQ graphs on x86 CPUs: the same values re-encoded as uint8, so ONNX Runtime fuses them exactly.

The int8 graphs quantize activations to int8 with zero point 0 (symmetric), as TensorRT requires.
ONNX Runtime's CPU provider on x86 fuses a DequantizeLinear -> MatMul pair into its integer kernel
(MatMulIntegerToFloat, MLAS QGEMM) only when the activation is uint8: with int8 activations it
leaves most of them as DequantizeLinear (weights dequantized again at every run) + fp32 MatMul, so
the int8 graph runs no faster than fp32 (`session.qdqisint8allowed=1` does fuse them, into s8s8
kernels that are 2-3x slower still on x86). Measured on the small preset's MRC Q-Former: 20 of 52
quantized MatMuls fused with int8 activations, 52 of 52 with uint8, 1.9x faster, the same output.

Re-encoding is exact: q_int8 = clip(round(x / s), -128, 127) with zero point 0 and
q_uint8 = clip(round(x / s) + 128, 0, 255) with zero point 128 dequantize to the same values.

Weights depend on the CPU (runtime.cpu_isa). With VNNI they stay int8: MLAS's u8s8 kernel sums
u8*s8 products in int32, exactly. Without VNNI that kernel adds pairs of products into int16 with
saturation (`vpmaddubsw`: 2 * 255 * 127 > 32767): the tiny BEATs graph falls to cosine 0.990 on an
AVX2 CPU. There the weights of the fused MatMuls are re-encoded as uint8 too (w + 128, zero point
128: the same values), which sends them to MLAS's u8u8 kernel: it widens both to int16 and sums
pairs in int32 (`vpmaddwd`), exactly, still an integer GEMM on 1-byte weights. Measured under QEMU
as a Haswell CPU (AVX2, no VNNI), tiny BEATs, 1 - cosine vs fp32: 1.0e-2 with int8 weights,
5.4e-5 with uint8 weights, 5.4e-5 with exact DequantizeLinear math (no fusion), 1.0e-4 with 7-bit
weights (ONNX Runtime's `reduce_range`, which would also fit int16). So the package keeps one int8
graph for every target (TensorRT and VNNI CPUs lose nothing), and the choice is made at load.

Needs the `onnx` package (a core dependency) and a graph under protobuf's 2 GiB; without either the
graph runs as it is. On ARM ONNX Runtime fuses int8 activations itself and its int8 kernels
accumulate in int32, so nothing is done there.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from vsal.runtime.cpu_isa import Vnni, detect_vnni

MAX_BYTES = 1_800_000_000  # the rewritten model is handed over as one protobuf message (< 2 GiB)
FUSED_OPS = ("MatMul", "Gemm", "Conv")  # ops ONNX Runtime can fuse with their Q/DQ inputs


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


@dataclass(frozen=True)
class CpuGraph:
    """An int8 graph re-encoded for this x86 CPU."""

    model: bytes  # the serialized model
    activations: int  # activation Q/DQ nodes re-encoded as uint8
    weights: int  # weight tensors re-encoded as uint8 (no VNNI)
    vnni: Vnni

    @property
    def note(self) -> str:
        """The choice, for the backend's description line."""
        if self.weights:
            return (
                f"uint8 activations x uint8 weights (no VNNI, {self.vnni.source}: "
                "u8s8 kernels would saturate)"
            )
        return f"uint8 activations x int8 weights (VNNI, {self.vnni.source})"


def cpu_int8_graph(path: str | os.PathLike, vnni: Vnni | None = None) -> CpuGraph | None:
    """The int8 Q/DQ graph at `path` re-encoded for this CPU (`vnni`: detected when None), or None
    when there is nothing to do (no int8 activation Q/DQ, not x86, no `onnx` package, a graph too
    large to re-serialize)."""
    path = Path(path)
    if not is_x86() or path.stat().st_size > MAX_BYTES:
        return None
    try:
        import onnx
        from vsal.transforms.graph_index import GraphIndex
        from vsal.transforms.onnx_io import side_files
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    sides = side_files(model, path.parent)
    if path.stat().st_size + sum(f.stat().st_size for f in sides if f.is_file()) > MAX_BYTES:
        return None
    graph = model.graph
    inits = GraphIndex.of(graph).initializers
    activations = [
        n
        for n in graph.node
        if (n.op_type == "QuantizeLinear" or (n.op_type == "DequantizeLinear" and n.input[0] not in inits))
        and _int8(inits.get(n.input[2]) if len(n.input) > 2 else None)
    ]
    if not activations:
        return None
    vnni = vnni or detect_vnni()
    chosen = set() if vnni.present else _fused_weight_dqs(graph, inits, activations)
    weights = [graph.node[i] for i in sorted(chosen)]
    read_elsewhere = {x for i, n in enumerate(graph.node) if i not in chosen for x in n.input}
    onnx.load_external_data_for_model(model, str(path.parent))  # in place: `inits` holds the data now
    zero_points: dict[str, str] = {}
    for node in activations + weights:
        node.input[2] = _uint8_zero_point(graph, inits, node.input[2], zero_points)
    shifted = _uint8_weights(graph, inits, weights, read_elsewhere)
    return CpuGraph(model.SerializeToString(), len(activations), shifted, vnni)


def _int8(tensor) -> bool:
    import onnx

    return tensor is not None and tensor.data_type == onnx.TensorProto.INT8


def _fused_weight_dqs(graph, inits, activations) -> set[int]:
    """Indices of the weight DequantizeLinear nodes (int8 initializer) feeding a MatMul/Gemm/Conv
    that also reads a re-encoded activation: the pairs ONNX Runtime fuses into an integer kernel."""
    from_activation = {o for n in activations if n.op_type == "DequantizeLinear" for o in n.output}
    weight_dq = {
        n.output[0]: i
        for i, n in enumerate(graph.node)
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and _int8(inits[n.input[0]])
        and len(n.input) > 2
        and _int8(inits.get(n.input[2]))
    }
    return {
        weight_dq[name]
        for node in graph.node
        if node.op_type in FUSED_OPS and from_activation & set(node.input)
        for name in node.input
        if name in weight_dq
    }


def _uint8_zero_point(graph, inits, name: str, renamed: dict[str, str]) -> str:
    """The name of `name` + 128 as a uint8 initializer (added once)."""
    import numpy as np
    from onnx import numpy_helper

    if name not in renamed:
        shifted = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
        new = numpy_helper.from_array(shifted.astype(np.uint8), f"{name}__uint8")
        graph.initializer.append(new)
        renamed[name] = new.name
    return renamed[name]


def _uint8_weights(graph, inits, weights, read_elsewhere: set[str]) -> int:
    """Store each int8 weight of `weights` (DequantizeLinear nodes) as uint8 (w + 128): in place
    unless other nodes read it too (`read_elsewhere`), then as a new initializer. Returns the
    tensors re-encoded."""
    import numpy as np
    from onnx import numpy_helper

    targets = {n.input[0] for n in weights}
    shared = read_elsewhere & targets
    for name in targets:
        shifted = (numpy_helper.to_array(inits[name]).astype(np.int16) + 128).astype(np.uint8)
        if name not in shared:
            inits[name].CopyFrom(numpy_helper.from_array(shifted, name))
            continue
        new = numpy_helper.from_array(shifted, f"{name}__uint8")
        graph.initializer.append(new)
        for node in weights:
            if node.input[0] == name:
                node.input[0] = new.name
    return len(targets)
