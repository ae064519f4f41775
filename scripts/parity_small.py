"""Runtime (ONNX Runtime fp32) against the PyTorch reference on the small preset, and what the
per-clip encoder cache saves. Usage:
    python scripts/parity_small.py [--preset small] [--workdir DIR] [--max-new-tokens 16]
Exports the preset (seeded random weights) unless DIR/<preset> already holds a package, generates
a 10 s clip, and prints per case: greedy token equality, cosine of the LLM input embeddings, and the
times of a first and a second question about the same clip.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vsal-parity"))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    from vsal.export import build_model, presets
    from vsal.export.assets import ensure_tokenizer_assets
    from vsal.export.package import ExportSource, TokenizerFiles, export_package
    from vsal.export.reference import ReferencePipeline
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions
    from vsal.runtime.synthetic import write_clip, write_tone

    assets = ensure_tokenizer_assets()
    package = args.workdir / args.preset
    if not (package / "manifest.json").is_file():
        start = time.perf_counter()
        export_package(
            ExportSource(presets.get(args.preset), random_weights=True),
            package,
            TokenizerFiles(assets.llama_dir, assets.bert_vocab),
        )
        print(f"export: {time.perf_counter() - start:.0f} s")
    clips = {
        "video+audio": {"video": write_clip(args.workdir / "av.mp4", seconds=10.0)},
        "video-only": {"video": write_clip(args.workdir / "v.mp4", seconds=10.0, audio_rate=None)},
        "audio-only": {"audio": write_tone(args.workdir / "a.wav", seconds=10.0)},
    }
    torch.set_num_threads(2)
    reference = ReferencePipeline(
        build_model(presets.get(args.preset)), assets.llama_dir, assets.bert_vocab.parent
    )
    runtime = Pipeline.load(package)
    options = DecodingOptions(num_beams=1, max_new_tokens=args.max_new_tokens)
    results = {}
    for case, media in clips.items():
        prompt = "What happens in this clip?"
        start = time.perf_counter()
        want = reference.ask(prompt, options=options, **media)
        ref_s = time.perf_counter() - start
        ref_embeds = reference.inputs_embeds(
            reference.av_tokens(reference.prepare(**media), prompt), prompt
        ).numpy()
        start = time.perf_counter()
        got = runtime.ask(prompt, options=options, **media)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        again = runtime.ask("And what can be heard?", options=options, **media)
        second_s = time.perf_counter() - start
        features, _ = runtime.encode_media(media.get("video"), media.get("audio"))
        embeds = runtime.inputs_embeds(runtime.av_tokens(features, prompt), prompt)
        results[case] = {
            "tokens_equal": got.token_ids == want.token_ids,
            "tokens": len(got.token_ids),
            "embeds_cosine": cosine(embeds, ref_embeds),
            "embeds_max_abs_error": float(np.abs(embeds - ref_embeds).max()),
            "reference_s": round(ref_s, 2),
            "runtime_first_question_s": round(first_s, 2),
            "runtime_second_question_s": round(second_s, 2),
            "second_question_cached": again.media_cached,
        }
        print(case, json.dumps(results[case]), flush=True)
    (args.workdir / f"parity_{args.preset}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
