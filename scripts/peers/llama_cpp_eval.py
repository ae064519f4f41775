"""llama.cpp as a measured peer: run under the llama-cpp venv's Python
(scripts/peers/install_llama_cpp.sh), never the project's, with only numpy, llama_cpp and gguf.

Two modes. Perplexity (scripts/perplexity_table.py's side):

  $VSAL_PEERS/llama-cpp/bin/python scripts/peers/llama_cpp_eval.py MODEL.gguf JOB.json

JOB.json (written by perplexity_table.py) holds the token ids vsal's tokenizer gave the text, the
windows vsal's `perplexity` scores them in (bos first in each), and the greedy prompts' ids. Both
sides score the same token sequence: llama.cpp's own tokenizer is not used. Prints one JSON line:
mean NLL and perplexity over the same tokens, greedy tokens per prompt, seconds.

Decode timing (`vsal bench --llm-dir`'s side, as scripts/peers/ort_genai_eval.py):

  $VSAL_PEERS/llama-cpp/bin/python scripts/peers/llama_cpp_eval.py --decode CHECKPOINT TYPE OUT JOB.json
  $VSAL_PEERS/llama-cpp/bin/python scripts/peers/llama_cpp_eval.py --decode CHECKPOINT TYPE OUT --build-only

CHECKPOINT is a Hugging Face Llama folder; TYPE is F32, Q8_0 or Q4_0. The GGUF is made once, as
perplexity_table.py makes it (F32 and Q8_0 by the venv's convert_hf_to_gguf.py, Q4_0 by llama.cpp's
quantizer from the F32 file, its default tensor mix for the type), into
OUT/<checkpoint>-<fingerprint>/ (the fingerprint covers the folder's path, its files' sizes and
times, and llama_cpp's version), and reused after. JOB.json is ort_genai_eval.py's:
  {"prompts": [[ids...], ...], "new_tokens": 64, "runs": 7, "threads": 0, "warmup": 1}
Batch 1, per prompt and run, timed as the other engines: prefill = from the reset to the first
token (the whole prompt in one batch through the decoder, and the first pick); decode tokens/s =
(new_tokens - 1) / (last token's time - first token's time). Greedy is plain argmax of the last
position's logits (no stop token, no sampler); the KV cache is f16, llama.cpp's default, set
explicitly. Prints one JSON line with those, the greedy ids, the bytes of weights read per token
(every tensor but an embedding table that is only gathered) and the peak RSS; a mistake in the
arguments or the job, or a failed conversion, prints {"error": ...} instead, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from peer_job import (  # noqa: E402
    EvalError,
    check_checkpoint,
    checkpoint_fingerprint,
    measure_prompt,
    peak_rss_bytes,
    read_job,
)


def window_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over rows, in float64 (as vsal.runtime.tools.perplexity.window_nll)."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    log_sum = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    return float((log_sum - x[np.arange(len(targets)), targets]).sum())


def logits_of(llm, tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), V] of one fresh sequence (no cache from an earlier call)."""
    llm.reset()  # the next eval drops the cache from position 0 on
    llm.eval(tokens)
    return np.asarray(llm.scores[: len(tokens)], dtype=np.float32)


def score(llm, job: dict) -> float:
    ids, bos, total = np.asarray(job["ids"], dtype=np.int64), job["bos"], 0.0
    for begin, end, scored in job["windows"]:
        fed = [bos, *ids[begin:end].tolist()]
        t = len(fed)
        logits = logits_of(llm, fed)
        total += window_nll(logits[t - 1 - scored : t - 1], ids[end - scored : end])
    return total


def greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Plain argmax decoding (no penalties, no stop token): tokens after `prompt`."""
    llm.reset()
    llm.eval(prompt)
    tokens: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return tokens


def perplexity_main(model_path: str, job_path: str) -> None:
    from llama_cpp import Llama

    job = json.loads(open(job_path, encoding="utf-8").read())
    window = job["window"]
    threads = job.get("threads") or os.cpu_count()  # 0: every core, as ONNX Runtime (llama's default: half)
    llm = Llama(
        model_path=model_path,
        n_ctx=max(window, max(len(p) for p in job["prompts"]) + job["new_tokens"]),
        n_batch=window,
        n_ubatch=window,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    start = time.perf_counter()
    total = score(llm, job)
    seconds = time.perf_counter() - start
    mean = total / len(job["ids"])
    out = {
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "tokens": len(job["ids"]),
        "seconds": seconds,
        "greedy": [greedy(llm, p, job["new_tokens"]) for p in job["prompts"]],
    }
    print(json.dumps(out))


# --- decode timing: the GGUF, made once ---------------------------------------------------------

GGUF_TYPES = ("F32", "Q8_0", "Q4_0")  # F32 and Q8_0 by the converter; Q4_0 quantized from F32
LLAMA_FTYPE_MOSTLY_Q4_0 = 2  # llama.h's llama_ftype
LOG_TAIL = 3000  # characters of a converter's log quoted in an error
EMBEDDING, OUTPUT = "token_embd.weight", "output.weight"  # GGUF names of the table and the LM head


def run_logged(cmd: list[str], log: Path, what: str) -> None:
    """Run a conversion step in a child process (its memory stays out of this one's peak RSS),
    its output appended to `log`; EvalError with the log's tail when it fails."""
    with log.open("a", encoding="utf-8") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
        raise EvalError(f"{what} failed (exit {code}); {log}:\n{tail}")


def convert(checkpoint: Path, kind: str, target: Path, folder: Path) -> None:
    """Write the checkpoint as a GGUF of `kind` at `target` (Q4_0: from the F32 file, made first)."""
    log = folder / "convert.log"
    if kind == "Q4_0":
        source = built_gguf(checkpoint, "F32", folder)
        code = (
            "import ctypes, sys, llama_cpp as l\n"
            "p = l.llama_model_quantize_default_params()\n"
            f"p.ftype = {LLAMA_FTYPE_MOSTLY_Q4_0}\n"
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n"
        )
        run_logged([sys.executable, "-c", code, str(source), str(target)], log, "llama.cpp's Q4_0 quantizer")
        return
    converter = Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise EvalError(f"{converter}: missing; bash scripts/peers/install_llama_cpp.sh installs it")
    cmd = [sys.executable, str(converter), str(checkpoint), "--outtype", kind.lower()]
    run_logged([*cmd, "--outfile", str(target)], log, f"convert_hf_to_gguf.py --outtype {kind.lower()}")


def gguf_path(checkpoint: Path, kind: str, folder: Path) -> Path:
    return folder / f"{checkpoint.resolve().name}-{kind.lower()}.gguf"


def built_gguf(checkpoint: Path, kind: str, folder: Path) -> Path:
    """The checkpoint's GGUF of `kind` in `folder`, converted now when it is not there yet (written
    under a temporary name and renamed: a killed conversion leaves no file that looks finished)."""
    path = gguf_path(checkpoint, kind, folder)
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{path.name}.partial-{os.getpid()}"
    try:
        convert(checkpoint, kind, partial, folder)
        if not partial.is_file():
            raise EvalError(f"the {kind} conversion wrote no {partial}; see {folder / 'convert.log'}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def weights_read_per_token(path: Path) -> tuple[int, int]:
    """(bytes of the tensors a decoded token reads, bytes of all tensors) of a GGUF: every tensor
    but the embedding table when the model has its own LM head (then the table is only gathered,
    one row a token; a tied head reads all of it)."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(sizes.values())
    return (total - sizes[EMBEDDING] if OUTPUT in sizes and EMBEDDING in sizes else total), total


# --- decode timing: the job and the runs ---------------------------------------------------------


def last_logits_argmax(llm) -> int:
    """Argmax of the last evaluated position's logits (logits_all is off: only that row exists)."""
    import llama_cpp

    row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))))


