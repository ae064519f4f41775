"""`vsal perplexity`: how well a package's LLM decoder predicts a text, without torch.

The text is tokenised with the package's LLM tokenizer and scored in sliding windows, as
transformers' perplexity guide does ("Perplexity of fixed-length models"): a window of `window`
decoder positions starts every `stride` text tokens, and each window scores only the tokens the
previous one did not, so every token is scored once, with up to window - 1 tokens of context.
Each window starts with the bos token, as the release's prompt does ([bos] + "USER: ..."): the
text's first token is scored too (from bos alone), and `window` counts bos, so a decoder call
takes window - 1 text tokens.

Each window is one prefill of the llm_decoder graph (no past: P = 0), fed the package's token
embeddings (`Pipeline.embed`) through the backend's own decoder step. Logits -> log-softmax in
float64 -> the mean negative log-likelihood (nats per token) -> perplexity = exp(mean NLL).
The same text at fp32, fp16 and int8 (`precision`, the registry's names) gives comparable figures:
a precision asked for by name runs exactly that graph, fp16 on the CPU included.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np
from vsal.runtime import precisions
from vsal.runtime.errors import ConfigError
from vsal.runtime.graphs import DECODER
from vsal.runtime.log import sayer
from vsal.runtime.registry_choice import precision_choice

if TYPE_CHECKING:
    from vsal.runtime.pipeline import Pipeline

DEFAULT_WINDOW = 512  # decoder positions per window, bos included (llama.cpp's perplexity context)
MAX_TEXT_BYTES = 64 * 1024 * 1024  # 64 MiB; the book (botchan.txt) is 279 KB
PROGRESS_LINES = 10  # about this many progress lines over a run


@dataclass(frozen=True)
class Window:
    """One decoder call: [bos] + text tokens [begin, end); the last `scored` of them are scored."""

    begin: int
    end: int
    scored: int


@dataclass
class PerplexityReport:
    text: str  # the text file
    tokens: int  # text tokens scored: every token of the text, once
    windows: int  # decoder calls
    window: int  # decoder positions per call, bos included
    stride: int  # text tokens between the starts of two windows
    perplexity: float  # exp(mean_nll)
    mean_nll: float  # nats per token
    precisions: dict[str, str]  # graph -> the precision it ran at
    backends: dict[str, str]  # graph -> what ran it
    seconds: float  # the windows' decoder calls and scoring (not loading, not tokenising)
    tokens_per_s: float  # tokens scored per second

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        ran = ", ".join(f"{graph} {p}" for graph, p in self.precisions.items())
        return (
            f"perplexity {self.perplexity:.4f} (mean NLL {self.mean_nll:.6f} nats) over {self.tokens} "
            f"tokens in {self.windows} windows of {self.window} (stride {self.stride}); {ran}; "
            f"{self.seconds:.2f} s, {self.tokens_per_s:.1f} tokens/s"
        )


def read_text(path: str | os.PathLike) -> str:
    """The file's text (UTF-8; a byte-order mark is dropped), or a ConfigError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--text {path}: no such file")
    if not path.is_file():
        raise ConfigError(f"--text {path}: not a file; give a text file")
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise ConfigError(f"--text {path}: {size:,} bytes, more than {MAX_TEXT_BYTES:,}: score a part of it")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--text {path}: not UTF-8 (byte {exc.start}: {exc.reason}); convert it, e.g. with iconv"
        ) from None
    if not text.strip():
        raise ConfigError(f"--text {path}: empty; give a text to score")
    return text


def decoder_window_range(profile: dict, context: int) -> tuple[int, int]:
    """(fewest, most) positions a window may take: a prefill within the profile's T and the
    decoder's context, and at least bos + one token to score."""
    return max(2, profile["T"]["min"]), min(profile["T"]["max"], context)


def check_window(window: int, stride: int, fewest: int, most: int) -> None:
    """ConfigError unless fewest <= window <= most and 1 <= stride <= window - 1 (no token skipped)."""
    if not fewest <= window <= most:
        raise ConfigError(
            f"--window {window}: the decoder takes {fewest} to {most} positions at once (llm_decoder "
            f"profile T, bos included): choose a window in that range"
        )
    if not 1 <= stride <= window - 1:
        raise ConfigError(
            f"--stride {stride}: a window of {window} holds {window - 1} text tokens after bos; a stride "
            f"of 1 to {window - 1} scores every token once (more would skip tokens)"
        )


def plan_windows(tokens: int, window: int, stride: int) -> list[Window]:
    """The windows over `tokens` text tokens, as transformers' perplexity guide slides them."""
    span = window - 1  # text tokens per window, after bos
    if tokens < span:
        raise ConfigError(
            f"the text is {tokens} tokens, shorter than one window ({span} tokens after bos at "
            f"--window {window}): give a longer text or a window of at most {tokens + 1}"
        )
    windows: list[Window] = []
    done = 0  # text tokens scored so far
    for begin in range(0, tokens, stride):
        end = min(begin + span, tokens)
        windows.append(Window(begin, end, end - done))
        done = end
        if end == tokens:
            break
    return windows


def window_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over rows: logits [N, V] (any float type), targets [N] -> nats, float64."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    log_sum = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    return float((log_sum - x[np.arange(len(targets)), targets]).sum())


