"""Backends: load a graph, describe its inputs and outputs, run it with numpy arrays.

One small interface (`Backend`), implemented by ONNX Runtime with the TensorRT, CUDA or CPU
execution provider; the native TensorRT engine backend plugs in behind the same interface. The
provider is chosen per graph from what the machine has and said on screen, never silently. Feeds
are checked against the manifest (names, dtypes, ranks, static sizes, profile ranges, multiples)
before running, so a wrong input is one clear error instead of a failure deep in a kernel, and an
input past the graph's profile (a prompt of 50,000 tokens) never reaches it. Every way of running
a graph (`OnnxRuntimeBackend.run`, the decoder's IO-binding step, `TensorRTBackend.run`, a
server's BLS call) passes through `FeedChecker.check`: shapes and dtypes only, cheap per token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from vsal.runtime.errors import VsalError
from vsal.runtime.manifest import GraphInfo, TensorInfo
from vsal.runtime.shapes import evaluate

PROVIDERS = {  # vsal's provider names -> ONNX Runtime's
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
ORT_LOG_FATAL = 4  # ONNX Runtime's log severities: 0 verbose ... 3 error, 4 fatal
PREFERENCE = ("tensorrt", "cuda", "cpu")


class BackendError(VsalError):
    """A graph that cannot be loaded or run, or feeds that do not fit it."""


class Backend(Protocol):
    name: str  # graph name
    description: str  # what runs it, for the screen

    def input_names(self) -> list[str]: ...

    def output_names(self) -> list[str]: ...

    def run(
        self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]: ...


def available_providers() -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [p for p in PREFERENCE if PROVIDERS[p] in have]


def choose_provider(requested: str | None) -> str:
    """The requested provider if this machine has it (else a clear error), or the best available."""
    have = available_providers()
    if requested is None:
        return have[0]
    if requested not in PROVIDERS:
        raise BackendError(f"unknown provider {requested!r}; choose one of {', '.join(PROVIDERS)}")
    if requested not in have:
        raise BackendError(
            f"provider {requested!r} is not available here (onnxruntime offers {', '.join(have)}); "
            "install onnxruntime-gpu on a GPU machine for cuda/tensorrt"
        )
    return requested


class Tensor(Protocol):
    """What the checker reads of a feed: a numpy array, or facts about a tensor on a device."""

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass
class FeedChecker:
    """Checks feeds against a graph's manifest entry: one message listing every problem."""

    graph: str
    info: GraphInfo

    def __post_init__(self) -> None:
        # Read once, not per call: the decoder's feeds are checked at every token.
        self._expected = {t.name: (t, np.dtype(t.dtype)) for t in self.info.inputs}
        self._relations = [
            (t, i, want)
            for t in self.info.inputs
            for i, want in enumerate(t.shape)
            if not isinstance(want, int) and want not in self.info.profile
        ]

    def check(self, feeds: Mapping[str, Tensor]) -> None:
        problems = []
        if feeds.keys() != self._expected.keys():
            missing = sorted(set(self._expected) - set(feeds))
            extra = sorted(set(feeds) - set(self._expected))
            if missing:
                problems.append(f"missing inputs {missing}")
            if extra:
                problems.append(f"unknown inputs {extra}")
        sizes: dict[str, int] = {}
        for name, (spec, dtype) in self._expected.items():
            if name in feeds:
                problems += self._check_one(spec, dtype, feeds[name], sizes)
        if not problems:
            problems += self._check_relations(feeds, sizes)
        if problems:
            raise BackendError(f"{self.graph}: " + "; ".join(problems))

    def _check_one(
        self, spec: TensorInfo, dtype: np.dtype, array: Tensor, sizes: dict[str, int]
    ) -> list[str]:
        if array.dtype != dtype:
            return [f"{spec.name} is {array.dtype}, expected {spec.dtype}"]
        if len(array.shape) != len(spec.shape):
            return [f"{spec.name} has shape {array.shape}, expected rank {len(spec.shape)} {spec.shape}"]
        problems = []
        for dim, want in zip(array.shape, spec.shape, strict=True):
            if isinstance(want, int):
                if dim != want:
                    problems.append(f"{spec.name} has shape {array.shape}, expected {spec.shape}")
            elif want in self.info.profile:  # a plain axis: check its range and step
                bounds = self.info.profile[want]
                step = self.info.axis_multiples.get(want, 1)
                if sizes.setdefault(want, dim) != dim:
                    problems.append(f"axis {want} is {sizes[want]} in one input and {dim} in {spec.name}")
                elif not bounds["min"] <= dim <= bounds["max"] or dim % step:
                    problems.append(
                        f"{spec.name} axis {want} = {dim} is outside the graph's range "
                        f"[{bounds['min']}, {bounds['max']}]" + (f" in steps of {step}" if step > 1 else "")
                    )
        return problems

    def _check_relations(self, feeds: Mapping[str, Tensor], sizes: dict[str, int]) -> list[str]:
        """Dimensions given by expressions ("P+T", "S*32") must equal their value (nothing in the
        graph checks it: a wrong attention-mask length could broadcast silently)."""
        problems = []
        for spec, i, want in self._relations:
            try:
                value = evaluate(want, sizes)
            except KeyError:
                continue  # an axis that only this expression names: nothing to compare with
            got = feeds[spec.name].shape[i]
            if got != value:
                where = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))
                problems.append(f"{spec.name} dimension {i} is {got}, expected {want} = {value} ({where})")
        return problems


def ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception types (a kernel's failure, an allocation it could not make): what
    a run may raise once its feeds passed the checker. Python's MemoryError is not among them."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, BaseException))


def ort_failure(graph: str, exc: BaseException) -> BackendError:
    first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
    return BackendError(f"{graph}: ONNX Runtime failed ({first_line})")


def tensorrt_ep_options(info: GraphInfo, precision: str, cache_dir: str | os.PathLike) -> dict[str, str]:
    """ONNX Runtime TensorRT EP options: one profile over the manifest's whole axis ranges (no
    rebuild per new shape), engine and timing caches on disk (the first session builds, later ones
    load). The EP builds weakly typed networks on TensorRT 10, so reduced precision must be enabled
    for the fp16 / Q/DQ graphs to run in it; TensorRT may then also pick fp16 inside the fp32
    islands, which the native backend (strongly typed) never does."""
    from vsal.runtime.tensorrt_engines import ort_profile_options

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


class OnnxRuntimeBackend:
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
    ):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise BackendError(f"{path}: graph file missing")
        options = ort.SessionOptions()
        options.log_severity_level = ORT_LOG_FATAL  # its errors come back as exceptions, said once by vsal
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The pipeline runs several sessions in turn: a session's intra-op threads that keep spinning
        # after its run take the cores from the next one (docs/performance.md).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if threads:
            options.intra_op_num_threads = threads
        providers: list = [PROVIDERS["cpu"]]
        if provider == "cuda":
            providers.insert(0, PROVIDERS["cuda"])
        elif provider == "tensorrt":  # nodes TensorRT does not take fall back to CUDA, then the CPU
            trt_options = tensorrt_ep_options(info, precision, cache_dir or path.parent)
            providers[:0] = [(PROVIDERS["tensorrt"], trt_options), PROVIDERS["cuda"]]
        source, note = str(path), ""
        if provider == "cpu" and precision == "int8":  # x86: re-encoded for this CPU (runtime.qdq_cpu)
            from vsal.transforms.qdq_cpu import cpu_int8_graph

            rewritten = cpu_int8_graph(path)
            if rewritten is not None:
                source, note = rewritten.model, f", {rewritten.note}"
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except ort_errors() as exc:
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        self.name = name
        self.provider = provider
        self.precision = precision
        running = self.session.get_providers()[0]
        if running != PROVIDERS[provider]:  # its own log is silenced: say the fallback here
            note += f", not on {PROVIDERS[provider]}: ONNX Runtime could not start it (check CUDA and cuDNN)"
        self.description = f"onnxruntime {provider} ({running}) {precision}{note}"
        self.checker = FeedChecker(name, info)
        self.errors = ort_errors()
        self._outputs = [o.name for o in self.session.get_outputs()]

    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self.checker.check(feeds)
        names = outputs or self._outputs
        try:
            values = self.session.run(names, feeds)
        except self.errors as exc:
            raise ort_failure(self.name, exc) from None
        return dict(zip(names, values, strict=True))
