"""GPU check, unattended in one go: TensorRT engines for the tiny and small presets, their parity with
ONNX Runtime fp32, and their speed against PyTorch fp16 eager on the same GPU.

    python scripts/gpu_check.py [--presets tiny,small] [--precisions fp32,fp16,int8] [--out gpu-check]
                                [--runs 10] [--tokens 32] [--backend tensorrt|onnxruntime]

`--backend onnxruntime` runs the same steps with ONNX Runtime in place of the engines, and PyTorch
on the CPU in fp32 where there is no CUDA: how the script itself is checked on a machine without a
GPU (python scripts/gpu_check.py --presets tiny --backend onnxruntime --runs 3).

Per preset:
  1. export the package (PyTorch -> ONNX, every graph validated against PyTorch), unless OUT/<preset>
     already holds one;
  2. per precision, `vsal-export build --backend tensorrt`: the fp16/int8 graphs, one engine per graph
     (strongly typed, profiles from the manifest), each engine checked against the fp32 graph in ONNX
     Runtime on held-out inputs, and greedy token agreement through the engines;
  3. per graph, host-to-host latency (numpy in, numpy out, copies included on both sides) of the
     engine against the PyTorch part in fp16 on the same GPU, at the shapes a 10 s clip gives (the
     decoder: a prefill of the clip's length and one decode step after it);
  4. the whole pipeline on a 10 s clip, greedy, a fixed number of tokens: vsal's runtime on the engines
     against vsal's PyTorch reference pipeline with the model in fp16 on the GPU.
Writes OUT/report.json and OUT/report.md; progress on stderr. A step that fails is recorded with its
error and the next one runs; steps that need what this machine lacks (TensorRT, CUDA) are recorded
as skipped with the reason. Exit status 1 when a parity check fails or a step errors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from vsal.runtime.log import sayer

PARITY_MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}


say = sayer("gpu_check")


def machine() -> dict:
    facts = {"python": platform.python_version(), "platform": platform.platform()}
    for module in ("torch", "tensorrt", "onnxruntime", "transformers"):
        try:
            facts[module] = __import__(module).__version__
        except ImportError:
            facts[module] = None
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            facts["gpu"] = props.name
            facts["compute_capability"] = f"{props.major}.{props.minor}"
            facts["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    except ImportError:
        pass
    return facts


class Steps:
    """Runs steps, records ok / skipped / error with timing, never stops at a failure."""

    def __init__(self, report: dict):
        self.report = report
        report.setdefault("steps", [])

    def run(self, name: str, fn, *args, **kwargs):
        say(f"{name} ...")
        start = time.perf_counter()
        entry = {"step": name}
        try:
            entry["result"] = fn(*args, **kwargs)
            entry["status"] = "ok"
        except Skip as exc:
            entry["status"] = "skipped"
            entry["reason"] = str(exc)
        except Exception as exc:  # recorded, the next step runs
            entry["status"] = "error"
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=6)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        why = entry.get("reason") or entry.get("error") or ""
        say(f"{name}: {entry['status']} ({entry['seconds']} s) {why}")
        self.report["steps"].append(entry)
        return entry.get("result")


class Skip(Exception):
    """This machine lacks what the step needs."""


def need_tensorrt() -> None:
    from vsal.runtime.backends.tensorrt_engines import EngineError, compute_capability, import_tensorrt

    try:
        import_tensorrt()
        compute_capability()
    except EngineError as exc:
        raise Skip(str(exc)) from None


def torch_device():
    """(torch, device, dtype) of the PyTorch baseline: fp16 on a CUDA GPU, else fp32 on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch, "cuda", torch.float16
    return torch, "cpu", torch.float32


def vsal_backend(folder: Path, name: str, precision: str, backend: str):
    """The graph as vsal runs it: a TensorRT engine, or ONNX Runtime (CUDA where it has it)."""
    from vsal.runtime.backends import available_providers, open_backend
    from vsal.runtime.manifest import load_manifest

    info = load_manifest(folder).graphs[name]
    provider = "cuda" if "cuda" in available_providers() else "cpu"  # ONNX Runtime's; TensorRT's own
    return open_backend(backend, folder, name, info, precision, provider=provider)


# --- steps -----------------------------------------------------------------------------------------


def export(preset: str, folder: Path) -> dict:
    from vsal.export.cli import cli

    if (folder / "manifest.json").is_file():
        return {"package": str(folder), "reused": True}
    cli.main(["export", "--preset", preset, "--output", str(folder)], standalone_mode=False)
    return {"package": str(folder), "reused": False}


