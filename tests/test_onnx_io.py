"""The one ONNX writer and tensor reader (vsal.transforms.onnx_io) and the graph index
(vsal.transforms.graph_index) that the transforms and `vsal-export check` share."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from vsal.transforms.graph_index import GraphIndex, drop_unread, name_nodes, node_inputs, toposort
from vsal.transforms.onnx_io import (
    ArrayData,
    TensorDataError,
    declared,
    external_files,
    read_array,
    save_onnx,
    stash_data,
)


def _model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """y = x + sum of the weights (each [4, 4] or broadcastable to it)."""
    nodes, last = [], "x"
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("Add", [last, name], [f"s{i}"], name=f"add{i}"))
        last = f"s{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _values(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))  # onnx's own reader, external data included
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_weights_stream_into_one_aligned_side_file(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((64, 64)).astype(np.float32)  # 16 KiB: side file
    small = np.ones((4,), np.float32)  # 16 bytes: stays in the graph
    model = _model({"big": big, "small": small})
    files = save_onnx(model, tmp_path / "g.onnx", external=True)
    assert files == [tmp_path / "g.onnx", tmp_path / "g.onnx.data"]
    assert external_files(tmp_path / "g.onnx") == [tmp_path / "g.onnx.data"]
    stored = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    entries = {t.name: {e.key: e.value for e in t.external_data} for t in stored.graph.initializer}
    assert entries["small"] == {} and entries["big"]["location"] == "g.onnx.data"
    assert int(entries["big"]["offset"]) % 4096 == 0
    values = _values(tmp_path / "g.onnx")
    assert np.array_equal(values["big"], big) and np.array_equal(values["small"], small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]  # no temporaries


def test_data_held_outside_the_proto_is_written_back(tmp_path):
    """A transform's path: stash a source's weights, add new ones without data, write inline."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    save_onnx(_model({"w": w}), tmp_path / "src.onnx", external=True)
    model = onnx.load(str(tmp_path / "src.onnx"), load_external_data=False)
    data = stash_data(model, tmp_path, min_bytes=1024)
    assert set(data) == {"w"} and not model.graph.initializer[0].external_data
    extra = np.full((4, 4), 2.0, np.float32)
    model.graph.initializer.append(declared("extra", extra))
    data["extra"] = ArrayData(extra)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dst.onnx.data").write_bytes(b"stale")
    assert save_onnx(model, tmp_path / "out" / "dst.onnx", data) == [tmp_path / "out" / "dst.onnx"]
    assert not (tmp_path / "out" / "dst.onnx.data").exists()  # a stale side file goes
    values = _values(tmp_path / "out" / "dst.onnx")
    assert np.array_equal(values["w"], w) and np.array_equal(values["extra"], extra)


def test_an_external_tensor_is_read_within_its_file(tmp_path):
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    save_onnx(_model({"w": w}), tmp_path / "g.onnx", external=True)
    tensor = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False).graph.initializer[0]
    assert np.array_equal(read_array(tensor, tmp_path), w)
    data = tmp_path / "g.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])  # truncated by one value
    with pytest.raises(TensorDataError, match="the file has"):
        read_array(tensor, tmp_path)
    data.unlink()
    with pytest.raises(TensorDataError, match="missing"):
        read_array(tensor, tmp_path)


def test_an_unlocated_external_tensor_is_refused(tmp_path):
    save_onnx(_model({"w": np.zeros((64, 64), np.float32)}), tmp_path / "g.onnx", external=True)
    model = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    with pytest.raises(ValueError, match="not located"):
        save_onnx(model, tmp_path / "copy.onnx")
    assert not list(tmp_path.glob("*copy*"))


