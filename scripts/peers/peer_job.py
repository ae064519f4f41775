"""What the peer runners share (scripts/peers/*_eval.py): the checkpoint's checks and fingerprint,
the job file, the timed rounds, the statistics and the peak RSS, as vsal's bench defines them.
Standard library only: each runner runs under its own peer's venv and never imports vsal; it finds
this file beside it (its folder is on sys.path).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_RUNS, DEFAULT_WARMUP = 7, 1


class EvalError(Exception):
    """A user mistake or a failed build: reported as {"error": message}."""


def checkpoint_fingerprint(checkpoint: Path, version: str) -> str:
    """Digest of what a peer's model built from `checkpoint` depends on: the folder's resolved path,
    each file's name, size and mtime (not the contents: hashing GBs of weights per run would cost
    more than a measurement), and the peer's `version`."""
    digest = hashlib.sha256(f"{checkpoint.resolve()}\n{version}\n".encode())
    for entry in sorted(checkpoint.iterdir()):
        if entry.is_file():
            stat = entry.stat()
            digest.update(f"{entry.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def check_checkpoint(checkpoint: Path) -> None:
    if not (checkpoint / "config.json").is_file():
        raise EvalError(f"{checkpoint}: no config.json; CHECKPOINT must be a Hugging Face model folder")
    if not any(checkpoint.glob("*.safetensors")) and not any(checkpoint.glob("*.bin")):
        raise EvalError(f"{checkpoint}: no *.safetensors or *.bin weights")


def machine_cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def positive_int(job: dict, key: str, default: int | None, job_path: Path, least: int = 1) -> int:
    value = job.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise EvalError(f"{job_path}: '{key}' must be an integer >= {least}, got {value!r}")
    return value


def read_job(job_path: Path) -> dict:
    """The decode job: prompts (token-id lists), new_tokens, runs, warmup, threads; checked."""
    try:
        job = json.loads(job_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"{job_path}: cannot read the job ({exc})") from exc
    prompts = job.get("prompts") if isinstance(job, dict) else None
    if not isinstance(prompts, list) or not prompts:
        raise EvalError(f"{job_path}: 'prompts' must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise EvalError(f"{job_path}: prompts[{i}] must be a non-empty list of integer token ids")
    return {
        "prompts": prompts,
        "new_tokens": positive_int(job, "new_tokens", None, job_path, least=2),
        "runs": positive_int(job, "runs", DEFAULT_RUNS, job_path),
        "warmup": positive_int(job, "warmup", DEFAULT_WARMUP, job_path, least=0),
        "threads": positive_int(job, "threads", 0, job_path, least=0) or machine_cores(),
    }


GreedyRun = Callable[[list[int], int], tuple[list[int], float, float]]  # tokens, prefill s, decode s


def measure_prompt(greedy_run: GreedyRun, prompt: list[int], job: dict) -> dict:
    """The job's warm-up and timed runs of one prompt: prefill ms, decode tokens/s (from the first
    token to the last), the greedy tokens and whether every run made the same."""
    new_tokens = job["new_tokens"]
    for _ in range(job["warmup"]):  # first runs pay for lazy setup, page faults, the threads' start
        greedy_run(prompt, new_tokens)
    prefills, rates, sequences = [], [], []
    for _ in range(job["runs"]):
        tokens, prefill, decode = greedy_run(prompt, new_tokens)
        prefills.append(1000 * prefill)
        rates.append((new_tokens - 1) / decode)
        sequences.append(tokens)
    return {
        "prompt_tokens": len(prompt),
        "prefill_ms": summarize(prefills),
        "decode_tokens_per_s": summarize(rates),
        "greedy": sequences[0],
        "greedy_same_every_run": all(s == sequences[0] for s in sequences),
    }


def summarize(values: list[float]) -> dict:
    """Median, min, max, interquartile range and the runs (as runtime/tools/bench.py summarizes)."""
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "iqr": q[2] - q[0],
        "runs": values,
    }


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark. Linux: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss keeps the parent's peak across fork and exec); elsewhere getrusage."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024
