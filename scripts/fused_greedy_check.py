"""The fused decoder's greedy tokens against its portable graph's, longer than the build's check.

  python scripts/fused_greedy_check.py PACKAGE [--tokens 64] [--precisions fp32,int8,int4]

For each decoder precision with a fused twin in PACKAGE: greedy tokens from the peers' prompt of
`vsal bench --llm-dir` (bos and the first 199 tokens of its fixed text, the package's tokenizer),
both graphs at once:
  exact   float32 activations (MatMulNBits at accuracy level 1 in both): the same math;
  as run  as the runtime runs them (level 4, int8 activations).
Prints, per precision and mode, how many tokens are equal from the first, the first place they
part with the portable graph's margin there (best - second best logit, over the largest: a
near-tie is what 1e-7 of float difference can flip), and the prefill logits' largest difference
over their scale. The build runs the same check
(vsal.export.build_fused) on up to 3 prompts of 16 tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from vsal.export.build_fused import EXACT_LEVEL, FusedRun, PortableRun, at_level, greedy
from vsal.runtime.graphs import DECODER
from vsal.runtime.manifest import load_manifest
from vsal.runtime.tools.peers import prompt_ids


def prefix(a: list[int], b: list[int]) -> int:
    """How many tokens are equal from the first."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check(package: Path, precision: str, tokens: int) -> list[str]:
    manifest = load_manifest(package)
    info = manifest.graphs[DECODER]
    table = manifest.load_embeddings(package)
    ids = prompt_ids(package, manifest)
    prompt = np.asarray(table[ids], np.float32)[None]
    portable = package / info.file_for(precision)[0]
    fused = package / info.fused[precision].file
    lines = []
    for mode in ("exact", "as run"):
        level = EXACT_LEVEL if mode == "exact" else None
        want = greedy(PortableRun(portable, level), [prompt], table, tokens)
        if level is None:
            got = greedy(FusedRun(fused), [prompt], table, tokens)
        else:
            with at_level(fused, level) as graph:
                got = greedy(FusedRun(graph), [prompt], table, tokens)
        a, b = want.prefill[0], got.prefill[0]
        error = float(np.abs(a - b).max() / np.abs(a).max())
        same = prefix(want.tokens[0], got.tokens[0])
        where = "never" if same == tokens else f"at token {same + 1} (margin {want.margins[0][same]:.2g})"
        lines.append(f"| {precision} | {mode} | {same}/{tokens} | {where} | {error:.2g} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--precisions", default="fp32,int8,int4")
    args = parser.parse_args(argv)
    fused = load_manifest(args.package).graphs[DECODER].fused
    wanted = [p for p in args.precisions.split(",") if p]
    missing = [p for p in wanted if p not in fused]
    if missing:
        print(f"{args.package}: no fused decoder at {', '.join(missing)} (built: {', '.join(fused)})")
        return 2
    print(f"{args.package}: {args.tokens} greedy tokens from the peers' 200-token prompt")
    print("| precision | activations | equal from the first | part | prefill logits error |")
    print("|---|---|---|---|---|")
    for precision in wanted:
        check(args.package, precision, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
