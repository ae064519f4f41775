"""fp16 variants of the tiny package's graphs: valid, same I/O, fp32 islands, accurate, finite."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

GRAPHS = ("vision_encoder", "frame_qformer", "whisper_encoder", "beats_encoder", "mrc_qformer", "llm_decoder")
# Measured on the tiny and small presets: worst cosine 1 - 3e-7 (ONNX Runtime CPU and onnx's
# reference evaluator, which computes float16 ops in float16). The bar leaves a wide margin.
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def manifest(tiny_package):
    from vsal.runtime.manifest import load_manifest

    return load_manifest(tiny_package)


@pytest.fixture(scope="module")
def specs(tiny_config):
    from vsal.export.specs import graph_specs

    return graph_specs(tiny_config)


@pytest.fixture(scope="module")
def converted(tiny_package, manifest, tmp_path_factory):
    """name -> (fp32 path, fp16 path, Fp16Report) for the six graphs."""
    from vsal.transforms.fp16 import convert_fp16

    folder = tmp_path_factory.mktemp("fp16")
    out = {}
    for name in GRAPHS:
        src = tiny_package / manifest.graphs[name].file
        dst = folder / f"{name}.fp16.onnx"
        out[name] = (src, dst, convert_fp16(src, dst))
    return out


def _feeds(spec, seed=0):
    rng = np.random.default_rng(seed)
    return [spec.make_inputs(sizes, rng) for sizes in spec.validation_sizes()]


def _types(path) -> dict[str, int]:
    """Element type of every tensor of the graph, from onnx's type inference (strict)."""
    model = onnx.shape_inference.infer_shapes(
        onnx.load_model(str(path), load_external_data=False), check_type=True, strict_mode=True
    )
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


@pytest.mark.parametrize("name", GRAPHS)
def test_loads_checks_and_keeps_io(converted, manifest, name):
    from vsal.export.accuracy import session

    src, dst, _ = converted[name]
    onnx.checker.check_model(str(dst), full_check=True)
    ref, test = session(src), session(dst)
    assert [(i.name, i.type) for i in test.get_inputs()] == [(i.name, i.type) for i in ref.get_inputs()]
    assert [(o.name, o.type) for o in test.get_outputs()] == [(o.name, o.type) for o in ref.get_outputs()]
    dtype = {"tensor(float)": "float32", "tensor(int64)": "int64"}
    graph = manifest.graphs[name]
    assert [(t.name, t.dtype) for t in graph.inputs] == [(i.name, dtype[i.type]) for i in test.get_inputs()]
    assert [(t.name, t.dtype) for t in graph.outputs] == [(o.name, dtype[o.type]) for o in test.get_outputs()]


@pytest.mark.parametrize("name", GRAPHS)
def test_is_fp16_with_fp32_islands(converted, name):
    src, dst, report = converted[name]
    types = _types(dst)
    model = onnx.load_model(str(dst), load_external_data=False)
    kept = {"LayerNormalization", "Softmax"}
    for node in model.graph.node:
        if node.op_type in kept:
            assert types[node.input[0]] == TensorProto.FLOAT, f"{node.op_type} {node.name} input"
            assert types[node.output[0]] == TensorProto.FLOAT, f"{node.op_type} {node.name} output"
    # The heavy compute is fp16: every MatMul/Conv reads float16.
    heavy = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")]
    assert heavy and all(types[n.input[0]] == TensorProto.FLOAT16 for n in heavy)
    weights = [t for t in model.graph.initializer if int(np.prod(t.dims)) >= 1024]
    assert any(t.data_type == TensorProto.FLOAT16 for t in weights)
    for tensor in weights:  # float32 only for constant masks (finfo.min): not weights
        if tensor.data_type == TensorProto.FLOAT:
            assert numpy_helper.to_array(tensor).min() <= np.finfo(np.float32).min, tensor.name
    assert report.bytes_after < report.bytes_before  # tiny graphs: structure and masks weigh too

    def float_bytes(m, dtype):
        return sum(len(t.raw_data) for t in m.graph.initializer if t.data_type == dtype)

    before = float_bytes(onnx.load_model(str(src)), TensorProto.FLOAT)
    after = float_bytes(onnx.load_model(str(dst)), TensorProto.FLOAT16)
    masks = sum(len(t.raw_data) for t in weights if t.data_type == TensorProto.FLOAT)
    assert 0.45 * (before - masks) < after <= 0.5 * before
    assert report.kept_fp32.get("Softmax", 0) == sum(n.op_type == "Softmax" for n in model.graph.node)


