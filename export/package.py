"""`vsal-export export`: a model package folder from a preset or checkpoint, graph by graph.

The package is self-describing: manifest.json (config, graphs with I/O, axes and profiles, sha256
of every file, tokenizers, special tokens, prompt template, decoding defaults, limits), one ONNX
graph per part, the LLM's token-embedding table and both tokenizers, plus validation.json.
Everything is written into `<output>.partial-<pid>/` and renamed to `<output>` when complete, so a
crashed export never leaves a folder a later run would trust. Parts are built, exported, validated
and freed one at a time, so the 13b preset never holds the whole model.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from vsal.export.config import ModelConfig
from vsal.export.onnx_export import DEFAULT_OPSET, ExportError, GraphValidation, export_graph, validate_graph
from vsal.export.specs import (
    MAX_FRAMES,
    MAX_NEW_TOKENS,
    MAX_PROMPT_TEXT,
    MAX_SLOTS,
    GraphSpec,
    graph_specs,
    llm_decoder_spec,
)
from vsal.export.streaming import WeightSource
from vsal.runtime.graphs import DECODER, GRAPHS
from vsal.runtime.log import sayer
from vsal.runtime.manifest import (
    MANIFEST_NAME,
    FileInfo,
    GraphInfo,
    Manifest,
    TensorInfo,
    save_manifest,
    sha256_file,
)
from vsal.runtime.package_lock import PackageLock, fsync_folder, replacing
from vsal.runtime.package_paths import file_problem
from vsal.runtime.preprocess import Preprocessing
from vsal.runtime.prompt import ANSWER_CUT, PROMPT_AFTER, PROMPT_BEFORE, DecodingOptions

import vsal

ALL_GRAPHS = tuple(GRAPHS)
INSTRUCTION_BOS = 30522  # [DEC], added to bert-base-uncased's 30522 entries


def decoder_step_feeds(config: ModelConfig, prompt_length: int, seed: int = 0) -> tuple[dict, dict]:
    """(prefill, decode) inputs of the llm_decoder graph at batch 1: a prompt of `prompt_length`
    tokens, then one token after it. No clip records the decoder's inputs; scripts time it on these."""
    spec = llm_decoder_spec(config)
    rng = np.random.default_rng(seed)
    prefill = spec.make_inputs({"B": 1, "T": prompt_length, "P": 0}, rng)
    decode = spec.make_inputs({"B": 1, "T": 1, "P": prompt_length}, rng)
    return prefill, decode


def graph_module(name: str, part: nn.Module) -> nn.Module:
    """The module whose forward takes the graph's inputs in spec order."""
    if name == DECODER:
        from vsal.export.llm_graph import LlmDecoderGraph

        return LlmDecoderGraph(part)
    return part


@dataclass
class ExportSource:
    """Where a part's weights come from: seeded random init, or a loader that fills a built part."""

    config: ModelConfig
    random_weights: bool
    fill: Callable[[str, nn.Module], None] | None = None  # (part name, module) -> loads its weights
    seed: int = 0
    # the LLM's tensors one at a time (vsal.export.streaming): the decoder is then exported streaming,
    # never built (the 13b preset, a 13B checkpoint); None: built like every other part
    llm_weights: WeightSource | None = None
    llm_label: str | None = None  # where the LLM's weights come from when not the rest's (`--llm DIR`)

    def weight_sources(self) -> dict[str, str]:
        """What the manifest records of the weights: the encoders' source and the LLM's."""
        rest = (
            f"seeded random (preset {self.config.name}, seed {self.seed})"
            if self.random_weights
            else "checkpoint"
        )
        llm = self.llm_label or rest
        if self.llm_label is None and self.random_weights and self.llm_weights is not None:
            dtype, seed = getattr(self.llm_weights, "dtype", "?"), getattr(self.llm_weights, "seed", "?")
            llm = f"seeded random per tensor ({dtype}, seed {seed})"
        return {"encoders": rest, "llm": llm}

    def part(self, name: str) -> nn.Module:
        from vsal.export.models.video_salmonn import build_part

        module = build_part(self.config, name, self.seed if self.random_weights else None)
        if self.fill is not None:
            self.fill(name, module)
        return module.eval()