def perplexity(
    package: str | os.PathLike,
    text: str | os.PathLike,
    *,
    precision: str | None = None,
    window: int | None = None,
    stride: int | None = None,
    threads: int = 0,
    progress: bool = True,
) -> PerplexityReport:
    """The perplexity of the package's LLM decoder over the text file `text`.

    `precision`: as in `Pipeline.load` (None: what this machine runs best); one asked for by name
    must be built for the decoder (else a ConfigError), and runs even where it would not be picked
    (fp16 on the CPU), so precisions compare on the same text. `window`: decoder positions per
    call, bos included (default: 512, or the profile's T max when smaller); `stride`: text tokens
    between window starts (default: half the window). `threads`: intra-op threads, 0 = the
    library's default. `progress`: the pipeline's choices and a few progress lines on stderr.
    """
    from vsal.runtime.pipeline import Pipeline

    if precision is not None:
        precisions.get(precision)  # a ConfigError naming the choices, before the package loads
    content = read_text(text)
    pipeline = Pipeline.load(
        package, threads=threads, verbose=progress, precision=precision, exact_precision=True
    )
    decoder = pipeline.manifest.graphs[DECODER]
    check_built(package, decoder.variants, precision)
    fewest, most = decoder_window_range(decoder.profile, pipeline.limits.context)
    window = window if window is not None else min(DEFAULT_WINDOW, most)
    stride = stride if stride is not None else max(1, window // 2)
    check_window(window, stride, fewest, most)
    ids = np.asarray(pipeline.llama.encode(content), dtype=np.int64)
    plan = plan_windows(len(ids), window, stride)
    say = sayer("vsal perplexity", enabled=progress)
    say(f"{len(ids)} tokens of {text} in {len(plan)} windows of {window} (stride {stride})")
    start = time.perf_counter()
    total = score_windows(pipeline, ids, plan, say)
    seconds = time.perf_counter() - start
    backends = pipeline.loaded_backends
    mean = total / len(ids)
    return PerplexityReport(
        text=str(text),
        tokens=len(ids),
        windows=len(plan),
        window=window,
        stride=stride,
        perplexity=math.exp(mean),
        mean_nll=mean,
        precisions={name: b.precision for name, b in backends.items()},
        backends={name: b.description for name, b in backends.items()},
        seconds=seconds,
        tokens_per_s=len(ids) / seconds if seconds > 0 else float("inf"),
    )


def check_built(package: str | os.PathLike, variants: Iterable[str], precision: str | None) -> None:
    """ConfigError when a precision is asked for by name and the decoder has no such graph: a
    figure measured at fp32 instead would read as that precision's."""
    if precision is None or precisions.get(precision).is_export or precision in variants:
        return
    raise ConfigError(
        f"--precision {precision}: {package} has no {precision} {DECODER}; build it "
        f"(vsal-export build {package} --precision {precision}) or choose one it has: "
        f"{', '.join([precisions.EXPORTED, *variants])}"
    )


def score_windows(
    pipeline: Pipeline, ids: np.ndarray, plan: list[Window], say: Callable[[str], None]
) -> float:
    """Total NLL (nats) of the plan's scored tokens: one prefill of the decoder per window."""
    bos = pipeline.manifest.special_tokens["bos"]
    step = pipeline.decoder_step(all_logits=True)
    every = max(1, len(plan) // PROGRESS_LINES)
    total = 0.0
    for number, w in enumerate(plan, 1):
        fed = np.concatenate([[bos], ids[w.begin : w.end]])  # [T]
        t = len(fed)
        logits, _ = step(
            pipeline.embed(fed)[None],  # [1, T, H]
            np.ones((1, t), np.int64),  # [1, T]: no past
            np.arange(t, dtype=np.int64)[None],  # [1, T]
            None,
        )
        # Row j predicts text token begin + j (row 0 is bos's): the last `scored` rows before the
        # final one (which predicts past the window) are the window's new tokens.
        total += window_nll(logits[0, t - 1 - w.scored : t - 1], ids[w.end - w.scored : w.end])
        if number % every == 0 or number == len(plan):
            so_far = math.exp(total / w.end)
            say(f"window {number}/{len(plan)}: {w.end} tokens, perplexity so far {so_far:.4f}")
    return total


@click.command(help="The LLM decoder's perplexity over a text file, in sliding windows (torch-free).")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="UTF-8 text.")
@click.option(
    "--precision",
    type=precision_choice(),
    default=None,
    help="The decoder's precision (default: the best this machine runs); one named runs as built.",
)
@click.option(
    "--window",
    type=int,
    default=None,
    help=f"Decoder positions per window, bos included [default: {DEFAULT_WINDOW}, or the profile's T max].",
)
@click.option(
    "--stride", type=int, default=None, help="Text tokens between window starts [default: window/2]."
)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="0 = default.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def perplexity_cli(model_dir, text_file, precision, window, stride, threads, as_json) -> None:
    report = perplexity(
        model_dir, text_file, precision=precision, window=window, stride=stride, threads=threads
    )
    click.echo(json.dumps(report.to_dict()) if as_json else report.summary())
