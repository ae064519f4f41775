"""The ONNX Runtime fused decoder (vsal.transforms.fused_decoder) computes what its portable graph
computes: logits and presents at prefill, decode and chunked sizes, greedy tokens, for float32,
float16-stored, int8 and int4 weights."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")

from vsal.export import presets  # noqa: E402
from vsal.export.streaming import RandomWeights, export_decoder_streaming  # noqa: E402
from vsal.runtime.backends import ort_session  # noqa: E402
from vsal.transforms.fused_decoder import FusedDecoderError, fuse_decoder  # noqa: E402
from vsal.transforms.quantizers import get_quantizer  # noqa: E402

TINY = presets.get("tiny")
LAYOUT = TINY.llm.kv_layout()
MAX_POSITIONS = 64
# (B, T, P) steps run in order on one cache: prefill, decodes, then a chunk (GroupQueryAttention
# takes T > 1 over a past only at B = 1)
STEPS = {1: [(7, 0), (1, 7), (1, 8), (4, 9)], 3: [(5, 0), (1, 5), (1, 6)]}
# Max |fused - portable| over max |portable|, logits and presents, float32 activations on both
# sides: measured 6e-7 (float32), 4e-7 (int8, int4)
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """precision -> the portable tiny decoder: float32 (exported), float16-stored (streamed, each
    weight read through a Cast), int8 and int4 weight-only (the build's quantizers)."""
    folder = tmp_path_factory.mktemp("portable")
    half = RandomWeights(TINY.llm, seed=3, dtype="float16")
    graphs = {
        "float16": export_decoder_streaming(
            TINY, half, folder / "half" / "llm_decoder.onnx", external=True
        ).files[0]
    }
    graphs["float32"] = export_decoder_streaming(
        TINY, RandomWeights(TINY.llm, seed=3), folder / "llm_decoder.onnx"
    ).files[0]
    for precision in ("int8", "int4"):
        graphs[precision] = folder / f"llm_decoder.{precision}.onnx"
        get_quantizer(f"{precision}-weight-only").convert(graphs["float32"], graphs[precision], None)
    return graphs


@pytest.fixture(scope="module")
def fused(portable, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused")
    return {
        p: fuse_decoder(src, folder / f"{p}.fused.onnx", max_positions=MAX_POSITIONS)
        for p, src in portable.items()
    }


@pytest.fixture(scope="module")
def exact(fused, tmp_path_factory):
    """Each fused graph with float32 activations (its MatMulNBits at accuracy level 1), beside it."""
    copies = {}
    for precision, report in fused.items():
        model = onnx.load(report.dst, load_external_data=False)
        for node in model.graph.node:
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 1
        copies[precision] = Path(report.dst).with_name(f"{precision}.level1.onnx")
        onnx.save(model, str(copies[precision]))
    return copies


def sessions(portable_graph, fused_graph):
    """Both graphs with float32 activations, so the comparison is exact on any CPU (ONNX Runtime's
    int8-activation kernels differ between graphs of other shapes and between CPUs:
    vsal.export.build_fused)."""
    level = {"session.qdq_matmulnbits_accuracy_level": "1"}
    return ort_session(portable_graph, config=level), ort_session(fused_graph)


def run_portable(session, x, past_length, past):
    b, t, _ = x.shape
    feed = {
        "inputs_embeds": x,
        "attention_mask": np.ones((b, past_length + t), np.int64),
        "position_ids": np.tile(np.arange(past_length, past_length + t), (b, 1)),
        **past,
    }
    return _outputs(session, session.run(None, feed))


def run_fused(session, x, past_length, past, keep=0):
    b, t, _ = x.shape
    feed = {
        "inputs_embeds": x,
        "position_ids": np.tile(np.arange(past_length, past_length + t), (b, 1)),
        "seqlens_k": np.full(b, past_length + t - 1, np.int32),
        "total_sequence_length": np.array(past_length + t, np.int32),
        "logits_to_keep": np.array(keep, np.int64),
        **past,
    }
    return _outputs(session, session.run(None, feed))


def _outputs(session, values):
    names = [o.name for o in session.get_outputs()]
    presents = {
        n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], values[1:], strict=True)
    }
    return values[0], presents


