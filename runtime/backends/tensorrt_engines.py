"""TensorRT engines from the package's ONNX graphs: profiles, build, cache, and refusal of foreign ones.

One engine per graph and precision, built from the same ONNX the ONNX Runtime backend runs (the
fp32 graph, or the fp16 / int8 variant `vsal-export build` added), as a strongly typed network:
precision lives in the graph (fp16 tensors with fp32 islands, explicit Q/DQ), which is the only mode
TensorRT 11 has and an opt-in flag on TensorRT 10 (JetPack 6). Optimisation profiles come from the
manifest's axis ranges. Engines are cached in `<package>/engines/` under a key of the graph's sha256,
the precision, the TensorRT version and the GPU's compute capability: an engine is only valid for
the TensorRT and GPU that built it, so any other is refused with the reason, and rebuilt from the
ONNX. A timing cache (`engines/timing.cache`) is shared by every build on the machine.

Written against NVIDIA's documented Python API (TensorRT 10.x and 11.x, cuda-python); TensorRT and
CUDA are imported only here and in the backend (backends/tensorrt.py), lazily: nothing else needs them.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vsal.runtime.errors import VsalError
from vsal.runtime.manifest import ENGINE_DIR, GraphInfo
from vsal.runtime.package_lock import write_durable, write_json_durable
from vsal.runtime.shapes import evaluate

TIMING_CACHE = "timing.cache"
LEVELS = ("min", "opt", "max")


class EngineError(VsalError):
    """No usable engine: TensorRT missing, a foreign engine, a failed build. Says what to do."""


@dataclass(frozen=True)
class EngineKey:
    """What an engine is valid for. Engines do not move between TensorRT versions or GPU models."""

    graph: str
    precision: str
    onnx_sha256: str
    tensorrt: str  # "10.3.0", "11.0.0"
    compute_capability: str  # "8.7" (Orin), "9.0" (H100)

    @property
    def stem(self) -> str:
        sm = self.compute_capability.replace(".", "")
        return f"{self.graph}.{self.precision}.{self.onnx_sha256[:16]}.trt{self.tensorrt}.sm{sm}"

    def mismatch(self, other: EngineKey) -> str | None:
        """Why an engine built for `other` cannot run here (None when it can)."""
        if other.onnx_sha256 != self.onnx_sha256:
            return "it was built from another version of the graph"
        if other.tensorrt != self.tensorrt:
            return f"it was built by TensorRT {other.tensorrt}, this machine has {self.tensorrt}"
        if other.compute_capability != self.compute_capability:
            return (
                f"it was built for a GPU of compute capability {other.compute_capability}, "
                f"this one is {self.compute_capability}"
            )
        return None


# --- profiles: the manifest's axis ranges as per-input shapes --------------------------------------


def input_profiles(info: GraphInfo) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input: (min shape, opt shape, max shape)} from the axis ranges; expression dims ("P+T") are
    evaluated at each level, which keeps them consistent with the axes they are made of."""
    profiles = {}
    for tensor in info.inputs:
        shapes = []
        for level in LEVELS:
            sizes = {axis: bounds[level] for axis, bounds in info.profile.items()}
            shape = []
            for dim in tensor.shape:
                if isinstance(dim, int):
                    shape.append(dim)
                else:
                    try:
                        shape.append(evaluate(dim, sizes))
                    except KeyError as exc:
                        raise EngineError(f"input {tensor.name}: {exc.args[0]} (no profile for it)") from None
            shapes.append(tuple(shape))
        profiles[tensor.name] = tuple(shapes)
    return profiles


def ort_profile_options(info: GraphInfo) -> dict[str, str]:
    """ONNX Runtime TensorRT EP's explicit profile options ("name:1x3x224x224,...") from the same
    ranges, so the EP builds one engine for the whole range instead of rebuilding per new shape."""
    profiles = input_profiles(info)
    options = {}
    for i, level in enumerate(LEVELS):
        options[f"trt_profile_{level}_shapes"] = ",".join(
            f"{name}:{'x'.join(str(d) for d in shapes[i])}" for name, shapes in profiles.items()
        )
    return options


# --- the machine ------------------------------------------------------------------------------------


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(
            "TensorRT is not installed here: on a GPU server `pip install 'vsal[gpu]'`; on Jetson it "
            "comes with JetPack (python3-libnvinfer). Or run the graphs with ONNX Runtime "
            "(--backend onnxruntime)"
        ) from None
    return trt


