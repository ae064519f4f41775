"""The llm_decoder graph with ONNX Runtime IO binding: the KV cache stays in ONNX Runtime.

Each step binds the previous step's present tensors (OrtValues) as the next past, and lets ONNX
Runtime allocate the new presents on the execution device, so the cache is never converted to numpy
or copied to the host between tokens (on a GPU it never leaves the device). Only the small inputs
and the logits cross. Beam search reorders the cache with a host round trip (rare: once per step
of a beam search, never in greedy or sampling). Every step's feeds, the bound past included, go
through the backend's FeedChecker first, like every other run of a graph: a past beyond the
profile's P max, or an input of another shape or dtype, is one clear error before ONNX Runtime
allocates anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from vsal.runtime.backends import ort_errors, ort_failure
from vsal.runtime.generation import past_names, present_names

ORT_DTYPES = {  # OrtValue.data_type() -> numpy
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}


@dataclass(frozen=True)
class BoundTensor:
    """What the feed checker reads of an OrtValue (which may live on the device)."""

    dtype: np.dtype | str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, value) -> BoundTensor:
        kind = value.data_type()
        return cls(ORT_DTYPES.get(kind, kind), tuple(value.shape()))


@dataclass(frozen=True)
class OrtKVCache:
    values: tuple  # OrtValues: key, value per layer, each [B, kvH, P, head_dim]
    device: str

    def reorder(self, beam_indices: np.ndarray) -> OrtKVCache:
        import onnxruntime as ort

        moved = tuple(
            ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(np.take(v.numpy(), beam_indices, axis=0)), self.device, 0
            )
            for v in self.values
        )
        return OrtKVCache(moved, self.device)


class BoundDecoderStep:
    """A `DecoderStep` (runtime.generation) over an `OnnxRuntimeBackend` of the llm_decoder graph."""

    def __init__(self, backend, num_layers: int, num_kv_heads: int, head_dim: int):
        self.backend = backend
        self.session = backend.session
        self.errors = ort_errors()
        self.device = "cuda" if backend.provider in ("cuda", "tensorrt") else "cpu"
        self.past = past_names(num_layers)
        self.present = present_names(num_layers)
        self.kv = (num_kv_heads, head_dim)

    def _empty(self, batch: int) -> OrtKVCache:
        import onnxruntime as ort

        zero = np.zeros((batch, self.kv[0], 0, self.kv[1]), np.float32)  # P = 0: the prefill
        value = ort.OrtValue.ortvalue_from_numpy(zero, self.device, 0)
        return OrtKVCache(tuple(value for _ in self.past), self.device)

    def __call__(self, inputs_embeds, attention_mask, position_ids, cache: OrtKVCache | None):
        cache = cache if cache is not None else self._empty(inputs_embeds.shape[0])
        host = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        past = dict(zip(self.past, cache.values, strict=True))
        self.backend.checker.check(host | {name: BoundTensor.of(value) for name, value in past.items()})
        binding = self.session.io_binding()
        for name, array in host.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present:
            binding.bind_output(name, self.device)
        try:
            self.session.run_with_iobinding(binding)
        except self.errors as exc:
            raise ort_failure(self.backend.name, exc) from None
        outputs = binding.get_outputs()
        return outputs[0].numpy(), OrtKVCache(tuple(outputs[1:]), self.device)
