"""vsal's decoder beside the engines a user would pick instead, on the same weights, in one
interleaved run (`vsal bench PACKAGE --llm-dir DIR`).

The package's LLM must come from DIR, a transformers Llama checkpoint folder: its embedding table
(model.embed_tokens.weight) must equal the package's embeddings.npy (as float32, bit for bit), or
the comparison is refused before anything runs. The engines:

* vsal at each decoder precision the package has built (fp32, int8, int4; fp16 is a GPU
  precision): the fused variant where it is built, and the portable graph at the same precision,
  labelled so (python -m vsal.runtime.tools.decoder_eval);
* onnxruntime-genai fp32 / int8 / int4 (scripts/peers/ort_genai_eval.py, its model builder run on
  DIR) and llama.cpp F32 / Q8_0 / Q4_0 (scripts/peers/llama_cpp_eval.py --decode, GGUFs converted
  from DIR), each under its own venv's Python in ${VSAL_PEERS:-/work/peers}; a peer whose venv is
  missing is reported as not installed, with the script that installs it.

Every engine decodes the same token ids: bos and the first PROMPT_TOKENS - 1 tokens of a fixed
English text (TEXT) by the package's tokenizer, then NEW_TOKENS greedy tokens (argmax, no stop
token), batch 1. Each peer's model is built once before the rounds. Then every round runs each
engine once, in turn, a child process each (a warm-up generation and a timed one): engines that
share the machine's noise share it alike, and each child's peak RSS is its own. Per engine the
medians over the rounds: prefill ms (to the first token), decode tokens/s ((N - 1) / time from
the first token to the last); the peak RSS; greedy tokens against the same engine's fp32 (equal
positions before the first difference, and equal positions in all); and the bandwidth roofline
measured on the spot (runtime.tools.machine_limits, once per class, at the most one of its engines
reads per token): ceiling = bandwidth / (weights read per token + KV cache at the mean context),
and the share of it reached. Weights read per token: vsal's decoder graph files (as the bench
counts them; its graphs take embeddings, so hold no table), genai's initializers but those only
gathered, llama.cpp's GGUF tensors but an untied embedding table. Rows are grouped by precision
class (fp32, 8-bit, 4-bit).
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vsal.runtime import hugepages
from vsal.runtime.errors import ConfigError, PackageError
from vsal.runtime.log import sayer

PROMPT_TOKENS = 200  # bos + the text's first 199 tokens
NEW_TOKENS = 64  # greedy tokens per generation
DEFAULT_ROUNDS = 3
CLASSES = ("fp32", "8-bit", "4-bit")  # the table's groups, by weight bits
CLASS_OF_BITS = {32: "fp32", 8: "8-bit", 4: "4-bit"}
CHILD_TIMEOUT_S = 3600  # one engine's run (or one peer model's build); a 13B fp32 run takes minutes
EMBEDDINGS_KEY = "model.embed_tokens.weight"
MAX_SAFETENSORS_HEADER = 100 << 20  # bytes; real headers are a few MB at most
GATHER_OPS = {"Gather", "GatherBlockQuantized"}  # read one row per token, not the whole table
VSAL, VSAL_PORTABLE = "vsal", "vsal portable graph"
# Jane Austen, Pride and Prejudice (1813), the opening of chapter 1: public domain English prose,
# long enough for PROMPT_TOKENS with any LLaMA-family tokenizer.
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must "
    "be in want of a wife.\n\nHowever little known the feelings or views of such a man may be on his "
    "first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters.\n\n"
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let '
    'at last?"\n\nMr. Bennet replied that he had not.\n\n"But it is," returned she; "for Mrs. Long has '
    'just been here, and she told me all about it."\n\nMr. Bennet made no answer.\n\n"Do you not want '
    'to know who has taken it?" cried his wife impatiently.\n\n"You want to tell me, and I have no '
    'objection to hearing it."\n\nThis was invitation enough.\n\n"Why, my dear, you must know, Mrs. '
    "Long says that Netherfield is taken by a young man of large fortune from the north of England; "
    "that he came down on Monday in a chaise and four to see the place, and was so much delighted with "
    "it, that he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, "
    'and some of his servants are to be in the house by the end of next week."\n\n"What is his name?"'
    '\n\n"Bingley."\n\n"Is he married or single?"\n\n"Oh! Single, my dear, to be sure! A single man of '
    'large fortune; four or five thousand a year. What a fine thing for our girls!"\n'
)
TEXT_SOURCE = "Pride and Prejudice, chapter 1"

say = sayer("vsal bench: peers")


@dataclass(frozen=True)
class Peer:
    """A peer engine: its venv under VSAL_PEERS, its runner in scripts/peers, its precisions."""

    name: str
    venv: str
    runner: str  # scripts/peers/<runner>: `PY runner [mode] CHECKPOINT PRECISION OUT JOB.json`
    install: str  # scripts/peers/<install>
    classes: dict[str, str]  # its precision spelling -> class
    mode: tuple[str, ...] = ()  # the runner's leading arguments


PEERS = (
    Peer(
        "onnxruntime-genai",
        "ort-genai",
        "ort_genai_eval.py",
        "install_ort_genai.sh",
        {"fp32": "fp32", "int8": "8-bit", "int4": "4-bit"},
    ),
    Peer(
        "llama.cpp",
        "llama-cpp",
        "llama_cpp_eval.py",
        "install_llama_cpp.sh",
        {"F32": "fp32", "Q8_0": "8-bit", "Q4_0": "4-bit"},
        mode=("--decode",),
    ),
)


@dataclass(frozen=True)
class Engine:
    """One engine at one precision: the child command that measures it (JOB.json appended) and, for
    a peer, the command that builds its model once (None: nothing to build)."""

    name: str  # VSAL, VSAL_PORTABLE or a Peer's name
    precision: str  # the engine's own spelling
    precision_class: str
    command: tuple[str, ...]
    build: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"


def default_peers_dir() -> Path:
    return Path(os.environ.get("VSAL_PEERS", "/work/peers"))


def default_scripts_dir() -> Path:
    """scripts/peers of the source tree this module is in (the runners are not part of the wheel)."""
    return Path(__file__).resolve().parents[2] / "scripts" / "peers"


# --- the checkpoint folder is the package's LLM ------------------------------------------------


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and where its data starts; ConfigError naming --llm-dir."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_SAFETENSORS_HEADER:
                raise ValueError(f"a {length}-byte header")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ConfigError(f"--llm-dir: {path} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"--llm-dir: {path} is not a safetensors file (its header is not an object)")
    return header, 8 + length


def _file_holding(llm_dir: Path, key: str) -> Path:
    """The safetensors file of the folder that holds `key` (one file, or shards with an index)."""
    single, index = llm_dir / "model.safetensors", llm_dir / "model.safetensors.index.json"
    if single.is_file():
        return single
    if index.is_file():
        try:
            shard = json.loads(index.read_text(encoding="utf-8"))["weight_map"][key]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--llm-dir: {index} names no file for {key} ({exc!r})") from None
        return llm_dir / shard
    raise ConfigError(
        f"--llm-dir {llm_dir}: no model.safetensors or model.safetensors.index.json "
        "(give the transformers Llama checkpoint folder the package's LLM was exported from)"
    )


def embedding_table(llm_dir: Path) -> np.ndarray:
    """The folder's token-embedding table as float32 [V, H] (read without torch, memory-mapped)."""
    path = _file_holding(llm_dir, EMBEDDINGS_KEY)
    header, data_start = _safetensors_header(path)
    entry = header.get(EMBEDDINGS_KEY)
    if not isinstance(entry, dict):
        raise ConfigError(f"--llm-dir: {path} has no {EMBEDDINGS_KEY}")
    kind, shape = entry.get("dtype"), tuple(entry.get("shape", ()))
    begin, end = entry.get("data_offsets", (0, 0))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
    if kind == "BF16":  # bfloat16 is float32's upper half
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif kind in ("F32", "F16"):
        values = raw.view(np.float32 if kind == "F32" else np.float16).astype(np.float32)
    else:
        raise ConfigError(f"--llm-dir: {path}: {EMBEDDINGS_KEY} is {kind}, expected F32, F16 or BF16")
    if values.size != int(np.prod(shape)):
        raise ConfigError(f"--llm-dir: {path}: {EMBEDDINGS_KEY}'s bytes do not make its shape {shape}")
    return values.reshape(shape)


