"""Backends: the registry of what can run a package's graphs.

A backend is one module with a `Runner` subclass (vsal.runtime.backends.base) and one row here: its
name and an opener that imports that module lazily (TensorRT is optional) and returns a runner.
Adding a backend = one module + one `register_backend` row; nothing else names backends (the
pipeline, the CLIs and the build read `backend_names()` and call `open_backend`).

  onnxruntime   ONNX Runtime with its TensorRT, CUDA or CPU execution provider   onnx_runtime.py
  tensorrt      native TensorRT engines, built from the same ONNX and cached     tensorrt.py

The common ONNX Runtime session utility (`ort_session`, `session_options`) and provider choice live
in sessions.py, the feed checker and the runner base in base.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from vsal.runtime.backends.base import (
    BackendError,
    DeviceTensor,
    FeedChecker,
    HostTensor,
    Runner,
    Tensor,
)
from vsal.runtime.backends.sessions import (
    OPTIMIZATION_LEVELS,
    ORT_LOG_ERROR,
    ORT_LOG_FATAL,
    PREFERENCE,
    PROVIDERS,
    available_providers,
    choose_provider,
    ort_errors,
    ort_failure,
    ort_session,
    session_options,
)
from vsal.runtime.errors import ConfigError
from vsal.runtime.manifest import GraphInfo

# opener(folder, name, info, precision, *, provider, threads, progress) -> Runner
Opener = Callable[..., Runner]
# provider(requested or None) -> the provider the backend runs on here ("cuda", "cpu", ...)
ProviderRule = Callable[[str | None], str]


@dataclass(frozen=True)
class BackendRow:
    opener: Opener
    provider: ProviderRule


_ROWS: dict[str, BackendRow] = {}
BACKENDS = MappingProxyType(_ROWS)


def register_backend(name: str, opener: Opener, provider: ProviderRule = choose_provider) -> None:
    """Make `name` a backend choice (`vsal run --backend name`, `Pipeline.load(engine=name)`).
    `provider` resolves the provider asked for (None: the best here) into the one it runs on, which
    also decides the precision a graph runs at (gpu or cpu defaults); ONNX Runtime's by default."""
    if name in _ROWS:
        raise ValueError(f"backend {name!r} is registered already")
    _ROWS[name] = BackendRow(opener, provider)


def backend_names() -> tuple[str, ...]:
    return tuple(_ROWS)


def check_backend(engine: str) -> BackendRow:
    """The registry row of `engine`, or a ConfigError naming the choices."""
    if engine not in _ROWS:
        raise ConfigError(f"unknown backend {engine!r}; choose {' or '.join(_ROWS)}")
    return _ROWS[engine]


def backend_provider(engine: str, requested: str | None) -> str:
    """The provider `engine` runs on here when `requested` (None: the best available) is asked for."""
    return check_backend(engine).provider(requested)


def open_backend(
    engine: str,
    folder: str | os.PathLike,
    name: str,
    info: GraphInfo,
    precision: str,
    *,
    provider: str,
    threads: int = 0,
    progress: bool = True,
    low_memory: bool = False,
    portable: bool = False,
) -> Runner:
    """A runner of graph `name` (its manifest entry `info`) of the package in `folder` on backend
    `engine`, at `precision` (the graph's fp32 file where that variant was not built); provider,
    threads, low_memory (weight-only kernels without a packed int8 copy) and portable (the portable
    decoder even where its fused variant is built) are ONNX Runtime's (other backends ignore them)."""
    opener = check_backend(engine).opener
    kwargs = {"provider": provider, "threads": threads, "progress": progress}
    if low_memory:  # only when asked: a registered backend's opener need not know it
        kwargs["low_memory"] = True
    if portable:
        kwargs["portable"] = True
    return opener(Path(folder), name, info, precision, **kwargs)


def _open_onnxruntime(
    folder, name, info, precision, *, provider, threads, progress, low_memory=False, portable=False
) -> Runner:
    from vsal.runtime.backends.onnx_runtime import OnnxRuntimeBackend
    from vsal.runtime.manifest import ENGINE_DIR

    file, got = info.file_for(precision)
    if provider == "cpu" and got in info.fused and not portable:  # the decoder's fused variant
        from vsal.runtime.backends.fused_decoder import FusedDecoderBackend

        fused = info.fused[got]
        return FusedDecoderBackend(name, folder / fused.file, info.fused_interface(got), threads, got)
    return OnnxRuntimeBackend(
        name,
        folder / file,
        info,
        provider,
        threads,
        got,
        folder / ENGINE_DIR,
        low_memory=low_memory,
        spinning=name == "llm_decoder",  # it runs alone, token after token
    )


def _open_tensorrt(
    folder, name, info, precision, *, provider, threads, progress, low_memory=False, portable=False
) -> Runner:
    from vsal.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend.for_graph(folder, name, info, precision, progress=progress)


register_backend("onnxruntime", _open_onnxruntime)
register_backend("tensorrt", _open_tensorrt, provider=lambda requested: "cuda")  # engines run on the GPU

__all__ = [
    "BACKENDS",
    "OPTIMIZATION_LEVELS",
    "ORT_LOG_ERROR",
    "ORT_LOG_FATAL",
    "PREFERENCE",
    "PROVIDERS",
    "BackendError",
    "DeviceTensor",
    "FeedChecker",
    "HostTensor",
    "Runner",
    "Tensor",
    "BackendRow",
    "available_providers",
    "backend_names",
    "backend_provider",
    "check_backend",
    "choose_provider",
    "open_backend",
    "ort_errors",
    "ort_failure",
    "ort_session",
    "session_options",
    "register_backend",
]
