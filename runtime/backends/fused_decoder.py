"""The fused decoder on ONNX Runtime: its step writes the KV cache in place.

The fused variant (vsal.transforms.fused_decoder, recorded by the build as `graphs.llm_decoder.
fused.<precision>`) takes the cache as one buffer per layer and kind, [B, kvH, capacity, hd], that
GroupQueryAttention reads and writes in place when its past and present are the same tensor. So a
step binds each buffer (numpy memory wrapped as an OrtValue, no copy) as both, and the only tensors
that cross per token are the new token's embedding and the logits: no cache is allocated or
concatenated per token. The buffers grow by GROW positions when a step would pass their end (a copy
once per GROW tokens), never past the profile's P max. The IO binding itself is kept with the cache
(`StepBinding`): while the cache and the step's shapes stay, a step only writes the new token's
embedding and positions into the bound host arrays, so the per-token cost is ONNX Runtime's run.
Beam search reorders the buffers in place (one gather of the filled positions per step); a new
batch size (the prompt's row tiled to the beams) takes new buffers.

The variant has no attention mask: every row attends to all of its past, as generation feeds it
(one prompt, its beams). `FusedDecoderBackend.run` takes the portable graph's feeds too (the
build's accuracy checks, the perplexity tool), refusing a padded mask by name, and runs a chunk
(T > 1 over a past) a row at a time, as GroupQueryAttention takes such a step only at batch 1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from vsal.runtime.backends.base import BackendError
from vsal.runtime.backends.onnx_runtime import BoundTensor, OnnxRuntimeBackend
from vsal.runtime.graphs import KVLayout
from vsal.runtime.manifest import GraphInfo

GROW = 256  # cache positions added at a time


def _capacity(needed: int, most: int) -> int:
    return min(most, -(-(needed + GROW) // GROW) * GROW) if needed <= most else needed


class StepBinding:
    """One IO binding of a step's shape over a cache's buffers, reused step after step: the host
    inputs are arrays of their own, bound as OrtValues over their memory, which a step overwrites;
    the logits are written into an array of `logits_shape` bound the same way (reading them back
    through get_outputs() wraps every present too: 64 us a step on SmolLM2, a copy 5 us)."""

    def __init__(
        self,
        session,
        host: Mapping[str, np.ndarray],
        past: Mapping,
        present: Mapping,
        logits_shape: tuple[int, ...],
    ):
        import onnxruntime as ort

        self.key = _key(host, logits_shape)
        self.host = {name: np.array(array, order="C") for name, array in host.items()}  # own copies
        self.logits = np.zeros(logits_shape, np.float32)
        self.binding = session.io_binding()
        for name, array in self.host.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for name, value in past.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        for name, value in present.items():
            self.binding.bind_ortvalue_output(name, value)

    def fill(self, host: Mapping[str, np.ndarray]) -> None:
        for name, array in host.items():
            np.copyto(self.host[name], array)


def _vocab(info, name: str) -> int:
    """The logits' last axis, a number in the fused variant's interface."""
    shape = next((o.shape for o in info.outputs if o.name == "logits"), None)
    if shape is None:
        raise BackendError(f"{name}: the fused decoder's interface has no logits output")
    if not isinstance(shape[-1], int):
        raise BackendError(f"{name}: the fused decoder's logits have no fixed vocabulary axis: {shape}")
    return shape[-1]


def _key(host: Mapping[str, np.ndarray], logits_shape: tuple[int, ...]) -> tuple:
    return (*((name, np.shape(a), np.asarray(a).dtype.str) for name, a in host.items()), logits_shape)


@dataclass
class FusedKVCache:
    """The past in buffers [B, kvH, capacity, hd] per name, of which `length` positions are filled;
    `binding`: the last step's IO binding over these buffers."""

    layout: KVLayout
    buffers: tuple[np.ndarray, ...]
    values: tuple  # OrtValues over the same memory
    length: int
    binding: StepBinding | None = None

    @classmethod
    def allocate(cls, layout: KVLayout, batch: int, capacity: int) -> FusedKVCache:
        import onnxruntime as ort

        shape = (batch, layout.kv_heads, capacity, layout.head_dim)
        buffers = tuple(np.zeros(shape, layout.dtype) for _ in layout.past_names())
        values = tuple(ort.OrtValue.ortvalue_from_numpy(b) for b in buffers)  # shares b's memory
        return cls(layout, buffers, values, 0)

    @property
    def batch(self) -> int:
        return self.buffers[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def resized(self, rows: np.ndarray | None, capacity: int) -> FusedKVCache:
        """A copy in new buffers: rows `rows` (all: None) of the filled positions, `capacity` long."""
        count = self.batch if rows is None else len(rows)
        new = FusedKVCache.allocate(self.layout, count, capacity)
        filled = slice(0, self.length)
        for old, buffer in zip(self.buffers, new.buffers, strict=True):
            buffer[:, :, filled] = old[:, :, filled] if rows is None else old[rows, :, filled]
        new.length = self.length
        return new

    def reorder(self, beam_indices: np.ndarray) -> FusedKVCache:
        """Row i becomes row beam_indices[i]: in place when the batch keeps its size."""
        rows = np.asarray(beam_indices, dtype=np.int64)
        if len(rows) != self.batch:
            return self.resized(rows, self.capacity)
        filled = slice(0, self.length)
        for buffer in self.buffers:
            buffer[:, :, filled] = buffer[rows, :, filled]  # the gather copies first: safe in place
        return self


class FusedDecoderStep:
    """A `DecoderStep` (runtime.generation) over a `FusedDecoderBackend`. Logits come back for the
    last position only, [B, 1, V], which is what generation reads; `all_logits`: every position."""

    def __init__(self, backend: FusedDecoderBackend, layout: KVLayout, all_logits: bool = False):
        self.backend = backend
        self.layout = layout
        self.all_logits = all_logits
        self.past = layout.past_names()
        self.present = layout.present_names()
        self.most = backend.info.profile["P"]["max"]
        self.vocab = _vocab(backend.info, backend.name)

    def __call__(self, inputs_embeds, attention_mask, position_ids, cache: FusedKVCache | None):
        batch, t = inputs_embeds.shape[:2]
        _no_padding(attention_mask, self.backend.name)
        length = 0 if cache is None else cache.length
        if cache is None or length + t > cache.capacity:
            capacity = _capacity(length + t, self.most)
            cache = (
                FusedKVCache.allocate(self.layout, batch, capacity)
                if cache is None
                else cache.resized(None, capacity)
            )
        if batch > 1 and t > 1 and length:
            raise BackendError(
                f"{self.backend.name}: the fused decoder takes a chunk of {t} tokens over a past at "
                f"batch 1 only (GroupQueryAttention), not {batch}"
            )
        host = {
            "inputs_embeds": inputs_embeds,
            "position_ids": position_ids,
            "seqlens_k": np.full(batch, length + t - 1, np.int32),
            "total_sequence_length": np.array(length + t, np.int32),
            "logits_to_keep": np.array(0 if self.all_logits else 1, np.int64),
        }
        logits = (batch, t if self.all_logits else 1, self.vocab)
        if cache.binding is None or cache.binding.key != _key(host, logits):
            past = dict(zip(self.past, cache.values, strict=True))
            # the buffers and the host arrays keep their shapes while the binding lives: checked once
            self.backend.checker.check(host | {name: BoundTensor(v) for name, v in past.items()})
            present = dict(zip(self.present, cache.values, strict=True))
            cache.binding = StepBinding(self.backend.session, host, past, present, logits)
        else:
            cache.binding.fill(host)
        logits = self.backend.bound_step(cache.binding)
        cache.length = length + t
        return logits, cache


def _no_padding(attention_mask: np.ndarray, name: str) -> None:
    if not np.all(attention_mask == 1):
        raise BackendError(
            f"{name}: the fused decoder takes no padding (every row attends to all its past); "
            "this feed's attention_mask has zeros: run the portable decoder (--portable-decoder)"
        )


class FusedDecoderBackend(OnnxRuntimeBackend):
    """The fused decoder variant in an ONNX Runtime CPU session. `info`: the fused variant's own
    interface (GraphInfo.fused_interface)."""

    def __init__(self, name: str, path: str | os.PathLike, info: GraphInfo, threads: int, precision: str):
        super().__init__(name, path, info, "cpu", threads, precision, spinning=True)
        self.description += ", fused (GroupQueryAttention, MatMulNBits, the KV cache in place)"

    def bound_step(self, step: StepBinding) -> np.ndarray:
        """One run of a step's binding, each present bound to its past's buffer: the logits, on the host."""
        try:
            self.session.run_with_iobinding(step.binding)
        except self.errors as exc:
            from vsal.runtime.backends.sessions import ort_failure

            raise ort_failure(self.name, exc) from None
        return step.logits.copy()  # the next step overwrites the bound array

    def decoder_step(self, layout: KVLayout, all_logits: bool = False) -> FusedDecoderStep:
        return FusedDecoderStep(self, self.info.kv_layout(layout), all_logits)

    def run(self, feeds, outputs=None) -> dict[str, np.ndarray]:
        """The portable graph's feeds and outputs (logits at every position, the presents), a row at a
        time where GroupQueryAttention needs it (a chunk over a past)."""
        if "attention_mask" not in feeds:  # the fused graph's own feeds
            return super().run(feeds, outputs)
        _no_padding(np.asarray(feeds["attention_mask"]), self.name)
        x = np.asarray(feeds["inputs_embeds"])
        batch, t = x.shape[:2]
        past_names = [n for n in feeds if n.startswith("past_key_values.")]
        length = np.asarray(feeds[past_names[0]]).shape[2] if past_names else 0
        rows = (
            [slice(None)] if batch == 1 or t == 1 or not length else [slice(b, b + 1) for b in range(batch)]
        )
        parts = []
        for row in rows:
            own = {
                "inputs_embeds": x[row],
                "position_ids": np.asarray(feeds["position_ids"])[row],
                "seqlens_k": np.full(x[row].shape[0], length + t - 1, np.int32),
                "total_sequence_length": np.array(length + t, np.int32),
                "logits_to_keep": np.array(0, np.int64),
                **{n: np.ascontiguousarray(np.asarray(feeds[n])[row]) for n in past_names},
            }
            parts.append(super().run(own, None))
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return {k: joined[k] for k in (outputs or joined)}