def check_llm_dir(llm_dir: Path, package: Path, manifest) -> None:
    """ConfigError naming --llm-dir unless the folder's embedding table is the package's
    embeddings.npy: the peers would otherwise time another model."""
    if not llm_dir.is_dir():
        raise ConfigError(f"--llm-dir {llm_dir}: not a folder (give a transformers Llama checkpoint folder)")
    if not (llm_dir / "config.json").is_file():
        raise ConfigError(f"--llm-dir {llm_dir}: no config.json (a transformers checkpoint folder has one)")
    table = embedding_table(llm_dir)
    packaged = manifest.load_embeddings(package)
    if table.shape != packaged.shape or not np.array_equal(table, packaged):
        why = (
            f"shape {table.shape} against {packaged.shape}"
            if table.shape != packaged.shape
            else "same shape, other values"
        )
        raise ConfigError(
            f"--llm-dir {llm_dir}: its {EMBEDDINGS_KEY} is not {package}'s embeddings.npy ({why}): "
            "give the checkpoint folder the package's LLM was exported from (vsal-export export --llm)"
        )


def check_rounds(rounds: int) -> None:
    if rounds < 1:
        raise ConfigError(f"--peer-rounds {rounds}: expected at least 1")


# --- the engines -------------------------------------------------------------------------------


