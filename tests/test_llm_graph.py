"""The llm_decoder graph: one ONNX graph for prefill and decode, dynamic in B, T and P, with GQA.

Checked against transformers at sizes the graph was not traced at (prefill P=0, decode T=1,
chunked T>1 with P>0, left padding, B=1/3/5), and by greedy generation through ONNX Runtime with
the KV cache fed back, token for token against `generate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from transformers import DynamicCache
from vsal.export.llm_graph import LlmDecoderGraph, attention_bias, export_kwargs
from vsal.export.models.llm import LlmDecoder
from vsal.export.specs import llm_decoder_spec
from vsal.runtime.graphs import KVLayout

ort = pytest.importorskip("onnxruntime")

TRACED = {"B": 2, "T": 3, "P": 5}


# --- helpers ------------------------------------------------------------------------------------


def export(graph: LlmDecoderGraph, spec, path) -> None:
    """The export the package does: traced at the spec's export sizes, every axis dynamic."""
    arrays = spec.make_inputs(spec.export_sizes(), np.random.default_rng(0))
    args = tuple(torch.from_numpy(arrays[t.name]) for t in spec.inputs)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(path), **export_kwargs(spec))


def session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def case_inputs(spec, b: int, t: int, p: int, pad: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """The spec's inputs; with `pad`, row 0 is left-padded by `pad` tokens (positions start after them)."""
    arrays = spec.make_inputs({"B": b, "T": t, "P": p}, np.random.default_rng(seed))
    if pad:
        arrays["attention_mask"][0, :pad] = 0
        arrays["position_ids"][0] = np.maximum(np.arange(p, p + t) - pad, 0)
    return arrays


def torch_outputs(graph, spec, arrays) -> list[np.ndarray]:
    with torch.no_grad():
        out = graph(*(torch.from_numpy(arrays[t.name]) for t in spec.inputs))
    return [o.numpy() for o in out]


def greedy_onnx(
    sess, spec, embeds: np.ndarray, mask: np.ndarray, table: np.ndarray, steps: int
) -> np.ndarray:
    """Greedy decoding through the graph: prefill, then one token per step with the cache fed back.

    embeds [B, T, H], mask [B, T] (left padding as zeros), table [V, H] -> tokens [B, steps].
    Positions as transformers' generate: cumsum(mask) - 1 (0 on padding), then +1 per step."""
    b = embeds.shape[0]
    _, kv_heads, _, head_dim = spec.inputs[3].shape
    layout = KVLayout((len(spec.inputs) - 3) // 2, kv_heads, head_dim)
    names = layout.past_names()
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)  # [B, T]
    feeds = {n: np.zeros(layout.shape(b, 0), np.float32) for n in names}  # P = 0
    feeds |= {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
    tokens = []
    for _ in range(steps):
        logits, *presents = sess.run(["logits", *layout.present_names()], feeds)
        token = logits[:, -1].argmax(-1)  # [B]
        tokens.append(token)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)  # [B, P+T+1]
        positions = positions[:, -1:] + 1  # [B, 1]
        feeds = dict(zip(names, presents, strict=True))
        feeds |= {"inputs_embeds": table[token][:, None], "attention_mask": mask, "position_ids": positions}
    return np.stack(tokens, axis=1)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["mha", "gqa"])
def variant(request, tiny_config, tmp_path_factory):
    """(graph, spec, onnx path) for the tiny LLM (4 kv heads) and a GQA variant (2 kv heads)."""
    llm = tiny_config.llm
    if request.param == "gqa":
        llm = dataclasses.replace(llm, num_key_value_heads=2)
    torch.manual_seed(0)
    decoder = LlmDecoder(llm).eval()
    graph = LlmDecoderGraph(decoder)
    spec = llm_decoder_spec(dataclasses.replace(tiny_config, llm=llm))
    path = tmp_path_factory.mktemp(request.param) / "llm_decoder.onnx"
    export(graph, spec, path)
    return graph, spec, path


# --- the spec ------------------------------------------------------------------------------------


def test_spec_axes_cover_prefill_decode_and_beams(tiny_config):
    spec = llm_decoder_spec(tiny_config)
    assert spec.export_sizes() == TRACED
    assert spec.axis("T").max == 1024  # 1 + 16 + 3 * 120 + 512 = 889, rounded up
    assert spec.axis("P").min == 0 and spec.axis("P").max == 1024 + 512 - 1
    assert spec.axis("B").max == 5
    cases = spec.validation_sizes()
    assert any(c["P"] == 0 and c["T"] > 1 for c in cases)  # prefill
    assert any(c["T"] == 1 and c["P"] > 0 for c in cases)  # decode
    assert {1, 3} <= {c["B"] for c in cases}
    arrays = spec.make_inputs({"B": 2, "T": 3, "P": 4}, np.random.default_rng(0))
    assert arrays["attention_mask"].shape == (2, 7) and arrays["attention_mask"].all()
    assert arrays["position_ids"].tolist() == [[4, 5, 6], [4, 5, 6]]
    assert arrays["past_key_values.1.value"].shape == (2, 4, 4, 16)
    assert [t.name for t in spec.outputs][:3] == ["logits", "present.0.key", "present.0.value"]


