"""The hand-written protobuf readers: the shared varint, and the graph header on hostile bytes."""

from __future__ import annotations

import json
import shutil

import pytest
from vsal.runtime.errors import PackageError
from vsal.runtime.graph_header import HeaderError, read_graph_header
from vsal.runtime.manifest import load_manifest, sha256_file
from vsal.runtime.protobuf_wire import WireError, read_varint

GRAPH_IN_MODEL, INPUT_IN_GRAPH, NAME_IN_VALUE_INFO = 7, 11, 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out) + bytes([value])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _model_with_input(value_info: bytes) -> bytes:
    return _field(GRAPH_IN_MODEL, _field(INPUT_IN_GRAPH, value_info))


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**64 - 1])
def test_varints_read_back(value):
    data = b"\x05" + _varint(value) + b"\x07"
    assert read_varint(data, 1) == (value, len(data) - 1)
    assert read_varint(memoryview(data), 1) == (value, len(data) - 1)  # the graph header's memory map


@pytest.mark.parametrize(
    "data", [b"", b"\x80", b"\xff\xff", b"\xff" * 10 + b"\x01"], ids=["empty", "cut", "cut-2", "over-64-bits"]
)
def test_bad_varints_are_wire_errors(data):
    with pytest.raises(WireError, match="truncated or malformed varint"):
        read_varint(data, 0)
    assert issubclass(WireError, ValueError)  # what the tokenizer loader catches


@pytest.mark.parametrize(
    "content,problem",
    [
        (_model_with_input(b"\xff"), r"unreadable graph input/output \(Error parsing message"),
        (_model_with_input(_field(NAME_IN_VALUE_INFO, b"\xff\xfe")), "name is not valid UTF-8"),
        (_field(GRAPH_IN_MODEL, b"")[:1] + b"\xff" * 11, "truncated or malformed varint"),
        (b"\x3a\x05ab", "truncated or malformed message"),
    ],
    ids=["corrupt-value-info", "name-not-utf8", "varint-over-64-bits", "length-past-the-end"],
)
def test_hostile_headers_are_header_errors(tmp_path, content, problem):
    path = tmp_path / "g.onnx"
    path.write_bytes(content)
    with pytest.raises(HeaderError, match=problem):
        read_graph_header(path)


def test_a_graph_whose_input_name_is_not_utf8_is_named_at_load(tiny_package, tmp_path):
    """A graph that only its sha256 vouches for: one line naming the file. upb hands the bad name back
    as bytes; next to a str name, sorting the names for the message raised TypeError (a traceback)."""
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg, symlinks=True)
    graph = pkg / "graphs" / "vision_encoder.onnx"
    names = (b"\xff\xfe", b"pixel_values")
    inputs = b"".join(_field(INPUT_IN_GRAPH, _field(NAME_IN_VALUE_INFO, name)) for name in names)
    graph.write_bytes(_field(GRAPH_IN_MODEL, inputs))
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["graphs"]["vision_encoder"]["sha256"] = sha256_file(graph)
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        PackageError, match=r"vision_encoder.onnx: not an ONNX graph \(a graph input/output name"
    ):
        load_manifest(pkg)
