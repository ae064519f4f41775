"""llama.cpp's side of scripts/perplexity_table.py: run under the llama-cpp venv's Python
(scripts/peers/install_llama_cpp.sh), never the project's, with only numpy and llama_cpp.

  $VSAL_PEERS/llama-cpp/bin/python scripts/peers/llama_cpp_eval.py MODEL.gguf JOB.json

JOB.json (written by perplexity_table.py) holds the token ids vsal's tokenizer gave the text, the
windows vsal's `perplexity` scores them in (bos first in each), and the greedy prompts' ids. Both
sides score the same token sequence: llama.cpp's own tokenizer is not used. Prints one JSON line:
mean NLL and perplexity over the same tokens, greedy tokens per prompt, seconds.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


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


def main() -> None:
    from llama_cpp import Llama

    model_path, job_path = sys.argv[1], sys.argv[2]
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


if __name__ == "__main__":
    main()
