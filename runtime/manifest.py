"""The model package's manifest: the one contract between export, build and runtime.

A package folder holds `manifest.json`, one ONNX graph per part, the LLM's token-embedding table
and both tokenizers. The runtime reads everything it needs from here and never infers anything
from a file name. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from vsal.runtime.errors import PackageError
from vsal.runtime.package_paths import confined, inside, load_embeddings, read_manifest_json

MANIFEST_NAME = "manifest.json"
ENGINE_DIR = "engines"  # the TensorRT engine cache (vsal.runtime.tensorrt_engines, which imports this module)
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

    def paths(self) -> dict[str, str]:
        """Every file name the manifest gives, keyed by where it stands ("graphs.x.file")."""
        out = {}
        for name, graph in self.graphs.items():
            at = f"graphs.{name}"
            out[f"{at}.file"] = graph.file
            out.update({f"{at}.external_data[{f!r}]": f for f in graph.external_data})
            out.update({f"{at}.engines[{i}].file": e["file"] for i, e in enumerate(graph.engines)})
            for precision, variant in graph.variants.items():
                out[f"{at}.variants.{precision}.file"] = variant.file
                out.update(
                    {f"{at}.variants.{precision}.external_data[{f!r}]": f for f in variant.external_data}
                )
        for key in ("embeddings", "llm_tokenizer", "instruction_tokenizer"):
            out[f"{key}.file"] = getattr(self, key).file
        return out

    def load_embeddings(self, folder: str | os.PathLike) -> np.ndarray:
        """The token-embedding table [vocab, hidden] float32, memory-mapped, checked against
        config.llm; never unpickled."""
        llm = self.config.get("llm")
        dims = [llm.get(k) if isinstance(llm, dict) else None for k in ("vocab_size", "hidden_size")]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise PackageError(
                f"{Path(folder) / MANIFEST_NAME}: config.llm needs positive integers vocab_size and "
                f"hidden_size, got {dims}"
            )
        return load_embeddings(Path(folder), self.embeddings.file, *dims)


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
    """Read and check a package's manifest; PackageError says what is wrong and with which file.

    Checked here, so every reader gets it: manifest.json's size, nesting and field types; every file
    it names confined to the folder (package_paths); each graph's inputs and outputs against the
    ONNX file itself; the embedding table's shape and dtype. Missing files and sha256 are left to
    verify_files (they cost a read)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise PackageError(f"{folder}: not a model package folder (export one with `vsal-export export`)")
    if not os.path.lexists(path):
        raise PackageError(f"{folder}: no {MANIFEST_NAME}; an export that did not finish leaves none")
    data = read_manifest_json(confined(folder, MANIFEST_NAME, MANIFEST_NAME, must_exist=True))
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise PackageError(f"{path}: format_version {version!r}, this vsal reads {FORMAT_VERSION}")
    _check_types(data, _MANIFEST, path)
    manifest = Manifest.from_dict(data)
    for field_name, name in manifest.paths().items():
        confined(folder, name, field_name)
    _confine_engine_cache(folder)
    _check_interfaces(manifest, folder)
    if (folder / manifest.embeddings.file).is_file():  # missing: verify_files says so
        manifest.load_embeddings(folder)  # its .npy header: shape and dtype, never unpickled
    return manifest


def verify_files(manifest: Manifest, folder: str | os.PathLike) -> list[str]:
    """Problems with the package's files (missing, or sha256 differs); empty when all is well.
    A file that is unsafe to read (outside the folder, not a regular file) raises PackageError."""
    folder = Path(folder)
    problems = []
    for name, digest in manifest.files().items():
        path = folder / name
        real = confined(folder, name, "file")
        if not real.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(real) != digest:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt or replaced)")
    return problems


# --- the graphs against their files -----------------------------------------------------------------


def _check_interfaces(manifest: Manifest, folder: Path) -> None:
    """Each graph file (and variant) present must have the inputs and outputs the manifest declares
    (names, dtypes, ranks), and weights only in confined files: a swapped graph is refused at load."""
    for name, info in manifest.graphs.items():
        files = [(f"graphs.{name}", info.file, info.sha256)]
        files += [(f"graphs.{name}.variants.{p}", v.file, v.sha256) for p, v in info.variants.items()]
        for where, file, digest in files:
            _check_interface(folder, where, file, digest, info)


def _check_interface(folder: Path, where: str, file: str, digest: str, info: GraphInfo) -> None:
    from vsal.runtime.graph_header import HeaderError, read_graph_header  # imports onnx: only when needed

    path = folder / file
    if not path.is_file():
        return  # missing: verify_files and the backends say so
    try:
        header = read_graph_header(path)
    except HeaderError as exc:
        problem = f"not an ONNX graph ({exc})"
    else:
        problem = _interface_problem(header, info)
        for location in sorted(header.external_locations):
            rel = posixpath.normpath(posixpath.join(posixpath.dirname(file), location))
            confined(folder, rel, f"its weights location (for {where})", named_in=path)
    if problem:
        if sha256_file(path) != digest:
            raise PackageError(f"{path}: sha256 differs from the manifest (corrupt or replaced)")
        raise PackageError(f"{path}: {problem}; {where} in {MANIFEST_NAME} describes another graph")


