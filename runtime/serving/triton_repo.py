"""A Triton Inference Server model repository from a model package (torch-free).

    REPO/
      vision_encoder/config.pbtxt, 1/...      one model per graph: a TensorRT plan (`tensorrt`),
      frame_qformer/ ...                      an ONNX graph for ONNX Runtime (`onnxruntime`), or an
      whisper_encoder/ beats_encoder/         ONNX graph run by ONNX Runtime inside a Python-backend
      mrc_qformer/ llm_decoder/               model (`python`: servers with only the Python backend)
      vsal/config.pbtxt, 1/model.py,          the orchestrator (Python backend, decoupled): media,
           1/package/                         preprocessing, alignment, prompt, generation through
                                              BLS calls to the graph models; streams text back

Every config comes from the manifest: inputs and outputs with their dtypes, named axes as -1, the
batch axis (a graph whose inputs and outputs all start with the same profile axis is batched by
Triton up to the profile's max; the encoders get dynamic batching) and instance groups.

The repository is written to a temporary folder of its own beside REPO (`.REPO.partial-<pid>-<hex>`,
created afresh: never a folder that was there) and renamed to REPO when complete. REPO is never the
package, inside it or above it, nor the current folder; `overwrite` replaces only a repository this
module wrote (is_repository), never another folder.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path, PurePosixPath

from vsal.runtime import precisions
from vsal.runtime.backends.tensorrt_engines import ENGINE_DIR, cached_engines
from vsal.runtime.errors import VsalError
from vsal.runtime.limits import MAX_NEW_TOKENS_LIMIT, MAX_UPLOAD_MIB
from vsal.runtime.manifest import MANIFEST_NAME, GraphInfo, Manifest, load_manifest
from vsal.runtime.package_lock import stale_partial
from vsal.runtime.package_paths import (
    check_sha256,
    confined,
    inside,
    link_folder,
    place_file,
    write_text_file,
)

FLAVORS = ("tensorrt", "onnxruntime", "python")
MAX_INSTANCES = 64  # instances of a model per device, and orchestrator processes: more is a typo
MAX_ORCHESTRATOR_THREADS = 1024  # requests one orchestrator instance serves at once
ORCHESTRATOR = "vsal"  # the model clients call
ORCHESTRATOR_PACKAGE = "package"  # folder inside the orchestrator's version folder
DTYPES = {  # numpy dtype name -> Triton data type
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int16": "TYPE_INT16",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
# The orchestrator's tensors are UTF-8 text or file bytes as UINT8 [-1] (not BYTES: the Python backend
# stub bundled with Triton 2.51 garbles BYTES inputs under numpy 2; UINT8 works everywhere).
ORCHESTRATOR_INPUTS = (  # name, optional: media arrive as the files' bytes, with their names
    ("PROMPT", False),
    ("VIDEO", True),
    ("VIDEO_NAME", True),
    ("AUDIO", True),
    ("AUDIO_NAME", True),
    ("OPTIONS", True),  # JSON: DecodingOptions fields
)
ORCHESTRATOR_OUTPUTS = ("TEXT", "RESULT")  # a text piece per response; RESULT: the answer as JSON, last


class RepositoryError(VsalError, ValueError):
    """A repository that cannot be written from this package: names the file and the problem."""


@dataclass(frozen=True)
class RepoOptions:
    flavor: str = "python"
    precision: str = "fp32"  # which file of each graph (fp32, or the package's fp16/int8 variant)
    instances: int = 1  # instances per device (per GPU for kind gpu), 1 to MAX_INSTANCES
    device: str | None = None  # "gpu" | "cpu"; None: gpu for tensorrt and onnxruntime, cpu for python
    gpus: tuple[int, ...] = ()  # GPU ids (>= 0, distinct) for the instance groups; empty: every GPU
    max_queue_delay_us: int = 2000  # dynamic batching: how long an encoder request may wait for others
    orchestrator_instances: int = 1  # 1 to MAX_INSTANCES
    orchestrator_threads: int = 16  # requests one orchestrator instance serves at once
    link: bool = False  # symlink package files instead of copying them (`vsal serve`'s temporary repository)
    # "bls": the orchestrator calls the llm_decoder model once per token, the KV cache round-tripping
    # through host memory (fine for small models); "orchestrator": the orchestrator runs the decoder
    # itself (ONNX Runtime, CUDA when it has it, IO binding: the KV cache stays on the device)
    decoder: str = "bls"
    tensorrt: str | None = None  # tensorrt flavor: the engines' TensorRT version, when the cache has several
    compute_capability: str | None = None  # ... and GPU compute capability ("9.0")
    max_upload_mib: int = MAX_UPLOAD_MIB  # the orchestrator refuses a larger media file (video, audio)
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT  # ... and a request for more new tokens


def batch_axis(info: GraphInfo) -> str | None:
    """The axis Triton may batch on: the first dim of every input and output, a profile axis."""
    firsts = {t.shape[0] if t.shape else None for t in [*info.inputs, *info.outputs]}
    if len(firsts) == 1:
        (axis,) = firsts
        if isinstance(axis, str) and axis in info.profile:
            return axis
    return None


def triton_dims(shape: list[int | str], batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) else -1 for d in shape]
    return dims[1:] if batched else dims


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    if dtype not in DTYPES:
        raise RepositoryError(f"tensor {name}: dtype {dtype} has no Triton type")
    text = f'    name: "{name}"\n    data_type: {DTYPES[dtype]}\n    dims: [ {", ".join(map(str, dims))} ]\n'
    if optional:
        text += "    optional: true\n"
    return "  {\n" + text + "  }"


def _tensors(kind: str, items: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(
        f'parameters {{\n  key: "{k}"\n  value: {{ string_value: {json.dumps(v)} }}\n}}\n'
        for k, v in params.items()
    )


def _instance_group(kind: str, count: int, gpus: tuple[int, ...]) -> str:
    gpu_line = f"    gpus: [ {', '.join(map(str, gpus))} ]\n" if kind == "gpu" and gpus else ""
    return f"instance_group [\n  {{\n    count: {count}\n    kind: KIND_{kind.upper()}\n{gpu_line}  }}\n]\n"


def graph_config(name: str, info: GraphInfo, options: RepoOptions, file: str, built_for: str = "") -> str:
    """config.pbtxt of one graph model."""
    axis = batch_axis(info)
    max_batch = info.profile[axis]["max"] if axis else 0
    platform = {
        "tensorrt": 'platform: "tensorrt_plan"\n',
        "onnxruntime": 'platform: "onnxruntime_onnx"\n',
        "python": 'backend: "python"\n',
    }[options.flavor]
    text = f'name: "{name}"\n{platform}max_batch_size: {max_batch}\n'
    if options.flavor == "tensorrt":
        text = f"# engine built for {built_for}: Triton's TensorRT must be the same version\n" + text
    if options.flavor != "python":
        text += f'default_model_filename: "{file}"\n'
    text += _tensors(
        "input", [_tensor(t.name, t.dtype, triton_dims(t.shape, bool(axis))) for t in info.inputs]
    )
    text += _tensors(
        "output", [_tensor(t.name, t.dtype, triton_dims(t.shape, bool(axis))) for t in info.outputs]
    )
    if axis and name.endswith("_encoder"):  # prompt-independent, one request per clip: batch them
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n"
    device = options.device or ("cpu" if options.flavor == "python" else "gpu")
    text += _instance_group(device, options.instances, options.gpus)
    if options.flavor == "python":
        text += _parameters(
            {
                "graph_file": file,
                "graph_info": json.dumps(_graph_info_dict(info)),
                "device": device,
            }
        )
    return text


def _graph_info_dict(info: GraphInfo) -> dict:
    return {
        "inputs": [t.__dict__ for t in info.inputs],
        "outputs": [t.__dict__ for t in info.outputs],
        "profile": info.profile,
        "axis_multiples": info.axis_multiples,
        "batch_axis": batch_axis(info),
    }


def orchestrator_config(manifest: Manifest, options: RepoOptions) -> str:
    local = ["llm_decoder"] if options.decoder == "orchestrator" else []
    text = f'name: "{ORCHESTRATOR}"\nbackend: "python"\nmax_batch_size: 0\n'
    text += "model_transaction_policy {\n  decoupled: true\n}\n"
    text += _tensors("input", [_tensor(n, "uint8", [-1], opt) for n, opt in ORCHESTRATOR_INPUTS])
    text += _tensors("output", [_tensor(n, "uint8", [-1]) for n in ORCHESTRATOR_OUTPUTS])
    device = options.device or ("cpu" if options.flavor == "python" else "gpu")
    kind = "gpu" if local and device == "gpu" else "cpu"  # a local decoder lives on a GPU when there is one
    text += _instance_group(kind, options.orchestrator_instances, options.gpus if kind == "gpu" else ())
    text += _parameters(
        {
            "package": ORCHESTRATOR_PACKAGE,
            "graph_models": json.dumps({g: g for g in manifest.graphs if g not in local}),
            "local_graphs": json.dumps(local),
            "threads": str(options.orchestrator_threads),
            "precision": options.precision,
            "max_upload_mib": str(options.max_upload_mib),
            "max_new_tokens_limit": str(options.max_new_tokens_limit),
        }
    )
    return text


def _engine_file(name: str, info: GraphInfo, options: RepoOptions, package: Path) -> tuple[str, str]:
    """(engine file, what it was built for) from the package's engine cache (`<package>/engines/`,
    written by `vsal-export build --backend tensorrt` or the runtime's TensorRT backend)."""
    file, precision = info.file_for(options.precision)
    sha = info.sha256_for(precision)
    found = []
    for cached in cached_engines(package, name, precision)[0]:
        key = cached.key
        if key.onnx_sha256 != sha:
            continue  # built from another version of the graph
        if options.tensorrt and key.tensorrt != options.tensorrt:
            continue
        if options.compute_capability and key.compute_capability != options.compute_capability:
            continue
        target = f"TensorRT {key.tensorrt}, compute capability {key.compute_capability}"
        found.append((f"{ENGINE_DIR}/{cached.path.name}", target))
    if not found:
        raise RepositoryError(
            f"{package / ENGINE_DIR}: no {precision} TensorRT engine of graph {name} (from {file}); build "
            "engines on the GPU target, inside the Triton container that will serve them "
            "(`vsal-export build --backend tensorrt`), or use --flavor onnxruntime"
        )
    if len(found) > 1:
        targets = "; ".join(t for _, t in found)
        raise RepositoryError(
            f"{package / ENGINE_DIR}: several engines of graph {name} ({targets}): choose one with "
            "--tensorrt-version and --compute-capability"
        )
    return found[0]


