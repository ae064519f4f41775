"""Activation ranges for static int8, recorded for only the tensors that get a QuantizeLinear.

ONNX Runtime's calibrator records every input and output of every node of the quantized op types,
attention scores included, and keeps them all for a feed: Whisper large-v2's 32 layers of
20 x 1500 x 1500 scores and probabilities are about 12 GB per 30 s window, which killed the 13b
int8 build on a 24 GiB machine. Here the graph returns only the activations that feed a quantized
node (Whisper large-v2: about 100 tensors of 7.7 MB), one feed at a time, and ONNX Runtime's own
collectors turn them into ranges: the same histograms, percentiles and min/max as its calibrator
on the same feeds (tests/test_int8_ranges.py compares them), handed to `quantize_static` as its
calibration cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

# ONNX Runtime's create_calibrator defaults for each method (bins), with ranges symmetric
HISTOGRAM_BINS = {"percentile": (2048, 128), "entropy": (128, 128)}  # method -> num_bins, quantized bins


def quantized_activations(model: onnx.ModelProto, nodes: Iterable[str]) -> list[str]:
    """The non-constant inputs of `nodes` (by name): the activations a QuantizeLinear will read."""
    wanted = set(nodes)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names: list[str] = []
    for node in model.graph.node:
        if node.name in wanted:
            names += [x for x in node.input if x and x not in constants and x not in names]
    return names


def _recording_graph(src: Path, tensors: Sequence[str], dst: Path) -> None:
    """`src`'s graph (beside its external data) with `tensors` as its only outputs."""
    model = onnx.load(str(src), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    del model.graph.output[:]
    for name in tensors:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
        )
    onnx.save(model, str(dst))


class _MinMax:
    """Symmetric min/max over all feeds, as ONNX Runtime's MinMaxCalibrater(symmetric=True)."""

    def __init__(self):
        self.low: dict[str, np.ndarray] = {}
        self.high: dict[str, np.ndarray] = {}

    def collect(self, name_to_arr: Mapping[str, list[np.ndarray]]) -> None:
        for name, (array,) in name_to_arr.items():
            low, high = np.nanmin(array), np.nanmax(array)
            self.low[name] = np.minimum(self.low.get(name, low), low)
            self.high[name] = np.maximum(self.high.get(name, high), high)

    def compute_collection_result(self) -> dict[str, tuple]:
        result = {}
        for name in self.low:
            bound = np.nanmax([np.abs(self.low[name]), np.abs(self.high[name])], axis=0)
            result[name] = (-bound, bound)
        return result


def activation_ranges(
    src: Path,
    tensors: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    method: str,
    percentile: float,
):
    """ONNX Runtime TensorsData for `tensors` of the graph `src`, over `feeds` one at a time.

    method  minmax, percentile (of |x|, `percentile`) or entropy, each symmetric, with ONNX Runtime's
            default bins; the graph runs unoptimised, as ONNX Runtime's calibrator runs it.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import HistogramCollector, TensorsData

    src = Path(src)
    recording = src.with_name(f"{src.stem}.ranges.onnx")  # beside src: its external data resolves
    _recording_graph(src, tensors, recording)
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(recording), options, providers=["CPUExecutionProvider"])
        if method == "minmax":
            collector = _MinMax()
        else:
            bins, quantized_bins = HISTOGRAM_BINS[method]
            collector = HistogramCollector(method, True, bins, quantized_bins, percentile, "same")
        inputs = {i.name for i in session.get_inputs()}
        count = 0
        for feed in feeds:
            arrays = session.run(list(tensors), {k: v for k, v in feed.items() if k in inputs})
            # a graph input returned as an output may be the feed's own buffer (ONNX Runtime issue 21922)
            collector.collect(
                {name: [a.copy() if name in inputs else a] for name, a in zip(tensors, arrays, strict=True)}
            )
            count += 1
        del session
    finally:
        recording.unlink(missing_ok=True)
    if not count:
        raise ValueError(f"{src}: no calibration feeds")
    calibration = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    return TensorsData(calibration, collector.compute_collection_result())
