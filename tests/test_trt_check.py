"""`vsal-export check`: small ONNX packages that TensorRT's documents accept or reject, and why."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from vsal.export.check import TRT10, TRT11, check_package, main_check
from vsal.runtime.manifest import (
    FileInfo,
    GraphInfo,
    Manifest,
    PackageError,
    TensorInfo,
    load_manifest,
    save_manifest,
    sha256_file,
)

OPSET = 18


def _model(nodes, inputs, outputs, initializers=(), opset=OPSET, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _attention_block(dims=("N", 8)) -> onnx.ModelProto:
    """x @ W -> Softmax -> LayerNormalization: every op TensorRT 10 and 11 document."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Softmax", ["h"], ["p"], axis=-1),
        helper.make_node("LayerNormalization", ["p", "gamma", "beta"], ["y"], axis=-1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    return _model(nodes, [x], [y], weights)


def _package(tmp_path: Path, graphs: dict[str, tuple[onnx.ModelProto, GraphInfo]]) -> Path:
    """A package folder: the graphs, dummy embeddings/tokenizer files and a manifest over all of them."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    infos = {}
    for name, (model, info) in graphs.items():
        if info.external_data:  # weights in one side file, named by the manifest's first entry
            data = next(iter(info.external_data))
            onnx.save_model(
                model, folder / info.file, save_as_external_data=True, location=data, size_threshold=0
            )
            info.external_data = {data: sha256_file(folder / data)}
        else:
            onnx.save_model(model, folder / info.file)
        info.sha256 = sha256_file(folder / info.file)
        infos[name] = info
    np.save(folder / "embeddings.npy", np.zeros((4, 2), np.float32))  # [vocab, hidden] of config.llm
    files = {"embeddings.npy": FileInfo("embeddings.npy", sha256_file(folder / "embeddings.npy"))}
    for name, data in (("tokenizer.model", b"tok"), ("vocab.txt", b"[PAD]\n")):
        (folder / name).write_bytes(data)
        files[name] = FileInfo(name, sha256_file(folder / name))
    manifest = Manifest(
        preset="test",
        random_weights=True,
        config={"llm": {"vocab_size": 4, "hidden_size": 2}},
        graphs=infos,
        embeddings=files["embeddings.npy"],
        llm_tokenizer=files["tokenizer.model"],
        instruction_tokenizer=files["vocab.txt"],
        special_tokens={"bos": 1, "eos": 2, "pad": 0, "instruction_bos": 3},
        prompt={"before": "", "after": "{prompt}", "answer_cut": ""},
        decoding={"num_beams": 1},
        limits={"frames": 4},
        opset=OPSET,
    )
    save_manifest(manifest, folder)
    return folder


def _info(file="block.onnx", dims=("N", 8), profile=None, **kw) -> GraphInfo:
    profile = {"N": {"min": 1, "opt": 4, "max": 16}} if profile is None else profile
    return GraphInfo(
        file=file,
        sha256="",
        inputs=[TensorInfo("x", "float32", list(dims))],
        outputs=[TensorInfo("y", "float32", list(dims))],
        profile=profile,
        **kw,
    )


def _messages(report, graph="block", level="error"):
    return [f.message for f in report.graphs[graph].findings if f.level == level]


def test_tables_follow_the_documents():
    # Facts read from onnx-tensorrt docs/operators.md (10.15 and 11.0 revisions).
    assert TRT10.ops["LayerNormalization"].supported and "INT64" not in TRT10.ops["MatMul"].dtypes
    assert "INT64" in TRT10.ops["Gather"].dtypes and TRT10.ops["Det"].supported is False
    assert "Swish" in TRT11.ops and "Swish" not in TRT10.ops
    assert (TRT10.opset_min, TRT10.opset_max, TRT11.opset_max) == (9, 24, 24)


def test_supported_graph_passes(tmp_path):
    folder = _package(tmp_path, {"block": (_attention_block(), _info())})
    report = check_package(folder)
    assert report.ok, report.format()
    graph = report.graphs["block"]
    assert graph.op_counts == {"MatMul": 1, "Softmax": 1, "LayerNormalization": 1}
    assert graph.parses("10") and graph.parses("11") and graph.opset == OPSET
    text = report.format()
    assert "expected to parse and build: TensorRT 10: yes; TensorRT 11: yes" in text
    assert "not against a real TensorRT" in text and "result: OK" in text
    assert main_check(folder, as_json=False) == 0


def test_contrib_op_is_an_error(tmp_path):
    model = _attention_block()
    model.graph.node[1].CopyFrom(helper.make_node("FastGelu", ["h"], ["p"], domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report = check_package(_package(tmp_path, {"block": (model, _info())}))
    assert not report.ok
    errors = [f for f in report.graphs["block"].findings if f.level == "error"]
    assert any(
        "com.microsoft:FastGelu is an ONNX Runtime contrib op" in f.message and f.version == "both"
        for f in errors
    )
    assert not report.graphs["block"].parses("10") and not report.graphs["block"].parses("11")


def test_unsupported_standard_op_is_an_error(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])
    model = _model([helper.make_node("Det", ["x"], ["y"])], [x], [y])
    info = GraphInfo(
        "det.onnx",
        "",
        [TensorInfo("x", "float32", ["N", 3, 3])],
        [TensorInfo("y", "float32", ["N"])],
        {"N": {"min": 1, "opt": 2, "max": 4}},
    )
    report = check_package(_package(tmp_path, {"det": (model, info)}))
    assert not report.ok
    assert any("Det is unsupported by TensorRT 10.15" in m for m in _messages(report, "det"))
    assert any("Det is unsupported by TensorRT 11.0" in m for m in _messages(report, "det"))


def test_dtype_outside_the_documented_types(tmp_path):
    # MatMul is documented for FP32, FP16 and BF16 only; integer MatMul does not parse.
    x = helper.make_tensor_value_info("x", TensorProto.INT32, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.int32), "W")
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [x], [y], [w])
    info = _info(dims=("N", 4))
    info.inputs[0].dtype = info.outputs[0].dtype = "int32"
    report = check_package(_package(tmp_path, {"block": (model, info)}))
    assert any("MatMul on INT32" in m for m in _messages(report)), report.format()
    assert not report.ok


def test_type_tensorrt_does_not_have(tmp_path):
    # INT16 is no TensorRT type at all: neither as a graph input nor for Cast.
    x = helper.make_tensor_value_info("x", TensorProto.INT16, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], [x], [y])
    info = _info(dims=("N", 4))
    info.inputs[0].dtype = "int16"
    report = check_package(_package(tmp_path, {"block": (model, info)}))
    messages = _messages(report)
    assert any("graph input/output x is INT16: TensorRT has no such type" in m for m in messages)
    assert any("Cast on INT16" in m for m in messages)


def test_dynamic_axis_without_profile(tmp_path):
    folder = _package(tmp_path, {"block": (_attention_block(), _info(profile={}))})
    report = check_package(folder)
    assert not report.ok
    assert any("dynamic axis N has no optimisation profile" in m for m in _messages(report))


def test_bad_profile_and_multiples(tmp_path):
    info = _info(profile={"N": {"min": 4, "opt": 2, "max": 16}}, axis_multiples={"N": 4})
    report = check_package(_package(tmp_path, {"block": (_attention_block(), info)}))
    messages = _messages(report)
    assert any("min <= opt <= max" in m for m in messages)
    assert any("multiples of 4" in m for m in messages)


def test_silently_static_graph(tmp_path):
    # Exported with the batch traced as 2: static in ONNX, dynamic in the manifest.
    folder = _package(tmp_path, {"block": (_attention_block(dims=(2, 8)), _info())})
    report = check_package(folder)
    assert any("static 2 in ONNX but dynamic 'N'" in m for m in _messages(report))
    assert any("profile axis N names no dynamic dimension" in m for m in _messages(report, level="warning"))
    assert not report.ok


def test_dynamic_in_onnx_static_in_manifest_and_static_mismatch(tmp_path):
    model = _attention_block(dims=("N", 8))
    info = _info(dims=(1, 8), profile={})
    info.outputs[0].shape = ["N", 9]
    report = check_package(_package(tmp_path, {"block": (model, info)}))
    messages = _messages(report)
    assert any("dynamic 'N' in ONNX but static 1 in the manifest" in m for m in messages)
    assert any("output y dim 1: ONNX size 8, manifest size 9" in m for m in messages)


def test_equivalent_shape_expressions(tmp_path):
    model = _attention_block(dims=("S*4", 8))
    info = _info(dims=("4*S", 8), profile={"S": {"min": 2, "opt": 4, "max": 8}}, axis_multiples={"S": 2})
    report = check_package(_package(tmp_path, {"block": (model, info)}))
    assert report.ok, report.format()


def test_modified_file_fails_sha256(tmp_path):
    folder = _package(tmp_path, {"block": (_attention_block(), _info())})
    model = _attention_block()
    model.graph.node[1].attribute[0].i = 0  # a different, still valid graph
    onnx.save_model(model, folder / "block.onnx")
    report = check_package(folder)
    assert not report.ok
    assert any("sha256 differs" in f.message for f in report.package)
    assert report.graphs["block"].parses("10")  # the graph itself is still fine
    assert main_check(folder, as_json=False) == 1


def test_missing_file(tmp_path):
    folder = _package(tmp_path, {"block": (_attention_block(), _info())})
    (folder / "vocab.txt").unlink()
    (folder / "block.onnx").unlink()
    report = check_package(folder)
    assert not report.ok
    assert any("vocab.txt: missing" in f.message for f in report.package)
    assert any("block.onnx is missing" in m for m in _messages(report))


def test_external_weights_must_be_in_the_manifest(tmp_path):
    folder = _package(tmp_path, {"block": (_attention_block(), _info(external_data={"block.onnx.data": ""}))})
    assert check_package(folder).ok, check_package(folder).format()
    # A second export that wrote its weights elsewhere: the graph now names a file nobody hashes.
    model = onnx.load(str(folder / "block.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "other.data"
    (folder / "other.data").write_bytes((folder / "block.onnx.data").read_bytes())
    onnx.save_model(model, folder / "block.onnx")
    report = check_package(folder)
    assert any("other.data is not in the manifest's external_data" in m for m in _messages(report))


def test_opset_outside_the_documented_range(tmp_path):
    model = _attention_block()
    model.opset_import[0].version = 8
    report = check_package(_package(tmp_path, {"block": (model, _info())}))
    assert any("below TensorRT 10's minimum 9" in m for m in _messages(report))


def test_a_precisions_minimum_opset(tmp_path):
    """The registry row's min_opset is what its ops need: fp32 at opset 17 (below the exporter's
    18) parses as it always did; a row asking for 19 refuses a graph at 18."""
    from vsal.runtime.precisions import Precision, register_precision, unregister_precision

    old = _attention_block()
    old.opset_import[0].version = 17
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    report = check_package(_package(tmp_path / "a", {"block": (old, _info())}))
    assert report.graphs["block"].parses("10") and report.graphs["block"].parses("11"), report.format()
    register_precision(Precision("opset19", 32, "float32", 19, "identity"))
    try:
        report = check_package(
            _package(tmp_path / "b", {"block": (_attention_block(), _info(precision="opset19"))})
        )
    finally:
        unregister_precision("opset19")
    assert "precision opset19 needs opset 19 or later, the graph has 18" in _messages(report)


def test_reduce_axes_must_be_constant(tmp_path):
    # Opset 18 reductions take axes as an input: computed axes do not parse.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1),
        helper.make_node("Sub", ["s", "one"], ["axes"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1),
    ]
    model = _model(nodes, [x], [y], [one])
    info = _info(dims=("N", 4))
    info.outputs[0].shape = ["N", 1]
    report = check_package(_package(tmp_path, {"block": (model, info)}))
    assert any("axes must be an initializer" in m for m in _messages(report)), report.format()


def test_fp16_precision_needs_fp16_tensors_on_trt11(tmp_path):
    report = check_package(_package(tmp_path, {"block": (_attention_block(), _info(precision="fp16"))}))
    graph = report.graphs["block"]
    assert graph.parses("10") and not graph.parses("11")
    assert any("strongly typed" in f.message and f.version == "11" for f in graph.errors())


def test_json_output(tmp_path, capsys):
    folder = _package(tmp_path, {"block": (_attention_block(), _info())})
    assert main_check(folder, as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["graphs"]["block"]["parses"] == {"10": True, "11": True}
    assert "not against a real TensorRT" in data["basis"]


def test_package_errors_are_one_line(tmp_path):
    with pytest.raises(PackageError, match="not a model package folder"):
        check_package(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError) as exc:
        main_check(tmp_path, as_json=False)
    assert "\n" not in str(exc.value)


def test_build_variants_are_checked_too(tmp_path):
    """`vsal-export build` adds fp16/int8 copies: each is checked like the fp32 graph, as graph.precision."""
    from vsal.runtime.manifest import VariantInfo, load_manifest

    folder = _package(tmp_path, {"block": (_attention_block(), _info())})
    manifest = load_manifest(folder)
    # An "fp16" variant that is really fp32: TensorRT 11 would build it in fp32.
    onnx.save_model(_attention_block(), folder / "block.fp16.onnx")
    manifest.graphs["block"].variants["fp16"] = VariantInfo(
        "fp16", "block.fp16.onnx", sha256_file(folder / "block.fp16.onnx")
    )
    save_manifest(manifest, folder)
    report = check_package(folder)
    assert set(report.graphs) == {"block", "block.fp16"}
    assert report.graphs["block"].parses("11") and not report.graphs["block.fp16"].parses("11")
    assert "block.fp16  (block.fp16.onnx" in report.format()


def _qdq_block(zero_point: int) -> onnx.ModelProto:
    weights = [
        numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
        numpy_helper.from_array(np.array(zero_point, np.int8), "zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dq"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    return _model(nodes, [x], [y], weights)


@pytest.mark.parametrize("zero_point", [0, 3])
def test_qdq_zero_points_are_read_off_the_graph(tmp_path, zero_point):
    folder = _package(tmp_path, {"block": (_qdq_block(zero_point), _info(precision="int8"))})
    report = check_package(folder)
    infos = _messages(report, level="info")
    assert not any("not checked here" in m and "zero_point" in m for m in infos)
    if zero_point:
        assert any("non-zero zero point" in m and "'q'" in m for m in _messages(report)), report.format()
    else:
        assert report.ok and any("all with zero zero points" in m for m in infos), report.format()


# --- check agrees with the runtime: what `vsal run` refuses is not OK ----------------------------------


def _package_messages(report) -> list[str]:
    return [f.message for f in report.package if f.level == "error"]


def test_a_package_without_graphs_is_not_ok(tmp_path):
    folder = _package(tmp_path, {})
    report = check_package(folder)
    assert not report.ok and any("the manifest names no graphs" in m for m in _package_messages(report))
    assert main_check(folder, as_json=False) == 1


def _drop_decoder(manifest: dict) -> None:
    del manifest["graphs"]["llm_decoder"]


def _zero_multiple(manifest: dict) -> None:
    manifest["graphs"]["mrc_qformer"]["axis_multiples"]["S"] = 0


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_decoder, "the package lacks graphs ['llm_decoder']"),
        (_zero_multiple, "graphs.mrc_qformer.axis_multiples.S must be a positive integer, got 0"),
    ],
)
def test_what_the_runtime_refuses_check_refuses_with_its_words(tiny_package, tmp_path, edit, message):
    from vsal.runtime.pipeline import Pipeline

    folder = tmp_path / "pkg"
    shutil.copytree(tiny_package, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=re.escape(message)):
        Pipeline.load(folder, verbose=False)
    report = check_package(folder)
    assert not report.ok and any(message in m for m in _package_messages(report)), report.format()


def _big_weight_declared(model: onnx.ModelProto) -> None:
    """W declares 2**28 floats (1 GiB) stored at the start of its side file."""
    weight = next(t for t in model.graph.initializer if t.name == "W")
    del weight.dims[:]
    weight.dims.extend([1 << 14, 1 << 14])
    for entry in weight.external_data:
        if entry.key == "length":
            entry.value = str(1 << 30)


def _external_block(tmp_path: Path) -> Path:
    return _package(tmp_path, {"block": (_attention_block(), _info(external_data={"block.onnx.data": ""}))})


def _rehash(folder: Path) -> None:
    """The manifest's sha256 of the graph and its side file made to match what is there now."""
    manifest = json.loads((folder / "manifest.json").read_text())
    block = manifest["graphs"]["block"]
    block["sha256"] = sha256_file(folder / "block.onnx")
    block["external_data"] = {"block.onnx.data": sha256_file(folder / "block.onnx.data")}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["truncated", "declared 1 GiB"])