def _graph_files(name: str, info: GraphInfo, options: RepoOptions, package: Path) -> list[str]:
    """Package files the graph model needs, the model file first."""
    if options.flavor == "tensorrt":
        return [_engine_file(name, info, options, package)[0]]
    file, precision = info.file_for(options.precision)
    extra = info.variants[precision].external_data if precision in info.variants else info.external_data
    return [file, *sorted(extra)]


def _template(name: str) -> str:
    return resources.files("vsal.runtime.serving.triton_models").joinpath(name).read_text()


def precision_notes(manifest: Manifest, precision: str, package: Path) -> list[str]:
    """One note per graph that has no `precision` variant (it ships fp32); RepositoryError when no
    graph has one: a repository that silently ships fp32 for fp16 is never written."""
    if precisions.get(precision).is_export:
        return []
    lacking = [name for name, info in manifest.graphs.items() if precision not in info.variants]
    if len(lacking) == len(manifest.graphs):
        raise RepositoryError(
            f"{package}: no graph has its {precision} variant; build them first "
            f"(`vsal-export build {package} --precision {precision}`) or ask for --precision fp32"
        )
    return [f"{name}: no {precision} variant in the package, ships its fp32 graph" for name in lacking]


class _Writer:
    """Places package files in the repository being written: confined sources, sha256 checked
    against the manifest, destinations inside the repository only (package_paths.place_file)."""

    def __init__(self, package: Path, manifest: Manifest, root: Path, link: bool):
        self.package, self.root, self.link = package, root, link
        self.digests = manifest.files()

    def place(self, name: str, dst: Path) -> None:
        src = confined(self.package, name, "file", must_exist=True)
        # Engines are not hashed in the manifest (their records key them by the ONNX's sha256).
        place_file(src, dst, self.digests.get(name), self.root, link=self.link)

    def verify(self, name: str) -> None:
        check_sha256(confined(self.package, name, "file", must_exist=True), self.digests.get(name))

    def text(self, dst: Path, text: str) -> None:
        write_text_file(dst, text, self.root)


