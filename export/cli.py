"""`vsal-export`: a thin click CLI over vsal.export's Python API."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import click
from vsal.runtime.cli import run_cli
from vsal.runtime.registry_choice import precision_choice

RANDOM_WEIGHTS_NOTICE = (
    "note: preset {name!r} has seeded random weights: its answers are meaningless until real "
    "checkpoints are given (--checkpoint or --checkpoint-dir)"
)
LLM_FOLDER_NOTICE = (
    "note: the LLM decoder is {folder}'s; the encoders keep preset {name!r}'s seeded random weights, "
    "so answers about media are meaningless (the decoder's perplexity is real: vsal perplexity)"
)


def main() -> None:
    run_cli(cli, "vsal-export")


@click.group(help="Export video-SALMONN: model parts, checkpoints, the PyTorch reference pipeline.")
@click.version_option(package_name="vsal")
def cli() -> None:
    pass


@cli.command(help="List the built-in model presets with their parameter counts.")
def presets() -> None:
    import torch
    from vsal.export import build_model
    from vsal.export import presets as preset_table

    for name in preset_table.names():
        with torch.device("meta"):  # shapes only: no memory, even for 13b
            counts = build_model(preset_table.get(name)).parameter_counts()
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
        click.echo(f"{name:6s} {sum(counts.values()) / 1e6:9.1f}M  ({parts})")


def _model_options(fn):
    fn = click.option(
        "--checkpoint-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Folder with the six released files (see docs/checkpoints.md).",
    )(fn)
    fn = click.option(
        "--checkpoint",
        type=click.Path(path_type=Path, dir_okay=False),
        help="A consolidated checkpoint from `vsal-export convert`.",
    )(fn)
    fn = click.option(
        "--preset", default=None, help="Built-in preset with seeded random weights (default: tiny)."
    )(fn)
    return fn


def _load(preset: str | None, checkpoint: Path | None, checkpoint_dir: Path | None):
    """(model, llama tokenizer folder, bert tokenizer folder) for the chosen weights."""
    from vsal.export import build_model, presets
    from vsal.export.assets import ensure_tokenizer_assets

    chosen = sum(x is not None for x in (preset, checkpoint, checkpoint_dir))
    if chosen > 1:
        raise click.UsageError("give only one of --preset, --checkpoint, --checkpoint-dir")
    _check_weights(preset, checkpoint, checkpoint_dir)
    assets = ensure_tokenizer_assets()
    llama_dir, bert_dir = assets.llama_dir, assets.bert_vocab.parent
    if checkpoint is not None:
        from vsal.export.weights.consolidated import load_consolidated

        model = load_consolidated(checkpoint)
    elif checkpoint_dir is not None:
        from vsal.export.weights.release_files import load_release_files

        model, report = load_release_files(checkpoint_dir, presets.get("13b"), progress=True)
        click.echo(report.summary(), err=True)
        llama_dir = Path(checkpoint_dir) / "vicuna-13b-v1.5"
    else:
        name = preset or "tiny"
        model = build_model(presets.get(name))
        click.echo(RANDOM_WEIGHTS_NOTICE.format(name=name), err=True)
    return model, llama_dir, bert_dir


@cli.command(help="Answer a prompt about a clip with the PyTorch reference pipeline (fp32, CPU).")
@_model_options
@click.option("--video", type=click.Path(path_type=Path), help="Video file (its audio track is used too).")
@click.option("--audio", type=click.Path(path_type=Path), help="Audio file (alone, or beside --video).")
@click.option("--prompt", required=True, help="The question.")
@click.option("--beams", default=5, show_default=True, help="Beam width (1 = greedy; the release uses 5).")
@click.option("--max-new-tokens", default=512, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print answer, token ids and timing as JSON.")
def reference(
    preset, checkpoint, checkpoint_dir, video, audio, prompt, beams, max_new_tokens, as_json
) -> None:
    import time

    from vsal.export.reference import ReferencePipeline
    from vsal.runtime.prompt import DecodingOptions

    if video is None and audio is None:
        raise click.UsageError("give --video, --audio or both")
    options = DecodingOptions(num_beams=beams, max_new_tokens=max_new_tokens)
    model, llama_dir, bert_dir = _load(preset, checkpoint, checkpoint_dir)
    pipeline = ReferencePipeline(model, llama_dir, bert_dir)
    start = time.perf_counter()
    answer = pipeline.ask(prompt, video=video, audio=audio, options=options)
    seconds = time.perf_counter() - start
    if as_json:
        click.echo(
            json.dumps(
                {
                    "answer": answer.text,
                    "token_ids": answer.token_ids,
                    "av_tokens": answer.av_tokens,
                    "seconds": round(seconds, 3),
                }
            )
        )
    else:
        click.echo(answer.text if answer.text.strip() else "(empty answer)")
        click.echo(
            f"[{len(answer.token_ids)} tokens from {answer.av_tokens} clip tokens in {seconds:.1f} s]",
            err=True,
        )


DEFAULT_PACKAGE = Path("vsal-models") / "tiny"
MIN_OPSET = 18  # torch.onnx's dynamo exporter implements 18 (it converts to lower ones, or silently keeps 18)
MAX_OPSET = 23  # torch.onnx's ONNX_MAX_OPSET (torch 2.13): later ones are untested by torch and by vsal
MAX_WORKSPACE_MIB = 1 << 20  # 1 TiB, as vsal.export.build.MAX_WORKSPACE_BYTES (which imports torch)


class _Fraction(click.FloatRange):
    """A number from 0 to 1; NaN too is refused (click's range check lets it through)."""

    name = "fraction"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number from 0 to 1", param, ctx)
        return number


FRACTION = _Fraction(0.0, 1.0)


@cli.command(
    help="The built-in default job: export the tiny preset, generate a clip, ask about it with the runtime."
)
@click.option(
    "--package",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_PACKAGE,
    show_default=True,
    help="Model package to use; the tiny preset is exported there if absent.",
)
@click.option("--prompt", default="What happens in the video and what can be heard?", show_default=True)
def demo(package: Path, prompt: str) -> None:
    from vsal.export import presets
    from vsal.export.assets import ensure_tokenizer_assets
    from vsal.export.package import ExportSource, TokenizerFiles, export_package
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions
    from vsal.runtime.synthetic import write_clip

    if not (package / "manifest.json").is_file():
        click.echo(RANDOM_WEIGHTS_NOTICE.format(name="tiny"), err=True)
        assets = ensure_tokenizer_assets()
        export_package(
            ExportSource(presets.get("tiny"), random_weights=True),
            package,
            TokenizerFiles(assets.llama_dir, assets.bert_vocab),
        )
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "demo.mp4", seconds=10.0)
        click.echo(f"generated a 10 s clip with a tone sweep; asking: {prompt}", err=True)
        click.echo(f"(the same as: vsal run {package} --video CLIP --prompt ... --beams 1)", err=True)
        pipeline = Pipeline.load(package)
        answer = pipeline.ask(
            prompt,
            video=clip,
            options=DecodingOptions(num_beams=1, max_new_tokens=24),
            on_text=lambda piece: click.echo(piece, nl=False),
        )
    click.echo()
    click.echo(f"[{len(answer.token_ids)} tokens from {answer.av_tokens} clip tokens]", err=True)


