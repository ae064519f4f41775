"""The model package's manifest: the one contract between export, build and runtime.

A package folder holds `manifest.json`, one ONNX graph per part, the LLM's token-embedding table
and both tokenizers. The runtime reads everything it needs from here and never infers anything
from a file name. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import string
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from vsal.runtime.errors import ConfigError, PackageError
from vsal.runtime.graphs import DECODER, GRAPHS, KVLayout
from vsal.runtime.manifest_schema import COUNT, DERIVED, MANIFEST, RUNTIME_CONFIG, check_types
from vsal.runtime.package_lock import write_json_durable
from vsal.runtime.package_paths import (
    confined,
    confined_beside,
    load_embeddings,
    package_folder,
    read_manifest_json,
)
from vsal.runtime.preprocess import Preprocessing
from vsal.runtime.prompt import DecodingOptions
from vsal.runtime.shapes import axis_names

MANIFEST_NAME = "manifest.json"
GRAPH_DIR = "graphs"  # the exported graphs and the variants builds add
CALIBRATION_DIR = "calibration"  # `vsal-export calibrate`'s recorded inputs and clip list
ENGINE_DIR = "engines"  # the TensorRT engine cache (vsal.runtime.backends.tensorrt_engines)
# Folders the package's writers create files in, glob and clean: real folders, never symlinks.
WRITTEN_FOLDERS = {
    GRAPH_DIR: "graph folder",
    CALIBRATION_DIR: "calibration folder",
    ENGINE_DIR: "engine cache",
}
FORMAT_VERSION = 1
# Bounds on what a manifest may declare, far above the 13b (so sizes from a hostile manifest cannot
# make the runtime map, hash or allocate terabytes): the embedding table is [vocab, hidden] float32.
MAX_VOCAB = 1 << 20  # tokens; Vicuna has 32000
MAX_HIDDEN = 1 << 16  # LLM width; Vicuna-13B has 5120
_VICUNA = {"vocab_size": 32000, "hidden_size": 5120}
MAX_STATIC_DIM = 1 << 24  # a fixed tensor dim (224, 3000, 257); more is a hostile manifest
MAX_BEAMS = 64  # llm_decoder profile B max; the release decodes with 1 to 5
MAX_CONTEXT = 1 << 20  # llm_decoder P max + 1 when config.llm has no max_position_embeddings


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
    # Its own interface where it differs from the graph's (the fp16 decoder's float16 KV cache):
    # the same names and shapes, float dtypes of its own. Empty: the graph's (every older package).
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantInfo:
        data = dict(data)
        for key in ("inputs", "outputs"):
            data[key] = [TensorInfo(**t) for t in data.get(key, [])]
        return cls(**data)


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
    # precision -> the decoder rebuilt with ONNX Runtime's fused ops (vsal.transforms.fused_decoder),
    # from that precision's graph: its own interface (inputs, outputs), run only by ONNX Runtime
    fused: dict[str, VariantInfo] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphInfo:
        data = dict(data)
        data["inputs"] = [TensorInfo(**t) for t in data["inputs"]]
        data["outputs"] = [TensorInfo(**t) for t in data["outputs"]]
        for key in ("variants", "fused"):
            data[key] = {k: VariantInfo.from_dict(v) for k, v in data.get(key, {}).items()}
        return cls(**data)

    def all_variants(self) -> Iterator[tuple[str, VariantInfo]]:
        """(where, variant) for every variant and fused variant ("variants.int8", "fused.int4")."""
        for key in ("variants", "fused"):
            for precision, variant in getattr(self, key).items():
                yield f"{key}.{precision}", variant

    def fused_interface(self, precision: str) -> GraphInfo:
        """This entry as its fused `precision` variant runs it: that variant's own inputs and outputs."""
        variant = self.fused[precision]
        return replace(self, inputs=variant.inputs, outputs=variant.outputs, variants={}, fused={})

    def interface(self, precision: str) -> GraphInfo:
        """This entry as the `precision` variant runs it: its inputs and outputs where the variant
        declares its own (the fp16 decoder's float16 past and present), else the graph's. What the
        runners check feeds against and allocate by."""
        variant = self.variants.get(precision)
        if variant is None or not (variant.inputs or variant.outputs):
            return self
        return replace(self, inputs=variant.inputs or self.inputs, outputs=variant.outputs or self.outputs)

    def kv_layout(self, layout: KVLayout) -> KVLayout:
        """`layout` (the manifest's, of the exported graph) in the dtype this interface's past
        inputs have: the KV cache a runner of this entry allocates and passes between steps."""
        past = layout.past_names()[0]
        dtype = next((t.dtype for t in self.inputs if t.name == past), layout.dtype)
        return layout if dtype == layout.dtype else replace(layout, dtype=dtype)

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
    # KVLayout.to_dict() and Preprocessing.to_dict(); empty in a package written before they were
    # (kv_layout() and preprocessing_constants() derive them from config then)
    kv_cache: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    # {"encoders": ..., "llm": ...}: where each part's weights came from (empty before it was written)
    weight_sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in (*DERIVED, "weight_sources"):  # an older package stays as it was written
            if not data[key]:
                del data[key]
        for graph in data["graphs"].values():
            if not graph["fused"]:  # a package without fused variants stays as it was written
                del graph["fused"]
            for variant in graph["variants"].values():
                for key in ("inputs", "outputs"):  # the graph's interface: not repeated
                    if not variant[key]:
                        del variant[key]
        return data

    def kv_layout(self) -> KVLayout:
        """The llm_decoder graph's KV cache names and sizes (ValueError when config.llm cannot give
        them: check_runnable says so first)."""
        if self.kv_cache:
            return KVLayout.from_dict(self.kv_cache)
        return KVLayout.of_llm(self.config["llm"])

    def preprocessing_constants(self) -> Preprocessing:
        """The sizes and statistics the media's preprocessing uses for this package's encoders."""
        if self.preprocessing:
            return Preprocessing.from_dict(self.preprocessing)
        return Preprocessing.of_config(self.config)

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
            for _, variant in graph.all_variants():
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
            for where, variant in graph.all_variants():
                out[f"{at}.{where}.file"] = variant.file
                out.update({f"{at}.{where}.external_data[{f!r}]": f for f in variant.external_data})
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
        for key, value, most in zip(
            ("vocab_size", "hidden_size"), dims, (MAX_VOCAB, MAX_HIDDEN), strict=True
        ):
            if value > most:
                raise PackageError(
                    f"{Path(folder) / MANIFEST_NAME}: config.llm.{key} is {value}, more than any LLM "
                    f"vsal runs ({most} at most; Vicuna-13B has {_VICUNA[key]})"
                )
        return load_embeddings(Path(folder), self.embeddings.file, *dims)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_manifest(manifest: Manifest, folder: str | os.PathLike) -> Path:
    """Replace the package's manifest in one durable rename (package_lock.write_durable)."""
    path = Path(folder) / MANIFEST_NAME
    write_json_durable(path, manifest.to_dict())
    return path


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check a package's manifest; PackageError says what is wrong and with which file.

    Checked here, so every reader gets it: manifest.json's size, nesting and field types (with the
    keys every reader needs), the prompt template and decoding defaults; graphs/, calibration/ and
    engines/ real folders; every file it names confined to the folder (package_paths); each graph's
    inputs and outputs against the ONNX file itself; the embedding table's shape and dtype; the KV
    layout and the preprocessing constants, where declared, against config.llm and the graphs. Missing
    files and sha256 are left to verify_files (they cost a read); what only the runtime reads, to
    check_runnable."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise PackageError(f"{folder}: not a model package folder (export one with `vsal-export export`)")
    if not os.path.lexists(path):
        raise PackageError(f"{folder}: no {MANIFEST_NAME}; an export that did not finish leaves none")
    data = read_manifest_json(confined(folder, MANIFEST_NAME, MANIFEST_NAME, must_exist=True))
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(f"{path}: format_version {version!r}, this vsal reads {FORMAT_VERSION}")
    check_types(data, MANIFEST, path)
    _check_static_dims(data["graphs"], path)
    _check_prompt(data["prompt"], path)
    _check_decoding(data["decoding"], path)
    manifest = Manifest.from_dict(data)
    _check_written_folders(folder)
    for field_name, name in manifest.paths().items():
        confined(folder, name, field_name)
    _check_interfaces(manifest, folder)
    if (folder / manifest.embeddings.file).is_file():  # missing: verify_files says so
        manifest.load_embeddings(folder)  # its .npy header: shape and dtype, never unpickled
    _check_kv_cache(manifest, path)
    _check_preprocessing(manifest, path)
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
    (names, dtypes, ranks; the input sizes both fix), and weights only in confined files: a swapped
    graph is refused at load."""
    for name, info in manifest.graphs.items():
        _check_interface(folder, f"graphs.{name}", info.file, info.sha256, info)
        for precision, variant in info.variants.items():
            where = f"graphs.{name}.variants.{precision}"
            _check_variant_interface(folder / MANIFEST_NAME, where, variant, info)
            _check_interface(folder, where, variant.file, variant.sha256, info.interface(precision))
        for precision, variant in info.fused.items():
            where = f"graphs.{name}.fused.{precision}"
            if not variant.inputs or not variant.outputs:
                raise PackageError(f"{folder / MANIFEST_NAME}: {where} declares no inputs and outputs")
            _check_interface(folder, where, variant.file, variant.sha256, info.fused_interface(precision))


# The float types a variant's inputs and outputs may take instead of the graph's.
VARIANT_FLOATS = ("float32", "float16")


def _check_variant_interface(path: Path, where: str, variant: VariantInfo, info: GraphInfo) -> None:
    """A variant's own interface has the graph's names and shapes, in order; only a float dtype may
    differ (the runtime feeds every variant of a graph the same way, in the variant's dtypes)."""
    for kind, own, graph in (
        ("inputs", variant.inputs, info.inputs),
        ("outputs", variant.outputs, info.outputs),
    ):
        if not own:
            continue
        if [(t.name, t.shape) for t in own] != [(t.name, t.shape) for t in graph]:
            raise PackageError(
                f"{path}: {where}.{kind} names {[t.name for t in own][:6]}, not the graph's "
                f"{[t.name for t in graph][:6]} with their shapes: rebuild the variant"
            )
        for mine, theirs in zip(own, graph, strict=True):
            if mine.dtype != theirs.dtype and not {mine.dtype, theirs.dtype} <= set(VARIANT_FLOATS):
                raise PackageError(
                    f"{path}: {where}.{kind}: {mine.name} is {mine.dtype}, the graph's is {theirs.dtype}; "
                    f"a variant may only change a float type ({', '.join(VARIANT_FLOATS)}): rebuild it"
                )


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
            confined_beside(folder, file, location, f"its weights location (for {where})", path)
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
            if kind == "output":  # only feeds are built and checked by these sizes; check reports the rest
                continue
            for axis, (fixed, dim) in enumerate(zip(got.dims, tensor.shape, strict=False)):
                if isinstance(dim, int) and fixed is not None and fixed != dim:
                    return (
                        f"{kind} {tensor.name} has size {fixed} on axis {axis}, the manifest declares "
                        f"{dim} (shape {tensor.shape})"
                    )
    return ""


def _check_static_dims(graphs: dict[str, Any], path: Path) -> None:
    """Fixed sizes in declared shapes are positive and bounded: the runtime allocates and checks
    feeds by them, so -224 or 10**12 must fail here, not after the media is decoded."""
    for name, graph in graphs.items():
        for kind in ("inputs", "outputs"):
            for i, tensor in enumerate(graph[kind]):
                for axis, dim in enumerate(tensor["shape"]):
                    if isinstance(dim, int) and not 0 < dim <= MAX_STATIC_DIM:
                        raise PackageError(
                            f"{path}: graphs.{name}.{kind}[{i}].shape[{axis}] is {dim}; a fixed size "
                            f"must be 1 to {MAX_STATIC_DIM}: re-export the package"
                        )


def _check_written_folders(folder: Path) -> None:
    """graphs/, calibration/ and engines/ are real folders or absent (a build writes, globs and
    removes files in them); the engine cache, not named file by file in the manifest, holds only
    regular files inside the package."""
    for name, role in WRITTEN_FOLDERS.items():
        package_folder(folder, name, role)
    cache = folder / ENGINE_DIR
    for entry in sorted(os.listdir(cache)) if cache.is_dir() else []:
        confined(folder, f"{ENGINE_DIR}/{entry}", "engine cache")


# --- the KV cache and the preprocessing ----------------------------------------------------------


def _check_kv_cache(manifest: Manifest, path: Path) -> None:
    """kv_cache (declared, or derived from config.llm): a KVLayout within bounds, agreeing with config.llm
    (where that gives the sizes) and with the llm_decoder graph's past inputs and present outputs."""
    layout = _declared(manifest, "kv_cache", KVLayout, path, manifest.kv_layout, DECODER in manifest.graphs)
    if layout is None:
        return
    llm = manifest.config.get("llm")
    llm = llm if isinstance(llm, dict) else {}
    hidden, heads = llm.get("hidden_size"), llm.get("num_attention_heads")
    wanted = {
        "layers": llm.get("num_hidden_layers"),
        "kv_heads": llm.get("num_key_value_heads"),
        "head_dim": hidden // heads if _count(hidden) and _count(heads) else None,
    }
    for key, value in wanted.items():
        if _count(value) and getattr(layout, key) != value:
            raise PackageError(
                f"{path}: kv_cache.{key} is {getattr(layout, key)}, config.llm gives {value}: "
                "re-export the package"
            )
    graph = manifest.graphs.get(DECODER)
    if graph is None:
        return
    _check_kv_tensors(graph, layout, f"{path}: graphs.{DECODER}", "re-export the package")
    for precision in graph.variants:  # each runs with its own cache: one dtype, past as present
        interface = graph.interface(precision)
        where = f"{path}: graphs.{DECODER}.variants.{precision}"
        try:
            own = interface.kv_layout(layout)
        except ValueError as exc:  # a dtype the runtime keeps no cache in
            raise PackageError(f"{where}: its KV cache: {exc}: rebuild the variant") from None
        _check_kv_tensors(interface, own, where, "rebuild the variant")


def _check_kv_tensors(graph: GraphInfo, layout: KVLayout, where: str, fix: str) -> None:
    """The graph's past inputs and present outputs are the layout's names, dtype and sizes."""
    sizes = {1: layout.kv_heads, 3: layout.head_dim}
    for kind, tensors, names in (
        ("inputs", graph.inputs, layout.past_names()),
        ("outputs", graph.outputs, layout.present_names()),
    ):
        by_name = {t.name: t for t in tensors}
        for name in names:
            tensor = by_name.get(name)
            if tensor is None:
                raise PackageError(f"{where}.{kind} lacks {name}, which kv_cache names: {fix}")
            shape = tensor.shape
            if (
                tensor.dtype != layout.dtype
                or len(shape) != 4
                or any(shape[axis] != size for axis, size in sizes.items())
            ):
                raise PackageError(
                    f"{where}.{kind}: {name} is {tensor.dtype} {shape}, kv_cache gives {layout.dtype} "
                    f"[B, {layout.kv_heads}, length, {layout.head_dim}]: {fix}"
                )


def _check_preprocessing(manifest: Manifest, path: Path) -> None:
    """preprocessing (declared, or derived from config): within bounds, and the sizes it makes those
    the encoders' inputs declare."""
    needed = any(GRAPHS[n].media_dims for n in manifest.graphs if n in GRAPHS)
    pre = _declared(manifest, "preprocessing", Preprocessing, path, manifest.preprocessing_constants, needed)
    if pre is None:
        return
    for name, info in manifest.graphs.items():
        role = GRAPHS.get(name)
        if role is None or not role.media_dims or not info.inputs:
            continue
        tensor = info.inputs[0]
        for axis, key in role.media_dims.items():
            dim = tensor.shape[axis] if axis < len(tensor.shape) else None
            if dim != getattr(pre, key):
                raise PackageError(
                    f"{path}: preprocessing.{key} is {getattr(pre, key)}, graphs.{name}.inputs[0] "
                    f"({tensor.name}) has {dim} on axis {axis}: re-export the package"
                )


def _declared(manifest: Manifest, key: str, kind: type, path: Path, derive, needed: bool) -> Any:
    """The package's own `key` as a `kind`, or, in a package written before it, what `derive()` makes
    of its config where a graph reads it (None where none does); PackageError for values out of
    bounds either way, so a hostile config is refused at load, not at the first question."""
    data = getattr(manifest, key)
    if not data and not needed:
        return None
    try:
        return kind.from_dict(data) if data else derive()
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        where = key if data else f"{key} (derived from config: the package predates it)"
        if isinstance(exc, KeyError):
            detail = f"config lacks {exc.args[0]!r}"
        elif isinstance(exc, TypeError):
            detail = f"a config value of the wrong type ({exc})"
        else:
            detail = str(exc)
        raise PackageError(f"{path}: {where}: {detail}") from None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# --- what the runtime reads -------------------------------------------------------------------------

_MAX_SHAPE_EXPR = 64  # characters; the manifest's longest is "P+T"


def check_runnable(manifest: Manifest, folder: str | os.PathLike) -> None:
    """PackageError naming manifest.json and the field when the runtime could not run the package:
    the config values the pipeline and bench read, bos and eos inside the vocabulary, every shape
    expression understood, every axis a tensor names profiled with 0 <= min <= opt <= max, steps
    positive. Pipeline.load checks this; load_manifest does not, as `vsal-export check` reads
    packages of any graphs and reports their bad profiles itself."""
    path = Path(folder) / MANIFEST_NAME
    check_types(manifest.config, RUNTIME_CONFIG, path, "config")
    vocab = manifest.config["llm"]["vocab_size"]
    for key in ("bos", "eos"):
        token = manifest.special_tokens[key]
        if not 0 <= token < vocab:
            raise PackageError(
                f"{path}: special_tokens.{key} is {token}, outside the vocabulary of "
                f"config.llm.vocab_size {vocab} (ids 0 to {vocab - 1})"
            )
    for name, info in manifest.graphs.items():
        role = GRAPHS.get(name)
        _check_profile(info, path, f"graphs.{name}", role.runtime_axes if role else ())
    _check_decoder_profile(manifest.graphs[DECODER].profile, manifest.config["llm"], path)


def _check_decoder_profile(profile: dict[str, dict[str, int]], llm: dict[str, Any], path: Path) -> None:
    """The decoder's limits (runtime.limits.DecoderLimits) come from its profile: bounded here, so a
    request that passes them fits the model and memory (B max 10**6 passes any --beams, then the
    cache allocation fails), and B max 0 is the package's fault, not the request's."""
    where = f"{path}: graphs.llm_decoder.profile"
    beams = profile["B"]["max"]
    if not 1 <= beams <= MAX_BEAMS:
        raise PackageError(
            f"{where}.B max is {beams}; a decoder takes 1 to {MAX_BEAMS} beams: re-export the package"
        )
    positions = llm.get("max_position_embeddings")
    if isinstance(positions, bool) or not isinstance(positions, int) or positions <= 0:
        positions, source = MAX_CONTEXT, "vsal's bound"
    else:
        source = "config.llm.max_position_embeddings"
    context, new = profile["P"]["max"] + 1, profile["T"]["max"]
    if context > positions or new > context:
        raise PackageError(
            f"{where}: P max + 1 is {context} and T max {new}; both must be at most {positions} ({source}), "
            "T max at most P max + 1: re-export the package"
        )


def _check_profile(info: GraphInfo, path: Path, where: str, read: tuple[str, ...]) -> None:
    for axis, bounds in info.profile.items():
        lo, opt, hi = bounds["min"], bounds["opt"], bounds["max"]
        if not 0 <= lo <= opt <= hi:
            raise PackageError(
                f"{path}: {where}.profile.{axis} needs 0 <= min <= opt <= max, got {lo}, {opt}, {hi}"
            )
    for axis, step in info.axis_multiples.items():
        if step <= 0:
            raise PackageError(f"{path}: {where}.axis_multiples.{axis} must be {COUNT}, got {step}")
    named = set(read)
    for kind, tensors in (("inputs", info.inputs), ("outputs", info.outputs)):
        for i, tensor in enumerate(tensors):
            for dim in tensor.shape:
                if isinstance(dim, str):
                    named |= _shape_axes(dim, path, f"{where}.{kind}[{i}].shape")
    missing = sorted(named - info.profile.keys())
    if missing:
        raise PackageError(
            f"{path}: {where}.profile lacks {', '.join(missing)} (axes the graph's tensors or the "
            "runtime use): re-export the package"
        )


def _shape_axes(expr: str, path: Path, where: str) -> set[str]:
    """The axis names of a shape expression the runtime can evaluate (names, ints, + and *)."""
    try:
        if len(expr) > _MAX_SHAPE_EXPR:
            raise ValueError(f"longer than {_MAX_SHAPE_EXPR} characters")
        return axis_names(expr)
    except ValueError as exc:
        raise PackageError(
            f"{path}: {where} has {expr[:40]!r}, not a shape expression (axis names, integers, + and *: "
            f"{exc})"
        ) from None


def _check_prompt(prompt: dict[str, str], path: Path) -> None:
    """prompt.after is formatted with the question: it must hold `{prompt}` once and no other
    replacement field ("{x}" raises KeyError, "{prompt.__class__}" reads attributes). Every prompt
    string is text for the tokenizer: control characters other than tab and newline are refused."""
    for key, text in prompt.items():
        bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n"), None)
        if bad is not None:
            raise PackageError(
                f"{path}: prompt.{key} holds the control character {bad!r} (U+{ord(bad):04X}); prompt "
                "text may hold tabs and newlines, no other control characters"
            )
    try:
        parsed = list(string.Formatter().parse(prompt["after"]))
    except ValueError as exc:
        raise PackageError(
            f"{path}: prompt.after is not a template ({exc}); literal braces are written {{{{ and }}}}"
        ) from None
    fields = [(name, conv, spec) for _, name, spec, conv in parsed if name is not None]
    if fields != [("prompt", None, "")]:
        shown = ", ".join(
            "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            for name, conv, spec in fields
        )
        raise PackageError(
            f"{path}: prompt.after must hold {{prompt}} (where the question goes) once and no other "
            f"field, it has {shown or 'none'}"
        )


def _check_decoding(decoding: dict[str, Any], path: Path) -> None:
    """The decoding defaults, checked as the pipeline will use them (fields it knows, the rest ignored)."""
    known = {k: v for k, v in decoding.items() if k in DecodingOptions.__dataclass_fields__}
    try:
        DecodingOptions(**known)
    except ConfigError as exc:
        raise PackageError(f"{path}: decoding: {exc}") from None
