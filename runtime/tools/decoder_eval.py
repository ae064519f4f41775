"""vsal's decoder as a measured engine beside the peers (`vsal bench --llm-dir`), in a child process:

  python -m vsal.runtime.tools.decoder_eval PACKAGE PRECISION JOB.json [--portable-decoder] [--no-verify]

The job is the peers' (scripts/peers/ort_genai_eval.py, llama_cpp_eval.py --decode):
  {"prompts": [[ids...], ...], "new_tokens": 64, "runs": 7, "warmup": 1, "threads": 0}
prompts are LLM token ids, bos first as the peers get them, embedded with the package's table
(`Pipeline.embeddings`); threads 0: every core, set explicitly as the peers' runners set theirs
(ONNX Runtime's own default of 0 also pins its threads).

Only the package's decoder loads (its backends load lazily: no encoder runs), at PRECISION, which
must be built (fp32 is the export; others by `vsal-export build --precision P`). Its fused variant
runs where built, unless --portable-decoder. Each run is batch 1, greedy (argmax, no stop token)
through runtime.generation's prefill and decode_one_token, timed as the peers time theirs:
prefill = from the step's creation to the first token (the prompt through the decoder and the
first pick); decode tokens/s = (new_tokens - 1) / (last token's time - first token's time).
Prints one JSON line: per prompt the prefill ms and decode tokens/s statistics and the greedy ids,
which graph ran, the peak RSS (VmHWM). A mistake in the arguments, the job or the package prints
{"error": ...} instead, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from vsal.runtime import hugepages
from vsal.runtime.errors import ConfigError, VsalError
from vsal.runtime.tools.machine_limits import cores

DEFAULT_RUNS, DEFAULT_WARMUP = 7, 1  # as the peers' runners


def _count(job: dict, key: str, default: int | None, path: Path, least: int) -> int:
    value = job.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{path}: '{key}' must be an integer >= {least}, got {value!r}")
    return value


def read_job(path: Path) -> dict:
    """The job's prompts and counts, checked; ConfigError naming the file and key."""
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the job ({exc})") from None
    prompts = job.get("prompts") if isinstance(job, dict) else None
    if not isinstance(prompts, list) or not prompts:
        raise ConfigError(f"{path}: 'prompts' must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        ok = isinstance(prompt, list) and prompt
        if not ok or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ConfigError(f"{path}: prompts[{i}] must be a non-empty list of integer token ids")
    return {
        "prompts": prompts,
        "new_tokens": _count(job, "new_tokens", None, path, 2),
        "runs": _count(job, "runs", DEFAULT_RUNS, path, 1),
        "warmup": _count(job, "warmup", DEFAULT_WARMUP, path, 0),
        "threads": _count(job, "threads", 0, path, 0) or cores(),  # 0: every core, set as the peers set it
    }


def check_precision(manifest, package: Path, precision: str) -> None:
    """ConfigError unless the decoder has `precision` built (the pipeline would run fp32 instead)."""
    from vsal.runtime import precisions

    row = precisions.get(precision, option="PRECISION")
    info = manifest.graphs["llm_decoder"]
    if not row.is_export and precision not in info.variants:
        built = ", ".join([precisions.EXPORTED, *info.variants])
        raise ConfigError(
            f"{package}: the decoder has no {precision} variant (built: {built}); "
            f"vsal-export build {package} --precision {precision} --graphs llm_decoder adds it"
        )


def check_prompts(pipeline, job: dict, path: Path) -> None:
    """Every id inside the embedding table; every prompt and its new tokens inside the decoder's profile."""
    from vsal.runtime.limits import DecoderLimits
    from vsal.runtime.prompt import DecodingOptions

    vocab = pipeline.embeddings.shape[0]
    limits = DecoderLimits.of(pipeline.manifest.graphs["llm_decoder"])
    options = DecodingOptions(num_beams=1, max_new_tokens=job["new_tokens"])
    for i, prompt in enumerate(job["prompts"]):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"{path}: prompts[{i}] has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        limits.check(options, len(prompt), 0)  # a LimitError saying what fits


def greedy_run(pipeline, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """One batch-1 generation: the tokens, the prefill seconds and the seconds from the first token
    to the last."""
    from vsal.runtime.generation import decode_one_token, prefill

    start = time.perf_counter()
    step = pipeline.decoder_step()
    embeds = pipeline.embed(np.asarray(prompt, dtype=np.int64))[None]  # [1, T, H]
    logits, cache = prefill(step, embeds)  # [1, V]
    tokens = [int(np.argmax(logits[0]))]
    first = time.perf_counter()
    while len(tokens) < new_tokens:
        past = len(prompt) + len(tokens) - 1
        logits, cache = decode_one_token(step, pipeline.embed, np.array(tokens[-1:]), cache, past)
        tokens.append(int(np.argmax(logits[0])))
    return tokens, first - start, time.perf_counter() - first


def measure_prompt(pipeline, prompt: list[int], job: dict) -> dict:
    """The peers' timed rounds (scripts/peers/peer_job.py measure_prompt), kept twice on purpose:
    the peers' runners run in their own venvs and never import vsal."""
    from vsal.runtime.tools.bench import summarize

    new_tokens = job["new_tokens"]
    for _ in range(job["warmup"]):  # the first run pays for the session's lazy setup
        greedy_run(pipeline, prompt, new_tokens)
    prefills, rates, sequences = [], [], []
    for _ in range(job["runs"]):
        tokens, prefill_s, decode_s = greedy_run(pipeline, prompt, new_tokens)
        prefills.append(1000 * prefill_s)
        rates.append((new_tokens - 1) / decode_s)
        sequences.append(tokens)
    return {
        "prompt_tokens": len(prompt),
        "prefill_ms": summarize(prefills),
        "decode_tokens_per_s": summarize(rates),
        "greedy": sequences[0],
        "greedy_same_every_run": all(s == sequences[0] for s in sequences),
    }


def evaluate(package: Path, precision: str, job_path: Path, portable: bool, verify: bool = True) -> dict:
    from vsal.runtime.backends.fused_decoder import FusedDecoderBackend
    from vsal.runtime.manifest import load_manifest
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.tools.bench import peak_rss_bytes

    job = read_job(job_path)
    check_precision(load_manifest(package), package, precision)
    pipeline = Pipeline.load(
        package,
        provider="cpu",  # the peers run on the CPU
        threads=job["threads"],
        verbose=False,
        verify=verify,
        precision=precision,
        portable_decoder=portable,
    )
    check_prompts(pipeline, job, job_path)
    backend = pipeline.backend("llm_decoder")
    result = {
        "engine": "vsal",
        "precision": precision,
        "decoder_graph": "fused" if isinstance(backend, FusedDecoderBackend) else "portable",
        "backend": backend.description,
        "threads": job["threads"],
        "new_tokens": job["new_tokens"],
        "runs": job["runs"],
    }
    result["prompts"] = [measure_prompt(pipeline, p, job) for p in job["prompts"]]
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["huge_pages"] = hugepages.state()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vsal.runtime.tools.decoder_eval", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("package", type=Path, help="a vsal model package folder")
    parser.add_argument("precision", help="a decoder precision the package has built (fp32, int8, int4)")
    parser.add_argument("job", type=Path, help="JOB.json: prompts' token ids and counts")
    parser.add_argument(
        "--portable-decoder", action="store_true", help="the portable graph even where the fused one is built"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the files' sha256 (a caller that checked them once)"
    )
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.package, args.precision, args.job, args.portable_decoder, not args.no_verify)
    except VsalError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from vsal.runtime.hugepages import restart_with_hugepages

    restart_with_hugepages()  # as the `vsal` command does: the decoder measured as users run it
    sys.exit(main())