def _if_model() -> onnx.ModelProto:
    """A branch reads `outer` from the enclosing graph; two nodes share a name, one has none."""
    branch = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
    )
    nodes = [
        helper.make_node("Neg", ["x"], ["outer"], name="n"),
        helper.make_node("Neg", ["x"], ["unused"], name="n"),
        helper.make_node("Cast", ["unused"], ["dead"], to=TensorProto.FLOAT),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch, else_branch=branch),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_index_sees_what_subgraphs_read():
    model = _if_model()
    index = GraphIndex.of(model.graph)
    if_node = model.graph.node[3]
    assert set(node_inputs(if_node)) == {"c", "outer"}
    assert {n.name for n in index.consumers["outer"]} == {"if"}
    assert index.types["b"] == TensorProto.FLOAT  # a subgraph's types too
    assert [n.op_type for n in index.users(model.graph.node[0])] == ["If"]


def test_names_cleanup_and_order():
    model = _if_model()
    graph = model.graph
    name_nodes(graph)
    names = [n.name for n in graph.node]
    assert len(set(names)) == 4 and names[0] == "n" and names[3] == "if"
    assert drop_unread(graph, lambda n: n.op_type in ("Cast", "Neg")) == 2  # Cast, then its Neg
    assert [n.op_type for n in graph.node] == ["Neg", "If"]
    graph.node.reverse()
    toposort(graph)
    assert [n.op_type for n in graph.node] == ["Neg", "If"]
    graph.node[0].input[0] = "y"  # Neg reads the If's output, the If reads Neg's
    with pytest.raises(ValueError, match="cycle"):
        toposort(graph)


class _Failing:
    """Data whose stream breaks half way (a full disk, a read error of the source)."""

    nbytes = 64 * 64 * 4

    def chunks(self):
        yield b"\0" * 1024
        raise OSError("disk full")


def test_a_write_that_fails_leaves_the_old_files(tmp_path):
    old = np.ones((64, 64), np.float32)
    save_onnx(_model({"w": old}), tmp_path / "g.onnx", external=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    stash_data(model, tmp_path, min_bytes=1024)
    with pytest.raises(OSError, match="disk full"):
        save_onnx(model, tmp_path / "g.onnx", {"w": _Failing()}, external=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries either
    assert np.array_equal(_values(tmp_path / "g.onnx")["w"], old)


def test_large_models_go_external_by_themselves(tmp_path, monkeypatch):
    """None: the side file once the weights reach EXTERNAL_DATA_THRESHOLD (protobuf's 2 GiB)."""
    from vsal.transforms import onnx_io

    w = np.ones((64, 64), np.float32)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", w.nbytes * 2)
    assert save_onnx(_model({"w": w}), tmp_path / "small.onnx") == [tmp_path / "small.onnx"]
    files = save_onnx(_model({"a": w, "b": w}), tmp_path / "large.onnx")
    assert files == [tmp_path / "large.onnx", tmp_path / "large.onnx.data"]
    assert np.array_equal(_values(tmp_path / "large.onnx")["b"], w)


def test_packed_int4_tensors_read_and_copied_as_stored(tmp_path):
    """INT4 holds two values a byte: read back unpacked, copied packed, inline or external."""
    from onnx import TensorProto, helper, numpy_helper
    from vsal.transforms.onnx_io import stored_data

    values = [-8, 7, 1, -1, 3, 2, -3]  # odd count: the last byte holds one value
    inline = helper.make_tensor("w", TensorProto.INT4, [7], values)  # typed field, not raw
    packed = numpy_helper.from_array(numpy_helper.to_array(inline)).raw_data
    assert len(packed) == 4
    (tmp_path / "w.data").write_bytes(b"\0" * 16 + packed)
    external = TensorProto(name="w", data_type=TensorProto.INT4, data_location=TensorProto.EXTERNAL)
    external.dims.extend([7])
    for key, value in (("location", "w.data"), ("offset", "16"), ("length", "4")):
        entry = external.external_data.add()
        entry.key, entry.value = key, value
    for tensor in (inline, external):
        data = stored_data(tensor, tmp_path)
        assert data.nbytes == 4
        assert data.array().astype(int).tolist() == values
        assert b"".join(data.chunks()) == packed
