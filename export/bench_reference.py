"""The PyTorch reference's stage timings for `vsal bench` (run as a child process of it).

    python -m vsal.export.bench_reference MODEL_DIR [--video F] [--audio F] [--runs N] [--tokens T]
        [--threads K] [--checkpoint FILE]

Rebuilds the package's PyTorch model: a preset's seeded random weights (the manifest's config,
seed 0 as `vsal-export export --preset` uses), or a consolidated checkpoint (`--checkpoint`). The
package's weights are only those when the rebuilt LLM token-embedding table equals the package's
embeddings.npy bit for bit; otherwise (or for a package from real checkpoints without
`--checkpoint`) it refuses with a reason instead of timing another model. Times the same stages as
the runtime bench, eager fp32 on the CPU, with transformers' `generate` (greedy, the release's
repetition penalty, `min_new_tokens` = `max_new_tokens` so every run decodes the same length).
Progress goes to stderr; the last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from vsal.runtime.log import sayer

say = sayer("vsal bench: reference")


def load_model(model_dir: Path, checkpoint: Path | None):
    """(model, None) when the package's weights can be rebuilt, else (None, reason)."""
    from vsal.export import build_model
    from vsal.export.config import ModelConfig
    from vsal.runtime.manifest import load_manifest

    manifest = load_manifest(model_dir)
    llm_source = manifest.weight_sources.get("llm", "")
    if checkpoint is None and llm_source.startswith("seeded random per tensor"):
        return None, (
            f"{model_dir}'s decoder was exported streaming ({llm_source}): PyTorch's seeded build draws "
            "other values, and the whole model would not fit in memory; give --checkpoint FILE to time it"
        )
    if checkpoint is not None:
        from vsal.export.weights.consolidated import load_consolidated

        model = load_consolidated(checkpoint)
        source = f"checkpoint {checkpoint}"
    elif manifest.random_weights:
        model = build_model(ModelConfig.from_dict(manifest.config), seed=0)
        source = f"preset {manifest.preset!r}, seeded random weights (seed 0)"
    else:
        return None, (
            f"{model_dir} was exported from checkpoints ({manifest.preset}): give --checkpoint FILE "
            "(a consolidated checkpoint, `vsal-export convert`) to time the PyTorch reference"
        )
    table = model.llm.model.get_input_embeddings().weight.detach().float().numpy()
    packaged = np.load(model_dir / manifest.embeddings.file, mmap_mode="r")
    if table.shape != packaged.shape or not np.array_equal(table, packaged):
        return None, f"the rebuilt weights ({source}) are not the package's: its embeddings.npy differs"
    say(f"rebuilt the package's model from {source}")
    return model.eval(), None


def run_once(pipe, video, audio, prompt: str, tokens: int) -> dict:
    """One timed run: the reference's own stage timings, and the bench's generation stages."""
    from vsal.runtime.prompt import DecodingOptions
    from vsal.runtime.tools.bench import generation_stages

    # eos_token_id None: eos blocked, a fixed length, as the runtime bench decodes
    options = DecodingOptions(num_beams=1, max_new_tokens=tokens, repetition_penalty=1.5, eos_token_id=None)
    start = time.perf_counter()
    answer = pipe.ask(prompt, video=video, audio=audio, options=options)
    seconds = time.perf_counter() - start
    timings = dict(answer.timings)
    first, last = timings.pop("time_to_first_token"), timings.pop("generate")
    timings.update(generation_stages(seconds - last, first, last, len(answer.token_ids)))
    return {"timings": timings, "tokens": len(answer.token_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--video", type=Path)
    parser.add_argument("--audio", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()

    from vsal.export.reference import ReferencePipeline
    from vsal.runtime.manifest import load_manifest
    from vsal.runtime.tools.bench import peak_rss_bytes, run_line, summarize_runs

    if args.threads:
        torch.set_num_threads(args.threads)
    model, reason = load_model(args.model_dir, args.checkpoint)
    if model is None:
        say(f"skipped: {reason}")
        print(json.dumps({"skipped": reason}))
        return
    manifest = load_manifest(args.model_dir)
    pipe = ReferencePipeline(
        model,
        args.model_dir / Path(manifest.llm_tokenizer.file).parent,
        args.model_dir / Path(manifest.instruction_tokenizer.file).parent,
    )
    say("warm-up run")
    run_once(pipe, args.video, args.audio, args.prompt, args.tokens)
    results = []
    for i in range(args.runs):
        results.append(run_once(pipe, args.video, args.audio, args.prompt, args.tokens))
        say(run_line(i + 1, args.runs, results[-1]["timings"]))
    result = {
        **summarize_runs(results),
        "peak_rss_bytes": peak_rss_bytes(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "generate": "transformers generate, greedy, min_new_tokens = max_new_tokens",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
