"""The model package's manifest: the one contract between export, build and runtime.

A package folder holds `manifest.json`, one ONNX graph per part, the LLM's token-embedding table
and both tokenizers. The runtime reads everything it needs from here and never infers anything
from a file name. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vsal.runtime.errors import PackageError  # noqa: F401  (re-exported: its historical home)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name
    shape: list[int | str]  # ints, or expressions over the graph's axes ("N", "3*S", "P+T")


@dataclass
class VariantInfo:
    """A reduced-precision copy of a graph, added by `vsal-export build`."""

    precision: str  # "fp16" | "int8"
    file: str
    sha256: str
    external_data: dict[str, str] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)  # against fp32 on held-out inputs
    notes: str = ""  # what was kept in higher precision, and why


@dataclass
class GraphInfo:
    file: str  # relative to the package folder
    sha256: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    profile: dict[str, dict[str, int]]  # axis -> {"min", "opt", "max"}: the TensorRT profile
    axis_multiples: dict[str, int] = field(default_factory=dict)  # axes that come in steps (S: 10)
    precision: str = "fp32"
    external_data: dict[str, str] = field(default_factory=dict)  # weight files beside the graph -> sha256
    engines: list[dict[str, Any]] = field(default_factory=list)  # filled by `vsal-export build`
    variants: dict[str, VariantInfo] = field(default_factory=dict)  # precision -> fp16/int8 copy

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphInfo:
        data = dict(data)
        data["inputs"] = [TensorInfo(**t) for t in data["inputs"]]
        data["outputs"] = [TensorInfo(**t) for t in data["outputs"]]
        data["variants"] = {k: VariantInfo(**v) for k, v in data.get("variants", {}).items()}
        return cls(**data)

    def file_for(self, precision: str) -> tuple[str, str]:
        """(file, precision) to run: the variant when the package has it, else the fp32 graph."""
        if precision in self.variants:
            return self.variants[precision].file, precision
        return self.file, self.precision

    def sha256_for(self, precision: str) -> str:
        """sha256 of the file `file_for(precision)` names."""
        return self.variants[precision].sha256 if precision in self.variants else self.sha256


@dataclass
class FileInfo:
    file: str
    sha256: str


@dataclass
class Manifest:
    preset: str
    random_weights: bool  # seeded random weights: answers are meaningless
    config: dict[str, Any]  # ModelConfig.to_dict()
    graphs: dict[str, GraphInfo]
    embeddings: FileInfo  # .npy [vocab, hidden] float32: the LLM's token-embedding table
    llm_tokenizer: FileInfo  # sentencepiece tokenizer.model
    instruction_tokenizer: FileInfo  # bert-base-uncased vocab.txt (+ [DEC])
    special_tokens: dict[str, int]  # bos, eos, pad (LLM); instruction_bos ([DEC])
    prompt: dict[str, str]  # before, after (with {prompt}), answer_cut
    decoding: dict[str, Any]  # the release's decoding defaults
    limits: dict[str, int]  # documented maxima (frames, slots, prompt text tokens, new tokens)
    format_version: int = FORMAT_VERSION
    vsal_version: str = ""
    opset: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["graphs"] = {k: GraphInfo.from_dict(v) for k, v in data["graphs"].items()}
        for key in ("embeddings", "llm_tokenizer", "instruction_tokenizer"):
            data[key] = FileInfo(**data[key])
        return cls(**data)

    def files(self) -> dict[str, str]:
        """Every file the package must hold, with its sha256."""
        out = {}
        for graph in self.graphs.values():
            out[graph.file] = graph.sha256
            out.update(graph.external_data)
            for variant in graph.variants.values():
                out[variant.file] = variant.sha256
                out.update(variant.external_data)
        for info in (self.embeddings, self.llm_tokenizer, self.instruction_tokenizer):
            out[info.file] = info.sha256
        return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_manifest(manifest: Manifest, folder: str | os.PathLike) -> Path:
    path = Path(folder) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict())
    return path


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check a package's manifest; PackageError says what is wrong and with which file."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise PackageError(f"{folder}: not a model package folder (export one with `vsal-export export`)")
    if not path.is_file():
        raise PackageError(f"{folder}: no {MANIFEST_NAME}; an export that did not finish leaves none")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise PackageError(f"{path}: format_version {version!r}, this vsal reads {FORMAT_VERSION}")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise PackageError(f"{path}: malformed manifest ({exc})") from None


def verify_files(manifest: Manifest, folder: str | os.PathLike) -> list[str]:
    """Problems with the package's files (missing, or sha256 differs); empty when all is well."""
    folder = Path(folder)
    problems = []
    for name, digest in manifest.files().items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt or replaced)")
    return problems