def test_attention_bias_is_causal_over_the_past_and_masks_padding():
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # P=3, T=2, row 0 left-padded
    bias = attention_bias(mask, 2, torch.float32)
    assert bias.shape == (2, 1, 2, 5)
    seen = (bias == 0).int()[:, 0].tolist()
    assert seen[0] == [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert seen[1] == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


# --- PyTorch: the wrapper is transformers' own cache path ----------------------------------------


@pytest.mark.parametrize("b,t,p,pad", [(1, 7, 0, 0), (3, 1, 9, 0), (2, 4, 6, 0), (3, 5, 0, 2), (2, 1, 8, 3)])
def test_wrapper_matches_transformers_mask_and_cache(variant, b, t, p, pad):
    """The graph's own 4D bias gives what transformers' 2D-mask + DynamicCache path gives."""
    graph, spec, _ = variant
    arrays = case_inputs(spec, b, t, p, pad)
    got = torch_outputs(graph, spec, arrays)
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    past = [tensors[n] for n in KVLayout(graph.num_layers, graph.num_kv_heads, graph.head_dim).past_names()]
    cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
    with torch.no_grad():
        out = graph.lm(
            inputs_embeds=tensors["inputs_embeds"],
            attention_mask=tensors["attention_mask"],
            position_ids=tensors["position_ids"],
            cache=cache,
            use_cache=True,
        )
    want = [out.logits] + [x for layer in out.cache.layers for x in (layer.keys, layer.values)]
    real = arrays["attention_mask"][:, p:] == 1  # [B, T]; padding queries see nothing, any output goes
    np.testing.assert_allclose(got[0][real], want[0].numpy()[real], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-6, rtol=0)


# --- ONNX ------------------------------------------------------------------------------------------


def test_graph_io_names_and_dynamic_dims(variant):
    graph, spec, path = variant
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs]
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.input, *model.graph.output)
    }
    kv, hd = graph.num_kv_heads, graph.head_dim
    assert dims["inputs_embeds"][:2] == ["B", "T"] and dims["position_ids"] == ["B", "T"]
    assert dims["past_key_values.0.key"] == ["B", kv, "P", hd]
    assert dims["present.1.value"][:2] == ["B", kv] and dims["present.1.value"][3] == hd
    assert isinstance(dims["attention_mask"][1], str) and isinstance(dims["present.1.value"][2], str)


@pytest.mark.parametrize(
    "b,t,p,pad",
    [
        (1, 7, 0, 0),  # prefill
        (3, 1, 9, 0),  # decode
        (5, 4, 6, 0),  # chunked prefill, most beams
        (1, 1, 0, 0),  # single-token prefill
        (1, 1, 1, 0),  # sizes 0 and 1 everywhere torch.export specialises them
        (3, 6, 0, 2),  # left-padded prefill
        (2, 1, 12, 4),  # decode over a left-padded past
        (2, 3, 5, 0),  # the traced sizes
    ],
)
def test_onnx_matches_pytorch(variant, b, t, p, pad):
    graph, spec, path = variant
    arrays = case_inputs(spec, b, t, p, pad, seed=b * 100 + t * 10 + p)
    sess = session(path)
    got = sess.run([o.name for o in spec.outputs], {i.name: arrays[i.name] for i in spec.inputs})
    want = torch_outputs(graph, spec, arrays)
    sizes = {"B": b, "T": t, "P": p}
    for tensor, g, w in zip(spec.outputs, got, want, strict=True):
        assert g.shape == tensor.resolve(sizes), tensor.name
        assert np.isfinite(g).all(), tensor.name
        error = float(np.abs(g - w).max())
        assert error <= spec.atol + spec.rtol * float(np.abs(w).max()), (tensor.name, sizes, error)


def test_onnx_greedy_generation_matches_generate(variant):
    """Prefill + 12 decode steps through ONNX Runtime = transformers' greedy generate, with a
    left-padded batch of two prompts."""
    graph, spec, path = variant
    steps = 12
    table = graph.lm.get_input_embeddings().weight.detach().numpy()
    rng = np.random.default_rng(3)
    ids = rng.integers(3, table.shape[0], size=(2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0  # the second prompt is 6 tokens, left-padded
    embeds = table[ids].astype(np.float32)
    got = greedy_onnx(session(path), spec, embeds, mask, table, steps)
    with torch.no_grad():
        want = graph.lm.generate(
            inputs_embeds=torch.from_numpy(embeds),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert want.shape == (2, steps)
    assert got.tolist() == want.tolist()
