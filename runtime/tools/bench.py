"""`vsal bench`: per-stage speed and memory of a model package, against the PyTorch reference and
against what this machine allows.

One bench = a warm-up run and N timed runs of the whole job (decode the clip, preprocess, the three
encoders, the frame Q-Former, alignment, the MRC Q-Former, the prompt embeddings, prefill and a fixed
number of decoded tokens: end of sequence is ignored so every run decodes the same length). The
per-clip encoder cache is cleared before every run. For each stage: median, min and max.

* PyTorch reference: when torch is importable and the package's weights can be rebuilt (a preset's
  seeded random weights, or `--checkpoint FILE`), the same stages of the reference pipeline run in a
  child process (`python -m vsal.export.bench_reference`), so its memory is its own and this process
  never imports torch. The check that the weights are the package's: the LLM token-embedding table
  of the rebuilt model must equal the package's embeddings.npy, bit for bit. A reference that
  cannot run is reported as skipped, with its reason; with `--checkpoint` (asked for by name) it is
  an error, and the file is checked before the bench starts.
* Machine limits (`runtime.tools.machine_limits`): read bandwidth (DRAM, and at the size read per decoded
  token), fp32 GEMM rate (numpy), int8 GEMM rate (ONNX Runtime MatMulInteger). Decoding is reported
  as a fraction of its roofline (bandwidth / bytes read per token: decoder weights at the precision
  that ran + the KV cache at the mean context length), the encoders and the prefill as a fraction of
  the GEMM rate (FLOPs counted from the config: every matmul and convolution, attention included).
* Peak memory: the process's RSS high-water mark (VmHWM), the runtime's before the reference
  starts and the reference child's own.
* Peers (`--llm-dir DIR`, the checkpoint folder the package's LLM came from): vsal's decoder beside
  onnxruntime-genai and llama.cpp on the same weights, in interleaved rounds (`runtime.tools.peers`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from vsal.runtime import hugepages
from vsal.runtime.errors import ConfigError
from vsal.runtime.log import sayer
from vsal.runtime.observe import Stopwatch
from vsal.runtime.registry_choice import precision_choice

STAGES = (  # in pipeline order; the ones a clip without video or audio lacks are left out
    "decode_video+preprocess",
    "vision_encoder",
    "decode_audio+features",
    "whisper_encoder",
    "beats_encoder",
    "frame_qformer",
    "alignment",
    "mrc_qformer",
    "prompt_embeddings",
    "prefill",  # generation start -> first token (the prompt through the decoder + first pick)
    "decode_per_token",  # mean time per token after the first
    "time_to_first_token",  # request (media not cached) -> first token
    "end_to_end",  # request -> last token
)
DEFAULT_PROMPT = "What happens in this clip, and what can be heard?"
DEFAULT_TOKENS = 32
MAX_THREADS = 256  # intra-op threads; 0 = the libraries' default (one per core)
# The reference child: `python -m vsal.export.bench_reference`, with a user mistake (a checkpoint
# that is not one) as a JSON {"error": line} and exit code 1 instead of a traceback.
_REFERENCE_MAIN = """
import json, sys
from vsal.runtime.errors import VsalError
sys.argv[0] = "vsal.export.bench_reference"
try:
    from vsal.export.bench_reference import main
    main()
except VsalError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(1)
"""


say = sayer("vsal bench")


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark. Linux: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss does not: a child started by this process would report at least this one's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def summarize(values: list[float]) -> dict:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "iqr": q[2] - q[0],
        "runs": values,
    }


def generation_stages(lead: float, first: float, last: float, tokens: int) -> dict[str, float]:
    """The bench's generation stages, for the runtime and the reference alike: `lead` seconds from
    the request to generation start, the first token `first` and the last `last` seconds after it."""
    return {
        "prefill": first,
        "decode_per_token": (last - first) / max(tokens - 1, 1),
        "time_to_first_token": lead + first,
        "end_to_end": lead + last,
    }


def summarize_runs(results: list[dict]) -> dict:
    """Each stage's statistics over the timed runs (in STAGES order), the decode rate, the tokens."""
    return {
        "stages": {
            name: summarize([r["timings"][name] for r in results])
            for name in STAGES
            if name in results[0]["timings"]
        },
        "decode_tokens_per_s": summarize([1 / r["timings"]["decode_per_token"] for r in results]),
        "tokens": results[0]["tokens"],
    }


