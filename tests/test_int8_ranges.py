"""vsal.transforms.int8_ranges records the ranges ONNX Runtime's own calibrator computes, for only
the tensors that get quantized, so the 13b encoders calibrate in bounded memory."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")

from vsal.transforms.graph_index import name_nodes  # noqa: E402
from vsal.transforms.int8 import node_groups  # noqa: E402
from vsal.transforms.int8_ranges import activation_ranges, quantized_activations  # noqa: E402

GRAPH = "frame_qformer"
SIZES = ({"N": 2, "L": 7}, {"N": 3, "L": 5}, {"N": 1, "L": 9})


@pytest.fixture(scope="module")
def graph(tiny_package, tmp_path_factory):
    """The tiny frame Q-Former with named nodes, its weighted MatMuls and three feeds of two sizes."""
    from vsal.export import presets
    from vsal.export.specs import graph_specs

    model = onnx.load(str(tiny_package / "graphs" / f"{GRAPH}.onnx"))
    name_nodes(model.graph)
    path = tmp_path_factory.mktemp("ranges") / "named.onnx"
    onnx.save(model, str(path))
    attention = set(node_groups(model)["attention"])
    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in attention]
    spec = graph_specs(presets.get("tiny"))[GRAPH]
    rng = np.random.default_rng(3)
    return path, model, nodes, [spec.make_inputs(s, rng) for s in SIZES]


def ort_calibrator_ranges(path, feeds, method, tmp_path):
    """ONNX Runtime's calibrator over every MatMul tensor, one feed per stride, as quantize_static ran it."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator
    from vsal.transforms.int8 import _Feeds

    kind = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method]
    calibrator = create_calibrator(
        path,
        ["MatMul"],
        str(tmp_path / "augmented.onnx"),
        kind,
        extra_options={"symmetric": True, "percentile": 99.9},
    )
    reader = _Feeds(feeds, list(feeds[0]))
    for start in range(len(feeds)):
        reader.set_range(start, start + 1)
        calibrator.collect_data(reader)
    return calibrator.compute_data()


@pytest.mark.parametrize("method", ["percentile", "minmax"])
def test_ranges_equal_onnx_runtime_calibrator(graph, method, tmp_path):
    path, model, nodes, feeds = graph
    tensors = quantized_activations(model, nodes)
    ours = activation_ranges(path, tensors, feeds, method, 99.9)
    theirs = ort_calibrator_ranges(path, feeds, method, tmp_path)
    assert set(ours.keys()) == set(tensors) and set(tensors) < set(theirs.keys())
    for name in tensors:
        ours_range, theirs_range = (np.ravel(x[name].range_value).astype(np.float64) for x in (ours, theirs))
        assert np.array_equal(ours_range, theirs_range), name
    assert not (path.parent / "named.ranges.onnx").exists()  # the recording graph is removed


def test_only_quantized_inputs_are_recorded(graph):
    """Constants and the outputs of the quantized nodes are not recorded; every node's non-constant
    input is, once."""
    path, model, nodes, feeds = graph
    tensors = quantized_activations(model, nodes)
    constants = {t.name for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    expected = {x for name in nodes for x in by_name[name].input if x not in constants}
    assert set(tensors) == expected and len(tensors) == len(expected)
    assert not set(tensors) & {o for name in nodes for o in by_name[name].output} - expected
