"""runtime.qdq_cpu: int8 activation Q/DQ re-encoded as uint8 give the same values and fuse on x86."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from vsal.runtime.qdq_cpu import is_x86, uint8_activations  # noqa: E402


def _qdq_matmul(path, k=64, n=32):
    """x -> Q(int8, zero point 0) -> DQ -> MatMul <- DQ(int8 weight, per column) -> y."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (k, n), dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(rng.uniform(0.001, 0.01, n).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.skipif(not is_x86(), reason="the rewrite is for x86 CPUs only")
def test_uint8_activations_same_values_and_fused(tmp_path):
    path = _qdq_matmul(tmp_path / "qdq.onnx")
    rewritten, changed = uint8_activations(path)
    assert changed == 2  # the activation Q and DQ; the weight DQ stays int8
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32) * 2
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    fused = ort.InferenceSession(rewritten, options, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, want = fused.run(None, {"x": x})[0], plain.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "MatMulIntegerToFloat" in ops and "DequantizeLinear" not in ops


def test_graph_without_int8_activations_is_left_alone(tmp_path):
    path = _qdq_matmul(tmp_path / "qdq.onnx")
    model = onnx.load(str(path))
    del model.graph.node[:2]  # weight-only: x feeds the MatMul directly
    model.graph.node[-1].input[0] = "x"
    onnx.save(model, str(path))
    assert uint8_activations(path) is None
