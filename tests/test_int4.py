"""Int4 weight-only graphs (vsal.transforms.int4): blockwise DequantizeLinear(INT4) -> MatMul at opset
21, on the tiny package's decoder and on small graphs built here (outliers, odd K, activation x
activation MatMuls, external data)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxruntime")

from vsal.runtime.backends import ort_session  # noqa: E402
from vsal.runtime.errors import ConfigError  # noqa: E402
from vsal.transforms.int4 import (  # noqa: E402
    CLIP_RATIOS,
    OPSET,
    QMAX,
    QMIN,
    block_size_for,
    dequantize_blocks,
    quantize_blocks,
    quantize_weights_int4,
)
from vsal.transforms.int8 import QuantizeError  # noqa: E402
from vsal.transforms.onnx_io import save_onnx  # noqa: E402

# Logits vs fp32 on the tiny package (random weights: logits' std 0.16), on this test's prompts and
# steps, block 32 with the search on the weights: max |difference| 0.100, mean 0.0155, as written
# and fused into MatMulNBits alike (round to nearest: 0.127 / 0.0185; block 128: 0.120 / 0.0176);
# 3x the int8 weight-only figure. Here with a margin of 1.5.
MAX_LOGIT_DIFF = 0.15
MAX_MEAN_LOGIT_DIFF = 0.025


def dequantized_weights(model):
    """{MatMul name: (weight it reads as float [K, N], its DequantizeLinear node)}."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            q, scale = (inits[x] for x in dq.input)
            found[node.name] = (dequantize_blocks(q.astype(np.int8), scale), dq)
    return found


