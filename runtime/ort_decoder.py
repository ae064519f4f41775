"""The llm_decoder graph with ONNX Runtime IO binding: the KV cache stays in ONNX Runtime.

Each step binds the previous step's present tensors (OrtValues) as the next past, and lets ONNX
Runtime allocate the new presents on the execution device, so the cache is never converted to numpy
or copied to the host between tokens (on a GPU it never leaves the device). Only the small inputs
and the logits cross. Beam search reorders the cache with a host round trip (rare: once per step
of a beam search, never in greedy or sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from vsal.runtime.generation import past_names, present_names


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
        past_length = cache.values[0].shape()[2]
        if attention_mask.shape[1] != past_length + inputs_embeds.shape[1]:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions, expected past {past_length} + "
                f"new {inputs_embeds.shape[1]}"
            )
        binding = self.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.past, cache.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), OrtKVCache(tuple(outputs[1:]), self.device)
