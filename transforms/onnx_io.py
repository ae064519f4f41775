"""Writing ONNX files safely, torch-free (shared by the exporter, fp16 conversion and int8 quantization)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

EXTERNAL_DATA_THRESHOLD = 1 << 30  # weights past 1 GiB go to a side file (protobuf's limit is 2 GiB)


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save, with weights in a side file `<name>.data` when large; written under temporary names."""
    path = Path(path)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    tmp = path.with_name(f".{path.name}.partial")
    if size < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
        return [path]
    data = path.with_name(path.name + ".data")
    tmp_data = data.with_name(f".{data.name}.partial")
    onnx.save_model(
        model,
        tmp,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=tmp_data.name,
        size_threshold=1024,
    )
    # The graph refers to its data file by name: point it at the final name before renaming both.
    final = onnx.load_model(tmp, load_external_data=False)
    for tensor in final.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data.name
    onnx.save_model(final, tmp)
    os.replace(tmp_data, data)
    os.replace(tmp, path)
    return [path, data]


def external_files(path: str | os.PathLike) -> list[Path]:
    """The external data files an ONNX graph's tensors name (beside it), without loading weights."""
    path = Path(path)
    model = onnx.load_model(path, load_external_data=False)
    names = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path.parent / name for name in sorted(names)]


def graph_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX graph with its external data files (those its tensors name beside it)."""
    path = Path(path)
    return sum(f.stat().st_size for f in [path, *external_files(path)] if f.is_file())