STREAM_LLM_BYTES = 4 << 30  # an LLM past this in float32 is exported streaming, never built


def streamed_llm_weights(
    config: ModelConfig,
    random_seed: int | None = 0,
    checkpoint: Path | None = None,
    files: list[Path] | None = None,
    release_dir: Path | None = None,
):
    """The LLM's tensors one at a time where the LLM is too large to build (STREAM_LLM_BYTES in
    float32: the 13b preset), else None. The 13b preset's random weights are float16, as the
    released Vicuna is, drawn per tensor (vsal.export.streaming.RandomWeights: not the values
    `build_model` would draw); a consolidated `checkpoint`, or a folder's safetensors `files`, are
    memory-mapped in their own dtype; the six released files in `release_dir` are read as they lie,
    the LoRA merged per tensor (vsal.export.weights.release_stream)."""
    from vsal.export.streaming import RandomWeights, SafetensorsWeights, consolidated_weights, llama_shapes

    params = sum(int(np.prod(shape)) for shape in llama_shapes(config.llm).values())
    if params * 4 < STREAM_LLM_BYTES:
        return None
    if checkpoint is not None:
        return consolidated_weights(checkpoint)
    if files is not None:
        return SafetensorsWeights(files)
    if release_dir is not None:
        from vsal.export.weights.release_stream import ReleaseLlmWeights

        return ReleaseLlmWeights(release_dir, config)
    return RandomWeights(config.llm, seed=random_seed or 0, dtype="float16")


@dataclass
class TokenizerFiles:
    llm_dir: Path  # holds tokenizer.model or tokenizer.json (+ tokenizer_config.json)
    bert_vocab: Path  # bert-base-uncased vocab.txt

    @property
    def llm_file(self) -> Path:
        """The LLM tokenizer the package ships (tokenizer.model first, as the runtime reads it)."""
        from vsal.runtime.tokenizers import JSON_FILE, SPM_FILE

        spm, json_file = self.llm_dir / SPM_FILE, self.llm_dir / JSON_FILE
        return json_file if json_file.is_file() and not spm.is_file() else spm  # absent: _copy says so


