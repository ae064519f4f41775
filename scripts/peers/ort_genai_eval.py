"""onnxruntime-genai as a measured peer: run under the ort-genai venv's Python
(scripts/peers/install_ort_genai.sh), never the project's, with only numpy and onnxruntime_genai.

  $VSAL_PEERS/ort-genai/bin/python scripts/peers/ort_genai_eval.py CHECKPOINT PRECISION OUT JOB.json
  $VSAL_PEERS/ort-genai/bin/python scripts/peers/ort_genai_eval.py CHECKPOINT PRECISION OUT --build-only

CHECKPOINT is a Hugging Face Llama folder (config.json, *.safetensors, tokenizer files); PRECISION
is fp32, int8 or int4 (the model builder's `-p`, always with `-e cpu`). The genai model is built
once into OUT/<checkpoint>-<precision>-cpu-<fingerprint> (the fingerprint covers the folder's path,
its files' sizes and times, and the builder's version) and reused after. Every run writes the
machine's core count (or the job's "threads") into that model's genai_config.json as the decoder's
`intra_op_num_threads`: without it genai runs one thread.

JOB.json, as scripts/peers/llama_cpp_eval.py's job names its keys:
  {"prompts": [[ids...], ...], "new_tokens": 64, "runs": 7, "threads": 0, "warmup": 1}
prompts are token ids from vsal's tokenizer (genai's own is not used), so every engine decodes the
same sequence; threads 0 or absent: every core; runs and warmup default to 7 and 1.

Batch 1, per prompt and run, timed as `vsal bench` times its decoder (runtime/tools/bench.py):
prefill = from the generator's creation to the first token (the prompt through the decoder and the
first pick); decode tokens/s = (new_tokens - 1) / (last token's time - first token's time). Greedy
is plain argmax, no stop token (as llama_cpp_eval.py): the next token is picked from get_logits()
and fed back with append_tokens, since generate_next_token stops at eos and genai refuses an eos
outside the vocabulary. Prints one JSON line; a mistake in the arguments or the job prints
{"error": ...} instead, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from peer_job import (  # noqa: E402
    EvalError,
    check_checkpoint,
    checkpoint_fingerprint,
    measure_prompt,
    peak_rss_bytes,
    read_job,
)

PRECISIONS = ("fp32", "int8", "int4")  # the builder's CPU weight types
EXECUTION_PROVIDER = "cpu"
BUILD_MARKER = "ort-genai-build.json"  # written last: a folder without it is no finished build
LOG_TAIL = 3000  # characters of the builder's log quoted in an error


# --- the genai model, built once -----------------------------------------------------------------


def run_builder(checkpoint: Path, precision: str, target: Path) -> None:
    """The model builder in a child process (its torch and the loaded checkpoint stay out of this
    process's peak RSS), its output in target/build.log."""
    target.mkdir(parents=True)
    cache = target / "builder-cache"  # HF files and temporary external data; removed after
    log = target / "build.log"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint)]
    cmd += ["-o", str(target), "-p", precision, "-e", EXECUTION_PROVIDER, "-c", str(cache)]
    with log.open("w", encoding="utf-8") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    shutil.rmtree(cache, ignore_errors=True)
    if code != 0 or not (target / "genai_config.json").is_file():
        tail = log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
        raise EvalError(
            f"the model builder failed (exit {code}) on {checkpoint} at {precision}; {log}:\n{tail}"
        )