def test_llm_islands(converted):
    """RMSNorm chains, the rotary angles and the attention mask of the LLaMA decoder stay fp32."""
    _, dst, report = converted["llm_decoder"]
    types = _types(dst)
    model = onnx.load_model(str(dst), load_external_data=False)
    by_op: dict[str, list] = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, []).append(node)
    for op in ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Sin", "Cos", "Where"):
        assert by_op.get(op), op
        for node in by_op[op]:
            assert types[node.output[0]] == TensorProto.FLOAT, f"{op} {node.name}"
    # The mask constant (finfo(float32).min) is still float32, never clamped or -inf.
    inits = {t.name: t for t in model.graph.initializer}
    for node in by_op["Where"]:
        values = [numpy_helper.to_array(inits[i]) for i in node.input[1:] if i in inits]
        assert any(v.min() <= np.finfo(np.float32).min for v in values)
        assert all(v.dtype == np.float32 for v in values)
    assert report.reasons.get("rms_norm") and report.reasons.get("rotary") and report.reasons.get("mask")
    assert report.clamped_values == 0


@pytest.mark.parametrize("name", GRAPHS)
def test_accuracy(converted, specs, name):
    from vsal.export.accuracy import accuracy

    src, dst, _ = converted[name]
    result = accuracy(src, dst, _feeds(specs[name]))
    for output, entry in result.items():
        assert entry["finite"], output
        assert entry["cases"] == len(specs[name].validation_sizes())
        assert entry["cosine"] >= MIN_COSINE, (output, entry)
        assert entry["max_abs_error"] <= 0.05 * max(1.0, entry["max_abs_reference"]), (output, entry)


def test_padded_mrc_windows_stay_finite(converted, specs):
    """A fully padded window, and a sample with every slot padded: finite, and as the fp32 graph."""
    from vsal.export.accuracy import accuracy

    src, dst, _ = converted["mrc_qformer"]
    rng = np.random.default_rng(3)
    feeds = specs["mrc_qformer"].make_inputs({"B": 2, "S": 20}, rng)
    feeds["slot_mask"][:] = 1
    feeds["slot_mask"][0, 10:] = 0
    feeds["slot_mask"][1, :] = 0
    result = accuracy(src, dst, [feeds])
    entry = result["llm_tokens"]
    assert entry["finite"]
    assert entry["cosine"] >= MIN_COSINE, entry


def test_llm_mask_and_long_context(converted, specs):
    """Left padding in the attention mask and positions near the profile's maximum."""
    from vsal.export.accuracy import accuracy

    src, dst, _ = converted["llm_decoder"]
    spec = specs["llm_decoder"]
    rng = np.random.default_rng(4)
    feeds = spec.make_inputs({"B": 2, "T": 3, "P": 1500}, rng)
    feeds["attention_mask"][1, :700] = 0
    result = accuracy(src, dst, [feeds])
    for output, entry in result.items():
        assert entry["finite"], output
        assert entry["cosine"] >= MIN_COSINE, (output, entry)
    assert result["present.0.key"]["max_abs_error"] < 0.02  # rotated keys: angles kept fp32


def test_rms_norm_island_survives_outliers(converted, specs, tmp_path):
    """Hidden states with outliers (|x| = 400, x**2 past fp16's 65504), evaluated with onnx's
    reference evaluator, which computes float16 ops in float16 (ONNX Runtime CPU fuses the RMSNorm
    chain into one fp32 kernel and would hide the overflow). Without the islands it breaks."""
    from onnx.reference import ReferenceEvaluator
    from vsal.export.accuracy import cosine, session
    from vsal.transforms.fp16 import convert_fp16

    src, dst, _ = converted["llm_decoder"]
    spec = specs["llm_decoder"]
    feeds = spec.make_inputs({"B": 1, "T": 5, "P": 2}, np.random.default_rng(5))
    feeds["inputs_embeds"][..., [3, 17]] = 400.0
    want = session(src).run(["logits"], feeds)[0]
    got = ReferenceEvaluator(str(dst)).run(["logits"], feeds)[0]
    assert np.isfinite(got).all()
    assert cosine(want, got) >= MIN_COSINE
    bare = tmp_path / "no_islands.onnx"
    convert_fp16(src, bare, keep_fp32=("LayerNormalization", "Softmax"), patterns=())
    broken = ReferenceEvaluator(str(bare)).run(["logits"], feeds)[0]
    assert cosine(want, broken) < 0.9  # the test can tell


