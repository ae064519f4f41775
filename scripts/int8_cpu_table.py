"""INT8 against fp32 on the CPU, per graph: speed (ONNX Runtime as the runtime runs them, median of
several passes) and accuracy (cosine, max abs error) on inputs from clips the calibration never saw.

    python scripts/int8_cpu_table.py MODEL_DIR [--clips N] [--repeats 5] [--threads 0] [--json F]

MODEL_DIR must hold int8 variants (`vsal-export build MODEL_DIR --precision int8`). The inputs are
recorded by running the fp32 pipeline over N generated clips of other lengths and sizes than the
build's generated calibration clips; the decoder, which no clip input reaches, gets a prefill of 200
tokens and a decode step after it. Prints a markdown table; --json also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from vsal.runtime.log import sayer

say = sayer("int8_cpu_table")


def decoder_cases(package: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    from vsal.export.config import ModelConfig
    from vsal.export.package import decoder_step_feeds
    from vsal.runtime.manifest import load_manifest

    prefill, decode = decoder_step_feeds(ModelConfig.from_dict(load_manifest(package).config), 200, seed=7)
    return {"llm_decoder (prefill T=200)": [prefill], "llm_decoder (decode, P=200)": [decode]}


def median_ms(backend, feeds: list[dict[str, np.ndarray]], repeats: int) -> float:
    """Median over `repeats` of one pass over every feed, after a warm-up pass."""
    for f in feeds:
        backend.run(f)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for f in feeds:
            backend.run(f)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> int:
    from vsal.calib.collect import collect
    from vsal.export.accuracy import compare, worst_cosine
    from vsal.runtime.backends.onnx_runtime import OnnxRuntimeBackend
    from vsal.runtime.manifest import load_manifest
    from vsal.runtime.synthetic import write_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    manifest = load_manifest(args.package)
    missing = [n for n, g in manifest.graphs.items() if "int8" not in g.variants]
    if missing:
        print(f"{args.package}: no int8 variant of {missing}; run `vsal-export build --precision int8`")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        # Lengths and sizes that `build`'s generated calibration clips (2-9.5 s) never have.
        sizes = ((224, 224), (640, 360))
        clips = [
            write_clip(Path(tmp) / f"clip{i}.mp4", seconds=10.0 + 7 * i, size=sizes[i % 2])
            for i in range(args.clips)
        ]
        cases = {name: feeds for name, feeds in collect(args.package, clips).items() if feeds}
    cases.update(decoder_cases(args.package))
    rows = []
    for case, feeds in cases.items():
        name = case.split(" ")[0]
        info = manifest.graphs[name]
        fp32 = args.package / info.file
        int8 = args.package / info.variants["int8"].file
        say(f"{case}: timing fp32 and int8 over {len(feeds)} input(s)")
        # As the runtime runs them (on x86 the int8 graph's activations are re-encoded to uint8).
        b32 = OnnxRuntimeBackend(name, fp32, info, "cpu", args.threads, "fp32")
        b8 = OnnxRuntimeBackend(name, int8, info, "cpu", args.threads, "int8")
        t32, t8 = median_ms(b32, feeds, args.repeats), median_ms(b8, feeds, args.repeats)
        outputs = b32.output_names()
        acc = compare(
            lambda f, b=b32, o=outputs: [b.run(f)[n] for n in o],
            lambda f, b=b8, o=outputs: [b.run(f)[n] for n in o],
            outputs,
            feeds,
        )
        rows.append(
            {
                "graph": case,
                "int8_runs_as": b8.description,
                "fp32_ms": t32,
                "int8_ms": t8,
                "speedup": t32 / t8,
                "cosine": worst_cosine(acc),
                "max_abs_error": max(v["max_abs_error"] for v in acc.values()),
                "fp32_mib": fp32.stat().st_size / 2**20,
                "int8_mib": int8.stat().st_size / 2**20,
            }
        )
    print(
        f"\n`python scripts/int8_cpu_table.py {args.package} --clips {args.clips} --repeats {args.repeats}`\n"
    )
    print("| graph | fp32 ms | int8 ms | int8 speedup | cosine | max abs err | MiB fp32 -> int8 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['graph']} | {r['fp32_ms']:.1f} | {r['int8_ms']:.1f} | {r['speedup']:.2f}x | "
            f"{r['cosine']:.5f} | {r['max_abs_error']:.3g} | {r['fp32_mib']:.1f} -> {r['int8_mib']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
