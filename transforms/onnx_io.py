"""ONNX files, torch-free: the one writer and the one reader of tensor data.

`save_onnx` writes a graph with its large weights streamed, one tensor at a time, into a side file
`<name>.data` (when the model is large, or when asked), the data file first and the graph last, each
atomically (vsal.runtime.package_lock.replacing). A weight's bytes may come from the proto or from a
`TensorData` held outside it, so a transform never needs the whole model in memory.

`stored_data` locates an initializer's bytes (inline, or an extent of its side file, checked against
the file's size), and `read_array` reads one tensor. The exporter, the fp16 and int8 transforms and
`vsal-export check` (vsal.export.check) all go through these.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from vsal.runtime.errors import PackageError
from vsal.runtime.package_lock import fsync_folder, replacing
from vsal.transforms.graph_index import external_tensors

EXTERNAL_DATA_THRESHOLD = 1 << 30  # weights past 1 GiB go to a side file (protobuf's limit is 2 GiB)
INLINE_BYTES = 1024  # smaller tensors stay in the graph file (onnx's own threshold)
_ALIGN = 4096  # each tensor of a side file starts on a page, as onnx writes them (mmap-friendly)
CHUNK_ELEMENTS = 1 << 22  # values read (or converted) at a time
_HALF_BYTE_TYPES = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1}  # two values a byte


class TensorDataError(PackageError):
    """A tensor whose data cannot be read: no location, a non-integer extent, a file too short."""


class TensorData(Protocol):
    """A tensor's bytes held outside the proto, in the initializer's own type."""

    @property
    def nbytes(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...


def tensor_nbytes(tensor: TensorProto) -> int | None:
    """The bytes a tensor's dims and type need; None for strings and types onnx cannot size."""
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in _HALF_BYTE_TYPES:
        return (count + 1) // 2
    try:
        return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def external_entries(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def extent_problem(tensor: TensorProto, file_size: int) -> str | None:
    """Why `tensor` could not be read from its side file of `file_size` bytes, or None."""
    entries = external_entries(tensor)
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        return f"tensor {tensor.name} declares a non-integer offset or length"
    needed = tensor_nbytes(tensor)
    if length is not None and needed is not None and length != needed:
        return f"tensor {tensor.name} declares {length} bytes, its shape {list(tensor.dims)} needs {needed}"
    size = length if length is not None else needed
    if offset < 0:
        return f"tensor {tensor.name} declares offset {offset}"
    if size is not None and offset + size > file_size:
        return (
            f"tensor {tensor.name} is bytes {offset} to {offset + size}, the file has {file_size} "
            "(truncated, or not this graph's weights)"
        )
    return None


@dataclass(frozen=True)
class StoredData:
    """An initializer's data where it is stored: inline raw bytes, or an extent of a side file."""

    data_type: int
    dims: tuple[int, ...]
    raw: bytes | None = None
    path: Path | None = None
    offset: int = 0

    @property
    def count(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.data_type))

    @property
    def packed(self) -> bool:
        """Two values a byte (INT4, UINT4, FLOAT4E2M1): stored packed, low nibble first."""
        return self.data_type in _HALF_BYTE_TYPES

    @property
    def nbytes(self) -> int:
        return (self.count + 1) // 2 if self.packed else self.count * self.dtype.itemsize

    def _bytes(self) -> Iterator[bytes]:
        """The stored bytes, CHUNK_ELEMENTS bytes at a time (packed types)."""
        if self.raw is not None:
            for begin in range(0, self.nbytes, CHUNK_ELEMENTS):
                yield self.raw[begin : min(begin + CHUNK_ELEMENTS, self.nbytes)]
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.nbytes
            while left:
                part = f.read(min(CHUNK_ELEMENTS, left))
                if not part:
                    raise TensorDataError(
                        f"{self.path}: external tensor shorter than its dims {list(self.dims)}"
                    )
                left -= len(part)
                yield part

    def arrays(self) -> Iterator[np.ndarray]:
        """The values, flat, CHUNK_ELEMENTS at a time (a side file is read a chunk at a time)."""
        if self.packed:  # unpacked whole: int4 weights are a quarter of their fp16 size
            values = self.array().ravel()
            for begin in range(0, self.count, CHUNK_ELEMENTS):
                yield values[begin : begin + CHUNK_ELEMENTS]
            return
        if self.raw is not None:
            values = np.frombuffer(self.raw, dtype=self.dtype, count=self.count)
            for begin in range(0, self.count, CHUNK_ELEMENTS):
                yield values[begin : begin + CHUNK_ELEMENTS]
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for begin in range(0, self.count, CHUNK_ELEMENTS):
                size = min(CHUNK_ELEMENTS, self.count - begin)
                values = np.fromfile(f, dtype=self.dtype, count=size)
                if values.size != size:
                    raise TensorDataError(
                        f"{self.path}: external tensor shorter than its dims {list(self.dims)}"
                    )
                yield values

    def row_blocks(self, rows: int) -> Iterator[np.ndarray]:
        """The values `rows` rows (of the first axis) at a time, shaped [rows, *dims[1:]]: a weight
        read a block at a time, never whole (packed types: TensorDataError)."""
        if self.packed or not self.dims:
            raise TensorDataError(f"row blocks of a packed or scalar tensor {list(self.dims)}")
        row, total = int(np.prod(self.dims[1:], dtype=np.int64)), self.dims[0]
        if self.raw is not None:
            values = np.frombuffer(self.raw, dtype=self.dtype, count=self.count).reshape(self.dims)
            for begin in range(0, total, rows):
                yield values[begin : begin + rows]
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for begin in range(0, total, rows):
                count = min(rows, total - begin)
                values = np.fromfile(f, dtype=self.dtype, count=count * row)
                if values.size != count * row:
                    raise TensorDataError(
                        f"{self.path}: external tensor shorter than its dims {list(self.dims)}"
                    )
                yield values.reshape(count, *self.dims[1:])

    def chunks(self) -> Iterator[bytes]:
        """The bytes to store, as they are stored (packed types stay packed)."""
        if self.packed:
            yield from self._bytes()
            return
        for values in self.arrays():
            yield values.tobytes()

    def array(self) -> np.ndarray:
        if self.packed:
            tensor = TensorProto(data_type=self.data_type, raw_data=b"".join(self._bytes()))
            tensor.dims.extend(self.dims)
            return numpy_helper.to_array(tensor)
        parts = list(self.arrays())
        return (np.concatenate(parts) if parts else np.empty(0, self.dtype)).reshape(self.dims)


