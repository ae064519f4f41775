"""The fp16 decoder takes and returns its KV cache in float16: the build writes it so and records
the variant's own interface, the manifest checks it at load, the runtime keeps the cache in the
running variant's dtype (half the bytes per step), and an older fp16 package (float32 KV) still runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

DECODER = "llm_decoder"


@pytest.fixture(scope="module")
def built(tiny_package, tmp_path_factory):
    """The tiny package with its decoder's fp16 variant, as `vsal-export build --precision fp16`."""
    from vsal.export.build import build

    folder = tmp_path_factory.mktemp("fp16kv") / "pkg"
    shutil.copytree(tiny_package, folder)
    report = build(folder, "fp16", graphs=(DECODER,), progress=False)
    assert report.recorded, report.format()
    return folder, report


@pytest.fixture(scope="module")
def layout(built):
    from vsal.runtime.manifest import load_manifest

    return load_manifest(built[0]).kv_layout()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from vsal.runtime.synthetic import write_clip

    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=4.0)


def _variant(folder):
    return json.loads((folder / "manifest.json").read_text())["graphs"][DECODER]["variants"]["fp16"]


def _greedy(tokens=12):
    from vsal.runtime.prompt import DecodingOptions

    return DecodingOptions(num_beams=1, max_new_tokens=tokens, eos_token_id=None)


def _pipelines(folder):
    from vsal.runtime.pipeline import Pipeline

    fp32 = Pipeline.load(folder, verbose=False, precision="fp32")
    fp16 = Pipeline.load(folder, verbose=False, precision="fp16", exact_precision=True)
    return fp32, fp16


def _prefill_cache(pipeline, prompt_length=9):
    """The decoder step's cache after a prefill of `prompt_length` random embeddings."""
    hidden = pipeline.manifest.config["llm"]["hidden_size"]
    x = np.random.default_rng(0).standard_normal((1, prompt_length, hidden)).astype(np.float32)
    mask = np.ones((1, prompt_length), np.int64)
    positions = np.arange(prompt_length, dtype=np.int64)[None]
    return pipeline.decoder_step()(x, mask, positions, None)


# --- the graph and the manifest -------------------------------------------------------------------


def test_the_variant_takes_and_returns_float16_kv(built, layout):
    from vsal.runtime.graph_header import read_graph_header

    folder, report = built
    path = folder / _variant(folder)["file"]
    header = read_graph_header(path)
    dtypes = {t.name: t.dtype for t in (*header.inputs, *header.outputs)}
    kv = layout.past_names() + layout.present_names()
    assert all(dtypes[name] == "float16" for name in kv)
    others = {
        "inputs_embeds": "float32",
        "attention_mask": "int64",
        "position_ids": "int64",
        "logits": "float32",
    }
    assert {name: dtypes[name] for name in others} == others
    graph = onnx.load_model(path, load_external_data=False).graph
    casts = [n for n in graph.node if n.op_type == "Cast"]
    assert not [
        n for n in casts if set(n.input) & set(kv) or set(n.output) & set(kv)
    ]  # no Cast at the boundary
    assert "KV cache float16 at the boundary" in report.graphs[DECODER]["notes"]
    assert report.end_to_end["token_agreement"] == 1.0


def test_the_manifest_records_the_variants_interface(built, layout):
    from vsal.runtime.manifest import load_manifest

    folder, _ = built
    variant = _variant(folder)
    declared = {t["name"]: t["dtype"] for t in (*variant["inputs"], *variant["outputs"])}
    assert {declared[n] for n in layout.past_names() + layout.present_names()} == {"float16"}
    assert declared["inputs_embeds"] == declared["logits"] == "float32"
    info = load_manifest(folder).graphs[DECODER]
    assert [t.shape for t in info.interface("fp16").inputs] == [t.shape for t in info.inputs]
    assert info.interface("fp16").kv_layout(layout).dtype == "float16"
    assert info.interface("fp32") is info and info.kv_layout(layout).dtype == "float32"


# --- the runtime ----------------------------------------------------------------------------------


