"""How fast ONNX Runtime's MatMulNBits reads weights at decode (M = 1), beside the machine's bandwidth.

  python scripts/matmulnbits_rate.py [--layers 30] [--runs 15] [--threads 1,2] [--config KEY=VALUE ...]

One graph of LAYERS decoder layers of MatMulNBits only, SmolLM2-135M's shapes (q/k/v 576 x 960,
o 576 x 576, gate/up 576 x 3072, down 1536 x 576: 66 MB at int4 in blocks of 32, more than this
machine's L3), random weights, one token's activation, for each (bits, block size) at accuracy
level 4 (int8 activations, what vsal's fused decoder runs) and each thread count; median of RUNS
runs after 3 warm-ups. Prints ms per pass and weight bytes read per second, then the read bandwidth
of `vsal bench` (runtime.tools.machine_limits) at the same size: the decode roofline's numerator.
--config adds a session config entry to every session (e.g. mlas.use_lut_gemm=1, ONNX Runtime's
LUT GEMM path, which its source takes for 2-bit weights only).
A kernel that reads far below it is compute-bound: no graph change brings decode to the roofline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

HIDDEN, INTERMEDIATE, QKV = 576, 1536, 960
CONFIGS = ((4, 32), (4, 64), (4, 128), (8, 32), (8, 128))


def layers_graph(layers: int, bits: int, block: int, seed: int = 0):
    """A model of `layers` x 4 MatMulNBits reading x (and the down projection a slice of gate_up)."""
    rng = np.random.default_rng(seed)
    nodes, inits, outputs, total = [], [], [], 0

    def weight(name: str, k: int, n: int) -> list[str]:
        nonlocal total
        blocks = -(-k // block)
        packed = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
        scales = rng.random(n * blocks, dtype=np.float32) * 0.01
        inits.extend(
            [numpy_helper.from_array(packed, f"{name}.w"), numpy_helper.from_array(scales, f"{name}.s")]
        )
        total += packed.nbytes + scales.nbytes
        return [f"{name}.w", f"{name}.s"]

    def matmul(x: str, name: str, k: int, n: int) -> str:
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4}
        nodes.append(
            helper.make_node("MatMulNBits", [x, *weight(name, k, n)], [name], domain="com.microsoft", **attrs)
        )
        return name

    for name, value in (("start", 0), ("stop", INTERMEDIATE), ("axis", 1)):
        inits.append(numpy_helper.from_array(np.array([value], np.int64), name))
    for i in range(layers):
        outputs += [matmul("x", f"l{i}.qkv", HIDDEN, QKV), matmul("x", f"l{i}.o", HIDDEN, HIDDEN)]
        gate_up = matmul("x", f"l{i}.gate_up", HIDDEN, 2 * INTERMEDIATE)
        nodes.append(helper.make_node("Slice", [gate_up, "start", "stop", "axis"], [f"l{i}.gate"]))
        outputs.append(matmul(f"l{i}.gate", f"l{i}.down", INTERMEDIATE, HIDDEN))
    graph = helper.make_graph(
        nodes,
        "matmulnbits_rate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets), total


def rate(model, threads: int, runs: int, config: dict[str, str] | None = None) -> float:
    """Median seconds per pass."""
    from vsal.runtime.backends.sessions import ort_session

    session = ort_session(model.SerializeToString(), threads=threads, config=config)
    x = np.random.default_rng(1).random((1, HIDDEN), dtype=np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.config):
        parser.error(f"--config takes KEY=VALUE, got {args.config}")
    config = dict(item.split("=", 1) for item in args.config)
    threads = [int(t) for t in args.threads.split(",")]
    print("| bits | block | threads | ms per pass | MB | GB/s |", "|---|---|---|---|---|---|", sep="\n")
    largest = 0
    for bits, block in CONFIGS:
        model, total = layers_graph(args.layers, bits, block)
        largest = max(largest, total)
        for count in threads:
            seconds = rate(model, count, args.runs, config)
            cells = [
                bits,
                block,
                count,
                f"{seconds * 1e3:.2f}",
                f"{total / 1e6:.1f}",
                f"{total / seconds / 1e9:.1f}",
            ]
            print("| " + " | ".join(str(c) for c in cells) + " |")
    from vsal.runtime.tools.machine_limits import memory_bandwidth

    read = memory_bandwidth(largest)
    gbs = read["bytes_per_s"] / 1e9
    print(f"read bandwidth at {largest / 2**20:.0f} MiB: {gbs:.1f} GB/s ({read['kernel']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
