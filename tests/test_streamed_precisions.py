"""Every decoder precision built from the streamed decoder (vsal.export.streaming with a float16
source: each weight a float16 initializer read through one Cast to float32): fp16, int8 weight-only
and int4. Each gives what the same values exported as float32 give (the same quantized tensors,
the same fp16 graph), has no weight Cast left, runs in ONNX Runtime close to the dequantized math
and to the float32 graph, passes `vsal-export check`, and converts a weight at a time."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from vsal.export import presets
from vsal.export.config import LlmConfig
from vsal.export.streaming import RandomWeights, WeightSource, export_decoder_streaming
from vsal.runtime.backends import ort_session
from vsal.transforms.fp16 import convert_fp16, float16_boundary
from vsal.transforms.int4 import dequantize_blocks
from vsal.transforms.quantizers import get_quantizer
from vsal.transforms.weight_only import quantize_weights_int8

TINY = presets.get("tiny")
LAYOUT = TINY.llm.kv_layout()
KV = LAYOUT.past_names() + LAYOUT.present_names()
PRECISIONS = ("fp16", "int8", "int4")
SIZES = ({"B": 1, "T": 7, "P": 0}, {"B": 2, "T": 1, "P": 9}, {"B": 1, "T": 3, "P": 5})  # prefill, decode
# Max |output - the float32 graph's| over max |the float32 graph's output|, every output, measured
# on SIZES: fp16 6.9e-4 (the presents rounded to float16; the logits 2.4e-5), int8 9.5e-3, int4
# 0.070 (the tiny decoder's logits: std 0.16). Here with a margin of about 3.
FLOAT32_TOLERANCE = {"fp16": 2e-3, "int8": 0.03, "int4": 0.2}
# Max |logits and presents - the dequantized weights' in float32|: as written (DequantizeLinear ->
# MatMul) 0 here; fused into MatMulNBits (ONNX Runtime's default: int8 activations) 5.1e-3 here,
# up to 0.037 on the small preset (vsal.transforms.int4's figures).
DEQUANTIZED_TOLERANCE = {"written": 1e-5, "fused": 0.05}
# 13b width (hidden 5120, intermediate 13824, vocab 32000), two layers: 0.8 B weights, 3.2 GB in
# float32 (1.6 GB of float16 on disk); exported in about 25 s.
WIDE = LlmConfig(num_hidden_layers=2)


@dataclass(frozen=True)
class AsFloat32:
    """A source's values as float32: the graph a float32 checkpoint of the same values gives."""

    source: WeightSource

    def names(self) -> list[str]:
        return self.source.names()

    def info(self, name: str):
        return self.source.info(name)[0], np.dtype(np.float32)

    def tensor(self, name: str) -> np.ndarray:
        return np.asarray(self.source.tensor(name), dtype=np.float32)


def _convert(precision: str, src: Path, dst: Path) -> None:
    """As the build converts the decoder (its registry quantizers; int4 keeps the LM head int8)."""
    if precision == "fp16":
        convert_fp16(src, dst, half_io=KV)
    else:
        get_quantizer(f"{precision}-weight-only").convert(src, dst, None)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """{"source" / precision: (from the streamed float16 graph, from its float32 twin)}."""
    folder = tmp_path_factory.mktemp("streamed")
    half = RandomWeights(TINY.llm, seed=7, dtype="float16")
    streamed = export_decoder_streaming(TINY, half, folder / "half" / "llm_decoder.onnx", external=True)
    plain = export_decoder_streaming(TINY, AsFloat32(half), folder / "plain" / "llm_decoder.onnx")
    found = {"source": (streamed.files[0], plain.files[0])}
    for precision in PRECISIONS:
        pair = tuple(src.with_name(f"llm_decoder.{precision}.onnx") for src in found["source"])
        for src, dst in zip(found["source"], pair, strict=True):
            _convert(precision, src, dst)
        found[precision] = pair
    return found


def _structure(path) -> onnx.GraphProto:
    return onnx.load(str(path), load_external_data=False).graph


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in _structure(path).node)