def run_line(number: int, runs: int, timings: dict[str, float]) -> str:
    return (
        f"run {number}/{runs}: end to end {timings['end_to_end']:.2f} s, first token "
        f"{timings['time_to_first_token']:.2f} s, {1 / timings['decode_per_token']:.1f} tokens/s"
    )


# --- FLOPs and bytes from the config ----------------------------------------------------------------


def _layer_flops(tokens: int, width: int, ffn: int, ffn_mats: int = 2) -> float:
    """One transformer layer: q, k, v, o projections, the FFN's matrices, QK^T and AV."""
    return 2 * tokens * (4 * width * width + ffn_mats * width * ffn) + 4 * tokens * tokens * width


def encoder_flops(config: dict, graph: str, shapes: dict[str, tuple]) -> float | None:
    """FLOPs of one call of an encoder graph at the given input shapes (None: not counted)."""
    if graph == "vision_encoder":
        v = config["vision"]
        n = shapes["pixel_values"][0]
        d, p = v["embed_dim"], v["patch_size"]
        patches = (v["img_size"] // p) ** 2
        per_frame = 2 * patches * 3 * p * p * d + v["depth"] * _layer_flops(
            patches + 1, d, int(d * v["mlp_ratio"])
        )
        return n * per_frame
    if graph == "whisper_encoder":
        w = config["whisper"]
        t, d, mels = w["max_source_positions"], w["d_model"], w["num_mel_bins"]
        convs = 2 * (2 * t) * mels * 3 * d + 2 * t * 3 * d * d
        return convs + w["encoder_layers"] * _layer_flops(t, d, w["encoder_ffn_dim"])
    if graph == "beats_encoder":
        b = config["beats"]
        frames, bins = shapes["fbank"][1], shapes["fbank"][2]
        p, d = b["input_patch_size"], b["encoder_embed_dim"]
        t = (frames // p) * (bins // p)
        front = 2 * t * p * p * b["embed_dim"] + 2 * t * b["embed_dim"] * d
        pos_conv = 2 * t * d * (d // b["conv_pos_groups"]) * b["conv_pos"]
        return front + pos_conv + b["encoder_layers"] * _layer_flops(t, d, b["encoder_ffn_embed_dim"])
    return None


def llm_flops(config: dict, tokens: int, past: int = 0) -> float:
    """FLOPs of the decoder on `tokens` new tokens after `past` (logits for every new token)."""
    m = config["llm"]
    h, layers, inter = m["hidden_size"], m["num_hidden_layers"], m["intermediate_size"]
    hd = h // m["num_attention_heads"]
    kv = m["num_key_value_heads"] * hd
    per_token = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter) * layers + 2 * h * m["vocab_size"]
    attended = tokens * past + tokens * (tokens + 1) / 2  # causal
    return tokens * per_token + 4 * attended * h * layers


def kv_bytes_per_position(manifest, precision: str) -> int:
    """Bytes of the KV cache per position of context (key and value, every layer) as the decoder that
    runs at `precision` keeps it (an fp16 decoder: float16)."""
    layout = manifest.graphs["llm_decoder"].interface(precision).kv_layout(manifest.kv_layout())
    return 2 * layout.layers * layout.kv_heads * layout.head_dim * np.dtype(layout.dtype).itemsize


def graph_bytes(folder: Path, manifest, graph: str, precision: str, fused: bool = False) -> int:
    """Bytes of the graph file that runs at `precision` (+ its external weight files); `fused`: of
    its fused variant."""
    info = manifest.graphs[graph]
    if fused:
        variant = info.fused[precision]
        files = [variant.file, *variant.external_data]
    elif precision in info.variants:
        variant = info.variants[precision]
        files = [variant.file, *variant.external_data]
    else:
        files = [info.file, *info.external_data]
    return sum((folder / f).stat().st_size for f in files)


# --- the runtime ------------------------------------------------------------------------------------


class _TimedStep:
    """Wraps a DecoderStep: times each call (the first is the prefill)."""

    def __init__(self, step):
        self.step = step
        self.seconds: list[float] = []

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.step(*args)
        self.seconds.append(time.perf_counter() - start)
        return out


def _media_kwargs(path: Path) -> dict:
    from vsal.runtime import media

    info = media.probe_media(path)
    return {"video": path} if info.video_seconds is not None else {"audio": path}


def run_runtime_once(
    pipeline, watch: Stopwatch, media_kwargs: dict, prompt: str, tokens: int, shapes: dict
) -> dict:
    """One timed run of the whole job; returns seconds per stage (+ decode details). The pipeline's
    stages come from `watch`, its observer; the bench's own (the prompt embeddings, the decoding
    at a fixed length, which `ask` does not do) are timed here."""
    from vsal.runtime.generation import generate_tokens
    from vsal.runtime.prompt import DecodingOptions

    pipeline.clear_cache()  # every run decodes and encodes the clip
    decoding = pipeline.manifest.decoding
    options = DecodingOptions(
        num_beams=1,
        max_new_tokens=tokens,
        repetition_penalty=decoding.get("repetition_penalty", 1.0),
        eos_token_id=None,  # no early stop: every run decodes `tokens` tokens
    )
    prompt = pipeline.check_request(prompt, options, media_kwargs.get("video"))  # the limits `ask` has
    watch.take()  # this run's stages only
    start = time.perf_counter()
    features, _ = pipeline.encode_media(media_kwargs.get("video"), media_kwargs.get("audio"))
    av = pipeline.av_tokens(features, prompt)
    with watch("prompt_embeddings"):
        embeds = pipeline.inputs_embeds(av, prompt)
    step = _TimedStep(pipeline.decoder_step())
    t = time.perf_counter()
    times = []
    ids = []
    for token in generate_tokens(step, pipeline.embed, embeds, options):
        times.append(time.perf_counter())
        ids.append(token)
    timings = watch.take()
    timings.update(generation_stages(t - start, times[0] - t, times[-1] - t, len(times)))
    shapes["prompt_length"] = int(embeds.shape[1])
    shapes["frames"] = int(features.frames)
    return {
        "timings": timings,
        "tokens": len(ids),
        "decoder_step_s": step.seconds[1:],
        "prefill_step_s": step.seconds[0],
    }


def _record_shapes(pipeline, shapes: dict) -> None:
    """Remember the input shapes of each graph's last call (for the FLOPs)."""

    def record(name, feeds):
        shapes.setdefault("graphs", {})[name] = {k: tuple(v.shape) for k, v in feeds.items()}

    pipeline.observe_feeds(record)


def bench_runtime(
    model_dir: Path,
    media_kwargs: dict,
    prompt: str,
    runs: int,
    tokens: int,
    precision,
    threads: int,
    low_memory: bool = False,
    portable_decoder: bool = False,
) -> dict:
    from vsal.runtime.backends.fused_decoder import FusedDecoderBackend
    from vsal.runtime.pipeline import Pipeline

    start = time.perf_counter()
    pipeline = Pipeline.load(
        model_dir,
        threads=threads,
        verbose=False,
        precision=precision,
        low_memory=low_memory,
        portable_decoder=portable_decoder,
    )
    load_s = time.perf_counter() - start
    shapes: dict = {}
    _record_shapes(pipeline, shapes)
    watch = Stopwatch()
    pipeline.observe(watch)
    say(f"runtime: warm-up run (loads the {len(pipeline.manifest.graphs)} graphs)")
    start = time.perf_counter()
    run_runtime_once(pipeline, watch, media_kwargs, prompt, tokens, shapes)
    warmup_s = time.perf_counter() - start
    results = []
    for i in range(runs):
        result = run_runtime_once(pipeline, watch, media_kwargs, prompt, tokens, shapes)
        results.append(result)
        say("runtime " + run_line(i + 1, runs, result["timings"]))
    backends = pipeline.loaded_backends
    return {
        **summarize_runs(results),
        "decoder_step_s": summarize([float(np.median(r["decoder_step_s"])) for r in results]),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "backends": {name: b.description for name, b in backends.items()},
        "precisions": {name: b.precision for name, b in backends.items()},
        "fused_decoder": isinstance(backends.get("llm_decoder"), FusedDecoderBackend),
        "shapes": shapes,
        "_manifest": pipeline.manifest,
    }


# --- the reference, in a child process ------------------------------------------------------------------


def torch_available() -> bool:
    """Whether torch and transformers can be imported (checked without importing them here)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    except (ImportError, ValueError):
        return False


def bench_reference(
    model_dir: Path, media_kwargs: dict, prompt: str, runs: int, tokens: int, threads: int, checkpoint
) -> dict:
    """The reference's stage timings from `python -m vsal.export.bench_reference`, or {"skipped": why}."""
    if not torch_available():
        return {"skipped": "torch/transformers are not installed (the core install): no reference"}
    command = [
        sys.executable,
        "-c",
        _REFERENCE_MAIN,
        str(model_dir),
        "--prompt",
        prompt,
        "--runs",
        str(runs),
        "--tokens",
        str(tokens),
        "--threads",
        str(threads),
    ]
    for key in ("video", "audio"):
        if key in media_kwargs:
            command += [f"--{key}", str(media_kwargs[key])]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # its progress goes to our stderr
    lines = proc.stdout.strip().splitlines()
    result = _last_json(lines)
    if result is not None and "error" in result:
        return {"skipped": result["error"]}
    if proc.returncode != 0 or result is None:
        return {"skipped": f"the reference failed (exit code {proc.returncode}); see its messages above"}
    return result


def _last_json(lines: list[str]) -> dict | None:
    """The child's result: its last stdout line, when that is a JSON object."""
    try:
        value = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def check_settings(runs: int, tokens: int, threads: int, reference: bool, checkpoint) -> None:
    """The bench's settings, before minutes of work: ConfigError for the first that cannot run."""
    from vsal.runtime.package_paths import file_problem

    if runs < 1 or tokens < 2:
        raise ConfigError("--runs must be >= 1 and --max-new-tokens >= 2")
    if not 0 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads {threads}: expected 0 (the default) to {MAX_THREADS}")
    if checkpoint is None:
        return
    problem = file_problem(checkpoint, what="a consolidated checkpoint file")
    if problem:
        raise ConfigError(f"{checkpoint}: {problem} (--checkpoint)")
    if not reference:
        raise ConfigError("--checkpoint is for the PyTorch reference: leave out --no-reference")
    if not torch_available():
        raise ConfigError(
            "--checkpoint is for the PyTorch reference, which needs torch and transformers: "
            "pip install 'vsal[export]', or leave out --checkpoint"
        )


# --- putting it together -----------------------------------------------------------------------------------


def roofline(runtime: dict, limits: dict, model_dir: Path, tokens: int) -> dict:
    manifest = runtime["_manifest"]
    config = manifest.config
    shapes = runtime["shapes"]
    precision = runtime["precisions"].get("llm_decoder", "fp32")
    weights = graph_bytes(model_dir, manifest, "llm_decoder", precision, runtime.get("fused_decoder", False))
    mean_context = shapes["prompt_length"] + tokens / 2
    kv_bytes = kv_bytes_per_position(manifest, precision) * mean_context
    per_token = weights + kv_bytes
    bandwidth = limits.get("working_set_bandwidth", limits["memory_bandwidth"])["bytes_per_s"]
    dram = limits["memory_bandwidth"]["bytes_per_s"]
    measured = runtime["decode_tokens_per_s"]["median"]
    decode = {
        "precision": precision,
        "decoder_weight_bytes": weights,
        "kv_bytes_per_token_at_mean_context": round(
            kv_bytes_per_position(manifest, precision) * mean_context
        ),
        "bytes_per_token": round(per_token),
        "bandwidth_bytes_per_s": round(bandwidth),
        "roofline_tokens_per_s": bandwidth / per_token,
        "measured_tokens_per_s": measured,
        "fraction": measured * per_token / bandwidth,
        "dram_roofline_tokens_per_s": dram / per_token,
        "fraction_of_dram_roofline": measured * per_token / dram,
    }
    fp32_rate = limits["gemm_fp32"]["flop_per_s"]
    int8_rate = (limits.get("gemm_int8") or {}).get("op_per_s")
    compute = {}
    stages = runtime["stages"]
    for graph, feeds in shapes.get("graphs", {}).items():
        flops = encoder_flops(config, graph, feeds)
        if flops is None or graph not in stages:
            continue
        if graph == "vision_encoder":  # timed over every chunk of frames: count them all
            flops = flops / feeds["pixel_values"][0] * shapes["frames"]
        seconds = stages[graph]["median"]
        entry = {
            "precision": runtime["precisions"].get(graph, "fp32"),
            "gflop": flops / 1e9,
            "gflop_per_s": flops / seconds / 1e9,
            "fraction_of_fp32_gemm": flops / seconds / fp32_rate,
        }
        if int8_rate and entry["precision"] == "int8":
            entry["fraction_of_int8_gemm"] = flops / seconds / int8_rate
        compute[graph] = entry
    prefill_flops = llm_flops(config, shapes["prompt_length"])
    compute["prefill"] = {
        "precision": precision,
        "gflop": prefill_flops / 1e9,
        "gflop_per_s": prefill_flops / stages["prefill"]["median"] / 1e9,
        "fraction_of_fp32_gemm": prefill_flops / stages["prefill"]["median"] / fp32_rate,
    }
    return {"decode": decode, "compute": compute}


def run_bench(
    model_dir: str | os.PathLike,
    media: str | os.PathLike | None = None,
    runs: int = 3,
    precision: str | None = None,
    tokens: int = DEFAULT_TOKENS,
    threads: int = 0,
    prompt: str = DEFAULT_PROMPT,
    reference: bool = True,
    checkpoint: str | os.PathLike | None = None,
    quick_limits: bool = False,
    low_memory: bool = False,
    portable_decoder: bool = False,
    llm_dir: str | os.PathLike | None = None,
    peer_rounds: int = 3,
) -> dict:
    """The whole bench as a JSON-ready dict (see the module docstring). low_memory: the pipeline's
    (each run loads its encoders again: their stage times include their sessions' loading);
    portable_decoder: the decoder's portable graph even where its fused variant is built;
    llm_dir: the checkpoint folder of the package's LLM, to measure the peers on it in `peer_rounds`
    interleaved rounds (None: no peers)."""
    from vsal.runtime.manifest import load_manifest
    from vsal.runtime.tools import machine_limits, peers

    model_dir = Path(model_dir)
    check_settings(runs, tokens, threads, reference, checkpoint)
    manifest = load_manifest(model_dir)  # a clear error before anything else
    if llm_dir is not None:  # the folder and the rounds are checked before minutes of work
        peers.check_rounds(peer_rounds)
        peers.check_llm_dir(Path(llm_dir), model_dir, manifest)
    with tempfile.TemporaryDirectory(prefix="vsal-bench-") as tmp:
        generated = media is None
        if generated:
            from vsal.runtime.synthetic import write_clip

            say("no --media: generating a 10 s 320x240 clip with a stereo tone sweep")
            media = write_clip(Path(tmp) / "clip.mp4", seconds=10.0)
        media = Path(media)
        kwargs = _media_kwargs(media)
        rt = bench_runtime(
            model_dir, kwargs, prompt, runs, tokens, precision, threads, low_memory, portable_decoder
        )
        if reference:
            say("PyTorch reference (a child process)")
            ref = bench_reference(model_dir, kwargs, prompt, runs, tokens, threads, checkpoint)
            if checkpoint is not None and "skipped" in ref:  # asked for by name: not a silent skip
                raise ConfigError(f"--checkpoint: the PyTorch reference could not run: {ref['skipped']}")
        else:
            ref = {"skipped": "--no-reference"}
    manifest = rt["_manifest"]
    decoder_precision = rt["precisions"].get("llm_decoder", "fp32")
    say("measuring this machine's limits (bandwidth, GEMM rates)")
    weights = graph_bytes(
        model_dir, manifest, "llm_decoder", decoder_precision, rt.get("fused_decoder", False)
    )
    limits = machine_limits.measure(working_set_bytes=weights, quick=quick_limits, threads=threads)
    out = {
        "model": {
            "dir": str(model_dir),
            "preset": manifest.preset,
            "random_weights": manifest.random_weights,
            "precision_asked": precision,
            "precisions": rt["precisions"],
            "backends": rt["backends"],
        },
        "media": {
            "path": None if generated else str(media),
            "generated": generated,
            "frames": rt["shapes"]["frames"],
            "prompt_length": rt["shapes"]["prompt_length"],
        },
        "settings": {
            "runs": runs,
            "warmup_runs": 1,
            "max_new_tokens": tokens,
            "eos": "ignored (fixed length)",
            "threads": threads or "library default",
            "prompt": prompt,
        },
        "machine": limits | {"huge_pages": hugepages.state()},
        "runtime": {k: v for k, v in rt.items() if not k.startswith("_") and k != "shapes"},
        "reference": ref,
        "roofline": roofline(rt, limits, model_dir, tokens),
    }
    if llm_dir is not None:
        say(f"peers: vsal's decoder beside onnxruntime-genai and llama.cpp on {llm_dir}")
        out["peers"] = peers.compare(model_dir, llm_dir, peer_rounds, threads, quick_limits)
    if "stages" in ref:
        out["ratio"] = {  # reference / runtime: > 1 means the runtime is faster
            name: ref["stages"][name]["median"] / rt["stages"][name]["median"]
            for name in rt["stages"]
            if name in ref["stages"] and rt["stages"][name]["median"] > 0
        }
        out["ratio"]["decode_tokens_per_s"] = (
            rt["decode_tokens_per_s"]["median"] / ref["decode_tokens_per_s"]["median"]
        )
        out["ratio"]["peak_rss"] = ref["peak_rss_bytes"] / rt["peak_rss_bytes"]
    return out


# --- output -----------------------------------------------------------------------------------------------


def _ms(stat: dict | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['median'] * 1e3:9.1f} [{stat['min'] * 1e3:.1f}-{stat['max'] * 1e3:.1f}]"


def table(result: dict) -> str:
    rt, ref = result["runtime"], result["reference"]
    ratio = result.get("ratio", {})
    ref_stages = ref.get("stages", {})
    lines = [
        f"{result['model']['dir']} ({result['model']['preset']}, decoder "
        f"{result['roofline']['decode']['precision']}); {result['media']['frames']} frames, prompt "
        f"{result['media']['prompt_length']} tokens, {result['settings']['max_new_tokens']} tokens decoded; "
        f"median [min-max] of {result['settings']['runs']} runs after a warm-up",
        "",
        f"| {'stage':<24} | {'runtime ms':>26} | {'PyTorch ms':>26} | {'ratio':>6} |",
        f"|{'-' * 26}|{'-' * 28}|{'-' * 28}|{'-' * 8}|",
    ]
    for name, stat in rt["stages"].items():
        r = f"{ratio[name]:.2f}x" if name in ratio else "-"
        lines.append(f"| {name:<24} | {_ms(stat):>26} | {_ms(ref_stages.get(name)):>26} | {r:>6} |")
    tps = rt["decode_tokens_per_s"]
    ref_tps = ref.get("decode_tokens_per_s")

    def rate(stat):
        return f"{stat['median']:9.1f} [{stat['min']:.1f}-{stat['max']:.1f}]" if stat else "-"

    r = f"{ratio['decode_tokens_per_s']:.2f}x" if "decode_tokens_per_s" in ratio else "-"
    lines.append(f"| {'decode tokens/s':<24} | {rate(tps):>26} | {rate(ref_tps):>26} | {r:>6} |")
    gib = 2**30
    ref_peak = f"{ref['peak_rss_bytes'] / gib:.2f}" if "peak_rss_bytes" in ref else "-"
    lines.append(f"| {'peak RSS GiB':<24} | {rt['peak_rss_bytes'] / gib:>26.2f} | {ref_peak:>26} | {'':>6} |")
    if "skipped" in ref:
        lines.append(f"reference skipped: {ref['skipped']}")
    m = result["machine"]
    bw = m["memory_bandwidth"]
    lines += [
        "",
        f"machine: {m['cpu']['name']}, {m['cpu']['cores']} cores; read bandwidth "
        f"{bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['buffer_bytes'] >> 20} MiB, {bw['kernel']}; copy "
        f"{bw['copy_bytes_per_s'] / 1e9:.1f} GB/s r+w)"
        + (
            f", {m['working_set_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s at "
            f"{m['working_set_bandwidth']['buffer_bytes'] >> 20} MiB"
            if "working_set_bandwidth" in m
            else ""
        ),
        f"         fp32 GEMM {m['gemm_fp32']['flop_per_s'] / 1e9:.0f} GFLOP/s"
        + (f", int8 GEMM {m['gemm_int8']['op_per_s'] / 1e9:.0f} GOP/s" if m.get("gemm_int8") else "")
        + (f"; {m['huge_pages']}" if "huge_pages" in m else ""),
    ]
    d = result["roofline"]["decode"]
    lines.append(
        f"decode: {d['measured_tokens_per_s']:.1f} tokens/s = {100 * d['fraction']:.0f}% of the roofline "
        f"{d['roofline_tokens_per_s']:.1f} tokens/s ({d['bytes_per_token'] / 1e6:.1f} MB/token: "
        f"{d['decoder_weight_bytes'] / 1e6:.1f} MB {d['precision']} weights + KV; "
        f"{100 * d['fraction_of_dram_roofline']:.0f}% of the DRAM roofline)"
    )
    for graph, c in result["roofline"]["compute"].items():
        extra = (
            f", {100 * c['fraction_of_int8_gemm']:.0f}% of int8 GEMM" if "fraction_of_int8_gemm" in c else ""
        )
        lines.append(
            f"{graph} ({c['precision']}): {c['gflop']:.1f} GFLOP at {c['gflop_per_s']:.0f} GFLOP/s = "
            f"{100 * c['fraction_of_fp32_gemm']:.0f}% of fp32 GEMM{extra}"
        )
    if "peers" in result:
        from vsal.runtime.tools import peers

        lines += ["", peers.table(result["peers"])]
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


@click.command(help="Per-stage speed and memory, against the PyTorch reference and this machine's limits.")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "--media", type=click.Path(path_type=Path), help="Video or audio file (default: a generated clip)."
)
@click.option("--runs", default=3, show_default=True, help="Timed runs after one warm-up run.")
@click.option("--precision", type=precision_choice(), default=None)
@click.option(
    "--max-new-tokens", "tokens", default=DEFAULT_TOKENS, show_default=True, help="Decoded per run."
)
@click.option(
    "--threads",
    type=click.IntRange(0, MAX_THREADS),
    default=0,
    show_default=True,
    help="Intra-op threads (ORT and torch); 0 = default.",
)
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True)
@click.option("--reference/--no-reference", default=True, help="Time the PyTorch reference too.")
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Consolidated checkpoint the package was exported from (for the reference).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (the table goes to stderr).")
@click.option(
    "--quick-limits", is_flag=True, hidden=True, help="Small buffers for the machine limits (tests)."
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="The pipeline's low-memory mode (vsal run --low-memory); encoder stages then include loading.",
)
@click.option(
    "--portable-decoder",
    is_flag=True,
    help="Time the decoder's portable graph even where its fused variant is built (vsal run's option).",
)
@click.option(
    "--llm-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="The transformers Llama checkpoint folder the package's LLM came from: also measure "
    "onnxruntime-genai and llama.cpp on it where installed (scripts/peers/), interleaved with vsal.",
)
@click.option(
    "--peer-rounds",
    default=3,
    show_default=True,
    help="With --llm-dir: rounds, each running every engine once in turn.",
)
def bench_cli(as_json, **options):
    result = _jsonable(run_bench(**options))  # click's names are run_bench's parameters
    if as_json:
        click.echo(table(result), err=True)
        click.echo(json.dumps(result))
    else:
        click.echo(table(result))