def test_tiny_decoder(tiny_package, tmp_path):
    """The graph checks, runs in ONNX Runtime (fused or as written), has every weight int4 as the
    report says, and its logits stay close to fp32's."""
    from vsal.runtime.generation import GraphDecoderStep, decode_one_token, prefill
    from vsal.runtime.manifest import load_manifest

    manifest = load_manifest(tiny_package)
    src = tiny_package / manifest.graphs["llm_decoder"].file
    dst = tmp_path / "llm_decoder.w4.onnx"
    report = quantize_weights_int4(src, dst)

    model, source = onnx.load(str(dst)), onnx.load(str(src))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == OPSET
    assert [(v.name, v.type) for v in model.graph.input] == [(v.name, v.type) for v in source.graph.input]
    assert [v.name for v in model.graph.output] == [v.name for v in source.graph.output]

    weights = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer if len(t.dims) == 2}
    matmuls = [n for n in source.graph.node if n.op_type == "MatMul"]
    weighted = {n.name: n.input[1] for n in matmuls if n.input[1] in weights}
    before = {n.name: list(n.input) for n in matmuls}
    found = dequantized_weights(model)
    assert weighted and set(found) == set(weighted)
    assert set(report.weights) == set(weighted.values()) and not report.excluded
    for name, (w_dq, dq) in found.items():
        w = weights[weighted[name]]
        stated = report.weights[weighted[name]]
        inits = {t.name: t for t in model.graph.initializer}
        q, scale = (inits[x] for x in dq.input)
        bs = stated["block_size"]
        assert len(dq.input) == 2  # symmetric: no zero point
        assert q.data_type == TensorProto.INT4 and list(q.dims) == list(w.shape) == stated["shape"]
        assert list(scale.dims) == [w.shape[0] // bs, w.shape[1]]
        assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": bs}
        q_values = numpy_helper.to_array(q).astype(np.int8)
        assert q_values.min() >= QMIN and q_values.max() <= QMAX
        d = w.astype(np.float64) - w_dq
        assert np.linalg.norm(d) / np.linalg.norm(w) == pytest.approx(stated["rel_error"], rel=1e-5)
        assert np.abs(d).max() == pytest.approx(stated["max_error"], rel=1e-5)
        assert stated["rel_error"] < 0.12  # 4 bits of a Gaussian weight, clipped: about 0.09
    # activation x activation MatMuls (attention) read what they read before
    after = {n.name: list(n.input) for n in model.graph.node if n.op_type == "MatMul"}
    assert {k: v for k, v in after.items() if k not in weighted} == {
        k: v for k, v in before.items() if k not in weighted
    }
    assert report.dst_bytes < 0.2 * report.src_bytes

    layout = manifest.kv_layout()
    table = np.load(tiny_package / manifest.embeddings.file)

    def embed(ids):
        return table[np.asarray(ids, np.int64)].astype(np.float32)

    def step(session):
        names = [o.name for o in session.get_outputs()]
        return GraphDecoderStep(lambda f: dict(zip(names, session.run(names, f), strict=True)), layout)

    fp32 = step(ort_session(src))
    # as written (DequantizeLinear then MatMul: the dequantized math) and fused into MatMulNBits
    variants = [step(ort_session(dst, optimization="disable")), step(ort_session(dst))]
    rng = np.random.default_rng(5)
    diffs = []
    for length in (6, 23):
        prompt = embed(rng.integers(3, manifest.config["llm"]["vocab_size"], length))[None]
        ref, ref_cache = prefill(fp32, prompt)
        states = [prefill(v, prompt) for v in variants]
        for i in range(8):
            diffs += [np.abs(logits - ref) for logits, _ in states]
            token = np.array([int(np.argmax(ref[0]))])
            ref, ref_cache = decode_one_token(fp32, embed, token, ref_cache, length + i)
            states = [
                decode_one_token(v, embed, token, c, length + i)
                for v, (_, c) in zip(variants, states, strict=True)
            ]
    assert max(d.max() for d in diffs) < MAX_LOGIT_DIFF
    assert np.mean([d.mean() for d in diffs]) < MAX_MEAN_LOGIT_DIFF


# --- small graphs -------------------------------------------------------------------------------------


def matmul_graph(path, weights: dict, *, activation_matmul=False, external=False):
    """x [B, K] -> MatMul by each weight in turn (a chain: each N is the next K); optionally a final
    MatMul of the output by its own transpose (activation x activation)."""
    nodes, inits, x = [], [], "x"
    for i, (name, w) in enumerate(weights.items()):
        inits.append(numpy_helper.from_array(w.astype(np.float32), name))
        nodes.append(helper.make_node("MatMul", [x, name], [f"h{i}"], name=f"mm_{name}"))
        x = f"h{i}"
    if activation_matmul:
        nodes.append(helper.make_node("Transpose", [x], ["ht"], name="transpose"))
        nodes.append(helper.make_node("MatMul", [x, "ht"], ["scores"], name="attention"))
        x = "scores"
    k, n = next(iter(weights.values())).shape[0], list(weights.values())[-1].shape[1]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", "B" if activation_matmul else n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    save_onnx(model, path, external=external)
    return path


def with_outliers(rng, k, n, at=(3, 70)):
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    w[at[0], :] *= 40  # one input channel with large weights: its blocks' max sets a coarse grid
    w[at[1], 5] = 1.5
    return w


def output_error(x, w, q, scale):
    return float(np.square(x @ w - x @ dequantize_blocks(q, scale)).mean())


def test_search_lowers_error_on_outliers():
    rng = np.random.default_rng(0)
    w = with_outliers(rng, 128, 64)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    x[:, 3] *= 0.05  # the outlier weights' input is small, as AWQ finds for salient channels' opposite
    rtn = quantize_blocks(w, 32, search=False)
    by_weight = quantize_blocks(w, 32)
    by_output = quantize_blocks(w, 32, np.square(x).mean(axis=0))  # each input channel's mean square

    def weight_error(q, scale):
        return float(np.square(w - dequantize_blocks(q, scale)).mean())

    # a lone outlier sets its block's grid: clipping it costs more than it saves the rest, so the
    # weight error alone gains little (4 % here); the output error on activations gains a third
    assert weight_error(*by_weight) < weight_error(*rtn)
    assert output_error(x, w, *by_output) < 0.9 * output_error(x, w, *rtn)
    assert output_error(x, w, *by_output) < output_error(x, w, *by_weight)
    q, scale = rtn  # round to nearest: each block's max lands on the grid's end
    amax = np.abs(w.reshape(4, 32, 64)).max(axis=1)
    assert np.allclose(scale, amax / QMAX) and q.min() >= QMIN and q.max() <= QMAX
    assert CLIP_RATIOS[0] == 1.0  # the search can always fall back to round to nearest


def test_search_gives_a_negative_extreme_the_minus_eight_level():
    """Weights on a grid of step 0.5 from -4 to 3.5, each block's extreme -4, come back exactly from
    the search (scale 0.5, the extreme at -8), not from round to nearest (scale 4 / 7); float16
    weights are read as float32."""
    rng = np.random.default_rng(5)
    w = (rng.integers(QMIN, QMAX + 1, size=(64, 16)) * 0.5).astype(np.float16)
    w[[0, 32], :] = -4.0
    q, scale = quantize_blocks(w, 32)
    assert np.allclose(scale, 0.5) and np.array_equal(dequantize_blocks(q, scale), w.astype(np.float32))
    rtn = dequantize_blocks(*quantize_blocks(w, 32, search=False))
    assert np.abs(rtn - w.astype(np.float32)).max() > 0.1


def test_calibration_drives_the_search(tmp_path):
    """Calibration feeds (the graph's inputs) make the search minimise the output error."""
    rng = np.random.default_rng(1)
    weights = {"w0": with_outliers(rng, 128, 64)}
    src = matmul_graph(tmp_path / "g.onnx", weights)
    feeds = []
    for _ in range(4):
        x = rng.standard_normal((32, 128)).astype(np.float32)
        x[:, 3] *= 0.05
        feeds.append({"x": x})
    held_out = np.concatenate([f["x"] for f in feeds[:2]]) * 1.1
    plain = quantize_weights_int4(src, tmp_path / "rtn.onnx", search=False)
    tuned = quantize_weights_int4(src, tmp_path / "cal.onnx", calibration=feeds)
    assert (plain.search, tuned.search) == ("none", "activations")
    assert (tuned.calibration_samples, tuned.calibration_tokens) == (4, 128)
    ref = held_out @ weights["w0"]
    errors = [
        float(np.square(ort_session(p).run(None, {"x": held_out})[0] - ref).mean())
        for p in (tmp_path / "rtn.onnx", tmp_path / "cal.onnx")
    ]
    assert errors[1] < 0.9 * errors[0]
    assert tuned.weights["w0"]["clipped"] > 0
    with pytest.raises(QuantizeError, match="calibration feed 0"):
        quantize_weights_int4(src, tmp_path / "bad.onnx", calibration=[{"y": feeds[0]["x"]}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.onnx", "g.onnx", "rtn.onnx"]


def test_k_not_a_multiple_of_the_block(tmp_path):
    """K = 96 at block 64 takes blocks of 32 (TensorRT takes whole blocks only); K = 40 (not a
    multiple of 16) is refused, naming the weight, unless its MatMul is excluded."""
    assert [block_size_for(k, 128) for k in (576, 96, 128, 40)] == [64, 32, 128, None]
    rng = np.random.default_rng(2)
    weights = {"a": rng.standard_normal((96, 64)), "b": rng.standard_normal((64, 40))}
    weights["c"] = rng.standard_normal((40, 64))
    src = matmul_graph(tmp_path / "g.onnx", weights)
    with pytest.raises(QuantizeError, match=r"weight c \[40, 64\].*exclude"):
        quantize_weights_int4(src, tmp_path / "out.onnx", block_size=64, min_elements=1)
    assert not (tmp_path / "out.onnx").exists()
    report = quantize_weights_int4(
        src, tmp_path / "out.onnx", block_size=64, min_elements=1, exclude_nodes=["mm_c"]
    )
    assert {k: v["block_size"] for k, v in report.weights.items()} == {"a": 32, "b": 64}
    assert [e["node"] for e in report.excluded] == ["mm_c"]
    x = rng.standard_normal((3, 96)).astype(np.float32)
    # as written: ONNX Runtime's fused MatMulNBits runs int8 activations at its default accuracy level
    got = ort_session(tmp_path / "out.onnx", optimization="disable").run(None, {"x": x})[0]
    model = onnx.load(str(tmp_path / "out.onnx"))
    dq = {name: w for name, (w, _) in dequantized_weights(model).items()}
    want = x @ dq["mm_a"] @ dq["mm_b"] @ weights["c"].astype(np.float32)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    with pytest.raises(QuantizeError, match=r"N = 63 is odd"):
        odd = matmul_graph(tmp_path / "odd.onnx", {"d": rng.standard_normal((64, 63))})
        quantize_weights_int4(odd, tmp_path / "odd4.onnx", min_elements=1)
    for bad in (48, 8, True, "32"):
        with pytest.raises(ConfigError, match="block size"):
            quantize_weights_int4(src, tmp_path / "x.onnx", block_size=bad)


def test_activation_matmuls_and_external_data(tmp_path):
    """A MatMul of two activations is untouched; a graph with external data is written streaming
    into a side file, and runs."""
    rng = np.random.default_rng(3)
    weights = {"w0": rng.standard_normal((256, 512)), "w1": rng.standard_normal((512, 256))}
    src = matmul_graph(tmp_path / "g.onnx", weights, activation_matmul=True, external=True)
    dst = tmp_path / "g4.onnx"
    report = quantize_weights_int4(src, dst)
    assert (tmp_path / "g4.onnx.data").is_file() and report.files == [str(dst), str(dst) + ".data"]
    structure = onnx.load(str(dst), load_external_data=False)
    node = next(n for n in structure.graph.node if n.name == "attention")
    assert list(node.input) == ["h1", "ht"]
    assert set(dequantized_weights(onnx.load(str(dst)))) == {"mm_w0", "mm_w1"}
    x = rng.standard_normal((2, 256)).astype(np.float32)
    want = ort_session(src).run(None, {"x": x})[0]
    got = ort_session(dst).run(None, {"x": x})[0]
    assert got.shape == want.shape == (2, 2)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_one_weight_at_a_time(tmp_path):
    """Python's peak allocations while converting a graph of 32 weights of 1 MB (external data) stay
    near the largest weight (measured 5.8 MB: the weight read, the search's chunk temporaries), far
    from the model's 34 MB: quantized weights go to disk as they are made."""
    import tracemalloc

    rng = np.random.default_rng(4)
    weights = {f"w{i}": rng.standard_normal((512, 512)) for i in range(32)}
    src = matmul_graph(tmp_path / "g.onnx", weights, external=True)
    tracemalloc.start()
    try:
        report = quantize_weights_int4(src, tmp_path / "g4.onnx", check=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(report.weights) == 32
    assert peak < 8 * 512 * 512 * 4  # 8 MB: a quarter of the model


def test_int4_is_a_registry_row_the_build_and_runtime_use(tiny_package, tmp_path, capsys):
    """`--precision int4` builds the decoder only (the row's graphs), at opset 21, which the TensorRT
    check accepts; the runtime then picks int4 for the decoder on the CPU by itself, and says so."""
    import shutil

    from vsal.export.build import Thresholds, build
    from vsal.export.check import VERSIONS, check_package
    from vsal.runtime.generation import generate_tokens
    from vsal.runtime.manifest import load_manifest
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions

    folder = tmp_path / "pkg"
    shutil.copytree(tiny_package, folder)
    # Random tiny logits are near ties: greedy agreement is no measure of int4 here (the logits'
    # error is, in test_tiny_decoder); the gate is off so the variant is recorded.
    report = build(folder, "int4", thresholds=Thresholds(min_token_agreement=0.0), progress=False)
    assert report.recorded and set(report.graphs) == {"llm_decoder"}
    # The clips' prefills (prompt and clip tokens) drive the clipping search: 2 prompts per clip.
    assert "scale search: activations" in report.graphs["llm_decoder"]["notes"]
    assert "LM head int8 (1 weight)" in report.graphs["llm_decoder"]["notes"]
    feeds = re.search(r"(\d+) calibration feeds", report.graphs["llm_decoder"]["notes"])
    assert feeds and int(feeds[1]) > 0
    variants = {n: set(g.variants) for n, g in load_manifest(folder).graphs.items()}
    assert variants["llm_decoder"] == {"int4"} and not any(
        variants[n] for n in variants if n != "llm_decoder"
    )
    variant = load_manifest(folder).graphs["llm_decoder"].variants["int4"]
    model = onnx.load(str(folder / variant.file), load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [21]
    checked = check_package(folder, only={"llm_decoder.int4"}).graphs["llm_decoder.int4"]
    for version in VERSIONS:
        assert checked.parses(version), checked.errors(version)
    assert not [f for f in checked.findings if "differs from the manifest's opset" in f.message]

    capsys.readouterr()
    pipeline = Pipeline.load(folder, provider="cpu")
    assert pipeline.backend("llm_decoder").precision == "int4"
    assert "llm_decoder: onnxruntime cpu (CPUExecutionProvider) int4" in capsys.readouterr().err
    options = DecodingOptions(num_beams=1, max_new_tokens=4, eos_token_id=None)
    embeds = pipeline.embed(np.array([[1, 2, 3]]))
    assert len(list(generate_tokens(pipeline.decoder_step(), pipeline.embed, embeds, options))) == 4