def test_fp16_answers_as_fp32_greedy_and_beam_search_runs(built, clip):
    from vsal.runtime.prompt import DecodingOptions

    fp32, fp16 = _pipelines(built[0])
    assert fp16.backend(DECODER).precision == "fp16"
    want = fp32.ask("What happens?", video=clip, options=_greedy()).token_ids
    got = fp16.ask("What happens?", video=clip, options=_greedy()).token_ids
    assert got == want and len(got) == 12
    beams = DecodingOptions(num_beams=3, max_new_tokens=6, eos_token_id=None)
    assert len(fp16.ask("What happens?", video=clip, options=beams).token_ids) == 6


def test_the_kv_bytes_per_step_halve(built, layout):
    fp32, fp16 = _pipelines(built[0])
    _, wide = _prefill_cache(fp32)
    _, half = _prefill_cache(fp16)
    assert {v.data_type() for v in wide.values} == {"tensor(float)"}
    assert {v.data_type() for v in half.values} == {"tensor(float16)"}

    def nbytes(cache):
        return sum(int(np.prod(v.shape())) * v.numpy().dtype.itemsize for v in cache.values)

    assert nbytes(half) * 2 == nbytes(wide) == 9 * 2 * layout.layers * layout.kv_heads * layout.head_dim * 4
    reordered = half.reorder(np.array([0, 0, 0]))  # beam search keeps the dtype
    assert {v.data_type() for v in reordered.values} == {"tensor(float16)"}
    assert reordered.values[0].shape()[0] == 3


def test_a_float32_past_is_refused_by_the_fp16_decoder(built, layout):
    from vsal.runtime.backends import BackendError

    _, fp16 = _pipelines(built[0])
    runner = fp16.backend(DECODER)
    hidden = fp16.manifest.config["llm"]["hidden_size"]
    feeds = {
        "inputs_embeds": np.zeros((1, 1, hidden), np.float32),
        "attention_mask": np.ones((1, 3), np.int64),
        "position_ids": np.full((1, 1), 2, np.int64),
    }
    feeds |= {name: np.zeros(layout.shape(1, 2), np.float32) for name in layout.past_names()}
    with pytest.raises(BackendError, match="past_key_values.0.key is float32, expected float16"):
        runner.run(feeds)


def test_the_host_round_trip_step_keeps_the_variants_dtype(built, layout):
    """Runner.decoder_step's default (a runner without a device cache) allocates and reorders in it."""
    from vsal.runtime.backends.base import Runner
    from vsal.runtime.generation import NumpyKVCache

    _, fp16 = _pipelines(built[0])
    runner = fp16.backend(DECODER)
    step = Runner.decoder_step(runner, layout)
    assert step.layout.dtype == "float16"
    assert {a.dtype for a in step.empty_cache(2).arrays} == {np.dtype(np.float16)}
    hidden = fp16.manifest.config["llm"]["hidden_size"]
    x = np.zeros((1, 4, hidden), np.float32)
    _, cache = step(x, np.ones((1, 4), np.int64), np.arange(4, dtype=np.int64)[None], None)
    assert isinstance(cache, NumpyKVCache) and cache.arrays[0].dtype == np.float16
    assert cache.reorder(np.array([0, 0])).arrays[0].dtype == np.float16


# --- an older package -----------------------------------------------------------------------------


def test_an_older_fp16_package_with_float32_kv_still_loads_and_runs(built, tmp_path, clip):
    """An fp16 variant built before the KV cache went float16: no interface of its own, float32 past."""
    from vsal.runtime.manifest import sha256_file
    from vsal.transforms.fp16 import convert_fp16

    folder = tmp_path / "old"
    shutil.copytree(built[0], folder)
    data = json.loads((folder / "manifest.json").read_text())
    variant = data["graphs"][DECODER]["variants"]["fp16"]
    convert_fp16(folder / data["graphs"][DECODER]["file"], folder / variant["file"])
    variant["sha256"] = sha256_file(folder / variant["file"])
    del variant["inputs"], variant["outputs"]
    (folder / "manifest.json").write_text(json.dumps(data))
    fp32, fp16 = _pipelines(folder)
    assert fp16.backend(DECODER).precision == "fp16"
    _, cache = _prefill_cache(fp16)
    assert {v.data_type() for v in cache.values} == {"tensor(float)"}
    want = fp32.ask("What happens?", video=clip, options=_greedy()).token_ids
    assert fp16.ask("What happens?", video=clip, options=_greedy()).token_ids == want


# --- the boundary transform -----------------------------------------------------------------------