@cli.command(help="Write one consolidated checkpoint (LoRA merged) from the six released files.")
@click.option("--checkpoint-dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--output",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Output .safetensors file.",
)
def convert(checkpoint_dir: Path, output: Path) -> None:
    from vsal.export import presets
    from vsal.export.package import check_checkpoint_dir
    from vsal.export.weights.consolidated import convert_release_files

    check_checkpoint_dir(checkpoint_dir)
    report = convert_release_files(checkpoint_dir, output, presets.get("13b"), progress=True)
    click.echo(report.summary(), err=True)
    click.echo(f"wrote {output}")


@cli.command(
    name="export", help="Export a model package: ONNX graphs validated against PyTorch, manifest, tokenizers."
)
@_model_options
@click.option(
    "--output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Package folder."
)
@click.option(
    "--opset",
    default=None,
    type=click.IntRange(MIN_OPSET, MAX_OPSET),
    help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: vsal's tested one, 18).",
)
@click.option("--graphs", default=None, help="Comma-separated subset of graphs (default: all).")
@click.option("--no-slim", is_flag=True, help="Skip onnxslim (it is kept only when validation still passes).")
@click.option("--overwrite", is_flag=True, help="Replace an existing package at --output.")
@click.option(
    "--llm",
    "llm_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A transformers Llama checkpoint folder (config.json, safetensors, tokenizer): the package's "
    "LLM decoder, embeddings and LLM tokenizer; the other graphs from --preset (default: tiny).",
)
def export(preset, checkpoint, checkpoint_dir, output, opset, graphs, no_slim, overwrite, llm_dir) -> None:
    from vsal.export.onnx_export import DEFAULT_OPSET
    from vsal.export.package import ALL_GRAPHS, check_output, export_package

    chosen = _graph_names(graphs) or ALL_GRAPHS
    unknown = [g for g in chosen if g not in ALL_GRAPHS]
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)}: graphs are {', '.join(ALL_GRAPHS)}", param_hint="--graphs"
        )
    check_output(output, overwrite)  # before any model is built: these fail in seconds, not hours
    _check_weights(preset, checkpoint, checkpoint_dir)
    if llm_dir is not None and (checkpoint is not None or checkpoint_dir is not None):
        raise click.UsageError(
            "--llm takes the LLM from a folder and the rest from --preset: "
            "give it without --checkpoint or --checkpoint-dir"
        )
    if llm_dir is not None:
        source, tokenizers = _llm_folder_source(preset, llm_dir)
        click.echo(LLM_FOLDER_NOTICE.format(folder=llm_dir, name=source.config.name), err=True)
    else:
        source, tokenizers = _export_source(preset, checkpoint, checkpoint_dir)
        if source.random_weights:
            click.echo(RANDOM_WEIGHTS_NOTICE.format(name=source.config.name), err=True)
    manifest = export_package(
        source,
        output,
        tokenizers,
        graphs=chosen,
        opset=opset or DEFAULT_OPSET,
        slim=not no_slim,
        overwrite=overwrite,
    )
    click.echo(f"exported {len(manifest.graphs)} graphs to {output}")


