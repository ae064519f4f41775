"""Export the real-size (13b preset) encoders with random weights and report time and peak memory.

Each graph runs in its own process so its peak RSS is its own. Usage:
    python scripts/export_real_size_encoders.py [--graphs vision_encoder,beats_encoder] [--out DIR]
Prints one line per graph and writes DIR/real_size_export.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRAPHS = ("vision_encoder", "whisper_encoder", "beats_encoder")


def one(name: str, out: Path) -> dict:
    from vsal.export import presets
    from vsal.export.models.video_salmonn import build_part
    from vsal.export.onnx_export import export_graph, validate_graph
    from vsal.export.specs import graph_specs

    config = presets.get("13b")
    spec = graph_specs(config)[name]
    start = time.perf_counter()
    module = build_part(config, name)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    files = export_graph(spec, module, out / f"{name}.onnx")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    validation = validate_graph(spec, module, files[0])
    validate_s = time.perf_counter() - start
    return {
        "graph": name,
        "parameters": sum(p.numel() for p in module.parameters()),
        "build_s": round(build_s, 1),
        "export_s": round(export_s, 1),
        "validate_s": round(validate_s, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "onnx_bytes": sum(f.stat().st_size for f in files),
        "cases": [
            {
                "sizes": c.sizes,
                "max_abs_error": c.max_abs_error,
                "max_abs_reference": c.max_abs_reference,
                "onnx_s": round(c.seconds_onnx, 2),
                "torch_s": round(c.seconds_torch, 2),
            }
            for c in validation.cases
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--graphs", default=",".join(GRAPHS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.out)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in args.graphs.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, "--out", str(out)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                print(f"{name}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                sys.exit(1)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
            worst = max(e for c in result["cases"] for e in c["max_abs_error"].values())
            sizes = "; ".join(",".join(f"{k}={v}" for k, v in c["sizes"].items()) for c in result["cases"])
            print(
                f"{name}: {result['parameters'] / 1e6:.0f}M params, export {result['export_s']} s, "
                f"validate {result['validate_s']} s ({sizes}), peak RSS {result['peak_rss_gib']} GiB, "
                f"max abs error {worst:.2e}",
                flush=True,
            )
        (out / "real_size_export.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