def test_external_data_streamed(converted, tmp_path):
    """A graph with external weights converts tensor by tensor, to the same graph as inline."""
    from vsal.export.accuracy import session
    from vsal.transforms.fp16 import convert_fp16

    src, inline_dst, _ = converted["llm_decoder"]
    external = tmp_path / "llm.onnx"
    onnx.save_model(
        onnx.load_model(str(src)),
        str(external),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="llm.onnx.data",
        size_threshold=1024,
    )
    dst = tmp_path / "out" / "llm.fp16.onnx"
    report = convert_fp16(external, dst)
    assert report.external_data
    assert sorted(p.name for p in dst.parent.iterdir()) == ["llm.fp16.onnx", "llm.fp16.onnx.data"]
    assert report.bytes_after < 0.55 * report.bytes_before
    rng = np.random.default_rng(6)
    from vsal.export.presets import get
    from vsal.export.specs import llm_decoder_spec

    feeds = llm_decoder_spec(get("tiny")).make_inputs({"B": 2, "T": 3, "P": 4}, rng)
    for a, b in zip(session(dst).run(None, feeds), session(inline_dst).run(None, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_refuses_bad_requests(converted, tmp_path):
    from vsal.transforms.fp16 import Fp16Error, convert_fp16

    src, dst, _ = converted["vision_encoder"]
    with pytest.raises(Fp16Error, match="overwrite"):
        convert_fp16(src, src)
    with pytest.raises(Fp16Error, match="already"):
        convert_fp16(dst, tmp_path / "twice.onnx")
    with pytest.raises(Fp16Error, match="keep_nodes"):
        convert_fp16(src, tmp_path / "x.onnx", keep_nodes=["no_such_node"])
    assert not list(tmp_path.glob(".*partial"))


def test_keep_nodes_and_report(converted, tmp_path):
    from vsal.transforms.fp16 import convert_fp16

    src, _, report = converted["vision_encoder"]
    model = onnx.load_model(str(src), load_external_data=False)
    erf = [n.name for n in model.graph.node if n.op_type == "Erf"]
    extra = convert_fp16(src, tmp_path / "erf.onnx", keep_nodes=erf)
    assert extra.kept_fp32.get("Erf") == len(erf) and "Erf" not in report.kept_fp32
    assert extra.reasons["node"] == len(erf)
    assert report.nodes_after > report.nodes_before  # the Casts
    assert report.casts_added > 0 and report.seconds > 0
    assert set(report.to_dict()) >= {
        "kept_fp32",
        "nodes_before",
        "nodes_after",
        "bytes_before",
        "bytes_after",
    }


# --- the accuracy helper on hand-made graphs ------------------------------------------------------


def _scale_graph(path, factor: float, divide_by_zero: bool = False) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    k = numpy_helper.from_array(np.array(0.0 if divide_by_zero else factor, dtype=np.float32), "k")
    node = helper.make_node("Div" if divide_by_zero else "Mul", ["x", "k"], ["y"])
    graph = helper.make_graph([node], "g", [x], [y], [k])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_accuracy_helper(tmp_path):
    from vsal.export.accuracy import accuracy, time_graph, worst_cosine

    for name, factor in (("ref", 2.0), ("same", 2.0), ("scaled", 2.2), ("neg", -2.0)):
        _scale_graph(tmp_path / f"{name}.onnx", factor)
    _scale_graph(tmp_path / "inf.onnx", 0.0, divide_by_zero=True)
    feeds = [{"x": np.arange(8, dtype=np.float32).reshape(2, 4) + 1}, {"x": np.ones((3, 4), np.float32)}]
    same = accuracy(tmp_path / "ref.onnx", tmp_path / "same.onnx", feeds)["y"]
    assert same["cosine"] == pytest.approx(1.0) and same["max_abs_error"] == 0 and same["cases"] == 2
    scaled = accuracy(tmp_path / "ref.onnx", tmp_path / "scaled.onnx", feeds)["y"]
    assert scaled["cosine"] == pytest.approx(1.0) and scaled["max_abs_error"] == pytest.approx(0.2 * 8)
    assert scaled["max_abs_reference"] == 16
    neg = accuracy(tmp_path / "ref.onnx", tmp_path / "neg.onnx", feeds)
    assert worst_cosine(neg) == pytest.approx(-1.0)
    bad = accuracy(tmp_path / "ref.onnx", tmp_path / "inf.onnx", feeds)["y"]
    assert not bad["finite"] and bad["cosine"] == 0.0 and bad["max_abs_error"] == float("inf")
    assert time_graph(tmp_path / "ref.onnx", feeds, repeats=1) > 0