@dataclass(frozen=True)
class ArrayData:
    """New data for an initializer (a quantized weight, its scale)."""

    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.values.nbytes

    def chunks(self) -> Iterator[bytes]:
        yield np.ascontiguousarray(self.values).tobytes()


def declared(name: str, values: np.ndarray) -> TensorProto:
    """An initializer for `values` without its data: give `ArrayData(values)` to `save_onnx`."""
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(values.dtype))
    tensor.dims.extend(values.shape)
    return tensor


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def stored_data(tensor: TensorProto, folder: str | os.PathLike) -> StoredData:
    """Where `tensor`'s data is: its raw bytes, or its extent of a side file in `folder` (checked
    against the file's size). Tensors with typed fields (float_data...) are converted once."""
    dims = tuple(tensor.dims)
    if not is_external(tensor):
        # Typed fields (float_data, int32_data...) re-encoded as raw bytes the way they are stored.
        raw = (
            tensor.raw_data
            if tensor.HasField("raw_data")
            else numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
        )
        return StoredData(tensor.data_type, dims, raw=raw)
    entries = external_entries(tensor)
    if "location" not in entries:
        raise TensorDataError(f"initializer {tensor.name}: external data without a location")
    path = Path(folder) / entries["location"]
    if not path.is_file():
        raise TensorDataError(f"{path}: the side file of tensor {tensor.name} is missing")
    problem = extent_problem(tensor, path.stat().st_size)
    if problem:
        raise TensorDataError(f"{path}: {problem}")
    return StoredData(tensor.data_type, dims, path=path, offset=int(entries.get("offset", "0")))