def _write_graph(name: str, info: GraphInfo, options: RepoOptions, writer: _Writer) -> None:
    """One graph model: its files under version 1, and its config."""
    package = writer.package
    files = _graph_files(name, info, options, package)
    model_file = "model.plan" if options.flavor == "tensorrt" else PurePosixPath(files[0]).name
    version = writer.root / name / "1"
    writer.place(files[0], version / model_file)
    for extra in files[1:]:  # external weights, under the names the graph refers to
        writer.place(extra, version / PurePosixPath(extra).name)
    if options.flavor == "python":
        writer.text(version / "model.py", _template("onnx_graph.py"))
    built_for = _engine_file(name, info, options, package)[1] if options.flavor == "tensorrt" else ""
    shipped = info.interface(options.precision)  # a variant's own I/O where it differs (fp16 KV cache)
    writer.text(
        writer.root / name / "config.pbtxt", graph_config(name, shipped, options, model_file, built_for)
    )


def _write_orchestrator(manifest: Manifest, options: RepoOptions, local: list[str], writer: _Writer) -> None:
    """The orchestrator model, with the package files it reads itself under their package names:
    copies, or with `link` one symlink to the package folder (the orchestrator loads it as a package,
    and a package's files must lie inside its folder: links to each file would be refused)."""
    folder = writer.root / ORCHESTRATOR / "1" / ORCHESTRATOR_PACKAGE
    files = [
        info.file for info in (manifest.embeddings, manifest.llm_tokenizer, manifest.instruction_tokenizer)
    ]
    for name in local:  # graphs the orchestrator runs itself
        files += _graph_files(
            name, manifest.graphs[name], replace(options, flavor="onnxruntime"), writer.package
        )
    if writer.link:
        for file in files:
            writer.verify(file)
        link_folder(writer.package, folder, writer.root)
    else:
        for file in files:
            writer.place(file, folder / file)
        writer.text(folder / MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2) + "\n")  # as checked
    writer.text(folder.parent / "model.py", _template("orchestrator.py"))
    writer.text(writer.root / ORCHESTRATOR / "config.pbtxt", orchestrator_config(manifest, options))


