"""The ONNX Runtime backend: one graph in one session, on the TensorRT, CUDA or CPU provider.

`OnnxRuntimeBackend` runs any graph; its decoder step (`BoundDecoderStep`) uses IO binding so the
KV cache stays in ONNX Runtime between tokens: each step binds the previous step's present tensors
(OrtValues) as the next past and lets ONNX Runtime allocate the new presents on the execution
device, so the cache is never converted to numpy or copied to the host (on a GPU it never leaves
the device). Only the small inputs and the logits cross. Beam search reorders the cache with a host
round trip (rare: once per step of a beam search, never in greedy or sampling). Every step's feeds,
the bound past included, go through the backend's FeedChecker first, like every other run: a past
beyond the profile's P max, or an input of another shape or dtype, is one clear error before ONNX
Runtime allocates anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vsal.runtime.backends.base import BackendError, Runner
from vsal.runtime.backends.sessions import PROVIDERS, ort_errors, ort_failure, ort_session
from vsal.runtime.graphs import KVLayout
from vsal.runtime.manifest import GraphInfo

ORT_DTYPES = {  # OrtValue.data_type() -> numpy
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}


def tensorrt_ep_options(info: GraphInfo, precision: str, cache_dir: str | os.PathLike) -> dict[str, str]:
    """ONNX Runtime TensorRT EP options: one profile over the manifest's whole axis ranges (no
    rebuild per new shape), engine and timing caches on disk (the first session builds, later ones
    load). The EP builds weakly typed networks on TensorRT 10, so reduced precision must be enabled
    for the fp16 / Q/DQ graphs to run in it; TensorRT may then also pick fp16 inside the fp32
    islands, which the native backend (strongly typed) never does."""
    from vsal.runtime.backends.tensorrt_engines import ort_profile_options

    cache = str(Path(cache_dir) / "ort-tensorrt")
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_fp16_enable": str(precision == "fp16"),
        "trt_int8_enable": str(precision == "int8"),
        **ort_profile_options(info),
    }


@dataclass(frozen=True)
class BoundTensor:
    """An OrtValue (which may live on the device) as a `DeviceTensor`: what the feed checker reads."""

    value: object  # onnxruntime.OrtValue

    @property
    def dtype(self) -> np.dtype | str:
        kind = self.value.data_type()
        return ORT_DTYPES.get(kind, kind)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    def to_host(self) -> np.ndarray:
        return self.value.numpy()


# Weight-only int4/int8 (MatMulNBits, fused from DQ -> MatMul) with float32 activations: ONNX Runtime's
# default, int8 activations, keeps a second, int8-packed copy of the weights (2 layers at 13b width,
# int4: 0.93 GB against 0.70 GB for a 0.50 GB graph; the 13b int4 decoder's 8.1 GB: about 14 against
# 11); decoding is slower (15 against 11 ms a step on the small preset).
LOW_MEMORY_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


class OnnxRuntimeBackend(Runner):
    """One ONNX graph in an ONNX Runtime session (created once, reused)."""

    def __init__(
        self,
        name: str,
        path: str | os.PathLike,
        info: GraphInfo,
        provider: str,
        threads: int = 0,
        precision: str = "fp32",
        cache_dir: str | os.PathLike | None = None,
        low_memory: bool = False,
        spinning: bool = False,
    ):
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"{path}: graph file missing")
        providers: list = [PROVIDERS["cpu"]]
        if provider == "cuda":
            providers.insert(0, PROVIDERS["cuda"])
        elif provider == "tensorrt":  # nodes TensorRT does not take fall back to CUDA, then the CPU
            trt_options = tensorrt_ep_options(info, precision, cache_dir or path.parent)
            providers[:0] = [(PROVIDERS["tensorrt"], trt_options), PROVIDERS["cuda"]]
        source, note = path, ""
        if provider == "cpu" and precision == "int8":  # x86: re-encoded for this CPU (transforms.qdq_cpu)
            from vsal.transforms.qdq_cpu import cpu_int8_graph

            rewritten = cpu_int8_graph(path)
            if rewritten is not None:
                source, note = rewritten.model, f", {rewritten.note}"
        self.errors = ort_errors()
        try:
            # Idle threads stop spinning after a run: the pipeline runs several sessions in turn.
            # `spinning` keeps them (the decoder, which runs alone token after token: stopping its
            # threads at every run costs 10 % of a SmolLM2-135M decode step here).
            self.session = ort_session(
                source,
                threads=threads,
                providers=providers,
                stop_spinning=not spinning,
                name=name,
                config=LOW_MEMORY_CONFIG if low_memory else None,
            )
        except self.errors as exc:
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        self.provider = provider
        running = self.session.get_providers()[0]
        if running != PROVIDERS[provider]:  # its own log is silenced: say the fallback here
            note += f", not on {PROVIDERS[provider]}: ONNX Runtime could not start it (check CUDA and cuDNN)"
        super().__init__(name, info, precision, f"onnxruntime {provider} ({running}) {precision}{note}")
        self.device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"  # where outputs are bound
        self._outputs = [o.name for o in self.session.get_outputs()]

    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def output_names(self) -> list[str]:
        return list(self._outputs)

    def _run(self, feeds: Mapping[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(outputs, dict(feeds))
        except self.errors as exc:
            raise ort_failure(self.name, exc) from None
        return dict(zip(outputs, values, strict=True))

    def run_device(self, feeds, outputs=None) -> dict[str, BoundTensor]:
        """Outputs as OrtValues on the provider's device (ONNX Runtime allocates each, so they stay
        valid after later runs)."""
        self.checker.check(feeds)
        names = list(outputs or self._outputs)
        return dict(zip(names, map(BoundTensor, self.bound_run(feeds, {}, names)), strict=True))

    def bound_run(
        self,
        host: Mapping[str, np.ndarray],
        bound: Mapping[str, object],
        outputs: list[str],
        on_host: tuple[str, ...] = (),
    ) -> list:
        """One IO-bound run of checked feeds: `host` arrays and `bound` OrtValues as inputs, each of
        `outputs` an OrtValue on the device, or on the host when named in `on_host`."""
        binding = self.session.io_binding()
        for name, array in host.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in bound.items():
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, "cpu" if name in on_host else self.device)
        try:
            self.session.run_with_iobinding(binding)
        except self.errors as exc:
            raise ort_failure(self.name, exc) from None
        return binding.get_outputs()

    def decoder_step(self, layout: KVLayout, all_logits: bool = False) -> BoundDecoderStep:
        return BoundDecoderStep(self, self.info.kv_layout(layout))


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
    """A `DecoderStep` (runtime.generation) over an `OnnxRuntimeBackend` of the llm_decoder graph.
    `layout`: the running variant's (its dtype is the cache's: float16 for the fp16 decoder)."""

    def __init__(self, backend: OnnxRuntimeBackend, layout: KVLayout):
        self.backend = backend
        self.layout = layout
        self.past = layout.past_names()
        self.present = layout.present_names()

    def _empty(self, batch: int) -> OrtKVCache:
        import onnxruntime as ort

        zero = np.zeros(self.layout.shape(batch, 0), self.layout.dtype)  # P = 0: the prefill
        value = ort.OrtValue.ortvalue_from_numpy(zero, self.backend.device, 0)
        return OrtKVCache(tuple(value for _ in self.past), self.backend.device)

    def __call__(self, inputs_embeds, attention_mask, position_ids, cache: OrtKVCache | None):
        cache = cache if cache is not None else self._empty(inputs_embeds.shape[0])
        host = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        past = dict(zip(self.past, cache.values, strict=True))
        self.backend.checker.check(host | {name: BoundTensor(value) for name, value in past.items()})
        outputs = self.backend.bound_run(host, past, ["logits", *self.present], on_host=("logits",))
        return outputs[0].numpy(), OrtKVCache(tuple(outputs[1:]), self.backend.device)