def test_external_weights_past_the_end_of_their_file(tmp_path, capfd, damage):
    """A side file cut short (its sha256 fixed after) or a tensor declaring more bytes than the file
    has: ONNX Runtime cannot load the graph, and check says so, naming the tensor and the sizes."""
    from vsal.runtime.backends import BackendError
    from vsal.runtime.backends.onnx_runtime import OnnxRuntimeBackend

    folder = _external_block(tmp_path)
    data = folder / "block.onnx.data"
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[:100])
        expected = "the file has 100 (truncated"
    else:
        model = onnx.load(str(folder / "block.onnx"), load_external_data=False)
        _big_weight_declared(model)
        onnx.save_model(model, folder / "block.onnx")
        expected = f"tensor W is bytes 0 to {1 << 30}"
    _rehash(folder)
    report = check_package(folder)
    errors = _messages(report)
    assert not report.ok and any("block.onnx.data:" in m and expected in m for m in errors), errors
    capfd.readouterr()
    with pytest.raises(BackendError, match="ONNX Runtime cannot load it"):
        OnnxRuntimeBackend("block", folder / "block.onnx", load_manifest(folder).graphs["block"], "cpu")
    assert "onnxruntime" not in capfd.readouterr().err  # its own log stays quiet: vsal says it once


def test_external_length_that_disagrees_with_the_shape(tmp_path):
    folder = _external_block(tmp_path)
    model = onnx.load(str(folder / "block.onnx"), load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    for entry in weight.external_data:
        if entry.key == "length":
            entry.value = "8"
    onnx.save_model(model, folder / "block.onnx")
    _rehash(folder)
    assert any(
        "tensor W declares 8 bytes, its shape [8, 8] needs 256" in m for m in _messages(check_package(folder))
    )