def _weights(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _feeds(sizes, half_kv: bool, seed: int = 0) -> dict[str, np.ndarray]:
    from vsal.export.specs import llm_decoder_spec

    feeds = llm_decoder_spec(TINY).make_inputs(sizes, np.random.default_rng(seed))
    if half_kv:
        feeds = {k: v.astype(np.float16) if k in KV else v for k, v in feeds.items()}
    return feeds


def _run(path, feeds, optimization: str = "all") -> dict[str, np.ndarray]:
    session = ort_session(path, optimization=optimization)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


# --- the graphs -----------------------------------------------------------------------------------


def test_the_source_reads_each_weight_through_one_cast(graphs):
    """What the transforms take: float16 initializers, each read only by a Cast(to=FLOAT)."""
    graph = _structure(graphs["source"][0])
    half = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT16}
    readers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    assert len(half) == 9 * TINY.llm.num_hidden_layers + 2  # 7 Linears and 2 norms a layer, norm, head
    for name in half:
        (cast,) = readers[name]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_takes_the_float16_weights_and_drops_their_casts(graphs, precision):
    streamed, plain = graphs[precision]
    graph = _structure(streamed)
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    casts = [n for n in graph.node if n.op_type == "Cast" and n.input[0] in inits]
    assert {len(inits[n.input[0]].dims) for n in casts} == {1}  # only the norm weights' stay
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in producer]
    dqs = [producer[n.input[1]] for n in matmuls if producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(dqs) == 7 * TINY.llm.num_hidden_layers + 1  # every Linear and the LM head
    assert {inits[dq.input[1]].data_type for dq in dqs} == {TensorProto.FLOAT}  # a float32 output
    assert not [t for t in graph.initializer if t.data_type == TensorProto.FLOAT16 and len(t.dims) == 2]
    # the float32 twin's graph, but for the norm weights' Casts; and the same quantized tensors
    extra = _ops(streamed) - _ops(plain)
    assert extra == collections.Counter({"Cast": 2 * TINY.llm.num_hidden_layers + 1})
    assert not _ops(plain) - _ops(streamed)
    got, want = _weights(streamed), _weights(plain)
    quantized = [n for n in want if n.endswith(("_quantized", "_scale", "_zero_point"))]
    assert len(quantized) >= 2 * len(dqs)
    for name in quantized:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_fp16_keeps_the_float16_weights_with_no_cast_around_them(graphs):
    streamed, plain = graphs["fp16"]
    graph = _structure(streamed)
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    casts = [n for n in graph.node if n.op_type == "Cast"]
    assert not [n for n in casts if n.input[0] in inits]  # no weight is cast, either way
    for cast in casts:  # and no fp16 -> fp32 -> fp16 (or fp32 -> fp16 -> fp32) pair is left
        inner = producer.get(cast.input[0])
        assert not (inner is not None and inner.op_type == "Cast"), (inner.name, cast.name)
    weights = [t for t in graph.initializer if len(t.dims) == 2]
    assert weights and {t.data_type for t in weights} == {TensorProto.FLOAT16}
    # the KV cache float16 at the boundary, as for any fp16 decoder
    values = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    assert {values[name] for name in KV} == {TensorProto.FLOAT16}
    assert values["inputs_embeds"] == values["logits"] == TensorProto.FLOAT
    # the float32 twin's fp16 graph, op for op, weight for weight
    assert _ops(streamed) == _ops(plain)
    got, want = _weights(streamed), _weights(plain)
    for t in weights:
        np.testing.assert_array_equal(got[t.name], want[t.name], err_msg=t.name)


def test_fp16_keeps_a_weight_that_only_fp32_nodes_read_float16_behind_one_cast(graphs, tmp_path):
    """A MatMul kept float32 (keep_nodes) reads its weight in float32: the weight stays float16 on
    disk, read through one Cast, as in the source; never a float32 copy."""
    src = graphs["source"][0]
    graph = _structure(src)
    producer = {o: n for n in graph.node for o in n.output}
    head = next(n for n in graph.node if n.op_type == "MatMul" and "lm_head" in producer[n.input[1]].input[0])
    weight = producer[head.input[1]].input[0]
    dst = tmp_path / "llm_decoder.fp16.onnx"
    report = convert_fp16(src, dst, keep_nodes=[head.name], half_io=KV)
    assert head.name in report.fp32_nodes
    out = _structure(dst)
    assert {t.name: t.data_type for t in out.initializer}[weight] == TensorProto.FLOAT16
    (cast,) = [n for n in out.node if weight in n.input]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    assert report.bytes_after < 1.01 * report.bytes_before
    sizes = SIZES[0]
    want = _run(src, _feeds(sizes, half_kv=False), optimization="disable")["logits"]
    got = _run(dst, _feeds(sizes, half_kv=True))["logits"]
    assert np.abs(got - want).max() < FLOAT32_TOLERANCE["fp16"] * np.abs(want).max()


def test_fp16_as_the_build_makes_it(graphs, tmp_path):
    """The build's way: the registry's fp16 quantizer, then the KV cache made float16 at the boundary."""
    src = graphs["source"][0]
    dst = tmp_path / "llm_decoder.fp16.onnx"
    report = get_quantizer("fp16").convert(src, dst, None)
    assert report.applied and report.details["float16_weights"] == 9 * TINY.llm.num_hidden_layers + 2
    assert report.details["bytes_after"] < 1.01 * report.details["bytes_before"]  # float16 already
    assert float16_boundary(dst, KV) > 0
    assert _ops(dst) == _ops(graphs["fp16"][0])
    feeds = _feeds(SIZES[1], half_kv=True)
    for name, values in _run(dst, feeds).items():
        np.testing.assert_array_equal(values, _run(graphs["fp16"][0], feeds)[name], err_msg=name)


# --- running them ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"T{s['T']}P{s['P']}")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_runs_close_to_the_float32_graph(graphs, precision, sizes):
    source, variant = graphs["source"][0], graphs[precision][0]
    want = _run(source, _feeds(sizes, half_kv=False), optimization="disable")
    got = _run(variant, _feeds(sizes, half_kv=precision == "fp16"))
    assert set(got) == set(want)
    for name, values in got.items():
        assert values.shape == want[name].shape
        assert values.dtype == (np.float16 if precision == "fp16" and name in KV else np.float32)
        error = float(np.abs(values.astype(np.float64) - want[name]).max() / np.abs(want[name]).max())
        assert error < FLOAT32_TOLERANCE[precision], (name, error)


def _dequantized_graph(path, out: Path) -> Path:
    """The quantized graph with each DequantizeLinear replaced by its output's values in float32."""
    model = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            nodes.append(node)
            continue
        q, scale = values[node.input[0]].astype(np.float32), values[node.input[1]]
        axis = next(a.i for a in node.attribute if a.name == "axis")
        w = dequantize_blocks(q.astype(np.int8), scale) if axis == 0 else q * scale[None, :]
        model.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save_model(model, str(out))
    return out


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_is_the_dequantized_math(graphs, precision, tmp_path):
    variant = graphs[precision][0]
    reference = _dequantized_graph(variant, tmp_path / "dequantized.onnx")
    for sizes in SIZES[:2]:
        feeds = _feeds(sizes, half_kv=False)
        want = _run(reference, feeds, optimization="disable")
        for mode, optimization in (("written", "disable"), ("fused", "all")):
            got = _run(variant, feeds, optimization=optimization)
            error = max(float(np.abs(got[n] - want[n]).max()) for n in want)
            assert error < DEQUANTIZED_TOLERANCE[mode], (mode, sizes, error)


# --- vsal-export check ------------------------------------------------------------------------------


def _package(folder: Path, source: Path, variants: dict[str, Path]) -> Path:
    """A package whose llm_decoder is the streamed graph, with the variants as the build records them."""
    import shutil

    from vsal.export.specs import llm_decoder_spec
    from vsal.runtime.graph_header import read_graph_header
    from vsal.runtime.manifest import (
        FileInfo,
        GraphInfo,
        Manifest,
        TensorInfo,
        VariantInfo,
        save_manifest,
        sha256_file,
    )
    from vsal.transforms.onnx_io import external_files

    (folder / "graphs").mkdir(parents=True)

    def place(path: Path) -> tuple[str, str, dict[str, str]]:
        for file in (path, *external_files(path)):
            shutil.copyfile(file, folder / "graphs" / file.name)
        data = {f"graphs/{f.name}": sha256_file(folder / "graphs" / f.name) for f in external_files(path)}
        return f"graphs/{path.name}", sha256_file(folder / "graphs" / path.name), data

    spec = llm_decoder_spec(TINY)
    file, digest, data = place(source)
    info = GraphInfo(
        file=file,
        sha256=digest,
        inputs=[TensorInfo(t.name, t.dtype, list(t.shape)) for t in spec.inputs],
        outputs=[TensorInfo(t.name, t.dtype, list(t.shape)) for t in spec.outputs],
        profile=spec.profile(),
        external_data=data,
    )
    for precision, path in variants.items():
        file, digest, data = place(path)
        header = read_graph_header(path)
        own = {t.name: t.dtype for t in (*header.inputs, *header.outputs)}
        info.variants[precision] = VariantInfo(
            precision,
            file,
            digest,
            data,
            inputs=[TensorInfo(t.name, own[t.name], t.shape) for t in info.inputs],
            outputs=[TensorInfo(t.name, own[t.name], t.shape) for t in info.outputs],
        )
    np.save(folder / "embeddings.npy", np.zeros((TINY.llm.vocab_size, TINY.llm.hidden_size), np.float32))
    for name, content in (("tokenizer.model", b"tok"), ("vocab.txt", b"[PAD]\n")):
        (folder / name).write_bytes(content)
    files = {
        name: FileInfo(name, sha256_file(folder / name))
        for name in ("embeddings.npy", "tokenizer.model", "vocab.txt")
    }
    save_manifest(
        Manifest(
            preset="tiny",
            random_weights=True,
            config=TINY.to_dict(),
            graphs={"llm_decoder": info},
            embeddings=files["embeddings.npy"],
            llm_tokenizer=files["tokenizer.model"],
            instruction_tokenizer=files["vocab.txt"],
            special_tokens={"bos": 1, "eos": 2, "pad": 0, "instruction_bos": 3},
            prompt={"before": "", "after": "{prompt}", "answer_cut": ""},
            decoding={"num_beams": 1},
            limits={"frames": 4},
            opset=onnx.load(str(source), load_external_data=False).opset_import[0].version,
            kv_cache=LAYOUT.to_dict(),
        ),
        folder,
    )
    return folder


def test_vsal_export_check_accepts_them(graphs, tmp_path):
    from vsal.export.check import VERSIONS, check_package

    variants = {p: graphs[p][0] for p in PRECISIONS}
    folder = _package(tmp_path / "pkg", graphs["source"][0], variants)
    labels = {"llm_decoder", *(f"llm_decoder.{p}" for p in PRECISIONS)}
    report = check_package(folder, only=labels)
    assert set(report.graphs) == labels
    for label, checked in report.graphs.items():
        for version in VERSIONS:
            assert checked.parses(version), (label, version, checked.errors(version))


# --- memory: a weight at a time ---------------------------------------------------------------------


def _convert_and_measure(what: str, src: str, dst: str) -> dict:
    """Run in a child process: its peak RSS (getrusage) before and after converting `src`."""
    import resource

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    before = peak()
    if what == "int8":  # the transform's own memory; check=True adds ONNX Runtime's load of dst
        quantize_weights_int8(src, dst, check=False)
    else:
        convert_fp16(src, dst, check=False)
    return {"before": before, "after": peak()}


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, int]:
    """The streamed decoder at 13b width (two layers), and its weights' size in float32."""
    weights = RandomWeights(WIDE, seed=0, dtype="float16")
    result = export_decoder_streaming(WIDE, weights, tmp_path_factory.mktemp("wide") / "llm_decoder.onnx")
    return result.files[0], 2 * result.weight_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB")
@pytest.mark.parametrize("what", ["int8", "fp16"])
def test_a_wide_decoder_converts_a_weight_at_a_time(wide, what, tmp_path):
    """Peak RSS growth while converting, against the weights' float32 size (3.2 GB): measured about
    65 MB (0.02x) for both, less than the largest weight (the LM head, 328 MB in float16); holding
    the int8 weights alone would be 0.25x."""
    src, fp32_bytes = wide
    dst = tmp_path / f"llm_decoder.{what}.onnx"
    run = subprocess.run(
        [sys.executable, __file__, what, str(src), str(dst)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    growth = figures["after"] - figures["before"]
    assert growth < 0.1 * fp32_bytes, figures | {"fp32_bytes": fp32_bytes}
    written = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert written < (0.3 if what == "int8" else 0.52) * fp32_bytes  # int8, or float16 as it was


if __name__ == "__main__":
    print(json.dumps(_convert_and_measure(*sys.argv[1:4])))
