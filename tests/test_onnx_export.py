"""Every encoder graph exports with dynamic axes and matches PyTorch at sizes it was not traced at."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from vsal.export.onnx_export import ValidationError, export_graph, input_dims, validate_graph
from vsal.export.specs import Axis, GraphSpec, TensorSpec, evaluate, graph_specs


@pytest.fixture(scope="module")
def specs(tiny_config):
    return graph_specs(tiny_config)


@pytest.mark.parametrize(
    "name", ["vision_encoder", "frame_qformer", "whisper_encoder", "beats_encoder", "mrc_qformer"]
)
def test_encoder_graph_is_dynamic_and_exact(tiny_model, specs, tmp_path, name):
    spec = specs[name]
    module = getattr(tiny_model, name)
    path = export_graph(spec, module, tmp_path / f"{name}.onnx")[0]
    graph = onnx.load(str(path)).graph
    # The graph's dynamic dimensions carry the spec's names, static ones their values.
    for value, tensor in zip(graph.input, spec.inputs, strict=True):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert value.name == tensor.name and dims == list(tensor.shape)
    validation = validate_graph(spec, module, path)
    assert len(validation.cases) >= 2
    for axis in spec.axes:  # at least two sizes per axis, none of them the traced one
        seen = {case.sizes[axis.name] for case in validation.cases}
        assert len(seen) >= 2 and axis.export not in seen
    assert validation.worst() < 1e-4


def _toy_spec(module_axis_max=16):
    inputs = (TensorSpec("x", "float32", (1, "T")),)
    return GraphSpec(
        "toy",
        inputs,
        (TensorSpec("y", "float32", (1, "T")),),
        (Axis("T", 1, 8, module_axis_max, export=4, validate=(3, 9)),),
        atol=1e-5,
        rtol=0,
        make_inputs=lambda s, rng: {"x": rng.standard_normal((1, s["T"])).astype("float32")},
    )


def test_a_silently_static_graph_is_caught(tmp_path):
    class Static(nn.Module):
        def forward(self, x):
            return x * torch.linspace(0, 1, 4)  # length fixed at trace time: broadcasts only at T=4

    spec = _toy_spec()
    path = export_graph(spec, Static(), tmp_path / "static.onnx")[0]  # the exporter accepts it
    with pytest.raises(ValidationError) as info:
        validate_graph(spec, Static(), path)
    assert [m.kind for m in info.value.mismatches] == ["runtime", "runtime"]


def test_mismatches_are_collected_and_typed(tmp_path):
    class Double(nn.Module):
        def forward(self, x):
            return x * 2

    spec = _toy_spec()
    path = export_graph(spec, Double(), tmp_path / "double.onnx")[0]

    class Triple(nn.Module):
        def forward(self, x):
            return x * 3

    with pytest.raises(ValidationError) as info:
        validate_graph(spec, Triple(), path)
    kinds = [m.kind for m in info.value.mismatches]
    assert kinds == ["tolerance", "tolerance"]  # both validation sizes reported, not just the first
    assert "T=3" in str(info.value) and "T=9" in str(info.value)


def test_dynamic_shapes_follow_the_spec(specs):
    shapes = input_dims(specs["mrc_qformer"])
    av, mask = shapes
    assert set(av) == {0, 1} and set(mask) == {0, 1}
    assert str(av[0]) == str(mask[0])  # the batch axis is one Dim shared by both inputs


def test_shape_expressions():
    assert evaluate("3*S", {"S": 20}) == 60
    assert evaluate("P+T", {"P": 5, "T": 2}) == 7
    with pytest.raises(KeyError):
        evaluate("3*Q", {"S": 1})
    with pytest.raises(ValueError):
        evaluate("S/2", {"S": 4})


def test_axis_rules():
    with pytest.raises(ValueError, match="differ from the export size"):
        Axis("N", 1, 2, 8, export=2, validate=(2, 3))
    with pytest.raises(ValueError, match="multiples of 10"):
        Axis("S", 10, 20, 120, export=20, validate=(15, 30), multiple=10)
    np.testing.assert_equal(Axis("S", 10, 20, 120, export=20, validate=(10, 30), multiple=10).multiple, 10)


def test_a_graph_past_the_proto_limit_streams_its_weights_and_validates_after_a_rebuild(
    tiny_model, specs, tmp_path, monkeypatch
):
    import vsal.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1)  # tiny stands in for 13b's 4 GB
    spec, module = specs["vision_encoder"], tiny_model.vision_encoder
    files = export_graph(spec, module, tmp_path / "vision_encoder.onnx")
    assert [f.name for f in files] == ["vision_encoder.onnx", "vision_encoder.onnx.data"]
    assert not list(tmp_path.glob(".vision_encoder.onnx.*"))  # the staging folder is gone
    graph = onnx.load(str(files[0]), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == list(spec.inputs[0].shape)  # named on the structure, as for a small graph
    built = []

    def rebuild():
        built.append(1)
        return module

    assert validate_graph(spec, rebuild, files[0]).worst() < 1e-4
    assert built == [1]  # built once, after ONNX Runtime ran every case