def parse_gpus(text: str) -> tuple[int, ...]:
    """`--gpus 0,1` as GPU ids; RepositoryError for anything but comma-separated ids >= 0."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise RepositoryError(f"expected comma-separated GPU ids such as 0,1 (each >= 0), got {text!r}")
    return tuple(int(part) for part in parts)


def _check_count(label: str, value: int, most: int) -> None:
    if not 1 <= value <= most:
        raise RepositoryError(f"{label}: expected a count from 1 to {most}, got {value}")


def _check_options(options: RepoOptions) -> None:
    if options.flavor not in FLAVORS:
        raise RepositoryError(f"unknown flavor {options.flavor!r}; choose one of {', '.join(FLAVORS)}")
    if options.precision not in precisions.names():
        raise RepositoryError(
            f"unknown precision {options.precision!r}; choose {', '.join(precisions.names())}"
        )
    if options.decoder not in ("bls", "orchestrator"):
        raise RepositoryError(f"unknown decoder placement {options.decoder!r}; choose bls or orchestrator")
    _check_count("--instances", options.instances, MAX_INSTANCES)
    _check_count("--orchestrator-instances", options.orchestrator_instances, MAX_INSTANCES)
    _check_count("orchestrator_threads", options.orchestrator_threads, MAX_ORCHESTRATOR_THREADS)
    gpus = options.gpus
    if any(not isinstance(g, int) or g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise RepositoryError(f"--gpus: expected distinct GPU ids >= 0, got {','.join(map(str, gpus))}")


def _output_path(output: str | os.PathLike, package: Path) -> Path:
    """OUTPUT as an absolute path (`.` and `..` named), refused where writing or replacing it could
    destroy the package or the current folder: it must not be the package, lie inside it or contain
    it, nor be or contain the current folder; compared by real paths, also where a symlink leads."""
    out = Path(os.path.abspath(output))
    if not out.name:
        raise RepositoryError(f"{output}: is the root folder; choose a new folder for --output")
    real_package = os.path.realpath(package)
    cwd = os.path.realpath(os.getcwd())
    where = os.path.join(os.path.realpath(out.parent), out.name)  # the folder the rename makes
    for real in dict.fromkeys((where, os.path.realpath(out))):  # ... and a symlink's target there
        shown = f"{output} (resolves to {real})" if real != str(out) else str(output)
        if real == real_package:
            problem = f"is the package {package}"
        elif inside(real, real_package):
            problem = f"lies inside the package {package}"
        elif inside(real_package, real):
            problem = f"contains the package {package}"
        elif inside(cwd, real):
            problem = "is the current folder or contains it"
        else:
            continue
        raise RepositoryError(
            f"{shown}: {problem}; choose another --output, such as a new folder beside the package"
        )
    return out


def _check_existing(out: Path, overwrite: bool) -> None:
    """What is at OUTPUT may be replaced only with `overwrite`, and only a symlink (removed, never
    followed) or a repository this module wrote: never another folder or a file."""
    if not os.path.lexists(out) or (overwrite and out.is_symlink()):
        return
    if not out.is_symlink() and not (out.is_dir() and is_repository(out)):
        raise RepositoryError(
            f"{out}: exists and is not a Triton repository written by vsal-export triton: choose "
            "another --output or remove it yourself"
        )
    if not overwrite:
        raise RepositoryError(f"{out}: already exists (give --overwrite to replace it)")


def _temporary_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")


def _make_temporary(out: Path) -> Path:
    """A new, empty folder beside OUTPUT: mkdir fails on a name that exists, so never someone's."""
    while True:
        tmp = _temporary_name(out)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary folders of OUTPUT left by writers that died (their pid is gone), and only those."""
    prefix = f".{out.name}.partial-"
    for entry in os.scandir(out.parent):
        path = Path(entry.path)
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False) and stale_partial(path):
            shutil.rmtree(path, ignore_errors=True)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, deepest first (removed again if the write fails)."""
    created = []
    path = folder
    while not os.path.lexists(path):
        created.append(path)
        path = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete repository to OUTPUT; an old repository there is renamed away first and
    then removed, a symlink there is removed (its target is not touched)."""
    _check_existing(out, overwrite)  # again: writing a large package takes a while
    if out.is_symlink():
        out.unlink()
    elif os.path.lexists(out):
        old = _temporary_name(out)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed as stale by a later write
        return
    os.rename(tmp, out)


def write_repository(
    package: str | os.PathLike,
    output: str | os.PathLike,
    options: RepoOptions = RepoOptions(),
    *,
    overwrite: bool = False,
) -> Path:
    """Write the Triton model repository for a package; returns its folder (absolute).

    See the module's docstring for where it is written and what OUTPUT may be. Every package file is
    confined to the package and its sha256 checked against the manifest, also when linked (`link`)."""
    _check_options(options)
    package = Path(package)
    out = _output_path(output, package)
    manifest = load_manifest(package)
    _check_existing(out, overwrite)
    for note in precision_notes(manifest, options.precision, package):
        print(f"vsal: note: {note}", file=sys.stderr)
    created = _make_parents(out.parent)
    tmp = None
    try:
        _remove_stale_temporaries(out)
        tmp = _make_temporary(out)
        writer = _Writer(package, manifest, tmp, options.link)
        local = ["llm_decoder"] if options.decoder == "orchestrator" else []
        for name, info in manifest.graphs.items():
            if name not in local:
                _write_graph(name, info, options, writer)
        _write_orchestrator(manifest, options, local, writer)
        _install(tmp, out, overwrite)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    return out


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                return  # not empty (someone else's now) or not ours to remove


def is_repository(folder: str | os.PathLike) -> bool:
    """A folder written by write_repository (it holds the orchestrator model)."""
    return (Path(folder) / ORCHESTRATOR / "config.pbtxt").is_file()