def timed_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """One batch-1 generation: the tokens, the prefill seconds and the seconds from the first token
    to the last."""
    start = time.perf_counter()
    llm.reset()  # the next eval drops the cache from position 0 on
    llm.eval(prompt)
    tokens = [last_logits_argmax(llm)]
    first = time.perf_counter()
    while len(tokens) < new_tokens:
        llm.eval(tokens[-1:])
        tokens.append(last_logits_argmax(llm))
    return tokens, first - start, time.perf_counter() - first


def check_prompts(llm, job: dict, job_path: Path) -> None:
    vocab = llm.n_vocab()
    for i, prompt in enumerate(job["prompts"]):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise EvalError(
                f"{job_path}: prompts[{i}] has ids outside the vocabulary [0, {vocab}): {bad[:5]}"
            )


def decode_evaluate(args: argparse.Namespace) -> dict:
    try:
        import llama_cpp
    except ImportError as exc:
        peers = os.environ.get("VSAL_PEERS", "/work/peers")
        raise EvalError(
            f"{exc}: run this under the llama-cpp venv's Python, {peers}/llama-cpp/bin/python "
            "(bash scripts/peers/install_llama_cpp.sh installs it)"
        ) from exc
    check_checkpoint(args.checkpoint)
    job = read_job(args.job) if args.job is not None else None
    fingerprint = checkpoint_fingerprint(args.checkpoint, llama_cpp.__version__)
    folder = args.out / f"{args.checkpoint.resolve().name}-{fingerprint}"
    start = time.perf_counter()
    existed = gguf_path(args.checkpoint, args.type, folder).is_file()
    gguf = built_gguf(args.checkpoint, args.type, folder)
    read_bytes, file_bytes = weights_read_per_token(gguf)
    result = {"engine": "llama.cpp", "version": llama_cpp.__version__, "precision": args.type}
    result |= {"gguf": str(gguf), "build_seconds": None if existed else time.perf_counter() - start}
    result |= {"weights_bytes_per_token": read_bytes, "weights_file_bytes": file_bytes, "kv_dtype": "float16"}
    if job is None:
        return result
    longest = max(len(p) for p in job["prompts"])
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=longest + job["new_tokens"],
        n_batch=longest,  # the whole prompt in one batch, as the other engines prefill it
        n_ubatch=longest,
        logits_all=False,  # the last position's logits only, what greedy reads
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        type_k=llama_cpp.GGML_TYPE_F16,
        type_v=llama_cpp.GGML_TYPE_F16,
        verbose=False,
    )
    check_prompts(llm, job, args.job)
    result |= {"threads": job["threads"], "new_tokens": job["new_tokens"], "runs": job["runs"]}
    result["prompts"] = [
        measure_prompt(lambda ids, n: timed_greedy(llm, ids, n), p, job) for p in job["prompts"]
    ]
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def parse_decode_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llama_cpp_eval.py --decode", description="decode timing")
    parser.add_argument("checkpoint", type=Path, help="Hugging Face Llama checkpoint folder")
    parser.add_argument("type", choices=GGUF_TYPES, help="the GGUF's type")
    parser.add_argument("out", type=Path, help="folder for the converted GGUFs (cached there)")
    parser.add_argument("job", type=Path, nargs="?", help="JOB.json: prompts' token ids and counts")
    parser.add_argument(
        "--build-only", action="store_true", help="convert (or find) the GGUF, measure nothing"
    )
    args = parser.parse_args(argv)
    if args.job is None and not args.build_only:
        parser.error("JOB.json is required unless --build-only")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--decode"]:
        if len(argv) != 2:
            sys.exit("usage: llama_cpp_eval.py MODEL.gguf JOB.json | --decode CHECKPOINT TYPE OUT JOB.json")
        perplexity_main(*argv)
        return 0
    args = parse_decode_args(argv[1:])
    try:
        result = decode_evaluate(args)
    except EvalError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