def llm_folder_source(
    config: ModelConfig, llm_dir: str | os.PathLike, bert_vocab: Path, seed: int = 0
) -> tuple[ExportSource, TokenizerFiles]:
    """`--llm DIR`: the preset `config`'s parts with its seeded random weights around the LLM of a
    transformers Llama checkpoint folder (its dims, weights, tokenizer and special tokens)."""
    from vsal.export.weights.llm_folder import llm_filler, read_llm_folder, with_llm

    folder = read_llm_folder(llm_dir)
    config = with_llm(config, folder.config)
    streamed = streamed_llm_weights(config, files=list(folder.weights))
    label = f"transformers checkpoint folder {folder.path.name}"
    source = ExportSource(config, True, llm_filler(folder), seed, llm_weights=streamed, llm_label=label)
    return source, TokenizerFiles(folder.tokenizer.parent, bert_vocab)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an --output that the export could not replace, before any model is built."""
    output = Path(output)
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise ExportError(f"{output}: exists and is not a folder; choose another --output")
    if output.exists():
        is_package = (output / MANIFEST_NAME).is_file()
        if not (overwrite and is_package):
            why = (
                "use --overwrite to replace it"
                if is_package
                else "it is not a vsal package; choose another path"
            )
            raise ExportError(f"{output}: already exists ({why})")
    parent = next(p for p in (output.absolute(), *output.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{output}: cannot create it ({parent} is not a writable folder)")


def _prepare_output(output: Path, overwrite: bool) -> Path:
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.with_name(f"{output.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def _publish(work: Path, output: Path) -> None:
    """Move the finished package to `output`; an existing package is swapped out under its lock (a
    build of it finishes first) and removed after: the path holds a whole package at all times but
    for the instant between two renames."""
    if not output.exists():
        os.replace(work, output)
        return
    with PackageLock(output, "vsal-export export --overwrite"):
        old = output.with_name(f"{output.name}.replaced-{os.getpid()}")
        os.replace(output, old)
        os.replace(work, output)
        fsync_folder(output.parent)
    shutil.rmtree(old)


def export_package(
    source: ExportSource,
    output: str | os.PathLike,
    tokenizers: TokenizerFiles,
    graphs: tuple[str, ...] = ALL_GRAPHS,
    opset: int = DEFAULT_OPSET,
    slim: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Export, validate and package the chosen graphs; returns the manifest written."""
    output = Path(output)
    unknown = set(graphs) - set(ALL_GRAPHS)
    if unknown:
        raise ExportError(f"unknown graphs {sorted(unknown)}; graphs are {', '.join(ALL_GRAPHS)}")
    config = source.config
    specs = graph_specs(config)
    say = sayer("vsal-export", enabled=progress, stdout=True)
    work = _prepare_output(output, overwrite)
    try:
        (work / "graphs").mkdir()
        entries: dict[str, GraphInfo] = {}
        validations: dict[str, dict] = {}
        embeddings = None
        for index, name in enumerate(graphs, 1):
            spec = specs[name]
            if name == DECODER and source.llm_weights is not None:
                say(f"[{index}/{len(graphs)}] {name}: streaming its weights (the model is never built)")
                entry, validation = _export_decoder_streamed(source, spec, work, opset, say)
                embeddings = _embeddings_file(work, source.llm_weights)
            else:
                say(f"[{index}/{len(graphs)}] {name}: building")

                def build(name=name) -> nn.Module:
                    return graph_module(name, source.part(GRAPHS[name].part))

                if name == DECODER:  # the table from the module the export then uses: built once
                    first = [build()]
                    embeddings = _embeddings_file(work, first[0].lm)

                    def built(first=first, build=build) -> nn.Module:
                        return first.pop() if first else build()
                else:
                    built = build
                entry, validation = _export_one(spec, built, work, opset, slim, say)
            entries[name] = entry
            validations[name] = validation
            gc.collect()
        if embeddings is None:
            raise ExportError(
                "the package needs the llm_decoder graph (its token-embedding table ships with it)"
            )
        manifest = Manifest(
            preset=config.name,
            random_weights=source.random_weights,
            weight_sources=source.weight_sources(),
            config=config.to_dict(),
            graphs=entries,
            embeddings=embeddings,
            llm_tokenizer=_copy(tokenizers.llm_file, work, "tokenizer/llm"),
            instruction_tokenizer=_copy(tokenizers.bert_vocab, work, "tokenizer/instruction"),
            special_tokens={
                "bos": config.llm.bos_token_id,
                "eos": config.llm.eos_token_id,
                "pad": config.llm.pad_token_id,
                "instruction_bos": INSTRUCTION_BOS,
            },
            prompt={"before": PROMPT_BEFORE, "after": PROMPT_AFTER, "answer_cut": ANSWER_CUT},
            decoding=DecodingOptions().__dict__,
            limits={
                "max_frames": MAX_FRAMES,
                "max_slots": MAX_SLOTS,
                "max_prompt_text_tokens": MAX_PROMPT_TEXT,
                "max_new_tokens": MAX_NEW_TOKENS,
            },
            vsal_version=vsal.__version__,
            opset=opset,
            kv_cache=config.llm.kv_layout().to_dict(),
            preprocessing=Preprocessing.of_config(config.to_dict()).to_dict(),
        )
        config_src = tokenizers.llm_dir / "tokenizer_config.json"
        if config_src.is_file():
            shutil.copyfile(config_src, work / "tokenizer" / "llm" / "tokenizer_config.json")
        (work / "validation.json").write_text(json.dumps(validations, indent=2) + "\n")
        save_manifest(manifest, work)  # last: a folder without it is never trusted
        _publish(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"package ready: {output}")
    return manifest


