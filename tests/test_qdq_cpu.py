"""transforms.qdq_cpu: int8 Q/DQ re-encoded as uint8 give the same values and fuse on x86; without VNNI
the fused MatMuls get uint8 weights, so no kernel adds u8*s8 pairs into a saturating int16."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from vsal.runtime.cpu_isa import Vnni  # noqa: E402
from vsal.transforms.qdq_cpu import cpu_int8_graph, is_x86  # noqa: E402

pytestmark = pytest.mark.skipif(not is_x86(), reason="the rewrite is for x86 CPUs only")

VNNI, NO_VNNI = Vnni(True, "forced"), Vnni(False, "forced")
INT16_MAX, INT32_MAX = 2**15 - 1, 2**31 - 1
INTEGER_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger")


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


def optimized(model: bytes, path) -> onnx.ModelProto:
    """The graph as ONNX Runtime's CPU provider runs it (after its fusions)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def integer_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """The B (weight) initializer of every fused integer kernel of an optimized graph."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type in INTEGER_OPS:
            b = node.input[3] if node.op_type in ("QLinearMatMul", "QLinearConv") else node.input[1]
            found.append(numpy_helper.to_array(inits[b]))
    return found


def u8s8_pair_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What `vpmaddubsw` computes before saturating: a[m, 2j] * b[2j, n] + a[m, 2j+1] * b[2j+1, n]
    (MLAS's non-VNNI u8s8 kernels pair consecutive K), as int32 [M, K/2, N]."""
    a, b = a.astype(np.int32), b.astype(np.int32)
    return a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]


def worst_pair(b: np.ndarray) -> int:
    """The largest |pair sum| any uint8 activation can give with weight B [K, N] (K even)."""
    return int((np.abs(b[0::2].astype(np.int32)) + np.abs(b[1::2].astype(np.int32))).max() * 255)


@pytest.mark.parametrize("vnni", [VNNI, NO_VNNI], ids=["vnni", "no-vnni"])
def test_same_values_and_fused(tmp_path, vnni):
    path = _qdq_matmul(tmp_path / "qdq.onnx")
    rewritten = cpu_int8_graph(path, vnni)
    assert rewritten.activations == 2  # the activation Q and DQ
    assert rewritten.weights == (0 if vnni.present else 1)
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32) * 2
    fused = ort.InferenceSession(rewritten.model, providers=["CPUExecutionProvider"])
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # DequantizeLinear math
    plain = ort.InferenceSession(str(path), exact, providers=["CPUExecutionProvider"])
    got, want = fused.run(None, {"x": x})[0], plain.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    model = optimized(rewritten.model, tmp_path / "optimized.onnx")
    ops = {node.op_type for node in model.graph.node}
    assert "MatMulIntegerToFloat" in ops and "DequantizeLinear" not in ops
    (weight,) = integer_weights(model)
    assert weight.dtype == (np.int8 if vnni.present else np.uint8)


def test_the_notes_say_which_choice(tmp_path):
    path = _qdq_matmul(tmp_path / "qdq.onnx")
    assert cpu_int8_graph(path, Vnni(True, "/proc/cpuinfo: avx512_vnni")).note == (
        "uint8 activations x int8 weights (VNNI, /proc/cpuinfo: avx512_vnni)"
    )
    assert cpu_int8_graph(path, Vnni(False, "VSAL_CPU_VNNI=0")).note == (
        "uint8 activations x uint8 weights (no VNNI, VSAL_CPU_VNNI=0: u8s8 kernels would saturate)"
    )


def test_no_saturating_pair_without_vnni(tmp_path):
    """The bound, on the graph ONNX Runtime fuses: with int8 weights vpmaddubsw's int16 pairs
    overflow (the control: why VNNI is needed); with the no-VNNI graph's uint8 weights MLAS takes
    its u8u8 kernel, whose pairs and K-sums fit int32 for every uint8 activation."""
    path = _qdq_matmul(tmp_path / "qdq.onnx")
    (int8_weight,) = integer_weights(optimized(cpu_int8_graph(path, VNNI).model, tmp_path / "a.onnx"))
    assert worst_pair(int8_weight) > INT16_MAX
    x = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32) * 2
    a = np.clip(np.rint(x / 0.02) + 128, 0, 255).astype(np.uint8)  # the activation as the kernel sees it
    assert (np.abs(u8s8_pair_sums(a, int8_weight)) > INT16_MAX).any()  # real inputs saturate too

    (uint8_weight,) = integer_weights(optimized(cpu_int8_graph(path, NO_VNNI).model, tmp_path / "b.onnx"))
    k = uint8_weight.shape[0]
    assert uint8_weight.dtype == np.uint8 and 2 * 255 * 255 <= INT32_MAX and k * 255 * 255 <= INT32_MAX
    np.testing.assert_array_equal(uint8_weight.astype(np.int16) - 128, int8_weight)  # the same values


def test_weights_read_elsewhere_keep_their_int8_copy(tmp_path):
    path = _qdq_matmul(tmp_path / "qdq.onnx")
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("Identity", ["w"], ["w_raw"]))
    model.graph.output.append(helper.make_tensor_value_info("w_raw", TensorProto.INT8, [64, 32]))
    onnx.save(model, str(path))
    rewritten = onnx.load_from_string(cpu_int8_graph(path, NO_VNNI).model)
    inits = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert inits["w"].dtype == np.int8 and inits["w__uint8"].dtype == np.uint8
    session = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["w_raw"], {"x": np.zeros((1, 64), np.float32)})[0]
    np.testing.assert_array_equal(got, numpy_helper.to_array(onnx.load(str(path)).graph.initializer[2]))


def test_graph_without_int8_activations_is_left_alone(tmp_path):
    path = _qdq_matmul(tmp_path / "qdq.onnx")
    model = onnx.load(str(path))
    del model.graph.node[:2]  # weight-only: x feeds the MatMul directly
    model.graph.node[-1].input[0] = "x"
    onnx.save(model, str(path))
    assert cpu_int8_graph(path, VNNI) is None and cpu_int8_graph(path, NO_VNNI) is None