def read_array(tensor: TensorProto, folder: str | os.PathLike) -> np.ndarray:
    """One tensor's values, from the proto or its side file in `folder` (only its own extent)."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    return stored_data(tensor, folder).array()


def stash_data(model: onnx.ModelProto, folder: str | os.PathLike, min_bytes: int) -> dict[str, StoredData]:
    """Take initializers' data out of the proto: every external one (only located) and every inline
    one of `min_bytes` or more. Type inference and converters, which copy the proto, then handle its
    structure only; `save_onnx(model, dst, data=...)` writes the data back."""
    stash = {}
    for tensor in model.graph.initializer:
        if is_external(tensor):
            stash[tensor.name] = stored_data(tensor, folder)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= min_bytes:
            stash[tensor.name] = StoredData(tensor.data_type, tuple(tensor.dims), raw=tensor.raw_data)
            tensor.ClearField("raw_data")
    return stash


def save_onnx(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    data: Mapping[str, TensorData] | None = None,
    *,
    external: bool | None = None,
) -> list[Path]:
    """Save `model` to `path`; returns the files written (the graph, and `<name>.data` if any).

    `data`: initializer name -> its bytes held outside the proto (`stash_data`, `ArrayData`).
    `external`: weights into the side file `<name>.data` (tensors of INLINE_BYTES or more, one at a
    time, page-aligned); None: when the model and `data` reach EXTERNAL_DATA_THRESHOLD. Writing
    inline removes a stale side file of that name. Either file is written under a temporary name
    and replaces its final name when complete, the data before the graph.
    """
    path = Path(path)
    data = dict(data or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    for tensor in model.graph.initializer:
        if is_external(tensor) and tensor.name not in data:
            raise ValueError(f"initializer {tensor.name}: external data not located (use stash_data)")
    if external is None:
        external = model.ByteSize() + sum(d.nbytes for d in data.values()) >= EXTERNAL_DATA_THRESHOLD
    side = path.with_name(path.name + ".data")
    if not external:
        for tensor in model.graph.initializer:
            if tensor.name in data:
                tensor.raw_data = b"".join(data[tensor.name].chunks())
        with replacing(path) as tmp:
            onnx.save_model(model, tmp)
        side.unlink(missing_ok=True)
        return [path]
    with replacing(path) as tmp_graph:
        with replacing(side) as tmp_data:
            _stream_weights(model, data, tmp_data, side.name)
            onnx.save_model(model, tmp_graph)
    return [path, side]


def _stream_weights(model: onnx.ModelProto, data: Mapping[str, TensorData], out: Path, name: str) -> None:
    """Move the initializers' data (from `data` or the proto) into the file `out`, located as `name`."""
    offset = 0
    with open(out, "wb") as f:
        for tensor in model.graph.initializer:
            if tensor.name in data:
                source = data[tensor.name]
                if source.nbytes < INLINE_BYTES:
                    tensor.raw_data = b"".join(source.chunks())
                    continue
                pieces: Iterator[bytes] | Sequence[bytes] = source.chunks()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_BYTES:
                pieces = [tensor.raw_data]
            else:
                continue
            offset += f.write(b"\0" * ((-offset) % _ALIGN))
            length = sum(f.write(piece) for piece in pieces)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += length


def move_into(staged: Sequence[Path], folder: str | os.PathLike) -> list[Path]:
    """Move a graph and its side file, written and checked in a staging folder on the same file
    system, into `folder`: the data first, the graph last, each by an atomic rename."""
    final = [Path(folder) / p.name for p in staged]
    for src, dst in reversed(list(zip(staged, final, strict=True))):
        os.replace(src, dst)
    fsync_folder(folder)
    return final


def external_files(path: str | os.PathLike) -> list[Path]:
    """The side files an ONNX graph's tensors name (beside it), without loading weights."""
    path = Path(path)
    return side_files(onnx.load_model(path, load_external_data=False), path.parent)


def side_files(model: onnx.ModelProto, folder: str | os.PathLike) -> list[Path]:
    """The side files the tensors of `model` (loaded from `folder`) name."""
    names = {external_entries(t).get("location") for t in external_tensors(model.graph)}
    return [Path(folder) / name for name in sorted(names - {None})]


def graph_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX graph with its side files (those its tensors name beside it)."""
    path = Path(path)
    return sum(f.stat().st_size for f in [path, *external_files(path)] if f.is_file())