def _graph_names(graphs: str | None) -> tuple[str, ...] | None:
    """The graphs a --graphs option names; None when it is not given. An empty name is refused:
    `--graphs ''` (a variable that expanded to nothing) must not mean every graph."""
    if graphs is None:
        return None
    names = tuple(g.strip() for g in graphs.split(","))
    if not all(names):
        raise click.BadParameter(
            f"{graphs!r} has an empty graph name; give comma-separated names, or leave --graphs out for all",
            param_hint="--graphs",
        )
    return names


def _check_weights(preset, checkpoint: Path | None, checkpoint_dir: Path | None) -> None:
    """Every weights option checked (files there, readable, of the right kind) before a model is built."""
    from vsal.export import presets
    from vsal.export.package import check_checkpoint_dir, check_checkpoint_file

    if checkpoint is not None and checkpoint_dir is not None:
        raise click.UsageError("give only one of --checkpoint, --checkpoint-dir")
    if preset is not None:
        presets.get(preset)
    if checkpoint is not None:
        check_checkpoint_file(checkpoint)
    if checkpoint_dir is not None:
        check_checkpoint_dir(checkpoint_dir)


def _export_source(preset, checkpoint, checkpoint_dir):
    """(ExportSource, TokenizerFiles) for the chosen weights; part loaders never hold the whole model,
    and nothing but the package is written (the released files are read as they lie)."""
    from vsal.export import build_model, presets
    from vsal.export.assets import ensure_tokenizer_assets
    from vsal.export.package import ExportSource, TokenizerFiles, consolidated_filler, streamed_llm_weights

    if checkpoint is not None and checkpoint_dir is not None:
        raise click.UsageError("give only one of --checkpoint, --checkpoint-dir")
    assets = ensure_tokenizer_assets()
    tokenizers = TokenizerFiles(assets.llama_dir, assets.bert_vocab)
    if checkpoint_dir is not None:
        from vsal.export.weights.release_files import VICUNA_FOLDER
        from vsal.export.weights.release_stream import release_part_filler

        config = presets.get(preset or "13b")
        click.echo(f"reading the released files in {checkpoint_dir} part by part (LoRA merged)", err=True)
        vicuna = Path(checkpoint_dir) / VICUNA_FOLDER
        if (vicuna / "tokenizer.model").is_file():
            tokenizers = TokenizerFiles(vicuna, assets.bert_vocab)
        fill = release_part_filler(checkpoint_dir, config)  # every part checked before any export
        llm = streamed_llm_weights(config, release_dir=checkpoint_dir)
        return ExportSource(config, False, fill, llm_weights=llm), tokenizers
    if checkpoint is not None:
        from vsal.export.weights.consolidated import FORMAT, read_consolidated_config

        if _is_consolidated(checkpoint, FORMAT):
            config = read_consolidated_config(checkpoint)
            llm = streamed_llm_weights(config, checkpoint=checkpoint)
            return ExportSource(config, False, consolidated_filler(checkpoint), llm_weights=llm), tokenizers
        # One state dict in the release's key layout: small models only (the whole model is built).
        config = presets.get(preset or "13b")
        model = build_model(config, seed=None)
        report = model.load_release_state_dict(_read_state_dict(checkpoint))
        click.echo(report.summary(), err=True)

        def fill(name, module):
            module.load_state_dict(getattr(model, name).state_dict())

        return ExportSource(config, False, fill), tokenizers
    config = presets.get(preset or "tiny")
    return ExportSource(config, True, llm_weights=streamed_llm_weights(config)), tokenizers


