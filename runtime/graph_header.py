"""An ONNX file's interface, read without its weights: inputs, outputs and external-data locations.

A package is checked at load, before any media is decoded, that each graph is the one its manifest
describes. Parsing the whole ModelProto (`onnx.load`, even with load_external_data=False) copies
every inline weight into memory: up to 1 GiB per graph here. This reader walks the protobuf wire
format over a memory map instead and decodes only the small messages it needs (the graph's input
and output ValueInfoProtos, each weight tensor's name and external-data entries); weight bytes are
skipped, never copied. Torch-free.

Field numbers are those of onnx/onnx.proto (stable since IR version 3).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from vsal.runtime.protobuf_wire import WireError, read_varint

# Wire types of the protobuf encoding.
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

# Messages that can hold weight tensors, as {field number: message kind}.
_CHILDREN = {
    "model": {7: "graph", 25: "function"},  # ModelProto.graph, .functions
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto.node, .initializer, .sparse_initializer
    "function": {7: "node"},  # FunctionProto.node
    "node": {5: "attribute"},  # NodeProto.attribute
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values, .indices
}
GRAPH_IN_MODEL, INPUT_IN_GRAPH, OUTPUT_IN_GRAPH, INITIALIZER_IN_GRAPH = 7, 11, 12, 5
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
MAX_NESTING = 64  # subgraphs in subgraphs: real models nest a few levels; this bounds the recursion


class HeaderError(WireError):
    """The bytes are not a well-formed ONNX protobuf."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy dtype name, or "elem_type N" when ONNX has no numpy type for it
    rank: int | None  # None: the graph gives no shape
    dims: tuple[int | None, ...] = ()  # each axis's fixed size, None where symbolic (rank of them)


@dataclass
class GraphHeader:
    inputs: list[Tensor]  # without initializers (old IR versions list weights as inputs too)
    outputs: list[Tensor]
    external_locations: set[str] = field(default_factory=set)  # as written, relative to the graph's folder


def read_graph_header(path: Path) -> GraphHeader:
    """The interface of the ONNX file at `path` (a regular file); HeaderError when it is not ONNX."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            raise HeaderError("the file is empty")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        header, problem = _header(memoryview(mapped)), ""
    except WireError as exc:  # HeaderError, or a varint that runs off its message
        header, problem = None, str(exc)  # raised again below: its frames hold slices of the map
    mapped.close()  # every slice is gone by now (a live one would make this raise BufferError)
    if header is None:
        raise HeaderError(problem)
    return header


def _header(model: memoryview) -> GraphHeader:
    graph = None
    for number, wire, value in _fields(model):
        if number == GRAPH_IN_MODEL and wire == LENGTH:
            graph = value
    if graph is None:
        raise HeaderError("no graph in the model")
    inputs, outputs, weights = [], [], set()
    for number, wire, value in _fields(graph):
        if wire != LENGTH:
            continue
        if number == INPUT_IN_GRAPH:
            inputs.append(_value_info(value))
        elif number == OUTPUT_IN_GRAPH:
            outputs.append(_value_info(value))
        elif number == INITIALIZER_IN_GRAPH:
            weights.add(_tensor_name(value))
    locations = set(_external_locations(model, "model", 0))
    return GraphHeader([t for t in inputs if t.name not in weights], outputs, locations)


def _value_info(data: memoryview) -> Tensor:
    try:
        value = onnx.ValueInfoProto.FromString(bytes(data))
    except (DecodeError, UnicodeDecodeError) as exc:  # the pure-Python protobuf checks UTF-8 itself
        raise HeaderError(f"unreadable graph input/output ({exc})") from None
    if isinstance(value.name, bytes):  # upb hands a proto2 string that is not UTF-8 back as bytes
        raise HeaderError("a graph input/output name is not valid UTF-8")
    tensor_type = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = f"elem_type {tensor_type.elem_type}"
    rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return Tensor(value.name, dtype, rank, dims)


def _tensor_name(tensor: memoryview) -> str:
    for number, wire, value in _fields(tensor):
        if number == TENSOR_NAME and wire == LENGTH:
            return _text(value)
    return ""


def _external_locations(message: memoryview, kind: str, depth: int) -> Iterator[str]:
    """Every external-data location of a tensor anywhere under `message` (initializers, Constant
    attributes, subgraphs, functions): the files ONNX Runtime would open."""
    if depth > MAX_NESTING:
        raise HeaderError(f"messages nested more than {MAX_NESTING} deep")
    if kind == "tensor":
        yield from _tensor_locations(message)
        return
    children = _CHILDREN[kind]
    for number, wire, value in _fields(message):
        if wire == LENGTH and number in children:
            yield from _external_locations(value, children[number], depth + 1)


def _tensor_locations(tensor: memoryview) -> Iterator[str]:
    entries, external = [], False
    for number, wire, value in _fields(tensor):
        if number == TENSOR_EXTERNAL_DATA and wire == LENGTH:
            entries.append(value)
        elif number == TENSOR_DATA_LOCATION and wire == VARINT:
            external = value == EXTERNAL
    if not external:
        return
    for entry in entries:
        key = value = ""
        for number, wire, data in _fields(entry):  # StringStringEntryProto: key = 1, value = 2
            if wire == LENGTH and number == 1:
                key = _text(data)
            elif wire == LENGTH and number == 2:
                value = _text(data)
        if key == "location":
            yield value


def _text(data: memoryview) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("a name is not valid UTF-8") from None


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message: an int, or a slice of `data` (not copied)."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = read_varint(data, pos)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            value, pos = 0, pos + size
        elif wire == LENGTH:
            size, pos = read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise HeaderError(f"wire type {wire} (not produced by ONNX)")
        if number == 0 or pos > end:
            raise HeaderError("truncated or malformed message")
        yield number, wire, value