def _export_one(
    spec: GraphSpec,
    build: Callable[[], nn.Module],
    work: Path,
    opset: int,
    slim: bool,
    say: Callable[[str], None],
):
    path = work / "graphs" / f"{spec.name}.onnx"
    module = build()
    start = time.perf_counter()  # export_seconds: the export alone, not the build
    say(f"    exporting (dynamo, opset {opset}, axes {', '.join(a.name for a in spec.axes)})")
    files = export_graph(spec, module, path, opset)
    export_seconds = time.perf_counter() - start
    if len(files) > 1:  # weights past 2 GiB: freed while ONNX Runtime holds them, built again after
        del module
        gc.collect()
        module = build
    say(f"    validating against PyTorch at {len(spec.validation_sizes())} sizes")
    validation = validate_graph(spec, module, path)
    slimmed = False
    if slim and len(files) == 1:  # large graphs: slimming would load all weights into memory twice
        slimmed, validation = _try_slim(spec, module, path, validation, say)
    report = validation.to_dict() | {"export_seconds": round(export_seconds, 2), "slimmed": slimmed}
    say("    " + _validation_line(validation) + (" (onnxslim kept)" if slimmed else ""))
    return _graph_entry(spec, work, files), report


def _export_decoder_streamed(source: ExportSource, spec: GraphSpec, work: Path, opset: int, say):
    """The llm_decoder traced on meta, its weights streamed from `source.llm_weights` in their own
    dtype, validated against a PyTorch forward holding one layer at a time (vsal.export.streaming)."""
    from vsal.export.streaming import export_decoder_streaming, validate_streaming

    path = work / "graphs" / f"{spec.name}.onnx"
    weights = source.llm_weights
    say(f"    exporting (traced on meta, opset {opset}, weights streamed one tensor at a time)")
    result = export_decoder_streaming(source.config, weights, path, opset=opset)
    say(f"    {result.weight_bytes / 1e9:.2f} GB of weights in {result.export_seconds:.0f} s")
    say(f"    validating against a layer-at-a-time PyTorch forward at {len(spec.validation_sizes())} sizes")
    validation = validate_streaming(source.config, weights, path)
    report = validation.to_dict() | {
        "export_seconds": round(result.export_seconds, 2),
        "slimmed": False,
        "streamed": True,
        "weight_bytes": result.weight_bytes,
    }
    say("    " + _validation_line(validation))
    return _graph_entry(spec, work, result.files), report


def _graph_entry(spec: GraphSpec, work: Path, files: list[Path]) -> GraphInfo:
    path = files[0]
    return GraphInfo(
        file=str(path.relative_to(work)),
        sha256=sha256_file(path),
        inputs=[TensorInfo(t.name, t.dtype, list(t.shape)) for t in spec.inputs],
        outputs=[TensorInfo(t.name, t.dtype, list(t.shape)) for t in spec.outputs],
        profile=spec.profile(),
        axis_multiples={a.name: a.multiple for a in spec.axes if a.multiple > 1},
        external_data={str(f.relative_to(work)): sha256_file(f) for f in files[1:]},
    )


def _validation_line(validation: GraphValidation) -> str:
    cases = "; ".join(
        ",".join(f"{k}={v}" for k, v in c.sizes.items()) + f": {max(c.max_abs_error.values()):.2e}"
        for c in validation.cases
    )
    return f"max abs error vs PyTorch: {cases}"


def _try_slim(spec, module, path: Path, validation, say: Callable[[str], None]):
    """Simplify with onnxslim; the result replaces the graph only if validation still passes."""
    try:
        import onnx
        import onnxslim
    except ImportError:
        return False, validation
    from vsal.transforms.onnx_io import save_onnx

    try:
        with replacing(path) as slimmed:  # left as it was unless the block ends without an error
            save_onnx(onnxslim.slim(onnx.load(str(path))), slimmed, external=False)
            checked = validate_graph(spec, module, slimmed)
    except Exception as exc:  # a validation mismatch, or onnxslim's own failure: not ours to raise
        say(f"    onnxslim result dropped ({type(exc).__name__}): keeping the exported graph")
        return False, validation
    return True, checked


