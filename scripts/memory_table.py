"""docs/jetson.md's memory table, from a package's measured file sizes (issue 13, item 6).

For each mix of precisions (the encoders at fp32 / fp16 / int8, the decoder at fp16 / int8 / int4):
the bytes of the graphs the runtime would load (each graph's variant of that precision, with its side
files, as measured on disk), the token-embedding table, and the decoder's fp16 KV cache at the released
context (the decoder graph's P max + 1) with 1 and with the release's 5 beams; then which Jetson
module holds it with an OS and runtime reserve. A variant the package has not built is derived and
marked "~": fp16 as half the fp32 graph (the streamed 13B decoder's exported graph already holds
float16 weights: it is the fp16 size), int8 weight-only as half the fp16 decoder.

  python scripts/memory_table.py PACKAGE [--reserve-gb 2.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vsal.runtime.graphs import DECODER
from vsal.runtime.manifest import load_manifest

MODULES = {"AGX Orin 64 GB": 64, "AGX Orin 32 GB": 32, "Orin NX 16 GB": 16, "Orin Nano 8 GB": 8}
ENCODER_PRECISIONS = ("fp32", "fp16", "int8")
DECODER_PRECISIONS = ("fp16", "int8", "int4")
BEAMS = (1, 5)
GB = 1e9


def graph_file_bytes(package: Path, file: str, external_data: dict[str, str]) -> int:
    return sum((package / f).stat().st_size for f in [file, *external_data])


def variant_bytes(package: Path, manifest, name: str, precision: str) -> tuple[float, bool]:
    """(bytes, measured) of graph `name` at `precision`: its built variant's files, or derived."""
    info = manifest.graphs[name]
    if precision in info.variants:
        variant = info.variants[precision]
        return graph_file_bytes(package, variant.file, variant.external_data), True
    exported = graph_file_bytes(package, info.file, info.external_data)
    half_weights = name == DECODER and _float16_weights(package / info.file)
    fp16 = exported if half_weights else exported / 2
    if precision == "fp32":
        return exported * (2 if half_weights else 1), not half_weights
    if precision == "fp16":
        return fp16, half_weights
    if precision == "int8":
        return fp16 / 2, False
    return fp16 / 4, False


def _float16_weights(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)


def kv_bytes(manifest, beams: int) -> tuple[int, int]:
    """(bytes, context tokens): the fp16 KV cache of every layer at the released context."""
    layout = manifest.kv_layout()
    decoder = manifest.graphs[DECODER]
    context = int(decoder.profile["P"]["max"]) + 1
    per_token = 2 * layout.layers * layout.kv_heads * layout.head_dim * 2  # key and value, float16
    return per_token * context * beams, context


def table(package: Path, reserve_gb: float) -> dict:
    manifest = load_manifest(package)
    encoders = [n for n in manifest.graphs if n != DECODER]
    embeddings = (package / manifest.embeddings.file).stat().st_size
    rows = []
    for enc in ENCODER_PRECISIONS:
        enc_bytes, enc_measured = 0.0, True
        for name in encoders:
            size, measured = variant_bytes(package, manifest, name, enc)
            enc_bytes += size
            enc_measured &= measured
        for dec in DECODER_PRECISIONS:
            dec_bytes, dec_measured = variant_bytes(package, manifest, DECODER, dec)
            weights = enc_bytes + dec_bytes + embeddings
            row = {
                "encoders": enc,
                "decoder": dec,
                "encoders_gb": enc_bytes / GB,
                "decoder_gb": dec_bytes / GB,
                "measured": {"encoders": enc_measured, "decoder": dec_measured},
                "weights_gb": weights / GB,
            }
            for beams in BEAMS:
                kv, context = kv_bytes(manifest, beams)
                total = (weights + kv) / GB + reserve_gb
                row[f"total_gb_{beams}_beams"] = total
                row[f"fits_{beams}_beams"] = [m for m, size in MODULES.items() if total <= size]
                row["context"] = context
            rows.append(row)
    return {"package": str(package), "embeddings_gb": embeddings / GB, "reserve_gb": reserve_gb, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        "| encoders | decoder | encoders GB | decoder GB | + embeddings, KV (1 / 5 beams), reserve: GB | "
        "fits, 1 beam | fits, 5 beams |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        enc = ("" if r["measured"]["encoders"] else "~") + f"{r['encoders_gb']:.2f}"
        dec = ("" if r["measured"]["decoder"] else "~") + f"{r['decoder_gb']:.2f}"
        totals = f"{r['total_gb_1_beams']:.1f} / {r['total_gb_5_beams']:.1f}"
        one = ", ".join(m.split(" GB")[0] for m in r["fits_1_beams"]) or "none"
        five = ", ".join(m.split(" GB")[0] for m in r["fits_5_beams"]) or "none"
        lines.append(f"| {r['encoders']} | {r['decoder']} | {enc} | {dec} | {totals} | {one} | {five} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--reserve-gb", type=float, default=2.5, help="the OS and the runtime (default 2.5)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = table(args.package, args.reserve_gb)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return
    first = result["rows"][0]
    print(
        f"{args.package}: embeddings {result['embeddings_gb']:.2f} GB; KV cache fp16 at {first['context']} "
        f"tokens; reserve {result['reserve_gb']} GB; ~ = derived, not built"
    )
    print(markdown(result))


if __name__ == "__main__":
    main()
