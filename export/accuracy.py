"""Accuracy of a graph variant (fp16, int8, ...) against its fp32 reference, both run in ONNX Runtime CPU.

`accuracy(ref, test, feeds_list)` runs both graphs on every feed dict and gives, per output, the
worst cosine similarity and the largest absolute error over the feeds, with the reference's scale
and whether the variant stayed finite. Any two graphs with the same input and output names can be
compared: the variant's inputs and outputs may even have other float dtypes (feeds are cast to what
each graph declares, outputs are compared in float64). Torch-free.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from vsal.runtime.backends import ort_session
from vsal.runtime.backends.base import Runner

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bfloat16)": None,  # numpy has none: fed as given
}


def session(path: str | os.PathLike, threads: int = 0, optimization: str = "all", as_runtime: bool = False):
    """An ONNX Runtime CPU session, quiet; `threads` > 0 pins the intra-op thread count.

    `as_runtime`: an int8 Q/DQ graph runs re-encoded for this CPU as the runtime runs it
    (transforms.qdq_cpu: uint8 activations, and uint8 weights where the CPU has no VNNI).

    `optimization`: ORT's graph optimization level. "all" is what the runtime uses; "disable" runs
    the graph's ops as written (ORT's fusions, e.g. of an RMSNorm chain into one fp32 kernel, can
    hide what a precision change does to the graph itself).
    """
    source = path
    if as_runtime:
        from vsal.transforms.qdq_cpu import cpu_int8_graph

        prepared = cpu_int8_graph(path)
        source = prepared.model if prepared is not None else source
    return ort_session(source, threads=threads, optimization=optimization)


def _feeds_for(sess, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for meta in sess.get_inputs():
        if meta.name not in feeds:
            raise KeyError(f"feeds lack input {meta.name!r} of the graph")
        value = np.asarray(feeds[meta.name])
        dtype = _ORT_TYPES.get(meta.type)
        out[meta.name] = value.astype(dtype) if dtype is not None and value.dtype != dtype else value
    return out


def as_declared(feeds: Mapping[str, np.ndarray], tensors: Iterable) -> dict[str, np.ndarray]:
    """`feeds` with each float array cast to the dtype its input declares (`TensorInfo`s of the
    runner's interface: the fp16 decoder's past is float16), for runners that check their feeds."""
    declared = {t.name: np.dtype(t.dtype) for t in tensors}
    out = {}
    for name, value in feeds.items():
        value = np.asarray(value)
        dtype = declared.get(name)
        floats = dtype is not None and dtype.kind == "f" and value.dtype.kind == "f"
        out[name] = value.astype(dtype) if floats and value.dtype != dtype else value
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors, flattened, in float64: 1.0 when both are all zero."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0 or not (np.isfinite(na) and np.isfinite(nb)):
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def accuracy(
    ref_path: str | os.PathLike,
    test_path: str | os.PathLike,
    feeds_list: Iterable[Mapping[str, np.ndarray]],
    outputs: Sequence[str] | None = None,
    optimization: str = "all",
) -> dict[str, dict[str, Any]]:
    """Per output of the reference graph: the variant's agreement with it over every feed dict.

    Returns {output: {"cosine": worst over the feeds, "max_abs_error": largest, "mean_abs_error":
    largest per-feed mean, "max_abs_reference": the reference's largest magnitude, "finite": the
    variant's output had no NaN/inf in any feed, "shape_mismatch": shapes differed in some feed,
    "cases": feeds compared}}. A variant output with NaN/inf gets cosine 0 and an infinite error,
    so a threshold on cosine alone catches it. `outputs`: compare only these. `optimization`: ORT's
    graph optimization level for both sessions (see `session`). The variant runs as the runtime
    runs it on this CPU (`as_runtime`), so a build's accuracy gate measures what the machine uses.
    """
    feeds_list = list(feeds_list)
    if is_large(ref_path):  # the streamed 13B decoder: its reference runs a layer at a time, first
        names = list(outputs) if outputs is not None else graph_output_names(ref_path)
        wanted = iter(sectioned_outputs(ref_path, names, feeds_list))

        def run_reference(feeds):  # computed above, in feed order
            return next(wanted)
    else:
        ref = session(ref_path, optimization=optimization)
        names = list(outputs) if outputs is not None else [o.name for o in ref.get_outputs()]

        def run_reference(feeds):
            return ref.run(names, _feeds_for(ref, feeds))

    test = session(test_path, optimization=optimization, as_runtime=True)
    test_names = {o.name for o in test.get_outputs()}
    missing = [n for n in names if n not in test_names]
    if missing:
        raise KeyError(f"{test_path}: outputs {missing} of the reference are missing")
    return compare(run_reference, lambda feeds: test.run(names, _feeds_for(test, feeds)), names, feeds_list)


LARGE_GRAPH_BYTES = 6 << 30  # a reference past this runs a section of layers at a time


def is_large(path: str | os.PathLike) -> bool:
    """A graph too large for one ONNX Runtime session beside the rest of a build (with its side
    files: the streamed 13B decoder's float16 weights, 26 GB, which ONNX Runtime's folding of
    their Casts would double)."""
    from vsal.transforms.onnx_io import graph_bytes

    return graph_bytes(path) >= LARGE_GRAPH_BYTES


def graph_output_names(path: str | os.PathLike) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def sectioned_outputs(
    path: str | os.PathLike, names: Sequence[str], feeds_list: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """Per feed dict, the graph's `names` outputs, run a section of layers at a time
    (vsal.transforms.sections: one layer's weights in memory), feeds cast to the declared types."""
    import onnx
    from onnx import helper
    from vsal.transforms.sections import SectionedGraph

    inputs = onnx.load(str(path), load_external_data=False).graph.input
    dtypes = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in inputs}
    cases = [{k: np.asarray(f[k]).astype(dtypes[k], copy=False) for k in dtypes} for f in feeds_list]
    return SectionedGraph(path).run(names, cases)