def prompt_ids(package: Path, manifest, tokens: int = PROMPT_TOKENS) -> list[int]:
    """bos + the first `tokens` - 1 tokens of TEXT, by the package's tokenizer."""
    from vsal.runtime.tokenizers import LlamaTokenizer

    ids = LlamaTokenizer(package / manifest.llm_tokenizer.file).encode(TEXT)
    if len(ids) < tokens - 1:
        raise ConfigError(
            f"the fixed text is {len(ids)} tokens with {package}'s tokenizer; asked for {tokens}"
        )
    return [manifest.special_tokens["bos"], *ids[: tokens - 1]]


def vsal_engines(package: Path, manifest) -> tuple[list[Engine], list[str]]:
    """vsal's engines (fused where built, and the portable graph) and notes on precisions left out."""
    from vsal.runtime import precisions

    info = manifest.graphs["llm_decoder"]
    engines, notes = [], []
    base = (sys.executable, "-m", "vsal.runtime.tools.decoder_eval", str(package))
    for precision in (precisions.EXPORTED, *info.variants):
        row = precisions.get(precision)
        if row.gpu_only or row.weight_bits not in CLASS_OF_BITS:
            notes.append(f"vsal {precision}: a GPU precision, not compared on the CPU")
            continue
        cls = CLASS_OF_BITS[row.weight_bits]
        if precision in info.fused:
            engines.append(Engine(VSAL, precision, cls, (*base, precision, "--no-verify")))
        portable = (*base, precision, "--no-verify", "--portable-decoder")
        engines.append(Engine(VSAL_PORTABLE, precision, cls, portable))
    return engines, notes


def peer_engines(
    llm_dir: Path, peers_dir: Path, scripts_dir: Path, models_dir: Path
) -> tuple[list[Engine], list[dict]]:
    """The installed peers' engines, and a note for each peer that is not installed."""
    engines, missing = [], []
    for peer in PEERS:
        python = peers_dir / peer.venv / "bin" / "python"
        runner = scripts_dir / peer.runner
        if not python.is_file():
            note = f"not installed: run scripts/peers/{peer.install} (no {python})"
            missing.append({"engine": peer.name, "note": note})
            continue
        if not runner.is_file():
            note = f"its runner {runner} is missing (the peers' runners are in a source checkout)"
            missing.append({"engine": peer.name, "note": note})
            continue
        out = models_dir / peer.venv
        for precision, cls in peer.classes.items():
            command = (str(python), str(runner), *peer.mode, str(llm_dir), precision, str(out))
            engines.append(Engine(peer.name, precision, cls, command, build=(*command, "--build-only")))
    return engines, missing


def in_turn(engines: list[Engine]) -> list[Engine]:
    """A round's order: by class (fp32, 8-bit, 4-bit), the engines of a class side by side in time."""
    return sorted(engines, key=lambda e: CLASSES.index(e.precision_class))


# --- running the children -----------------------------------------------------------------------