def import_cudart():
    """cuda-python's runtime module (cuda.bindings.runtime from 12.6, cuda.cudart before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise EngineError("cuda-python is not installed: `pip install 'vsal[gpu]'`") from None
    return cudart


def cuda_check(result, what: str):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def compute_capability(device: int = 0) -> str:
    cudart = import_cudart()
    props = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return f"{props.major}.{props.minor}"


def engine_key(name: str, precision: str, onnx_sha256: str, device: int = 0) -> EngineKey:
    trt = import_tensorrt()
    return EngineKey(name, precision, onnx_sha256, trt.__version__, compute_capability(device))


# --- the cache ------------------------------------------------------------------------------------


@dataclass
class CachedEngine:
    path: Path
    key: EngineKey
    build_seconds: float = 0.0


def cached_engines(folder: Path, graph: str, precision: str) -> tuple[list[CachedEngine], list[str]]:
    """Every complete engine the cache holds for this graph and precision (any TensorRT, any GPU), and
    why each other record there was skipped."""
    engines, skipped = [], []
    for sidecar in sorted((Path(folder) / ENGINE_DIR).glob(f"{graph}.{precision}.*.json")):
        try:
            data = json.loads(sidecar.read_text())
            key = EngineKey(**data["key"])
        except (OSError, ValueError, KeyError, TypeError):
            skipped.append(f"{sidecar.name}: unreadable record, ignored")
            continue
        engine = sidecar.with_suffix(".engine")
        if not engine.is_file():
            skipped.append(f"{sidecar.name}: its engine file is missing")
            continue
        engines.append(CachedEngine(engine, key, data.get("build_seconds", 0.0)))
    return engines, skipped


def find_engine(folder: Path, key: EngineKey) -> tuple[CachedEngine | None, list[str]]:
    """The cached engine for `key`, and why each other engine of this graph and precision was refused."""
    engines, refused = cached_engines(folder, key.graph, key.precision)
    for cached in engines:
        reason = key.mismatch(cached.key)
        if reason is None:
            return cached, refused
        refused.append(f"{cached.path.name}: refused, {reason}")
    return None, refused


def build_engine(
    onnx_path: Path,
    info: GraphInfo,
    key: EngineKey,
    folder: Path,
    workspace_bytes: int | None = None,
    progress: bool = True,
) -> CachedEngine:
    """Build, serialize and cache one engine (atomically: a crash leaves no engine a later run trusts)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: honour the graph's types (fp32 islands stay fp32). The flag is required on
    # TensorRT 10 and accepted (strong typing is the only mode) on 11.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path: external weights beside it are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser refused it: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in input_profiles(info).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_dir = Path(folder) / ENGINE_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    timing_path = cache_dir / TIMING_CACHE
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, False)  # ignore_mismatch=False: a cache from another GPU is not used
    if progress:
        print(
            f"vsal: {key.graph}: building a TensorRT {key.tensorrt} {key.precision} engine for "
            f"sm_{key.compute_capability.replace('.', '')} (minutes for large graphs)",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    seconds = time.perf_counter() - start
    engine_path = cache_dir / f"{key.stem}.engine"
    # Unique temporary names (two processes may build the same engine), fsynced; the sidecar is
    # written last: the engine counts only once it is there.
    write_durable(engine_path, memoryview(serialized))
    write_durable(timing_path, memoryview(config.get_timing_cache().serialize()))
    record = {"key": asdict(key), "onnx": str(onnx_path.name), "build_seconds": round(seconds, 1)}
    write_json_durable(engine_path.with_suffix(".json"), record)
    if progress:
        size = engine_path.stat().st_size / 2**20
        print(f"vsal: {key.graph}: engine ready in {seconds:.0f} s ({size:.1f} MiB)", file=sys.stderr)
    return CachedEngine(engine_path, key, seconds)


def engine_for(
    folder: Path,
    name: str,
    info: GraphInfo,
    onnx_file: str,
    onnx_sha256: str,
    precision: str,
    rebuild: bool = True,
    workspace_bytes: int | None = None,
    progress: bool = True,
) -> CachedEngine:
    """The engine to run `name` at `precision` on this machine: from the cache, else built from the
    ONNX (when `rebuild`), else an EngineError saying why none fits."""
    key = engine_key(name, precision, onnx_sha256)
    cached, refused = find_engine(folder, key)
    if progress:
        for reason in refused:
            print(f"vsal: {name}: {reason}", file=sys.stderr)
    if cached is not None:
        return cached
    onnx_path = Path(folder) / onnx_file
    if not rebuild or not onnx_path.is_file():
        why = "; ".join(refused) or "none was built"
        hint = "run `vsal-export build --backend tensorrt` on this machine"
        if not onnx_path.is_file():
            hint = f"{onnx_file} is not in the package to rebuild it from; {hint}"
        raise EngineError(f"{name}: no {precision} engine for this machine ({why}); {hint}")
    return build_engine(onnx_path, info, key, Path(folder), workspace_bytes, progress)