def _llm_folder_source(preset: str | None, llm_dir: Path):
    """(ExportSource, TokenizerFiles) of `--llm DIR`: the folder is checked before a model is built."""
    from vsal.export import presets
    from vsal.export.assets import ensure_tokenizer_assets
    from vsal.export.package import llm_folder_source

    config = presets.get(preset or "tiny")
    return llm_folder_source(config, llm_dir, ensure_tokenizer_assets().bert_vocab)


def _is_consolidated(path: Path, format_name: str) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == format_name
    except Exception:
        return False


def _read_state_dict(path: Path):
    from vsal.export.weights.checkpoints import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    from vsal.export.weights.release_files import _torch_load

    data = _torch_load(path)
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(data).__name__}")
    return data


@cli.command(
    help="Check a package against TensorRT 10/11's documented ONNX support, and its integrity (no GPU)."
)
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(model_dir: Path, as_json: bool) -> None:
    from vsal.export.check import main_check

    sys.exit(main_check(model_dir, as_json))


def _gpu_ids(ctx, param, value: str | None) -> tuple[int, ...]:
    from vsal.runtime.serving.triton_repo import RepositoryError, parse_gpus

    try:
        return parse_gpus(value) if value is not None else ()
    except RepositoryError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command(help="Write a Triton Inference Server model repository for a package (see docs/serving.md).")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Repository folder.")
@click.option(
    "--flavor",
    type=click.Choice(["tensorrt", "onnxruntime", "python"]),
    default="tensorrt",
    show_default=True,
    help="Graph models: TensorRT plans, ONNX Runtime graphs, or ONNX Runtime inside the Python backend.",
)
@click.option("--precision", type=precision_choice(), default="fp32", show_default=True)
@click.option(
    "--instances", default=1, show_default=True, help="Instances of each graph model per device (1 to 64)."
)
@click.option(
    "--gpus",
    default=None,
    callback=_gpu_ids,
    help="Comma-separated GPU ids for the instance groups (default: all).",
)
@click.option(
    "--tensorrt-version", default=None, help="tensorrt: the engines' TensorRT version (if several)."
)
@click.option("--compute-capability", default=None, help="tensorrt: the engines' GPU (e.g. 9.0), if several.")
@click.option(
    "--decoder",
    type=click.Choice(["bls", "orchestrator"]),
    default="bls",
    show_default=True,
    help="LLM decoder as its own model (bls: KV cache through host memory) or inside the orchestrator "
    "(ONNX Runtime with IO binding: the KV cache stays on the GPU; the choice for the 13b).",
)
@click.option(
    "--orchestrator-instances",
    default=1,
    show_default=True,
    help="Processes of the orchestrator (media decoding and preprocessing are Python: one core each; "
    "1 to 64).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing repository at --output.")
def triton(
    model_dir,
    output,
    flavor,
    precision,
    instances,
    gpus,
    tensorrt_version,
    compute_capability,
    decoder,
    orchestrator_instances,
    overwrite,
) -> None:
    from vsal.runtime.serving.triton_repo import RepoOptions, write_repository

    options = RepoOptions(
        flavor=flavor,
        precision=precision,
        instances=instances,
        gpus=gpus,
        tensorrt=tensorrt_version,
        compute_capability=compute_capability,
        decoder=decoder,
        orchestrator_instances=orchestrator_instances,
    )
    repo = write_repository(model_dir, output, options, overwrite=overwrite)
    click.echo(f"wrote a Triton model repository ({flavor}, {precision}) to {repo}; model 'vsal' serves it")


