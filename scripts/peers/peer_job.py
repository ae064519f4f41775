"""What the peer runners share (scripts/peers/*_eval.py): the job file, the statistics and the
peak RSS, as vsal's bench defines them. Standard library only: each runner runs under its own
peer's venv and never imports vsal; it finds this file beside it (its folder is on sys.path).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
from pathlib import Path

DEFAULT_RUNS, DEFAULT_WARMUP = 7, 1


class EvalError(Exception):
    """A user mistake or a failed build: reported as {"error": message}."""


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
