"""Real weights through the llm_decoder graph: SmolLM2-135M-Instruct exported, then greedy-decoded
in ONNX Runtime (prefill + decode steps with the KV cache fed back, prompt embedded in numpy) and
compared token for token with transformers' `generate`.

SmolLM2 has the shape of the `small` preset's LLM (30 layers, 576 wide, 9 heads, 3 kv heads: GQA)
and ties its LM head to the embedding table. Prints export time, graph size, peak RSS, per-prompt
token equality, the largest logit difference and tokens/s for ONNX Runtime and PyTorch.

  python scripts/check_smollm2_onnx.py [--tokens 32] [--keep DIR] [--int8]
Exit status 1 when any prompt's tokens differ or the graph misses the spec's tolerance.
--int8 also builds the int8 weight-only decoder (what `vsal-export build --precision int8` makes of
an llm_decoder graph) and reports, per prompt, how many greedy tokens equal the fp32 graph's and
where they first differ (reported, not failed on: int8 may legitimately pick another near-tie).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Give three tips for learning to play the guitar.",
)


@dataclass
class PromptResult:
    prompt: str
    onnx_tokens: list[int]
    torch_tokens: list[int]
    max_logit_diff: float  # over every generated step, last position
    onnx_seconds: float
    torch_seconds: float

    @property
    def equal(self) -> bool:
        return self.onnx_tokens == self.torch_tokens


@dataclass
class Report:
    export_seconds: float
    graph_bytes: int
    validation: dict[str, float]  # "B=..,T=..,P=.." -> max |onnx - torch| over all outputs
    validation_ok: bool
    prompts: list[PromptResult] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    int8: list[dict] = field(default_factory=list)  # per prompt: int8 weight-only vs fp32 ONNX tokens

    @property
    def ok(self) -> bool:
        return self.validation_ok and all(p.equal for p in self.prompts)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def greedy_onnx(session, names, table: np.ndarray, ids: list[int], steps: int, eos: int | None):
    """Greedy decode through the graph. ids: the prompt; returns (tokens, last-position logits per step).

    Prefill feeds the whole prompt with an empty past (P = 0); each step feeds one token
    (T = 1) with the presents of the previous call as its past."""
    past_names, present_names, kv_heads, head_dim = names
    embeds = table[np.asarray(ids)][None]  # [1, T, H]
    t = embeds.shape[1]
    feeds = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in past_names}
    feeds |= {
        "inputs_embeds": embeds,
        "attention_mask": np.ones((1, t), np.int64),
        "position_ids": np.arange(t, dtype=np.int64)[None],
    }
    tokens, logits_per_step = [], []
    for step in range(steps):
        logits, *presents = session.run(["logits", *present_names], feeds)
        last = logits[0, -1]
        logits_per_step.append(last)
        token = int(last.argmax())
        tokens.append(token)
        if token == eos:
            break
        cached = t + step  # tokens in the presents: the next token's position
        feeds = dict(zip(past_names, presents, strict=True))
        feeds |= {
            "inputs_embeds": table[[token]][None],
            "attention_mask": np.ones((1, cached + 1), np.int64),
            "position_ids": np.array([[cached]], np.int64),
        }
    return tokens, logits_per_step


def run_check(
    work: Path, new_tokens: int = 32, prompts: tuple[str, ...] = PROMPTS, int8: bool = False
) -> Report:
    from vsal.export.llm_graph import LlmDecoderGraph, export_kwargs, llm_config_from_hf
    from vsal.export.specs import llm_decoder_spec
    from vsal.export.weights.real_weights import load_smollm2, load_smollm2_tokenizer
    from vsal.runtime.backends import ort_session

    model = load_smollm2()
    tokenizer = load_smollm2_tokenizer()
    table_param = model.get_input_embeddings().weight
    if model.config.tie_word_embeddings and model.lm_head.weight is not table_param:
        raise AssertionError("SmolLM2's LM head should share the embedding table")
    graph = LlmDecoderGraph.from_causal_lm(model)
    config = llm_config_from_hf(model.config)
    spec = llm_decoder_spec(config)

    # Export, traced at the spec's export sizes.
    path = work / "llm_decoder.onnx"
    arrays = spec.make_inputs(spec.export_sizes(), np.random.default_rng(0))
    args = tuple(torch.from_numpy(arrays[t.name]) for t in spec.inputs)
    start = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(path), **export_kwargs(spec))
    export_seconds = time.perf_counter() - start
    graph_bytes = sum(f.stat().st_size for f in work.iterdir() if f.name.startswith(path.name))

    session = ort_session(path, log_fatal=False)

    # The spec's validation sizes: prefill, decode, chunked.
    validation, validation_ok = {}, True
    rng = np.random.default_rng(1)
    for sizes in spec.validation_sizes():
        arrays = spec.make_inputs(sizes, rng)
        got = session.run([o.name for o in spec.outputs], {i.name: arrays[i.name] for i in spec.inputs})
        with torch.no_grad():
            want = graph(*(torch.from_numpy(arrays[i.name]) for i in spec.inputs))
        errors = [float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True)]
        limits = [spec.atol + spec.rtol * float(w.abs().max()) for w in want]
        validation[",".join(f"{k}={v}" for k, v in sizes.items())] = max(errors)
        validation_ok &= all(e <= lim for e, lim in zip(errors, limits, strict=True))

    report = Report(export_seconds, graph_bytes, validation, validation_ok)
    int8_session = None
    if int8:
        from vsal.transforms.weight_only import quantize_weights_int8

        quantize_weights_int8(path, work / "llm_decoder.int8.onnx")
        int8_session = ort_session(work / "llm_decoder.int8.onnx", log_fatal=False)
    table = table_param.detach().numpy()
    layout = config.kv_layout()
    names = (layout.past_names(), layout.present_names())
    names += (config.num_key_value_heads, config.head_dim)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        start = time.perf_counter()
        onnx_tokens, onnx_logits = greedy_onnx(session, names, table, ids, new_tokens, eos)
        onnx_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        torch_seconds = time.perf_counter() - start
        torch_tokens = out.sequences[0, len(ids) :].tolist()
        steps = min(len(onnx_logits), len(out.logits))
        diff = max(float(np.abs(onnx_logits[i] - out.logits[i][0].numpy()).max()) for i in range(steps))
        report.prompts.append(
            PromptResult(prompt, onnx_tokens, torch_tokens, diff, onnx_seconds, torch_seconds)
        )
        if int8_session is not None:
            start = time.perf_counter()
            int8_tokens, _ = greedy_onnx(int8_session, names, table, ids, new_tokens, eos)
            int8_seconds = time.perf_counter() - start
            pairs = list(zip(onnx_tokens, int8_tokens, strict=False))
            first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            report.int8.append(
                {
                    "prompt": prompt,
                    "equal_positions": sum(a == b for a, b in pairs),
                    "compared": len(pairs),
                    "first_difference": first,
                    "int8_tokens_per_s": len(int8_tokens) / int8_seconds,
                    "fp32_tokens_per_s": len(onnx_tokens) / onnx_seconds,
                    "int8_text": tokenizer.decode(int8_tokens),
                }
            )
        print(f"  {prompt!r}: {tokenizer.decode(onnx_tokens)!r}", flush=True)
    report.peak_rss_mib = _peak_rss_mib()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    parser.add_argument("--keep", type=Path, help="write the graph here instead of a temporary folder")
    parser.add_argument("--int8", action="store_true", help="also check the int8 weight-only decoder")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run_check(work, args.tokens, int8=args.int8)
    total = time.perf_counter() - start

    print(f"export: {report.export_seconds:.1f} s, graph {report.graph_bytes / 2**20:.1f} MiB")
    for sizes, error in report.validation.items():
        print(f"validation {sizes}: max |onnx - torch| {error:.2e}")
    for p in report.prompts:
        onnx_rate = len(p.onnx_tokens) / p.onnx_seconds
        torch_rate = len(p.torch_tokens) / p.torch_seconds
        print(
            f"{p.prompt!r}: tokens equal {p.equal} ({len(p.onnx_tokens)} vs {len(p.torch_tokens)}), "
            f"max logit diff {p.max_logit_diff:.2e}, "
            f"{onnx_rate:.1f} tok/s ONNX Runtime vs {torch_rate:.1f} tok/s PyTorch"
        )
    for r in report.int8:
        print(
            f"int8 weight-only {r['prompt']!r}: {r['equal_positions']}/{r['compared']} greedy tokens equal "
            f"to fp32 (first difference at {r['first_difference']}), {r['int8_tokens_per_s']:.1f} tok/s vs "
            f"{r['fp32_tokens_per_s']:.1f}: {r['int8_text']!r}"
        )
    print(f"peak RSS {report.peak_rss_mib:.0f} MiB, total {total:.1f} s")
    print("OK" if report.ok else "MISMATCH")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
