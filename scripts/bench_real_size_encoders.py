"""Time the real-size (13b preset) encoders: ONNX Runtime fp32 against PyTorch eager, on the CPU.

Each graph runs in its own process, one after the other (peak memory ~8-10 GiB for the vision
encoder): build the part with seeded random weights, export it (dynamo, as `vsal-export export`),
time PyTorch (a warm-up, then --runs), free the module, time ONNX Runtime (a session as the runtime
creates it: ORT_ENABLE_ALL, default threads; a warm-up, then --runs) and compare the outputs. Usage:
    python scripts/bench_real_size_encoders.py [--graphs vision_encoder,whisper_encoder,beats_encoder]
        [--frames 4] [--audio-seconds 10] [--runs 3] [--threads 0] [--out DIR]
Prints one line per graph and writes DIR/real_size_bench.json (median, min, max seconds per run,
peak RSS of the child (VmHWM), output cosine ORT vs PyTorch).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRAPHS = ("vision_encoder", "whisper_encoder", "beats_encoder")


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def timed(fn, runs: int) -> tuple[list[float], object]:
    out = fn()  # warm-up
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return seconds, out


def stats(seconds: list[float]) -> dict:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "runs": seconds}


def one(name: str, out: Path, frames: int, audio_seconds: float, runs: int, threads: int) -> dict:
    import onnxruntime as ort
    import torch
    from vsal.export import presets
    from vsal.export.models.video_salmonn import build_part
    from vsal.export.onnx_export import export_graph
    from vsal.export.specs import graph_specs
    from vsal.runtime.backends import ort_session

    if threads:
        torch.set_num_threads(threads)
    config = presets.get("13b")
    spec = graph_specs(config)[name]
    sizes = {"vision_encoder": {"N": frames}, "whisper_encoder": {"B": 1}}.get(name)
    if name == "beats_encoder":  # Kaldi fbank frames of `audio_seconds` at 16 kHz (25 ms window, 10 ms hop)
        sizes = {"B": 1, "F": 1 + (int(audio_seconds * 16000) - 400) // 160}
    feeds = spec.make_inputs(sizes, np.random.default_rng(0))
    start = time.perf_counter()
    module = build_part(config, name)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in module.parameters())
    path = out / f"{name}.onnx"
    start = time.perf_counter()
    files = export_graph(spec, module, path)
    export_s = time.perf_counter() - start
    print(f"{name}: exported in {export_s:.0f} s; timing PyTorch", file=sys.stderr, flush=True)
    inputs = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
    with torch.no_grad():
        torch_s, expected = timed(lambda: module(*inputs), runs)
    expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
    torch_threads = torch.get_num_threads()
    module = inputs = None  # free the weights before ONNX Runtime loads its copy
    gc.collect()
    print(f"{name}: timing ONNX Runtime", file=sys.stderr, flush=True)
    start = time.perf_counter()
    session = ort_session(path, threads=threads, log_fatal=False)
    load_s = time.perf_counter() - start
    ort_s, got = timed(lambda: session.run(None, feeds)[0], runs)
    a, b = got.reshape(-1).astype(np.float64), expected.reshape(-1).astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return {
        "graph": name,
        "parameters": params,
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "build_s": round(build_s, 1),
        "export_s": round(export_s, 1),
        "ort_session_load_s": round(load_s, 1),
        "onnx_bytes": sum(f.stat().st_size for f in files),
        "torch_s": stats(torch_s),
        "ort_s": stats(ort_s),
        "speedup_ort_vs_torch": statistics.median(torch_s) / statistics.median(ort_s),
        "cosine_ort_vs_torch": cosine,
        "max_abs_error": float(np.abs(got - expected).max()),
        "peak_rss_bytes": vm_hwm(),
        "torch_threads": torch_threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--graphs", default=",".join(GRAPHS))
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = one(args.child, args.out, args.frames, args.audio_seconds, args.runs, args.threads)
        print(json.dumps(result))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in args.graphs.split(","):
            command = [sys.executable, __file__, "--child", name, "--out", str(out)]
            command += ["--frames", str(args.frames), "--audio-seconds", str(args.audio_seconds)]
            command += ["--runs", str(args.runs), "--threads", str(args.threads)]
            proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(f"{name}: FAILED (exit code {proc.returncode})", file=sys.stderr)
                sys.exit(1)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(
                f"{name}: {r['parameters'] / 1e6:.0f}M params, inputs {r['input_shapes']}: PyTorch "
                f"{r['torch_s']['median']:.2f} s [{r['torch_s']['min']:.2f}-{r['torch_s']['max']:.2f}], "
                f"ORT {r['ort_s']['median']:.2f} s [{r['ort_s']['min']:.2f}-{r['ort_s']['max']:.2f}] = "
                f"{r['speedup_ort_vs_torch']:.2f}x, cosine {r['cosine_ort_vs_torch']:.6f}, "
                f"peak RSS {r['peak_rss_bytes'] / 2**30:.1f} GiB",
                flush=True,
            )
            for f in out.glob(f"{name}.onnx*"):
                f.unlink()  # the next graph needs the disk and the page cache
        (out / "real_size_bench.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