def _interface_problem(header, info: GraphInfo) -> str:
    for kind, found, declared in (
        ("input", header.inputs, info.inputs),
        ("output", header.outputs, info.outputs),
    ):
        by_name = {t.name: t for t in found}
        names = sorted(by_name)
        wanted = [t.name for t in declared]
        if sorted(wanted) != names:
            return f"its {kind}s are {names}, the manifest declares {sorted(wanted)}"
        for tensor in declared:
            got = by_name[tensor.name]
            if got.dtype != tensor.dtype:
                return f"{kind} {tensor.name} is {got.dtype}, the manifest declares {tensor.dtype}"
            if got.rank is not None and got.rank != len(tensor.shape):
                return f"{kind} {tensor.name} has rank {got.rank}, the manifest declares {len(tensor.shape)}"
    return ""


def _confine_engine_cache(folder: Path) -> None:
    """The TensorRT engine cache (`engines/`, not named file by file in the manifest) holds only
    regular files inside the package."""
    cache = folder / ENGINE_DIR
    if not os.path.lexists(cache):
        return
    real = os.path.realpath(cache)
    root = os.path.realpath(folder)
    if not inside(real, root) or real == root or not os.path.isdir(real):
        raise PackageError(f"{cache}: the engine cache must be a folder inside the package")
    for entry in sorted(os.listdir(real)):
        confined(folder, f"{ENGINE_DIR}/{entry}", "engine cache")


# --- field types ------------------------------------------------------------------------------------
# Checked before the dataclasses are built, so a wrong type is a PackageError naming the field, never a
# TypeError deep in the runtime. A spec is a type (or tuple of types), a list or dict of one spec (the
# items, the values), or a record: (required {key: spec}, optional {key: spec}).

_GRAPH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")  # graph names become folder names (Triton models)
_PRECISION_KEY = re.compile(r"[a-z0-9]+\Z")
_TENSOR = ({"name": str, "dtype": str, "shape": [(int, str)]}, {})
_VARIANT = (
    {"precision": str, "file": str, "sha256": str},
    {"external_data": {"": str}, "accuracy": dict, "notes": str},
)
_ENGINE = (
    {"file": str},
    {"tensorrt": str, "compute_capability": str, "precision": str, "build_seconds": (int, float)},
)
_GRAPH = (
    {"file": str, "sha256": str, "inputs": [_TENSOR], "outputs": [_TENSOR], "profile": {"": {"": int}}},
    {
        "axis_multiples": {"": int},
        "precision": str,
        "external_data": {"": str},
        "engines": [_ENGINE],
        "variants": {"precision": _VARIANT},
    },
)
_FILE = ({"file": str, "sha256": str}, {})
_MANIFEST = (
    {
        "preset": str,
        "random_weights": bool,
        "config": dict,
        "graphs": {"graph": _GRAPH},
        "embeddings": _FILE,
        "llm_tokenizer": _FILE,
        "instruction_tokenizer": _FILE,
        "special_tokens": {"": int},
        "prompt": {"": str},
        "decoding": dict,
        "limits": {"": int},
    },
    {"format_version": int, "vsal_version": str, "opset": int},
)
_KEYS = {"": None, "graph": _GRAPH_KEY, "precision": _PRECISION_KEY}


def _check_types(value: Any, spec: Any, path: Path, where: str = "") -> None:
    """PackageError naming manifest.json and the field when `value` does not follow `spec`."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], dict):
        _check_record(value, spec, path, where)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            _wrong(path, where, "a list", value)
        for i, item in enumerate(value):
            _check_types(item, spec[0], path, f"{where}[{i}]")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            _wrong(path, where, "an object", value)
        ((key_kind, item_spec),) = spec.items()
        pattern = _KEYS[key_kind]
        for key, item in value.items():
            if pattern is not None and not pattern.match(key):
                raise PackageError(
                    f"{path}: {where} has a key {key!r}; {key_kind} names are {pattern.pattern[:-2]}"
                )
            _check_types(item, item_spec, path, f"{where}.{key}")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            _wrong(path, where, " or ".join(_TYPE_NAMES[t] for t in types), value)


def _check_record(value: Any, spec: tuple, path: Path, where: str) -> None:
    required, optional = spec
    if not isinstance(value, dict):
        _wrong(path, where or "the top level", "an object", value)
    missing = [k for k in required if k not in value]
    if missing:
        raise PackageError(f"{path}: {where or 'the manifest'} lacks {', '.join(missing)}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise PackageError(
            f"{path}: {where or 'the manifest'} has unknown fields {unknown} (another vsal's format?)"
        )
    for key, item in value.items():
        _check_types(item, required.get(key, optional.get(key)), path, f"{where}.{key}" if where else key)


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "an object",
}


def _wrong(path: Path, where: str, expected: str, value: Any) -> None:
    shown = json.dumps(value)[:40] if not isinstance(value, dict | list) else type(value).__name__
    raise PackageError(f"{path}: {where} must be {expected}, got {shown}")