def compare(
    run_reference: Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]],
    run_test: Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]],
    names: Sequence[str],
    feeds_list: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, dict[str, Any]]:
    """`accuracy` over any two runners returning the `names` outputs in order (e.g. a TensorRT engine
    against the fp32 graph in ONNX Runtime)."""
    result = {
        n: {
            "cosine": 1.0,
            "max_abs_error": 0.0,
            "mean_abs_error": 0.0,
            "max_abs_reference": 0.0,
            "finite": True,
            "shape_mismatch": False,
            "cases": 0,
        }
        for n in names
    }
    for feeds in feeds_list:
        want = run_reference(feeds)
        got = run_test(feeds)
        for name, r, g in zip(names, want, got, strict=True):
            entry = result[name]
            entry["cases"] += 1
            r = np.asarray(r, dtype=np.float64)
            g = np.asarray(g, dtype=np.float64)
            if r.size:
                entry["max_abs_reference"] = max(entry["max_abs_reference"], float(np.abs(r).max()))
            if r.shape != g.shape:
                entry["shape_mismatch"] = True
                entry["cosine"] = 0.0
                entry["max_abs_error"] = float("inf")
                continue
            if not np.isfinite(g).all():
                entry["finite"] = False
                entry["cosine"] = 0.0
                entry["max_abs_error"] = float("inf")
                continue
            if not r.size:
                continue
            err = np.abs(r - g)
            entry["cosine"] = min(entry["cosine"], cosine(r, g))
            entry["max_abs_error"] = max(entry["max_abs_error"], float(err.max()))
            entry["mean_abs_error"] = max(entry["mean_abs_error"], float(err.mean()))
    return result


def worst_cosine(result: Mapping[str, Mapping[str, Any]]) -> float:
    """The lowest cosine over the outputs of an `accuracy` result."""
    return min((float(v["cosine"]) for v in result.values()), default=1.0)


def time_graph(
    path: str | os.PathLike,
    feeds_list: Sequence[Mapping[str, np.ndarray]],
    repeats: int = 3,
    threads: int = 0,
    optimization: str = "all",
) -> float:
    """Median seconds of one pass over `feeds_list` in ONNX Runtime CPU, after one warm-up pass."""
    sess = session(path, threads, optimization)
    prepared = [_feeds_for(sess, f) for f in feeds_list]
    for feeds in prepared:
        sess.run(None, feeds)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for feeds in prepared:
            sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class SectionedRunner(Runner):
    """A runner of a graph too large for one session (`is_large`): every run goes a section of layers
    at a time (vsal.transforms.sections), each section's session made and freed in turn. Slow (the
    sessions are made again each run) but within memory: what a build's fp32 reference of the
    streamed 13B decoder needs, never what the runtime runs."""

    def __init__(self, name: str, info, precision: str, path: str | os.PathLike):
        from vsal.transforms.sections import SectionedGraph

        super().__init__(name, info, precision, "ONNX Runtime CPU, a section of layers at a time")
        self.graph = SectionedGraph(path)

    def input_names(self) -> list[str]:
        return [t.name for t in self.info.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.info.outputs]

    def _run(self, feeds, outputs):
        return dict(zip(outputs, self.graph.run(outputs, [feeds])[0], strict=True))


def large_graph_runners(package: str | os.PathLike):
    """A pipeline `backend_factory`: `SectionedRunner` for the package's exported graphs past
    LARGE_GRAPH_BYTES (the streamed 13B decoder), the pipeline's own runner for the rest (a built
    variant runs as the runtime runs it)."""
    from vsal.runtime.precisions import EXPORTED

    def factory(name: str, info, file: str, precision: str):
        path = os.path.join(package, file)
        if precision == EXPORTED and is_large(path):
            return SectionedRunner(name, info, precision, path)
        return None

    return factory