def build(folder: Path, precision: str, backend: str) -> dict:
    engines = backend == "tensorrt"
    if engines:
        need_tensorrt()
    elif precision == "fp32":
        raise Skip("fp32 with ONNX Runtime: the exported graphs are used as they are")
    from vsal.export.build import Thresholds
    from vsal.export.build import build as run_build

    report = run_build(folder, precision, thresholds=Thresholds(), engines=engines)
    print(report.format(), file=sys.stderr)
    checked = report.engines if engines else report.graphs
    failed = [
        f"{name}: cosine {e['cosine']:.5f} < {PARITY_MIN_COSINE[precision]}"
        for name, e in checked.items()
        if e["cosine"] < PARITY_MIN_COSINE[precision]
    ]
    result = {"graphs": checked, "end_to_end": report.end_to_end, "problems": report.problems}
    if failed:
        for name, e in checked.items():
            if engines and e["cosine"] < PARITY_MIN_COSINE[precision]:
                result.setdefault("diagnosis", {})[name] = polygraphy_layers(folder, name, precision)
        raise AssertionError("; ".join(failed) + f"; layer-by-layer comparison: {result.get('diagnosis')}")
    return result


def polygraphy_layers(folder: Path, name: str, precision: str) -> str:
    """Where an engine departs from ONNX Runtime: Polygraphy runs the same graph in both with every
    tensor marked as an output and compares them layer by layer; returns the log's path."""
    import shutil
    import subprocess

    from vsal.runtime.backends.tensorrt_engines import input_profiles
    from vsal.runtime.manifest import load_manifest

    exe = shutil.which("polygraphy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if exe is None:
        return "polygraphy is not installed (pip install polygraphy)"
    info = load_manifest(folder).graphs[name]
    file, _ = info.file_for(precision)
    profiles = input_profiles(info)

    def shapes(level: int) -> list[str]:
        return [f"{n}:[{','.join(str(d) for d in p[level])}]" for n, p in profiles.items()]

    log = folder / f"polygraphy-{name}.{precision}.log"
    command = [exe, "run", str(folder / file), "--trt", "--onnxrt", "--strongly-typed"]
    for i, level in enumerate(("min", "opt", "max")):
        command += [f"--trt-{level}-shapes", *shapes(i)]
    command += ["--input-shapes", *shapes(1), "--trt-outputs", "mark", "all", "--onnx-outputs", "mark", "all"]
    command += ["--fail-fast", "--log-file", str(log)]
    subprocess.run(command, capture_output=True, text=True, timeout=1800)
    return str(log)


def clip_feeds(folder: Path, clip: Path) -> dict[str, dict[str, np.ndarray]]:
    """Each graph's inputs on the clip, as the runtime feeds them (the decoder's are made up below)."""
    from vsal.calib.collect import collect

    return {name: feeds[0] for name, feeds in collect(folder, [clip], False).items() if feeds}


def decoder_feeds(folder: Path, prompt_length: int) -> dict[str, dict[str, np.ndarray]]:
    from vsal.export.config import ModelConfig
    from vsal.export.package import decoder_step_feeds
    from vsal.runtime.manifest import load_manifest

    config = ModelConfig.from_dict(load_manifest(folder).config)
    prefill, decode = decoder_step_feeds(config, prompt_length, seed=0)
    return {"llm_decoder.prefill": prefill, "llm_decoder.decode": decode}


def median_seconds(fn, runs: int, sync=None) -> dict:
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return {
        "median_ms": 1e3 * float(np.median(times)),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
    }


def graph_speed(folder: Path, preset: str, precision: str, feeds: dict, runs: int, backend: str) -> dict:
    if backend == "tensorrt":
        need_tensorrt()
    torch, device, dtype = torch_device()
    from vsal.export import presets
    from vsal.export.package import ExportSource, graph_module
    from vsal.runtime.graphs import GRAPHS
    from vsal.runtime.manifest import load_manifest

    manifest = load_manifest(folder)
    source = ExportSource(presets.get(preset), random_weights=True)
    sync = torch.cuda.synchronize if device == "cuda" else None
    results = {}
    for case, inputs in feeds.items():
        name = case.split(".")[0]
        runner = vsal_backend(folder, name, precision, backend)
        module = graph_module(name, source.part(GRAPHS[name].part)).to(device, dtype).eval()
        order = [t.name for t in manifest.graphs[name].inputs]

        def torch_run(module=module, inputs=inputs, order=order):
            with torch.no_grad():
                args = [
                    torch.from_numpy(inputs[n]).to(device, dtype if inputs[n].dtype == np.float32 else None)
                    for n in order
                ]
                out = module(*args)
                first = out[0] if isinstance(out, tuple | list) else out
                return first.float().cpu().numpy()

        ours = median_seconds(lambda runner=runner, inputs=inputs: runner.run(inputs), runs)
        theirs = median_seconds(torch_run, runs, sync)
        results[case] = {
            "shapes": {k: list(v.shape) for k, v in inputs.items() if not k.startswith("past")},
            "vsal": ours,
            "vsal_backend": runner.description,
            "pytorch": theirs,
            "pytorch_on": f"{device} {str(dtype).split('.')[-1]}",
            "speedup": theirs["median_ms"] / ours["median_ms"],
        }
        del module
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def pipeline_speed(
    folder: Path, preset: str, precision: str, clip: Path, runs: int, tokens: int, backend: str
) -> dict:
    if backend == "tensorrt":
        need_tensorrt()
    torch, device, dtype = torch_device()
    from vsal.export import build_model, presets
    from vsal.export.reference import ReferencePipeline
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions

    prompt = "What happens in the video and what can be heard?"
    options = DecodingOptions(num_beams=1, max_new_tokens=tokens, eos_token_id=None)
    runtime = Pipeline.load(folder, engine=backend, precision=precision, verbose=False)

    def run_runtime():
        runtime.clear_cache()  # every run decodes and encodes the clip again
        return runtime.ask(prompt, video=clip, options=options)

    answer = run_runtime()
    ours = median_seconds(run_runtime, runs)
    model = build_model(presets.get(preset), seed=0).to(device, dtype).eval()
    tokenizers = folder / "tokenizer"
    reference = ReferencePipeline(model, tokenizers / "llm", tokenizers / "instruction")
    # eos is blocked for `tokens` steps so both sides decode the same length (random weights rarely
    # say eos anyway); the token ids of both are in the report.
    ref_options = DecodingOptions(num_beams=1, max_new_tokens=tokens, min_length=tokens)
    ref_answer = reference.ask(prompt, video=clip, options=ref_options)
    sync = torch.cuda.synchronize if device == "cuda" else None
    eager = median_seconds(lambda: reference.ask(prompt, video=clip, options=ref_options), runs, sync)
    return {
        "tokens": tokens,
        "vsal": ours,
        "vsal_backend": backend,
        "pytorch": eager,
        "pytorch_on": f"{device} {str(dtype).split('.')[-1]}",
        "speedup": eager["median_ms"] / ours["median_ms"],
        "runtime_tokens": answer.token_ids,
        "pytorch_tokens": ref_answer.token_ids,
        "stages_ms": {k: 1e3 * v for k, v in answer.timings.items()},
    }


# --- report ----------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        "# vsal GPU check",
        "",
        f"`{report['command']}`",
        "",
        "```",
        json.dumps(report["machine"], indent=1),
    ]
    lines += ["```", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for s in report["steps"]:
        detail = s.get("reason") or s.get("error") or ""
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {detail[:160]} |")
    for s in report["steps"]:
        result = s.get("result") or {}
        if s["step"].startswith("build") and result.get("graphs"):
            lines += ["", f"## {s['step']}: against the fp32 graph in ONNX Runtime", ""]
            lines += ["| graph | cosine | max abs err | build s |", "|---|---|---|---|"]
            for name, e in result["graphs"].items():
                seconds = e.get("build_seconds", e.get("seconds"))
                lines.append(f"| {name} | {e['cosine']:.6f} | {e['max_abs_error']:.3g} | {seconds} |")
            lines.append(f"\nend to end: {result['end_to_end']}")
        if s["step"].startswith("speed") and result:
            lines += ["", f"## {s['step']}: host-to-host median ms", ""]
            lines += ["| graph | vsal | ms | PyTorch | ms | speedup |", "|---|---|---|---|---|---|"]
            for case, r in result.items():
                lines.append(
                    f"| {case} | {r['vsal_backend']} | {r['vsal']['median_ms']:.2f} | {r['pytorch_on']} | "
                    f"{r['pytorch']['median_ms']:.2f} | {r['speedup']:.2f}x |"
                )
        if s["step"].startswith("pipeline") and result:
            same = result["runtime_tokens"] == result["pytorch_tokens"]
            lines += [
                "",
                f"## {s['step']}: whole pipeline, {result['tokens']} tokens",
                "",
                f"vsal runtime ({result['vsal_backend']}) {result['vsal']['median_ms']:.1f} ms, PyTorch "
                f"eager ({result['pytorch_on']}) {result['pytorch']['median_ms']:.1f} ms: "
                f"{result['speedup']:.2f}x; tokens equal: {same}",
            ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--backend", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "command": " ".join(sys.argv), "backend": args.backend}
    say(f"machine: {report['machine']}")
    steps = Steps(report)
    from vsal.runtime.synthetic import write_clip

    clip = args.out / "clip_10s.mp4"
    steps.run("clip", lambda: str(write_clip(clip, seconds=10.0)))
    for preset in args.presets.split(","):
        folder = args.out / preset
        steps.run(f"export {preset}", export, preset, folder)
        feeds = steps.run(f"feeds {preset}", clip_feeds, folder, clip) or {}
        prompt_length = 200 if preset == "tiny" else 220
        feeds.update(decoder_feeds(folder, prompt_length))
        for precision in args.precisions.split(","):
            steps.run(f"build {preset} {precision}", build, folder, precision, args.backend)
            steps.run(
                f"speed {preset} {precision}",
                graph_speed,
                folder,
                preset,
                precision,
                feeds,
                args.runs,
                args.backend,
            )
            steps.run(
                f"pipeline {preset} {precision}",
                pipeline_speed,
                folder,
                preset,
                precision,
                clip,
                max(3, args.runs // 3),
                args.tokens,
                args.backend,
            )
        (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "report.md").write_text(markdown(report))
    say(f"report: {args.out / 'report.md'}")
    return 1 if any(s["status"] == "error" for s in report["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