def run_child(command: tuple[str, ...]) -> dict:
    """A child's result: its last stdout line as a JSON object, or {"error": why}."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {CHILD_TIMEOUT_S} s"}
    except OSError as exc:
        return {"error": f"cannot start {command[0]}: {exc}"}
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if isinstance(result, dict) and (proc.returncode == 0 or "error" in result):
        return result
    tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
    return {"error": f"exit status {proc.returncode}, no JSON result; stderr: {tail}"}


def build_models(engines: list[Engine], errors: dict[str, str]) -> None:
    """Each peer's model, built (or found) once before the rounds; a failure is that engine's error."""
    for engine in engines:
        if engine.build is None:
            continue
        say(f"{engine.label}: building its model (once; cached)")
        result = run_child(engine.build)
        if "error" in result:
            errors[engine.label] = result["error"]


def run_rounds(
    engines: list[Engine],
    job: Path,
    rounds: int,
    errors: dict[str, str],
    run: Callable[[tuple[str, ...]], dict] = run_child,
) -> tuple[dict[str, list[dict]], list[list]]:
    """Every round runs each engine (without an error) once, in turn. Returns each engine's results
    by label and the order the children ran in, [round, label] each."""
    results: dict[str, list[dict]] = {e.label: [] for e in engines}
    order = []
    for number in range(1, rounds + 1):
        for engine in engines:
            if engine.label in errors:
                continue
            result = run((*engine.command, str(job)))
            order.append([number, engine.label])
            if "error" in result:
                errors[engine.label] = result["error"]
                continue
            results[engine.label].append(result)
            one = result["prompts"][0]
            say(
                f"round {number}/{rounds}: {engine.label}: prefill {one['prefill_ms']['median']:.1f} ms, "
                f"{one['decode_tokens_per_s']['median']:.1f} tokens/s"
            )
    return results, order


# --- what each engine reads per token ----------------------------------------------------------


def onnx_read_bytes(path: Path) -> tuple[int, str]:
    """(bytes of the initializers a decoded token reads, the past cache's dtype) of an ONNX decoder:
    every initializer but those only gathered (an embedding table: one row a token)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for tensor in graph.initializer:
        ops = consumers.get(tensor.name)
        if ops and ops <= GATHER_OPS:
            continue
        external = {e.key: e.value for e in tensor.external_data}
        if "length" in external:
            total += int(external["length"])
        elif tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    past = next((i for i in graph.input if i.name.startswith("past_key_values")), None)
    dtype = "float32"
    if past is not None:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)).name
    return total, dtype


def kv_elements_per_position(manifest) -> int:
    """Key and value elements per position of context, every layer (the checkpoint's dims)."""
    m = manifest.config["llm"]
    head_dim = m["hidden_size"] // m["num_attention_heads"]
    return 2 * m["num_hidden_layers"] * m["num_key_value_heads"] * head_dim


def read_per_token(engine: Engine, result: dict, package: Path, manifest) -> tuple[int, int]:
    """(weight bytes read per decoded token, KV bytes per position of context) of one engine."""
    from vsal.runtime.tools.bench import graph_bytes, kv_bytes_per_position

    if engine.name in (VSAL, VSAL_PORTABLE):
        fused = result.get("decoder_graph") == "fused"
        weights = graph_bytes(package, manifest, "llm_decoder", engine.precision, fused)
        return weights, kv_bytes_per_position(manifest, engine.precision)
    elements = kv_elements_per_position(manifest)
    if "weights_bytes_per_token" in result:  # llama.cpp's runner counts its GGUF's tensors
        return int(result["weights_bytes_per_token"]), elements * np.dtype(result["kv_dtype"]).itemsize
    model_dir = Path(result["model_dir"])  # onnxruntime-genai: its decoder's ONNX file
    config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    weights, dtype = onnx_read_bytes(model_dir / config["model"]["decoder"]["filename"])
    return weights, elements * np.dtype(dtype).itemsize


def bandwidth_at(size: int, quick: bool) -> dict:
    """Read bandwidth over a buffer of `size` bytes, measured now (quick: at most 64 MiB, 2 reps)."""
    from vsal.runtime.tools import machine_limits

    return machine_limits.memory_bandwidth(min(size, 64 << 20) if quick else size, 2 if quick else 5)


# --- the rows ------------------------------------------------------------------------------------