@cli.command(
    help="Record each graph's inputs on real media for calibrated precisions (int8), stored in the package: "
    "a later build reads them while the graphs are the same."
)
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--media",
    "media_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder of video/audio files; one in four is held out to check accuracy.",
)
@click.option("--max-clips", type=click.IntRange(min=2), default=None, help="Use at most this many files.")
def calibrate(model_dir: Path, media_dir: Path, max_clips: int | None) -> None:
    from vsal.calib.collect import media_files
    from vsal.export.build import calibrate as record

    paths = record(model_dir, media_files(media_dir, max_clips))
    click.echo(f"calibration sets: {', '.join(str(p) for p in paths.values())}")


@cli.command(
    help="Add a precision's graphs (fp16, int8, ...: the registered ones) with an accuracy report to a "
    "package; no folder: the tiny preset."
)
@click.argument("model_dir", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--precision", required=True, type=precision_choice())
@click.option(
    "--calib-media",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder of real media to calibrate (int8) and check accuracy on (one in four held out).",
)
@click.option("--max-clips", type=click.IntRange(min=2), default=None)
@click.option(
    "--backend",
    type=click.Choice(["auto", "tensorrt", "onnxruntime"]),
    default="auto",
    show_default=True,
    help="onnxruntime: graphs only; tensorrt: also engines (needs TensorRT on this machine).",
)
@click.option("--graphs", default=None, help="Comma-separated subset of graphs (default: all).")
@click.option(
    "--min-cosine",
    type=FRACTION,
    default=0.99,
    show_default=True,
    help="Per graph, against fp32 on held-out inputs (0 to 1).",
)
@click.option(
    "--min-token-agreement",
    type=FRACTION,
    default=0.5,
    show_default=True,
    help="Greedy tokens equal to fp32's (0 to 1).",
)
@click.option(
    "--allow-below",
    is_flag=True,
    help="Record a build below the thresholds anyway (marked below threshold in the manifest), exit 0.",
)
@click.option(
    "--workspace-mib",
    type=click.IntRange(1, MAX_WORKSPACE_MIB),
    default=None,
    help="TensorRT builder scratch memory limit (small devices: e.g. 1024 on an Orin Nano).",
)
def build(
    model_dir,
    precision,
    calib_media,
    max_clips,
    backend,
    graphs,
    min_cosine,
    min_token_agreement,
    allow_below,
    workspace_mib,
) -> None:
    from vsal.calib.collect import media_files
    from vsal.export.build import Thresholds
    from vsal.export.build import build as run_build

    thresholds = Thresholds(min_cosine, min_token_agreement)
    chosen = _graph_names(graphs)
    engines = _tensorrt_usable(backend)
    if model_dir is None:
        model_dir = DEFAULT_PACKAGE
        if not (model_dir / "manifest.json").is_file():
            click.echo(f"no package given: exporting the tiny preset to {model_dir} first", err=True)
            ctx = click.get_current_context()
            ctx.invoke(export, output=model_dir)
    media = media_files(calib_media, max_clips) if calib_media else None
    report = run_build(
        model_dir,
        precision,
        media,
        chosen,
        thresholds,
        engines=engines,
        workspace_bytes=workspace_mib * 2**20 if workspace_mib else None,
        allow_below=allow_below,
    )
    click.echo(report.format())
    if report.problems and not report.recorded:
        click.echo(
            "vsal-export: error: the build is below its accuracy thresholds: nothing was recorded, "
            f"the package is as it was (report: {model_dir / f'build_{precision}.rejected.json'}; "
            "--allow-below records it anyway)",
            err=True,
        )
        sys.exit(1)


def _tensorrt_usable(backend: str) -> bool:
    """Whether to build engines: always for tensorrt (or a clear error why not), when TensorRT and a
    GPU are both here for auto, never for onnxruntime."""
    if backend == "onnxruntime":
        return False
    from vsal.runtime.backends.tensorrt_engines import EngineError, compute_capability, import_tensorrt

    try:
        import_tensorrt()
        compute_capability()
    except EngineError as exc:
        if backend == "tensorrt":
            raise click.UsageError(f"--backend tensorrt: {exc}") from None
        click.echo(f"vsal-export: no TensorRT engines on this machine ({str(exc).split(':')[0]})", err=True)
        return False
    return True
