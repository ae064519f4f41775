"""ONNX Runtime sessions, made one way: providers, session options, its errors as vsal's.

Every `InferenceSession` vsal builds by hand (the backend, the build's checks, the tools and
scripts) comes from `ort_session`, so ONNX Runtime's log level, optimisation level and threads are
set in one place. onnxruntime is imported inside the functions: importing this module costs nothing
on a machine that runs only TensorRT engines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from vsal.runtime.backends.base import BackendError

PROVIDERS = {  # vsal's provider names -> ONNX Runtime's
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = ("tensorrt", "cuda", "cpu")
PROFILE_ENV = "VSAL_ORT_PROFILE"  # a folder: every session writes ONNX Runtime's profile there
ORT_LOG_FATAL = 4  # ONNX Runtime's log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
ORT_LOG_ERROR = 3
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")  # ONNX Runtime's graph optimisation


def session_options(
    *,
    threads: int = 0,
    optimization: str = "all",
    log_fatal: bool = True,
    stop_spinning: bool = False,
    low_memory: bool = False,
    config: Mapping[str, str] | None = None,
):
    """ONNX Runtime SessionOptions.

    threads: intra-op threads (0: ONNX Runtime's default, one per core). optimization: one of
    OPTIMIZATION_LEVELS ("disable" runs the graph's ops as written). log_fatal: ONNX Runtime prints
    only fatal messages (its errors come back as exceptions, which vsal says once); False: its
    errors too (scripts that show them). stop_spinning: idle intra-op threads stop spinning after
    a run (sessions that run in turn would otherwise take each other's cores, docs/performance.md).
    low_memory: for graphs near the machine's memory (the streamed 13B decoder's float16 weights,
    each read through a Cast): nodes run in priority order (the default order runs every Cast, whose
    inputs are all ready, first: half the model in float32 at once, measured) and no memory arena
    (it keeps each freed float32 copy). Pair it with optimization "disable": constant folding would
    turn every weight's Cast into a float32 initializer. 4 layers at 13b width: 0.66 GB beside the
    mapped weights, against 3.7 GB. config: session config entries ("session.*" keys).
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization {optimization!r}: one of {OPTIMIZATION_LEVELS}")
    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_FATAL if log_fatal else ORT_LOG_ERROR
    options.graph_optimization_level = levels[optimization]
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        options.intra_op_num_threads = threads
    if low_memory:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_cpu_mem_arena = False
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def ort_session(
    source: str | os.PathLike | bytes,
    *,
    threads: int = 0,
    providers: Sequence | None = None,
    optimization: str = "all",
    log_fatal: bool = True,
    stop_spinning: bool = False,
    low_memory: bool = False,
    config: Mapping[str, str] | None = None,
    name: str | None = None,
):
    """An ONNX Runtime InferenceSession of a graph file or serialized model (bytes).

    providers: ONNX Runtime's provider list (names or (name, options) pairs); None: the CPU only.
    The other arguments are `session_options`'. ONNX Runtime's own exceptions pass through
    (`ort_errors()` names them): callers say what failing to load means for them. With
    $VSAL_ORT_PROFILE set to a folder, the session profiles its runs and writes ONNX Runtime's JSON
    there when it ends, named after `name` (default: the file's stem); scripts/profile_ops.py
    reads them.
    """
    import onnxruntime as ort

    options = session_options(
        threads=threads,
        optimization=optimization,
        log_fatal=log_fatal,
        stop_spinning=stop_spinning,
        low_memory=low_memory,
        config=config,
    )
    folder = os.environ.get(PROFILE_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        options.enable_profiling = True
        label = name or ("graph" if isinstance(source, bytes) else Path(source).stem.split(".")[0])
        options.profile_file_prefix = os.path.join(folder, label)
    model = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(model, options, providers=list(providers or [PROVIDERS["cpu"]]))


def ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception types (a kernel's failure, an allocation it could not make): what
    a run may raise once its feeds passed the checker. Python's MemoryError is not among them."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, BaseException))


def ort_failure(graph: str, exc: BaseException) -> BackendError:
    first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
    return BackendError(f"{graph}: ONNX Runtime failed ({first_line})")


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