def equal_to(tokens: list[int], reference: list[int]) -> dict:
    """Positions equal before the first difference, and equal positions in all."""
    same = [a == b for a, b in zip(tokens, reference, strict=False)]  # a shorter run: fewer positions
    prefix = same.index(False) if False in same else len(same)
    return {"prefix": prefix, "count": sum(same), "of": len(reference)}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def engine_row(engine: Engine, results: list[dict], error: str | None) -> dict:
    row = {"engine": engine.name, "precision": engine.precision, "class": engine.precision_class}
    if error is not None:
        row["error"] = error
    if not results:
        return row
    prompts = [r["prompts"][0] for r in results]
    greedy = [p["greedy"] for p in prompts]
    row |= {
        "rounds": len(results),
        "prefill_ms": _stats([p["prefill_ms"]["median"] for p in prompts]),
        "decode_tokens_per_s": _stats([p["decode_tokens_per_s"]["median"] for p in prompts]),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
        "greedy": greedy[0],
        "greedy_same_every_round": all(g == greedy[0] for g in greedy),
    }
    for key in ("decoder_graph", "backend", "version", "threads", "huge_pages"):
        if key in results[0]:
            row[key] = results[0][key]
    return row


def add_greedy_equal(rows: list[dict]) -> None:
    """Each row's greedy tokens against its engine's fp32 row (vsal's fused rows against the
    portable fp32 when no fused fp32 is built)."""
    fp32 = {r["engine"]: r["greedy"] for r in rows if r["class"] == "fp32" and "greedy" in r}
    for row in rows:
        reference = fp32.get(row["engine"])
        name = row["engine"]
        if reference is None and name == VSAL:
            reference, name = fp32.get(VSAL_PORTABLE), VSAL_PORTABLE
        if reference is not None and "greedy" in row:
            row["greedy_equal_to_fp32"] = equal_to(row["greedy"], reference) | {"reference": f"{name} fp32"}
    # the fused graph against the portable graph it was built from, precision by precision
    portable = {r["precision"]: r["greedy"] for r in rows if r["engine"] == VSAL_PORTABLE and "greedy" in r}
    for row in rows:
        if row["engine"] == VSAL and "greedy" in row and row["precision"] in portable:
            row["greedy_equal_to_portable"] = equal_to(row["greedy"], portable[row["precision"]])


def add_roofline(row: dict, weights: int, kv_per_position: int, mean_context: float, bandwidth: dict) -> None:
    per_token = weights + kv_per_position * mean_context
    ceiling = bandwidth["bytes_per_s"] / per_token
    row |= {
        "weights_bytes_per_token": weights,
        "kv_bytes_per_token_at_mean_context": round(kv_per_position * mean_context),
        "bytes_per_token": round(per_token),
        "bandwidth_bytes_per_s": round(bandwidth["bytes_per_s"]),
        "bandwidth_buffer_bytes": bandwidth["buffer_bytes"],
        "roofline_tokens_per_s": ceiling,
        "fraction_of_roofline": row["decode_tokens_per_s"]["median"] / ceiling,
    }


def add_rooflines(
    engines: list[Engine],
    rows: list[dict],
    reads: dict[str, tuple[int, int]],
    mean_context: float,
    quick: bool,
) -> None:
    """Each measured row's roofline. One bandwidth per precision class, measured at the most any of
    its engines reads per token: the engines of a class are compared on one ceiling (a loaded
    machine's measurements at nearby sizes differ by more than the sizes would)."""
    for cls in CLASSES:
        members = [(e, r) for e, r in zip(engines, rows, strict=True) if e.precision_class == cls]
        members = [(e, r) for e, r in members if e.label in reads]
        if not members:
            continue
        say(f"{cls}: measuring the read bandwidth at the class's bytes per token")
        size = max(round(w + kv * mean_context) for w, kv in (reads[e.label] for e, _ in members))
        bandwidth = bandwidth_at(size, quick)
        for engine, row in members:
            add_roofline(row, *reads[engine.label], mean_context, bandwidth)


# --- the comparison ------------------------------------------------------------------------------