def built_model(
    checkpoint: Path, precision: str, out: Path, builder_version: str
) -> tuple[Path, float | None]:
    """The genai model folder for (checkpoint, precision), built now if no finished one is there.
    Returns the folder and the build's seconds (None when it was cached)."""
    name = f"{checkpoint.resolve().name}-{precision}-{EXECUTION_PROVIDER}"
    folder = out / f"{name}-{checkpoint_fingerprint(checkpoint, builder_version)}"
    if (folder / BUILD_MARKER).is_file():
        return folder, None
    partial = out / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    try:
        run_builder(checkpoint, precision, partial)
        seconds = time.perf_counter() - start
        marker = {"checkpoint": str(checkpoint.resolve()), "precision": precision}
        marker |= {"execution_provider": EXECUTION_PROVIDER, "builder": builder_version, "seconds": seconds}
        (partial / BUILD_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished folder left by a killed run
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder, seconds


def set_threads(model_dir: Path, threads: int) -> dict:
    """Write the decoder's intra_op_num_threads into genai_config.json; returns the config."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options["intra_op_num_threads"] = threads
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return config


# --- the job ------------------------------------------------------------------------------------


def check_prompts(job: dict, config: dict, job_path: Path) -> None:
    """Every id inside the model's vocabulary, every prompt plus its new tokens inside its context."""
    vocab, context = config["model"]["vocab_size"], config["model"]["context_length"]
    for i, prompt in enumerate(job["prompts"]):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise EvalError(
                f"{job_path}: prompts[{i}] has ids outside the vocabulary [0, {vocab}): {bad[:5]}"
            )
        if len(prompt) + job["new_tokens"] > context:
            raise EvalError(
                f"{job_path}: prompts[{i}] ({len(prompt)} ids) + new_tokens ({job['new_tokens']}) "
                f"exceeds the model's context_length {context}"
            )


# --- measuring ----------------------------------------------------------------------------------


def greedy_run(og, np, model, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """One batch-1 generation: the tokens, the prefill seconds and the seconds from the first token
    to the last."""
    start = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    tokens: list[int] = []
    first = 0.0
    while True:
        tokens.append(int(np.argmax(generator.get_logits()[0, -1])))  # logits [1, 1, V]
        if len(tokens) == 1:
            first = time.perf_counter()
        if len(tokens) == new_tokens:
            return tokens, first - start, time.perf_counter() - first
        generator.append_tokens(np.asarray(tokens[-1:], dtype=np.int32))


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="Hugging Face Llama checkpoint folder")
    parser.add_argument("precision", choices=PRECISIONS, help="the model builder's -p (with -e cpu)")
    parser.add_argument("out", type=Path, help="folder for the built genai models (cached there)")
    parser.add_argument("job", type=Path, nargs="?", help="JOB.json: prompts' token ids and counts")
    parser.add_argument(
        "--build-only", action="store_true", help="build (or find) the model, measure nothing"
    )
    args = parser.parse_args(argv)
    if args.job is None and not args.build_only:
        parser.error("JOB.json is required unless --build-only")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    try:
        import numpy as np
        import onnxruntime_genai as og
    except ImportError as exc:
        peers = os.environ.get("VSAL_PEERS", "/work/peers")
        raise EvalError(
            f"{exc}: run this under the ort-genai venv's Python, {peers}/ort-genai/bin/python "
            "(bash scripts/peers/install_ort_genai.sh installs it)"
        ) from exc
    check_checkpoint(args.checkpoint)
    job = read_job(args.job) if args.job is not None else None
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, build_seconds = built_model(args.checkpoint, args.precision, args.out, og.__version__)
    result = {"engine": "onnxruntime-genai", "version": og.__version__, "precision": args.precision}
    result |= {"execution_provider": EXECUTION_PROVIDER, "model_dir": str(model_dir)}
    result["build_seconds"] = build_seconds
    if job is None:
        return result
    config = set_threads(model_dir, job["threads"])
    check_prompts(job, config, args.job)
    model = og.Model(str(model_dir))
    result |= {"threads": job["threads"], "new_tokens": job["new_tokens"], "runs": job["runs"]}
    run = lambda ids, n: greedy_run(og, np, model, ids, n)  # noqa: E731
    result["prompts"] = [measure_prompt(run, p, job) for p in job["prompts"]]
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate(args)
    except EvalError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
