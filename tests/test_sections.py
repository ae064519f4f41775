"""A large graph run a section of layers at a time (vsal.transforms.sections) gives the whole
graph's outputs, every node run once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from vsal.export import presets
from vsal.export.specs import llm_decoder_spec
from vsal.export.streaming import RandomWeights, export_decoder_streaming
from vsal.runtime.backends.sessions import ort_session
from vsal.transforms.sections import SectionedGraph, node_sections

TINY = presets.get("tiny")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sections") / "llm_decoder.onnx"
    export_decoder_streaming(TINY, RandomWeights(TINY.llm, seed=3, dtype="float16"), path, external=True)
    return path


def _cases(n_sizes=((1, 5, 0), (2, 1, 6), (3, 4, 3))):
    spec = llm_decoder_spec(TINY)
    rng = np.random.default_rng(0)
    return spec, [spec.make_inputs({"B": b, "T": t, "P": p}, rng) for b, t, p in n_sizes]


def test_sections_follow_the_layers_and_cover_every_node_once(decoder):
    model = onnx.load(decoder, load_external_data=False)
    sections = node_sections(model.graph)
    assert sorted(set(sections)) == list(
        range(TINY.llm.num_hidden_layers)
    )  # the rotary, norm, head join a layer
    assert sections == sorted(sections)  # consecutive: the graph's own order
    graph = SectionedGraph(decoder, max_section_bytes=1)  # one layer a section
    assert len(graph.sections) == TINY.llm.num_hidden_layers
    run = [id(n) for s in graph.sections for n in s.nodes]
    assert len(run) == len(set(run)) == len(graph.model.graph.node)
    assert all(not s.initializers or s.weight_bytes > 0 for s in graph.sections)
    layer1 = graph.sections[1]
    assert all(".layers.0." not in t.name for t in layer1.initializers)  # its own weights only


def test_sectioned_run_equals_one_session_of_the_whole_graph(decoder):
    spec, cases = _cases()
    names = [t.name for t in spec.outputs]
    whole = ort_session(decoder, optimization="disable")
    expected = [whole.run(names, c) for c in cases]
    seen: dict[tuple[int, str], tuple] = {}
    got = SectionedGraph(decoder, max_section_bytes=1).run(
        names, cases, observe=["inputs_embeds"], observer=lambda i, n, a: seen.setdefault((i, n), a.shape)
    )
    for want, have in zip(expected, got, strict=True):
        for a, b in zip(want, have, strict=True):
            np.testing.assert_array_equal(a, b)
    assert set(seen) == {(i, "inputs_embeds") for i in range(3)}  # a graph input, as it was fed
    assert seen[(1, "inputs_embeds")] == cases[1]["inputs_embeds"].shape


def test_observed_values_reach_the_observer_per_case_and_are_not_kept(decoder):
    spec, cases = _cases(((1, 3, 0), (2, 2, 1)))
    model = onnx.load(decoder, load_external_data=False)
    matmul_inputs = [n.input[0] for n in model.graph.node if n.op_type == "MatMul"][:3]
    shapes: dict[tuple[int, str], tuple] = {}
    graph = SectionedGraph(decoder, max_section_bytes=1)
    out = graph.run(
        ["logits"], cases, observe=matmul_inputs, observer=lambda i, n, a: shapes.update({(i, n): a.shape})
    )
    assert {k for k in shapes} == {(i, n) for i in range(2) for n in matmul_inputs}
    assert shapes[(1, matmul_inputs[0])][:2] == (2, 2)
    assert out[0][0].shape[:2] == (1, 3)
    with pytest.raises(KeyError, match="no node makes"):
        graph.run(["not_a_value"], cases)


def test_a_graph_without_layer_scopes_is_one_section(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)]
    )
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    assert node_sections(model.graph) == [0, 0]
    (out,) = SectionedGraph(path).run(["y"], [{"x": np.array([-1.0, 2.0], np.float32)}])[0]
    np.testing.assert_array_equal(out, [-0.0, -2.0])


def _scoped(op, inputs, outputs, layer):
    node = helper.make_node(op, inputs, outputs)
    entry = node.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.name_scopes", f"['lm', 'lm.model.layers.{layer}']"
    return node


@pytest.fixture()
def three_layers(tmp_path):
    """x -> layer 0 -> a (a graph output that layer 1 reads) -> layer 1 -> b -> layer 2 (Clip with
    an empty optional input) -> y; the weight w is read by layers 1 and 2."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in ("a", "y")]
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.5])
    top = helper.make_tensor("top", TensorProto.FLOAT, [], [1.0])
    nodes = [
        _scoped("Relu", ["x"], ["a"], 0),
        _scoped("Add", ["a", "w"], ["b"], 1),
        _scoped("Mul", ["b", "w"], ["m"], 2),
        _scoped("Clip", ["m", "", "top"], ["y"], 2),
    ]
    graph = helper.make_graph(nodes, "g", [x], outs, initializer=[w, top])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_outputs_read_later_shared_weights_and_empty_inputs_run_as_one_session(three_layers):
    graph = SectionedGraph(three_layers, max_section_bytes=1)
    assert len(graph.sections) == 3
    assert [t.name for t in graph.sections[2].initializers] == ["w", "top"]  # w: layers 1 and 2
    cases = [{"x": np.array([-1.0, 0.2, 3.0], np.float32)}, {"x": np.array([4.0], np.float32)}]
    whole = ort_session(three_layers, optimization="disable")
    got = graph.run(["a", "y"], cases)
    for case, have in zip(cases, got, strict=True):
        for want, value in zip(whole.run(["a", "y"], case), have, strict=True):
            np.testing.assert_array_equal(want, value)


def test_one_section_session_at_a_time_and_no_section_file_left(three_layers):
    alive, most = [], []

    class Counted:
        def __init__(self, path):
            self.inner = ort_session(path, optimization="disable")
            alive.append(1)
            most.append(len(alive))

        def run(self, names, feeds):
            return self.inner.run(names, feeds)

        def __del__(self):
            alive.pop()

    graph = SectionedGraph(three_layers, max_section_bytes=1, session_factory=Counted)
    graph.run(["y"], [{"x": np.array([1.0], np.float32)}])
    assert len(most) == 3 and max(most) == 1  # the last section's is freed before the next loads

    def failing(path):
        raise RuntimeError("cannot load")

    with pytest.raises(RuntimeError, match="cannot load"):
        SectionedGraph(three_layers, session_factory=failing).run(["y"], [{"x": np.ones(1, np.float32)}])
    assert sorted(p.name for p in three_layers.parent.iterdir()) == ["g.onnx"]
