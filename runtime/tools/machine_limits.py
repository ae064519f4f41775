"""What this machine allows, measured on the spot (numpy and ONNX Runtime only, no torch).

* memory bandwidth: the best of the read-only kernels over a buffer of a given size, on one thread
  and on every core (numpy releases the GIL in them): a max reduction (SIMD, the fastest numpy
  reader) and a matrix-vector product (OpenBLAS sgemv, the kernel shape of LLM decoding); a
  threaded copy is reported beside it (read + write bytes counted, as STREAM does). Measured both for a
  buffer far larger than the last-level cache (DRAM) and for a buffer the size of what is read per
  decoded token, because a working set that fits in a large L3 is served faster than DRAM.
* fp32 GEMM rate: numpy matmul (OpenBLAS, all cores) of two square fp32 matrices.
* int8 GEMM rate: ONNX Runtime's MatMulInteger (uint8 x int8 -> int32, MLAS) when the `onnx`
  package is there to build the one-node graph; else reported as unavailable.

Every figure is the best of a few repetitions after a warm-up: a limit, not a typical value.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from vsal.runtime.backends import ort_session

DRAM_BUFFER_BYTES = 1 << 30  # well past the largest L3 caches (this one: see cpu())


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu() -> dict:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {"name": name, "cores": cores(), "memory_bytes": memory, "numpy": np.__version__}


def _best(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(nbytes: int, reps: int = 5, threads: int | None = None) -> dict:
    """Bytes/s of the best kernel reading a buffer of `nbytes` (rounded to whole 16 KiB rows)."""
    threads = threads or cores()
    cols = 4096  # float32 row of 16 KiB
    rows = max(nbytes // (4 * cols), 2 * threads)
    a = np.ones((rows, cols), np.float32)
    b = np.empty_like(a)
    ones = np.ones(cols, np.float32)
    size = a.nbytes
    parts_a = np.array_split(a, threads)
    parts_b = np.array_split(b, threads)
    results: dict[str, float] = {}
    with ThreadPoolExecutor(threads) as pool:

        def each(fn):
            return lambda: list(pool.map(fn, range(threads)))

        kernels = {
            "max_1t": (lambda: np.max(a), size),
            "max": (each(lambda i: np.max(parts_a[i])), size),
            "gemv": (lambda: a @ ones, size),  # OpenBLAS threads it itself
            "copy": (each(lambda i: np.copyto(parts_b[i], parts_a[i])), 2 * size),  # read + write
        }
        for name, (fn, moved) in kernels.items():
            results[name] = moved / _best(fn, reps)
    reads = {k: v for k, v in results.items() if k != "copy"}
    best = max(reads, key=reads.get)
    return {
        "buffer_bytes": int(size),
        "bytes_per_s": reads[best],  # read bandwidth: what decoding (reading weights) can reach
        "kernel": best,
        "copy_bytes_per_s": round(results["copy"]),  # STREAM-style copy, read + write bytes counted
        "kernels_bytes_per_s": {k: round(v) for k, v in results.items()},
    }


def gemm_rate(n: int = 2048, reps: int = 5) -> dict:
    """fp32 FLOP/s of an n x n x n numpy matmul (2 n^3 FLOPs)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n), dtype=np.float32)
    y = rng.standard_normal((n, n), dtype=np.float32)
    seconds = _best(lambda: x @ y, reps)
    return {"flop_per_s": 2 * n**3 / seconds, "n": n, "kernel": "numpy matmul fp32"}


def int8_gemm_rate(n: int = 2048, reps: int = 5, threads: int = 0) -> dict | None:
    """int8 OPS/s of ONNX Runtime's MatMulInteger (uint8 [n, n] x int8 [n, n]); None without `onnx`."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return None

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "int8_gemm",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [n, n]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort_session(model.SerializeToString(), threads=threads)
    rng = np.random.default_rng(0)
    feeds = {
        "a": rng.integers(0, 256, (n, n), dtype=np.uint8),
        "b": rng.integers(-128, 128, (n, n), dtype=np.int8),
    }
    seconds = _best(lambda: session.run(None, feeds), reps)
    return {"op_per_s": 2 * n**3 / seconds, "n": n, "kernel": "onnxruntime MatMulInteger u8s8"}


def measure(working_set_bytes: int | None = None, quick: bool = False, threads: int = 0) -> dict:
    """The machine's limits: DRAM bandwidth, bandwidth at `working_set_bytes`, fp32 and int8 GEMM.

    quick: smaller buffers and matrices (tests); the figures are then rough.
    """
    dram = (64 << 20) if quick else DRAM_BUFFER_BYTES
    n = 512 if quick else 2048
    reps = 2 if quick else 5
    out = {
        "cpu": cpu(),
        "memory_bandwidth": memory_bandwidth(dram, reps),
        "gemm_fp32": gemm_rate(n, reps),
        "gemm_int8": int8_gemm_rate(n, reps, threads),
        "quick": quick,
    }
    if working_set_bytes:
        size = max(int(working_set_bytes), 16 << 20)
        if quick:
            size = min(size, 64 << 20)
        out["working_set_bandwidth"] = memory_bandwidth(size, reps)
    return out