def _boundary_graph(path):
    """x -> Cast16 -> Mul(w16) -> Cast32 -> y; x also read in float32 (Add); z = Add(x, 1) in float32."""
    f, h = TensorProto.FLOAT, TensorProto.FLOAT16
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=h),
        helper.make_node("Mul", ["x16", "w"], ["m16"]),
        helper.make_node("Cast", ["m16"], ["y"], to=f),
        helper.make_node("Add", ["x", "one"], ["z"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float16), "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", f, ["N"])],
        [helper.make_tensor_value_info("y", f, ["N"]), helper.make_tensor_value_info("z", f, ["N"])],
        inits,
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_float16_boundary_on_a_hand_made_graph(tmp_path):
    from vsal.export.accuracy import session
    from vsal.transforms.fp16 import Fp16Error, float16_boundary

    path = tmp_path / "g.onnx"
    _boundary_graph(path)
    # The boundary Casts of x and y go; x's float32 reader and z (made in float32) get one each.
    assert float16_boundary(path, ["x", "y", "z"]) == 0
    onnx.checker.check_model(str(path), full_check=True)
    sess = session(path)
    assert [i.type for i in sess.get_inputs()] == ["tensor(float16)"]
    assert [o.type for o in sess.get_outputs()] == ["tensor(float16)", "tensor(float16)"]
    x = np.array([1.5, -3.0, 0.25], np.float16)
    y, z = sess.run(None, {"x": x})
    np.testing.assert_array_equal(y, x * 2)
    np.testing.assert_array_equal(z, x + 1)  # Add still computes in float32, between Casts
    with pytest.raises(Fp16Error, match="no float graph input or output named"):
        float16_boundary(path, ["nope"])


def test_convert_fp16_half_io_is_the_build_s_boundary(tiny_package, built, layout, tmp_path):
    """convert_fp16(half_io=KV names) writes the graph the build's two steps write."""
    from vsal.export.accuracy import session
    from vsal.export.presets import get
    from vsal.export.specs import llm_decoder_spec
    from vsal.runtime.manifest import load_manifest
    from vsal.transforms.fp16 import convert_fp16

    folder, _ = built
    src = tiny_package / load_manifest(tiny_package).graphs[DECODER].file
    dst = tmp_path / "dec.fp16.onnx"
    convert_fp16(src, dst, half_io=layout.past_names() + layout.present_names())
    feeds = llm_decoder_spec(get("tiny")).make_inputs({"B": 2, "T": 3, "P": 5}, np.random.default_rng(1))
    kv = set(layout.past_names())
    feeds = {k: v.astype(np.float16) if k in kv else v for k, v in feeds.items()}
    built_graph = session(folder / _variant(folder)["file"])
    for a, b in zip(session(dst).run(None, feeds), built_graph.run(None, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_as_declared_casts_only_floats():
    from vsal.export.accuracy import as_declared
    from vsal.runtime.manifest import TensorInfo

    tensors = [TensorInfo("a", "float16", ["N"]), TensorInfo("b", "int64", ["N"])]
    out = as_declared({"a": np.ones(2, np.float32), "b": np.ones(2, np.int64), "c": np.ones(1)}, tensors)
    assert out["a"].dtype == np.float16 and out["b"].dtype == np.int64 and out["c"].dtype == np.float64


def test_float16_boundary_keeps_external_weights_as_they_are(tiny_package, layout, tmp_path):
    from vsal.export.accuracy import session
    from vsal.runtime.manifest import load_manifest, sha256_file
    from vsal.transforms.fp16 import convert_fp16, float16_boundary

    src = tmp_path / "llm.onnx"
    model = onnx.load_model(tiny_package / load_manifest(tiny_package).graphs[DECODER].file)
    onnx.save_model(model, src, save_as_external_data=True, location="llm.onnx.data", size_threshold=1024)
    dst = tmp_path / "out" / "llm.fp16.onnx"
    convert_fp16(src, dst)
    data = dst.with_name("llm.fp16.onnx.data")
    digest = sha256_file(data)
    assert float16_boundary(dst, layout.past_names() + layout.present_names()) == 4 * layout.layers
    assert sha256_file(data) == digest  # the weights are not rewritten
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name, data.name]
    types = {i.name: i.type for i in (*session(dst).get_inputs(), *session(dst).get_outputs())}
    assert types["past_key_values.0.key"] == types["present.0.value"] == "tensor(float16)"
