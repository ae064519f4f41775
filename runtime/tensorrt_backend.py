"""The native TensorRT backend: one engine, its execution context and device buffers; no torch.

Implements the runtime's `Backend` interface with TensorRT's name-based I/O API (TensorRT 10/11:
set_input_shape, set_tensor_address, execute_async_v3) and cuda-python for memory and the stream.
Device buffers are allocated once per tensor and grown when a larger shape arrives, so steady-state
runs allocate nothing. Feeds are checked against the manifest first, like every backend, and cast
to the engine's input types (an fp16 engine keeps fp32 I/O when its graph does).

Written against NVIDIA's documented API; see docs/jetson.md for what was and was not run on hardware.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from vsal.runtime.backends import BackendError, FeedChecker
from vsal.runtime.manifest import GraphInfo
from vsal.runtime.tensorrt_engines import (
    CachedEngine,
    EngineError,
    cuda_check,
    engine_for,
    import_cudart,
    import_tensorrt,
)


class TensorRTBackend:
    """One serialized engine, deserialized once and run many times."""

    cached: CachedEngine | None = None  # where `for_graph` found or built the engine

    def __init__(self, name: str, engine_path: str | os.PathLike, info: GraphInfo, precision: str):
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise BackendError(f"{engine_path}: engine file missing")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:  # another TensorRT version or GPU, or a damaged file
            raise EngineError(
                f"{engine_path}: TensorRT {trt.__version__} cannot load this engine (built by another "
                "TensorRT version or for another GPU?); delete it and run "
                "`vsal-export build --backend tensorrt`"
            )
        self.context = self.engine.create_execution_context()
        self.stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in names if not is_input[n]]
        declared = sorted(t.name for t in info.inputs)
        if sorted(self._inputs) != declared:  # the feeds are checked against the manifest's inputs
            raise EngineError(
                f"{engine_path}: the engine takes inputs {sorted(self._inputs)}, the graph {declared}; "
                "delete it and run `vsal-export build --backend tensorrt`"
            )
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._declared = {t.name: np.dtype(t.dtype) for t in (*info.inputs, *info.outputs)}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.name = name
        self.precision = precision
        self.description = f"tensorrt {trt.__version__} engine {precision} ({engine_path.name})"
        self.checker = FeedChecker(name, info)

    @classmethod
    def for_graph(
        cls,
        folder: str | os.PathLike,
        name: str,
        info: GraphInfo,
        precision: str,
        workspace_bytes: int | None = None,
        progress: bool = True,
    ) -> TensorRTBackend:
        """The package graph's engine for this machine at `precision` (its fp32 graph where no such
        variant was built): from the engine cache, else built from the ONNX."""
        file, got = info.file_for(precision)
        cached = engine_for(
            Path(folder),
            name,
            info,
            file,
            info.sha256_for(got),
            got,
            workspace_bytes=workspace_bytes,
            progress=progress,
        )
        backend = cls(name, cached.path, info, got)
        backend.cached = cached
        return backend

    def input_names(self) -> list[str]:
        return list(self._inputs)

    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self.checker.check(feeds)
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        staged = []  # host arrays must outlive the async copies
        for name in self._inputs:
            array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            staged.append(array)
            if not self.context.set_input_shape(name, array.shape):
                raise BackendError(f"{self.name}: the engine refuses {name} of shape {array.shape}")
            pointer = self._buffer(name, max(array.nbytes, 1))  # empty tensors (P=0) need an address too
            cuda_check(
                cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, h2d, self.stream), "copy in"
            )
            self.context.set_tensor_address(name, pointer)
        results = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.name}: output {name} has unresolved shape {shape}")
            host = np.empty(shape, self._dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, max(host.nbytes, 1)))
            results[name] = host
        if not self.context.execute_async_v3(int(self.stream)):  # TensorRT takes the raw handle
            raise BackendError(f"{self.name}: TensorRT failed to run the engine (see its log above)")
        wanted = outputs or self._outputs
        for name in wanted:
            host = results[name]
            pointer = self._buffers[name][0]
            copy = cudart.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes, d2h, self.stream)
            cuda_check(copy, "copy out")
        cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        del staged
        return {n: results[n].astype(self._declared.get(n, results[n].dtype), copy=False) for n in wanted}

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if nbytes > size:
            if pointer:
                cuda_check(self._cudart.cudaFree(pointer), "cudaFree")
            pointer = int(cuda_check(self._cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers.clear()
        if getattr(self, "stream", None) is not None:
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
