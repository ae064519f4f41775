"""The native TensorRT backend: one engine, its execution context and device buffers; no torch.

A `Runner` over TensorRT's name-based I/O API (TensorRT 10/11: set_input_shape, set_tensor_address,
execute_async_v3) with cuda-python's runtime (`cudart`) for memory and the stream, wrapped in
`CudaMemory`. `TensorRTBackend.run` allocates a device buffer per tensor once and grows it when a
larger shape arrives, so steady-state runs allocate nothing; feeds are cast to the engine's input
types (an fp16 engine keeps fp32 I/O when its graph does).

`TensorRTDecoderStep` is the decoder's step with the KV cache resident on the device: two buffers
per past tensor, preallocated at the profile's B max and P max, the present of one step written
into the buffer that is not the past and then swapped by pointer; beam search gathers rows on the
device. Per token only the small inputs go in and the logits come out.

Written against NVIDIA's documented API. The decoder step has run only against a numpy stand-in of
that API (tests/test_tensorrt_decoder_step.py: the bookkeeping, not TensorRT itself); see
docs/jetson.md for what was and was not run on hardware.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vsal.runtime.backends.base import BackendError, FeedChecker, Runner
from vsal.runtime.backends.tensorrt_engines import (
    CachedEngine,
    EngineError,
    cuda_check,
    engine_for,
    import_cudart,
    import_tensorrt,
)
from vsal.runtime.graphs import KVLayout
from vsal.runtime.manifest import GraphInfo


class CudaMemory:
    """Device memory and one stream through cuda-python's runtime: every copy is asynchronous on
    the stream, `sync()` waits for them (host arrays must stay alive until then)."""

    def __init__(self, cudart):
        self.cudart = cudart
        self.stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        kinds = cudart.cudaMemcpyKind
        self._h2d = kinds.cudaMemcpyHostToDevice
        self._d2h = kinds.cudaMemcpyDeviceToHost
        self._d2d = kinds.cudaMemcpyDeviceToDevice

    def alloc(self, nbytes: int) -> int:
        return int(cuda_check(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, pointer: int) -> None:
        cuda_check(self.cudart.cudaFree(pointer), "cudaFree")

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        copy = self.cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, self._h2d, self.stream)
        cuda_check(copy, "copy in")

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        copy = self.cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, self._d2h, self.stream)
        cuda_check(copy, "copy out")

    def copy(self, destination: int, source: int, nbytes: int) -> None:
        copy = self.cudart.cudaMemcpyAsync(destination, source, nbytes, self._d2d, self.stream)
        cuda_check(copy, "copy on the device")

    def sync(self) -> None:
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    @property
    def handle(self) -> int:
        return int(self.stream)  # TensorRT takes the raw stream handle

    def close(self) -> None:
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None


class Buffers:
    """Device buffers by name, each grown (never shrunk) to the largest size asked for."""

    def __init__(self, memory: CudaMemory):
        self.memory = memory
        self._held: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

    def get(self, name: str, nbytes: int) -> int:
        pointer, size = self._held.get(name, (0, 0))
        if nbytes > size or not pointer:  # empty tensors (P = 0) need an address too
            if pointer:
                self.memory.free(pointer)
            pointer = self.memory.alloc(nbytes)
            self._held[name] = (pointer, max(nbytes, 1))
        return pointer

    def close(self) -> None:
        for pointer, _ in self._held.values():
            self.memory.free(pointer)
        self._held.clear()


@dataclass(frozen=True)
class DeviceArray:
    """A tensor in device memory (a `DeviceTensor`): where, what type, what shape."""

    pointer: int
    dtype: np.dtype
    shape: tuple[int, ...]
    memory: CudaMemory

    def to_host(self) -> np.ndarray:
        array = np.empty(self.shape, self.dtype)
        self.memory.to_host(array, self.pointer)
        self.memory.sync()
        return array


def set_shape(context, graph: str, name: str, shape: tuple[int, ...]) -> None:
    if not context.set_input_shape(name, shape):
        raise BackendError(f"{graph}: the engine refuses {name} of shape {shape}")


def output_shape(context, graph: str, name: str) -> tuple[int, ...]:
    shape = tuple(context.get_tensor_shape(name))
    if any(d < 0 for d in shape):
        raise BackendError(f"{graph}: output {name} has unresolved shape {shape}")
    return shape


def execute(context, memory: CudaMemory, graph: str) -> None:
    if not context.execute_async_v3(memory.handle):
        raise BackendError(f"{graph}: TensorRT failed to run the engine (see its log above)")


class TensorRTBackend(Runner):
    """One serialized engine, deserialized once and run many times."""

    cached: CachedEngine | None = None  # where `for_graph` found or built the engine

    def __init__(self, name: str, engine_path: str | os.PathLike, info: GraphInfo, precision: str):
        trt = import_tensorrt()
        cudart = import_cudart()
        info = info.interface(precision)  # the variant's own dtypes (the fp16 decoder's KV cache)
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
        self.memory = CudaMemory(cudart)
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
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._declared = {t.name: np.dtype(t.dtype) for t in (*info.inputs, *info.outputs)}
        self._buffers = Buffers(self.memory)
        self._steps: dict[KVLayout, TensorRTDecoderStep] = {}
        description = f"tensorrt {trt.__version__} engine {precision} ({engine_path.name})"
        super().__init__(name, info, precision, description)

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

    def _execute(self, feeds: Mapping[str, np.ndarray]) -> dict[str, DeviceArray]:
        """Copy the feeds in, run, and leave every output in its device buffer."""
        staged = []  # host arrays must outlive the async copies
        for name in self._inputs:
            array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            staged.append(array)
            set_shape(self.context, self.name, name, array.shape)
            pointer = self._buffers.get(name, array.nbytes)
            self.memory.to_device(pointer, array)
            self.context.set_tensor_address(name, pointer)
        results = {}
        for name in self._outputs:
            shape = output_shape(self.context, self.name, name)
            dtype = self.dtypes[name]
            pointer = self._buffers.get(name, int(np.prod(shape)) * dtype.itemsize)
            self.context.set_tensor_address(name, pointer)
            results[name] = DeviceArray(pointer, dtype, shape, self.memory)
        execute(self.context, self.memory, self.name)
        self.memory.sync()  # the inputs' copies are done before `staged` goes
        return results

    def _run(self, feeds: Mapping[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        on_device = self._execute(feeds)
        hosts = {}
        for name in outputs:
            tensor = on_device[name]
            hosts[name] = np.empty(tensor.shape, tensor.dtype)
            self.memory.to_host(hosts[name], tensor.pointer)
        self.memory.sync()
        return {n: a.astype(self._declared.get(n, a.dtype), copy=False) for n, a in hosts.items()}

    def run_device(self, feeds, outputs=None) -> dict[str, DeviceArray]:
        """Outputs in the engine's device buffers, in the engine's dtypes: valid until the next run
        of this backend, which reuses the buffers."""
        self.checker.check(feeds)
        on_device = self._execute(feeds)
        return {name: on_device[name] for name in outputs or self._outputs}

    def decoder_step(self, layout: KVLayout, all_logits: bool = False) -> TensorRTDecoderStep:
        """The device-resident step (one per layout, kept: its KV buffers are allocated once), its
        cache in the dtype of the engine's graph's past (`GraphInfo.kv_layout`)."""
        layout = self.info.kv_layout(layout)
        if layout not in self._steps:
            self._steps[layout] = TensorRTDecoderStep(
                self.context, self.memory, self.info, layout, self.dtypes, self.name, self.checker
            )
        return self._steps[layout]

    def close(self) -> None:
        for step in getattr(self, "_steps", {}).values():  # getattr: a constructor that failed
            step.close()
        self._steps = {}
        if getattr(self, "_buffers", None) is not None:
            self._buffers.close()
        if getattr(self, "memory", None) is not None:
            self.memory.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


# --- the decoder step with its KV cache on the device -----------------------------------------------


@dataclass(frozen=True)
class DeviceKVCache:
    """A handle on a `TensorRTDecoderStep`'s cache: `length` positions of `batch` rows. The step
    keeps one live cache; a handle from before its last step or reorder is refused."""

    step: TensorRTDecoderStep
    generation: int  # the step's count of steps and reorders when this handle was made
    batch: int
    length: int

    def reorder(self, beam_indices: np.ndarray) -> DeviceKVCache:
        return self.step.reorder(self, beam_indices)


@dataclass(frozen=True)
class KVFacts:
    """What the feed checker reads of a past tensor on the device."""

    dtype: np.dtype
    shape: tuple[int, ...]


class TensorRTDecoderStep:
    """A `DecoderStep` (runtime.generation) whose KV cache never leaves the device.

    Each past tensor has two device buffers of [B max, kv_heads, P max, head_dim] (the profile's
    maxima) in the layout's dtype, allocated once. A step binds one as the past (its first
    [B, kv_heads, P, head_dim] elements, dense) and the other as the present, which the engine
    writes as [B, kv_heads, P+T, head_dim]; then the two swap roles, so the present becomes the next
    past without a copy. `reorder` gathers rows (beam_indices) from the live buffer into the other
    one on the device (one device-to-device copy per row and tensor) and swaps likewise. The host
    sends inputs_embeds, attention_mask and position_ids and receives the logits [B, T, V]: nothing
    else crosses. A cache longer than P max is refused before the engine runs (it would not fit).

    Unverified on real TensorRT: its bookkeeping runs against a numpy stand-in of the same API.
    """

    def __init__(
        self,
        context,
        memory: CudaMemory,
        info: GraphInfo,
        layout: KVLayout,
        dtypes: Mapping[str, np.dtype],
        name: str = "llm_decoder",
        checker: FeedChecker | None = None,
    ):
        self.context = context
        self.memory = memory
        self.layout = layout
        self.name = name
        self.checker = checker or FeedChecker(name, info)
        self.dtypes = dict(dtypes)
        self.past = layout.past_names()
        self.present = layout.present_names()
        self.kv_dtype = np.dtype(layout.dtype)
        self.logits_dtype = np.dtype(next(t.dtype for t in info.outputs if t.name == "logits"))
        for tensor in (*self.past, *self.present):
            if self.dtypes[tensor] != self.kv_dtype:
                raise BackendError(
                    f"{name}: the engine's {tensor} is {self.dtypes[tensor]}, the package's KV layout "
                    f"says {self.kv_dtype}; rebuild the engine from this package"
                )
        self.max_batch = info.profile["B"]["max"]
        self.max_length = info.profile["P"]["max"]
        nbytes = int(np.prod(layout.shape(self.max_batch, self.max_length))) * self.kv_dtype.itemsize
        self.buffers = [(memory.alloc(nbytes), memory.alloc(nbytes)) for _ in self.past]
        self.live = 0  # which buffer of each pair holds the past
        self.generation = 0
        self.batch = self.length = 0
        self._small = Buffers(memory)  # the host inputs and the logits, grown as needed
        # The mask grows by a position per token: its buffer is taken at [B max, P max] at once, or
        # each token would free and allocate it again (cudaFree waits for the whole device).
        self._mask_bytes = self.max_batch * self.max_length * self.dtypes["attention_mask"].itemsize

    def _live(self, cache: DeviceKVCache) -> None:
        if cache.step is not self or cache.generation != self.generation:
            raise BackendError(
                f"{self.name}: a stale KV cache: the device-resident step keeps only its latest cache "
                "(pass each step's cache to the next step)"
            )

    def _swap(self, batch: int, length: int) -> DeviceKVCache:
        self.live = 1 - self.live
        self.generation += 1
        self.batch, self.length = batch, length
        return DeviceKVCache(self, self.generation, batch, length)

    def __call__(self, inputs_embeds, attention_mask, position_ids, cache: DeviceKVCache | None):
        batch, t = inputs_embeds.shape[:2]
        if cache is None:  # a new sequence: the past is empty, whatever the buffers held
            length = 0
        else:
            self._live(cache)
            batch, length = cache.batch, cache.length
        host = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        past_shape = self.layout.shape(batch, length)
        self.checker.check(host | {name: KVFacts(self.kv_dtype, past_shape) for name in self.past})
        if length + t > self.max_length:
            raise BackendError(
                f"{self.name}: the KV cache would hold P+T = {length + t} positions; its device buffers "
                f"hold the profile's P max = {self.max_length}"
            )
        staged = []  # host arrays must outlive the async copies
        for name, array in host.items():
            array = np.ascontiguousarray(array, dtype=self.dtypes[name])
            staged.append(array)
            set_shape(self.context, self.name, name, array.shape)
            reserve = self._mask_bytes if name == "attention_mask" else 0
            pointer = self._small.get(name, max(array.nbytes, reserve))
            self.memory.to_device(pointer, array)
            self.context.set_tensor_address(name, pointer)
        present_shape = self.layout.shape(batch, length + t)
        for i, (past, present) in enumerate(zip(self.past, self.present, strict=True)):
            set_shape(self.context, self.name, past, past_shape)
            self.context.set_tensor_address(past, self.buffers[i][self.live])
            self.context.set_tensor_address(present, self.buffers[i][1 - self.live])
        for present in self.present:  # the engine must write what the buffers hold
            got = output_shape(self.context, self.name, present)
            if got != present_shape:
                raise BackendError(f"{self.name}: the engine makes {present} {got}, expected {present_shape}")
        logits_shape = output_shape(self.context, self.name, "logits")
        logits = np.empty(logits_shape, self.dtypes["logits"])
        pointer = self._small.get("logits", logits.nbytes)
        self.context.set_tensor_address("logits", pointer)
        execute(self.context, self.memory, self.name)
        self.memory.to_host(logits, pointer)
        self.memory.sync()
        del staged
        return logits.astype(self.logits_dtype, copy=False), self._swap(batch, length + t)

    def reorder(self, cache: DeviceKVCache, beam_indices: np.ndarray) -> DeviceKVCache:
        """The cache of rows `beam_indices` (a `KVCache.reorder`), gathered on the device."""
        self._live(cache)
        rows = np.asarray(beam_indices, np.int64).reshape(-1)
        if rows.size > self.max_batch or rows.size == 0 or rows.min() < 0 or rows.max() >= cache.batch:
            raise BackendError(
                f"{self.name}: cannot reorder {cache.batch} cache rows by {rows.tolist()} "
                f"(B max {self.max_batch})"
            )
        row_bytes = int(np.prod(self.layout.shape(1, cache.length))) * self.kv_dtype.itemsize
        for pair in self.buffers:
            source, destination = pair[self.live], pair[1 - self.live]
            for j, row in enumerate(rows.tolist()):
                self.memory.copy(destination + j * row_bytes, source + row * row_bytes, row_bytes)
        return self._swap(int(rows.size), cache.length)

    def close(self) -> None:
        for pair in self.buffers:
            for pointer in pair:
                self.memory.free(pointer)
        self.buffers = []
        self._small.close()