def empty_past(batch):
    return {
        name: np.zeros((batch, TINY.llm.num_key_value_heads, 0, LAYOUT.head_dim), np.float32)
        for name in LAYOUT.past_names()
    }


@pytest.mark.parametrize("precision", ["float32", "float16", "int8", "int4"])
@pytest.mark.parametrize("batch", sorted(STEPS))
def test_fused_equals_portable_at_every_step(portable, exact, precision, batch):
    ref, got = sessions(portable[precision], exact[precision])
    rng = np.random.default_rng(batch)
    past_ref = past_got = empty_past(batch)
    for t, p in STEPS[batch]:
        x = rng.standard_normal((batch, t, TINY.llm.hidden_size)).astype(np.float32)
        logits_ref, past_ref = run_portable(ref, x, p, past_ref)
        logits_got, past_got = run_fused(got, x, p, past_got)
        scale = np.abs(logits_ref).max()
        assert logits_got.shape == logits_ref.shape
        assert np.abs(logits_got - logits_ref).max() <= TOLERANCE * scale, (t, p)
        for name, value in past_ref.items():
            assert (
                past_got[name].shape
                == value.shape
                == (batch, TINY.llm.num_key_value_heads, p + t, LAYOUT.head_dim)
            )
            assert np.abs(past_got[name] - value).max() <= TOLERANCE * np.abs(value).max(), (name, t, p)


def test_logits_to_keep_returns_the_last_positions(portable, exact):
    ref, got = sessions(portable["int4"], exact["int4"])
    x = np.random.default_rng(0).standard_normal((2, 6, TINY.llm.hidden_size)).astype(np.float32)
    every, _ = run_portable(ref, x, 0, empty_past(2))
    for keep in (1, 3):
        kept, _ = run_fused(got, x, 0, empty_past(2), keep=keep)
        assert kept.shape == (2, keep, TINY.llm.vocab_size)
        assert np.abs(kept - every[:, -keep:]).max() <= TOLERANCE * np.abs(every).max()


@pytest.mark.parametrize("precision", ["float32", "int4"])
def test_greedy_tokens_equal_the_portable_graph(portable, exact, precision):
    """24 greedy tokens from a random prompt, each fed back through a random embedding table."""
    ref, got = sessions(portable[precision], exact[precision])
    rng = np.random.default_rng(11)
    table = rng.standard_normal((TINY.llm.vocab_size, TINY.llm.hidden_size)).astype(np.float32)
    prompt = rng.standard_normal((1, 9, TINY.llm.hidden_size)).astype(np.float32)

    def greedy(run):
        logits, past = run(prompt, 0, empty_past(1))
        tokens, length = [], prompt.shape[1]
        for _ in range(24):
            tokens.append(int(logits[0, -1].argmax()))
            logits, past = run(table[tokens[-1]][None, None], length, past)
            length += 1
        return tokens

    expected = greedy(lambda x, p, past: run_portable(ref, x, p, past))
    assert greedy(lambda x, p, past: run_fused(got, x, p, past)) == expected
    assert len(set(expected)) > 1  # not a degenerate repetition


def test_the_fused_graph_is_a_few_nodes_a_layer(portable, fused):
    report = fused["int4"]
    ops = collections.Counter(n.op_type for n in onnx.load(report.dst, load_external_data=False).graph.node)
    layers = TINY.llm.num_hidden_layers
    assert ops["GroupQueryAttention"] == layers and ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["MatMulNBits"] == 4 * layers + 1  # qkv, o, gate_up, down; the LM head
    assert report.nodes <= 12 * layers + 6 < report.src_nodes
    assert report.weights == {"int4": 7 * layers, "int8": 1}  # the build keeps the LM head int8


def test_a_graph_that_is_not_a_llama_decoder_is_refused(tiny_package, tmp_path):
    src = tiny_package / "graphs" / "frame_qformer.onnx"
    with pytest.raises(FusedDecoderError, match="frame_qformer.onnx: not a LLaMA llm_decoder graph"):
        fuse_decoder(src, tmp_path / "x.onnx", max_positions=MAX_POSITIONS)
    assert not list(tmp_path.iterdir())  # nothing written
