"""`vsal`: the torch-free command line: run, chat, probe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from vsal.runtime.errors import VsalError
from vsal.runtime.limits import MAX_NEW_TOKENS_LIMIT, MAX_UPLOAD_MIB, PORTS
from vsal.runtime.registry_choice import backend_choice, precision_choice


def run_cli(group: click.Group, prog: str) -> None:
    """Run a click group: a user mistake (the `VsalError` tree) is one line on stderr and exit code 1.

    An OSError that names a file (a full disk, a folder without write permission) is the machine's
    answer about the user's file, so it is one line too. Anything else is a bug: it keeps its
    traceback, followed by one line that says so (exit code 3).
    """
    try:
        group(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except VsalError as exc:
        click.echo(f"{prog}: error: {exc}", err=True)
        sys.exit(1)
    except MemoryError:
        click.echo(
            f"{prog}: error: out of memory; use a smaller input, fewer beams or --max-new-tokens, "
            "or a machine with more memory",
            err=True,
        )
        sys.exit(1)
    except OSError as exc:
        if exc.filename is None:
            _report_bug(prog)
        click.echo(f"{prog}: error: {exc.filename}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    except Exception:
        _report_bug(prog)


def _report_bug(prog: str) -> None:
    import traceback

    traceback.print_exc()
    click.echo(
        f"{prog}: internal error (a bug in vsal, not in your input): please report the traceback", err=True
    )
    sys.exit(3)


def main() -> None:
    run_cli(cli, "vsal")


@click.group(help="Run video-SALMONN without torch.")
@click.version_option(package_name="vsal")
def cli() -> None:
    pass


@cli.command(help="Show what the release's sampling takes from a media file.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def probe(path: Path, as_json: bool) -> None:
    from vsal.runtime.media import probe_media
    from vsal.runtime.preprocess import MAX_AUDIO_SECONDS

    info = probe_media(path)
    if as_json:
        click.echo(json.dumps(info.to_dict()))
        return
    click.echo(f"{path}")
    if info.video_seconds is not None:
        click.echo(
            f"  video: {info.video_codec} {info.width}x{info.height}, {info.video_seconds:.2f} s -> "
            f"{info.clips} clips, {2 * info.clips} frames at 2 fps"
            + (" (truncated to the release's 60 s)" if info.truncated else "")
        )
    else:
        click.echo("  video: none")
    if info.audio_seconds is not None:
        click.echo(
            f"  audio: {info.audio_codec} {info.sample_rate} Hz, {info.channels} channel(s), "
            f"{info.audio_seconds:.2f} s"
            + (
                f" (the encoders read its first {MAX_AUDIO_SECONDS:.0f} s; nothing after is decoded)"
                if info.audio_seconds > MAX_AUDIO_SECONDS
                else ""
            )
        )
    else:
        click.echo("  audio: none")


def _decoding_options(max_new_tokens, beams, sample, temperature, top_p, top_k, seed):
    from vsal.runtime.prompt import DecodingOptions

    if sample and beams is not None and beams > 1:
        raise click.UsageError("--sample draws one sequence: leave out --beams")
    return DecodingOptions(
        num_beams=1 if sample else (beams if beams is not None else DecodingOptions().num_beams),
        max_new_tokens=max_new_tokens,
        sample=sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )


def _generation_options(fn):
    for option in reversed(
        [
            click.option(
                "--max-new-tokens", default=512, show_default=True, help="Stop after this many tokens."
            ),
            click.option(
                "--beams", type=int, default=None, help="Beam width (the release's default: 5; 1 = greedy)."
            ),
            click.option("--sample", is_flag=True, help="Sample instead of searching (one beam)."),
            click.option("--temperature", default=1.0, show_default=True),
            click.option("--top-p", default=1.0, show_default=True),
            click.option("--top-k", default=0, show_default=True, help="0 = off."),
            click.option("--seed", type=int, default=None, help="Sampling seed (repeatable answers)."),
            click.option(
                "--provider",
                type=click.Choice(["cpu", "cuda", "tensorrt"]),
                default=None,
                help="ONNX Runtime execution provider (default: the best this machine has).",
            ),
            click.option(
                "--backend",
                "engine",
                type=backend_choice(),
                default="onnxruntime",
                show_default=True,
                help="tensorrt: native TensorRT engines, built into MODEL_DIR/engines on first use.",
            ),
            click.option(
                "--precision",
                type=precision_choice(),
                default=None,
                help="Graph precision (default: fp16 on a GPU, int8 on the CPU when built, else fp32).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@cli.command(help="Answer a question about a video and/or audio file, streaming the answer.")
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--server", default=None, help="Ask a `vsal serve` server at HOST:PORT instead (no MODEL_DIR).")
@click.option("--video", type=click.Path(path_type=Path), help="Video file (its audio track is used too).")
@click.option("--audio", type=click.Path(path_type=Path), help="Audio file (alone, or beside --video).")
@click.option("--prompt", required=True, help="The question.")
@_generation_options
@click.option(
    "--json", "as_json", is_flag=True, help="Print answer, token ids, timings and backends as JSON."
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="One stage's graphs in memory at a time (the encoders are freed before the decoder runs), "
    "and ONNX Runtime's int4/int8 weight-only kernels without a packed copy (13b on a 16 GB machine).",
)
@click.option(
    "--portable-decoder",
    is_flag=True,
    help="Run the decoder's portable graph on ONNX Runtime even where its fused variant is built.",
)
def run(
    model_dir,
    server,
    video,
    audio,
    prompt,
    max_new_tokens,
    beams,
    sample,
    temperature,
    top_p,
    top_k,
    seed,
    provider,
    engine,
    precision,
    as_json,
    low_memory,
    portable_decoder,
) -> None:
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import check_prompt

    if video is None and audio is None:
        raise click.UsageError("give --video, --audio or both")
    prompt = check_prompt(prompt)  # before the package loads; the server checks it again
    options = _decoding_options(max_new_tokens, beams, sample, temperature, top_p, top_k, seed)
    if (model_dir is None) == (server is None):
        raise click.UsageError("give MODEL_DIR or --server HOST:PORT")
    if server is not None:
        from vsal.runtime.serving.client import Client

        if provider or precision or engine != "onnxruntime" or low_memory or portable_decoder:
            raise click.UsageError(
                "--provider, --backend, --precision, --low-memory and --portable-decoder are the server's "
                "choice: leave them out"
            )

        pipeline = Client(server)  # the same ask() as the pipeline's
    else:
        pipeline = Pipeline.load(
            model_dir,
            provider=provider,
            verbose=not as_json,
            precision=precision,
            engine=engine,
            low_memory=low_memory,
            portable_decoder=portable_decoder,
        )
    if as_json:
        answer = pipeline.ask(prompt, video=video, audio=audio, options=options)
        click.echo(json.dumps(answer.to_dict()))
        return
    answer = pipeline.ask(
        prompt, video=video, audio=audio, options=options, on_text=lambda piece: click.echo(piece, nl=False)
    )
    if options.num_beams > 1:
        click.echo(answer.text, nl=False)
    click.echo()
    spent = sum(answer.timings.values()) - answer.timings.get("time_to_first_token", 0)
    click.echo(f"[{len(answer.token_ids)} tokens, {spent:.2f} s]", err=True)


@cli.command(help="Serve a model package (or a `vsal-export triton` repository) with Triton on 127.0.0.1.")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(*PORTS), default=8001, show_default=True, help="gRPC port.")
@click.option(
    "--flavor",
    type=click.Choice(["python", "onnxruntime", "tensorrt"]),
    default="python",
    show_default=True,
    help="Graph models of the temporary repository (the bundled Triton has only the Python backend).",
)
@click.option(
    "--max-queue-delay-us",
    type=click.IntRange(0, 10_000_000),
    default=2000,
    show_default=True,
    help="How long an encoder request may wait to be batched with others (at most 10 s).",
)
@click.option(
    "--decoder",
    type=click.Choice(["bls", "orchestrator"]),
    default="bls",
    show_default=True,
    help="Run the LLM decoder as its own model (bls) or inside the orchestrator (KV cache on the device).",
)
@click.option(
    "--precision",
    type=precision_choice(),
    default="fp32",
    show_default=True,
    help="Which file of each graph (the package's fp16/int8 variants where built).",
)
@click.option(
    "--max-upload-mib",
    type=click.IntRange(min=1),
    default=None,
    help=f"Largest media file a request may send, video and audio each, in MiB [default: {MAX_UPLOAD_MIB}].",
)
@click.option(
    "--max-new-tokens-limit",
    type=click.IntRange(min=1),
    default=None,
    help=f"Most new tokens a request may ask for [default: {MAX_NEW_TOKENS_LIMIT}, the release's].",
)
def serve(
    model_dir, port, flavor, max_queue_delay_us, decoder, precision, max_upload_mib, max_new_tokens_limit
) -> None:
    from vsal.runtime.serving.serve import Server, serve_forever
    from vsal.runtime.serving.triton_repo import RepoOptions, is_repository

    limits = {"max_upload_mib": max_upload_mib, "max_new_tokens_limit": max_new_tokens_limit}
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits and is_repository(model_dir):
        raise click.UsageError(
            "a repository from `vsal-export triton` is served with the limits in its vsal/config.pbtxt "
            "(parameters max_upload_mib, max_new_tokens_limit): edit them there, or serve the package"
        )
    options = RepoOptions(
        flavor=flavor,
        link=True,
        max_queue_delay_us=max_queue_delay_us,
        decoder=decoder,
        precision=precision,
        **limits,
    )
    server = Server(model_dir, port=port, options=options)
    sys.exit(serve_forever(server))


@cli.command(help="Ask several questions about one clip (the encoders run once).")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--video", type=click.Path(path_type=Path))
@click.option("--audio", type=click.Path(path_type=Path))
@_generation_options
def chat(
    model_dir,
    video,
    audio,
    max_new_tokens,
    beams,
    sample,
    temperature,
    top_p,
    top_k,
    seed,
    provider,
    engine,
    precision,
) -> None:
    from vsal.runtime.errors import VsalError
    from vsal.runtime.pipeline import Pipeline

    if video is None and audio is None:
        raise click.UsageError("give --video, --audio or both")
    options = _decoding_options(max_new_tokens, beams, sample, temperature, top_p, top_k, seed)
    pipeline = Pipeline.load(model_dir, provider=provider, precision=precision, engine=engine)
    pipeline.check_options(options, video)  # beams and --max-new-tokens once, not at every question
    pipeline.encode_media(video, audio)  # decode and encode once, up front
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 reaches the prompt check
        sys.stdin.reconfigure(errors="surrogateescape")
    click.echo("Ask about the clip (an empty line or Ctrl-D ends).", err=True)
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        try:
            answer = pipeline.ask(
                prompt,
                video=video,
                audio=audio,
                options=options,
                on_text=lambda piece: click.echo(piece, nl=False),
            )
        except VsalError as exc:
            click.echo(f"vsal: error: {exc}", err=True)
            continue
        if options.num_beams > 1:
            click.echo(answer.text, nl=False)
        click.echo()


from vsal.runtime.tools.bench import bench_cli  # noqa: E402  (click and numpy only at import)

cli.add_command(bench_cli, "bench")

from vsal.runtime.tools.perplexity import perplexity_cli  # noqa: E402  (click and numpy only at import)

cli.add_command(perplexity_cli, "perplexity")