def compare(
    package: str | os.PathLike,
    llm_dir: str | os.PathLike,
    rounds: int = DEFAULT_ROUNDS,
    threads: int = 0,
    quick_limits: bool = False,
    peers_dir: Path | None = None,
    scripts_dir: Path | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    new_tokens: int = NEW_TOKENS,
) -> dict:
    """The interleaved comparison as a JSON-ready dict (see the module docstring)."""
    from vsal.runtime.manifest import load_manifest, verify_files

    package, llm_dir = Path(package), Path(llm_dir)
    peers_dir = peers_dir or default_peers_dir()
    check_rounds(rounds)
    manifest = load_manifest(package)
    check_llm_dir(llm_dir, package, manifest)
    problems = verify_files(manifest, package)  # once here: the children skip it (--no-verify)
    if problems:
        raise PackageError("; ".join(problems))
    ids = prompt_ids(package, manifest, prompt_tokens)
    engines, notes = vsal_engines(package, manifest)
    peers, missing = peer_engines(
        llm_dir, peers_dir, scripts_dir or default_scripts_dir(), peers_dir / "models"
    )
    engines = in_turn(engines + peers)
    errors: dict[str, str] = {}
    build_models(engines, errors)
    with tempfile.TemporaryDirectory(prefix="vsal-peers-") as tmp:
        job = Path(tmp) / "job.json"
        spec = {"prompts": [ids], "new_tokens": new_tokens, "runs": 1, "warmup": 1, "threads": threads}
        job.write_text(json.dumps(spec), encoding="utf-8")
        results, order = run_rounds(engines, job, rounds, errors)
    rows = [engine_row(e, results[e.label], errors.get(e.label)) for e in engines]
    add_greedy_equal(rows)
    reads = {  # label -> (weight bytes per token, KV bytes per position)
        e.label: read_per_token(e, results[e.label][0], package, manifest)
        for e in engines
        if results[e.label]
    }
    add_rooflines(engines, rows, reads, len(ids) + new_tokens / 2, quick_limits)
    return {
        "llm_dir": str(llm_dir),
        "settings": {
            "rounds": rounds,
            "prompt_tokens": len(ids),
            "prompt": f"bos + the first {len(ids) - 1} tokens of {TEXT_SOURCE} (the package's tokenizer)",
            "new_tokens": new_tokens,
            "greedy": "argmax, no stop token",
            "per_child": "1 warm-up generation + 1 timed",
            "threads": threads or "every core",
            "huge_pages": hugepages.state(),  # the children run in this environment
            "peers_dir": str(peers_dir),
        },
        "engines": rows,
        "not_installed": missing,
        "notes": notes,
        "order": order,
    }


# --- output --------------------------------------------------------------------------------------


def _span(stat: dict, scale: float = 1.0) -> str:
    return f"{stat['median'] * scale:.1f} [{stat['min'] * scale:.1f}-{stat['max'] * scale:.1f}]"


def _greedy(row: dict) -> str:
    eq = row.get("greedy_equal_to_fp32")
    if eq is None:
        return "-"
    text = f"{eq['prefix']}/{eq['of']} first, {eq['count']} in all"
    own = row.get("greedy_equal_to_portable")
    return text if own is None else f"{text}; = portable graph: {own['prefix']}/{own['of']} first"


def table(peers: dict) -> str:
    s = peers["settings"]
    lines = [
        f"peers on {peers['llm_dir']}: prompt {s['prompt_tokens']} tokens, {s['new_tokens']} greedy "
        f"tokens, {s['rounds']} interleaved rounds, threads {s['threads']}; median [min-max] over the rounds",
        "",
        "| class | engine | precision | prefill ms | decode tokens/s | peak RSS MiB | greedy = fp32 "
        "| MB/token | roofline tokens/s | of roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "huge_pages" in s:  # every child inherits the bench's environment (runtime/hugepages.py)
        lines.insert(1, f"every engine's process: {s['huge_pages']} (the bench's environment, inherited)")
    for cls in CLASSES:
        for row in (r for r in peers["engines"] if r["class"] == cls):
            head = f"| {cls} | {row['engine']} | {row['precision']} |"
            if "prefill_ms" not in row:
                lines.append(f"{head} failed: {row.get('error', 'no result')} | | | | | | |")
                continue
            lines.append(
                f"{head} {_span(row['prefill_ms'])} | {_span(row['decode_tokens_per_s'])} "
                f"| {row['peak_rss_bytes'] / 2**20:.0f} | {_greedy(row)} "
                f"| {row['bytes_per_token'] / 1e6:.1f} "
                f"| {row['roofline_tokens_per_s']:.1f} | {100 * row['fraction_of_roofline']:.0f}% |"
            )
    for entry in peers["not_installed"]:
        lines.append(f"{entry['engine']}: {entry['note']}")
    lines += [f"note: {n}" for n in peers["notes"]]
    failed = [r for r in peers["engines"] if "error" in r and "prefill_ms" in r]
    lines += [f"{r['engine']} {r['precision']}: stopped after a failure: {r['error']}" for r in failed]
    return "\n".join(lines)
