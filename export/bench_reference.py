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
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def say(message: str) -> None:
    print(f"vsal bench: reference: {message}", file=sys.stderr, flush=True)


class _TokenClock:
    """A `generate` streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_model(model_dir: Path, checkpoint: Path | None):
    """(model, None) when the package's weights can be rebuilt, else (None, reason)."""
    from vsal.export import build_model
    from vsal.export.config import ModelConfig
    from vsal.runtime.manifest import load_manifest

    manifest = load_manifest(model_dir)
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


@torch.no_grad()
def run_once(pipe, video, audio, prompt: str, tokens: int) -> dict:
    from vsal.export.models.alignment import align_streams
    from vsal.runtime import media

    m, cfg = pipe.model, pipe.config
    timings: dict[str, float] = {}
    start = time.perf_counter()
    image_embeds = None
    if video is not None:
        t = time.perf_counter()
        pixels = pipe.video_pixels(video)
        timings["decode_video+preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        image_embeds = m.vision_encoder(pixels)
        timings["vision_encoder"] = time.perf_counter() - t
        if audio is None and media.has_audio(video):
            audio = video
    audio_tokens = None
    if audio is not None:
        t = time.perf_counter()
        features, fbank = pipe.audio_features(audio)
        timings["decode_audio+features"] = time.perf_counter() - t
        t = time.perf_counter()
        speech = m.whisper_encoder(features)
        timings["whisper_encoder"] = time.perf_counter() - t
        t = time.perf_counter()
        sound = m.beats_encoder(fbank)
        timings["beats_encoder"] = time.perf_counter() - t
        audio_tokens = torch.cat([speech, sound], dim=-1)
    video_tokens = None
    if image_embeds is not None:
        t = time.perf_counter()
        ids, mask = pipe.instruction(prompt)
        frame_tokens = m.frame_qformer(image_embeds, ids, mask)
        video_tokens = frame_tokens.reshape(1, -1, frame_tokens.shape[-1])
        timings["frame_qformer"] = time.perf_counter() - t
    t = time.perf_counter()
    av_features, slot_mask = align_streams(video_tokens, audio_tokens, cfg)
    timings["alignment"] = time.perf_counter() - t
    t = time.perf_counter()
    av = m.mrc_qformer(av_features, slot_mask)
    timings["mrc_qformer"] = time.perf_counter() - t
    t = time.perf_counter()
    embeds = pipe.inputs_embeds(av, prompt)
    timings["prompt_embeddings"] = time.perf_counter() - t
    clock = _TokenClock()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        out = m.llm.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=tokens,
            min_new_tokens=tokens,  # eos blocked: a fixed length, as the runtime bench decodes
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.5,
            eos_token_id=cfg.llm.eos_token_id,
            pad_token_id=cfg.llm.pad_token_id,
            streamer=clock,
        )
    times = clock.times
    timings["prefill"] = times[0] - t
    timings["decode_per_token"] = (times[-1] - times[0]) / max(len(times) - 1, 1)
    timings["time_to_first_token"] = times[0] - start
    timings["end_to_end"] = times[-1] - start
    return {"timings": timings, "tokens": int(out.shape[1])}


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
    from vsal.runtime.tools.bench import STAGES, peak_rss_bytes, summarize

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
        result = run_once(pipe, args.video, args.audio, args.prompt, args.tokens)
        results.append(result)
        t = result["timings"]
        say(
            f"run {i + 1}/{args.runs}: end to end {t['end_to_end']:.2f} s, first token "
            f"{t['time_to_first_token']:.2f} s, {1 / t['decode_per_token']:.1f} tokens/s"
        )
    print(
        json.dumps(
            {
                "stages": {
                    name: summarize([r["timings"][name] for r in results])
                    for name in STAGES
                    if name in results[0]["timings"]
                },
                "decode_tokens_per_s": summarize([1 / r["timings"]["decode_per_token"] for r in results]),
                "tokens": results[0]["tokens"],
                "peak_rss_bytes": peak_rss_bytes(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "generate": "transformers generate, greedy, min_new_tokens = max_new_tokens",
            }
        )
    )


if __name__ == "__main__":
    main()