def _embeddings_file(work: Path, llm: nn.Module | WeightSource) -> FileInfo:
    """The token-embedding table as float32 .npy: from the built LLM, or streamed from its weights."""
    from vsal.export.streaming import write_embeddings

    path = work / "embeddings.npy"
    if isinstance(llm, nn.Module):
        np.save(path, llm.get_input_embeddings().weight.detach().float().numpy())
    else:
        write_embeddings(llm, path)
    return FileInfo(file=path.name, sha256=sha256_file(path))


def _copy(src: Path, work: Path, subdir: str) -> FileInfo:
    if not src.is_file():
        raise ExportError(f"{src}: tokenizer file not found")
    (work / subdir).mkdir(parents=True, exist_ok=True)
    dest = work / subdir / src.name
    shutil.copyfile(src, dest)
    return FileInfo(file=f"{subdir}/{src.name}", sha256=sha256_file(dest))


def check_checkpoint_file(path: Path) -> None:
    """--checkpoint: a readable safetensors file (header read) or torch.save file, checked before
    any model is built."""
    from vsal.export.weights.checkpoints import CheckpointError

    path = Path(path)
    _check_readable_file(path, "--checkpoint", CheckpointError)
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.metadata()
        except (SafetensorError, OSError) as exc:  # a bad header; a file gone since the check
            raise CheckpointError(
                f"{path}: --checkpoint is not a readable safetensors file ({exc})"
            ) from None
    elif not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(
            f"{path}: --checkpoint is neither a .safetensors file nor a torch.save file "
            f"(it starts with {head[:4]!r})"
        )


def check_checkpoint_dir(folder: Path) -> None:
    """--checkpoint-dir: the six released files and folders all there and readable (one message
    listing every one that is not), checked before any model is built."""
    from vsal.export.weights.checkpoints import CheckpointError
    from vsal.export.weights.release_files import RELEASE_SOURCES

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: --checkpoint-dir is not a folder")
    problems = []
    for source in RELEASE_SOURCES:
        path = folder / source.name
        want_dir = Path(source.name).suffix not in (".pt", ".pth")  # the HF folders ("vicuna-13b-v1.5")
        if not path.exists():
            problems.append(f"missing {source.name} ({source.what})")
        elif want_dir != path.is_dir():
            problems.append(f"{source.name}: expected a {'folder' if want_dir else 'file'}")
        elif not os.access(path, os.R_OK | (os.X_OK if want_dir else 0)):
            problems.append(f"{source.name}: not readable")
    if problems:
        raise CheckpointError(
            f"{folder}: --checkpoint-dir needs the six released files: {'; '.join(problems)} "
            "(see docs/checkpoints.md)"
        )


def _check_readable_file(path: Path, option: str, error: type[Exception]) -> None:
    problem = file_problem(path, what="a checkpoint file")
    if problem is not None:
        raise error(f"{path}: {problem} ({option})")
    if path.stat().st_size == 0:
        raise error(f"{path}: {option} is empty (0 bytes)")


def consolidated_filler(path: Path) -> Callable[[str, nn.Module], None]:
    """Load one part's tensors from a consolidated checkpoint (keys `<part>.*`), strictly."""
    from safetensors import safe_open
    from vsal.export.weights.checkpoints import CheckpointError, _derived

    def fill(name: str, module: nn.Module) -> None:
        prefix = name + "."
        params = module.state_dict()
        with safe_open(str(path), framework="pt") as f:
            keys = {k[len(prefix) :] for k in f.keys() if k.startswith(prefix)}
            expected = {k for k in params if not _derived(k)}
            if keys != expected:
                raise CheckpointError(
                    f"{path}: part {name} keys differ: missing {sorted(expected - keys)[:5]}, "
                    f"unexpected {sorted(keys - expected)[:5]}"
                )
            with torch.no_grad():
                for key in keys:
                    tensor = f.get_tensor(prefix + key)
                    if tensor.shape != params[key].shape:
                        want = tuple(params[key].shape)
                        raise CheckpointError(
                            f"{path}: {prefix + key} has shape {tuple(tensor.shape)}, expected {want}"
                        )
                    params[key].copy_(tensor.to(params[key].dtype))

    return fill
