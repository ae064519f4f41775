"""The build's fused decoder: each decoder variant rebuilt for ONNX Runtime, checked, recorded.

`vsal-export build --precision int8|int4` writes, beside the decoder's portable variant (what
TensorRT builds from), its fused twin (vsal.transforms.fused_decoder: GroupQueryAttention,
SkipSimplifiedLayerNormalization, MatMulNBits over the same quantized values), which the runtime
runs where ONNX Runtime runs the decoder. It is checked against the portable variant on prompts
(the held-out clips' prefills, else the spec's validation inputs), twice:

* exact: both graphs with float32 activations (the fused graph's MatMulNBits at accuracy level 1,
  the portable graph's DequantizeLinear -> MatMul fused by ONNX Runtime at level 1 too), the
  prefill's logits within FUSED_TOLERANCE of their scale and the greedy tokens equal, token for
  token: the same weights, values and math. A problem otherwise, at every precision, unless they
  part at a near-tie (the portable graph's two best logits within FUSED_TOLERANCE of the scale,
  which 1e-7 of float difference may flip);
* as they run: int8 activations in MatMulNBits (level 4, ONNX Runtime's default; on this CPU
  10-30x faster than level 1 at prefill, 1.8x at decode), greedy tokens compared token for token.
  ONNX Runtime fuses the portable int4 graph's blockwise DequantizeLinear -> MatMul into the same
  MatMulNBits (level 4), but the graphs' float32 math around them (norms, attention) differs by
  1e-7, which flips some int8 roundings of the activations, layer after layer: their logits differ
  by about 2 % of their scale (SmolLM2-135M; with q, k, v unfused too), each as far from the exact
  math as from the other, and greedy tokens may part. The portable int8 graph's per-channel
  DequantizeLinear it leaves unfused (float32 activations, 2x slower): there the fused graph rounds
  activations and the other does not. Reported; a problem only for float32 weights, where nothing
  is rounded.

Each graph runs and is freed before the next loads, so the 13b int4 check holds one at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from vsal.export.package_update import variant_file, written_folder
from vsal.runtime.graphs import DECODER
from vsal.runtime.manifest import GRAPH_DIR, TensorInfo, VariantInfo, sha256_file

FUSED_PRECISIONS = ("fp32", "int8", "int4")  # the decoder precisions a build fuses (fp32: the export's)
# max |fused - portable| prefill logits over max |portable logits|, float32 activations: measured
# 2.5e-6 (SmolLM2-135M int8 and int4), 6e-7 (the tiny decoder)
FUSED_TOLERANCE = 1e-4
EXACT_LEVEL = 1  # MatMulNBits accuracy level with float32 activations
GREEDY_TOKENS = 16
MAX_PROMPTS = 3


@dataclass
class FusedBuild:
    variant: VariantInfo
    problems: list[str]
    summary: str


def build_fused(package: Path, manifest, precision: str, build_id: str, feeds, progress=None) -> FusedBuild:
    """The fused twin of the decoder's `precision` graph (as `manifest` names it), written under
    this build's name and compared with it on the prompts of `feeds` (decoder feed dicts)."""
    from vsal.transforms.fused_decoder import fuse_decoder

    info = manifest.graphs[DECODER]
    src = package / info.file_for(precision)[0]
    rel = variant_file(DECODER, precision, build_id, fused=True)
    written_folder(package, GRAPH_DIR)
    dst = package / rel
    context = info.profile["P"]["max"] + 1
    report = fuse_decoder(src, dst, max_positions=context)
    table = manifest.load_embeddings(package)
    prompts = _prompts(feeds)
    expected = greedy(PortableRun(src, EXACT_LEVEL), prompts, table)
    with at_level(dst, EXACT_LEVEL) as exact_graph:
        exact = greedy(FusedRun(exact_graph), prompts, table)
    error = _worst_error(expected.prefill, exact.prefill)
    exact_equal, total = _equal(expected.tokens, exact.tokens)
    parted = parted_beyond_ties(expected, exact.tokens)
    as_run = greedy(PortableRun(src), prompts, table).tokens, greedy(FusedRun(dst), prompts, table).tokens
    equal, _ = _equal(*as_run)
    problems = []
    if error > FUSED_TOLERANCE:
        problems.append(
            f"{DECODER}: fused {precision} logits differ by {error:.2g} of their scale from its portable "
            f"graph's (float32 activations) > {FUSED_TOLERANCE}"
        )
    if parted:  # at a near-tie the 1e-7 the two graphs' math differs by may pick either token
        problems.append(
            f"{DECODER}: fused {precision} greedy tokens equal to the portable graph's {exact_equal}/{total} "
            f"(float32 activations), parting beyond a near-tie: prompt {', '.join(parted)}"
        )
    if equal != total and precision == "fp32":
        problems.append(f"{DECODER}: fused fp32 greedy tokens equal to the portable graph's {equal}/{total}")
    inputs, outputs = _interface(dst)
    files = [Path(f) for f in report.files if Path(f) != dst]
    variant = VariantInfo(
        precision=precision,
        file=rel,
        sha256=sha256_file(dst),
        external_data={str(f.relative_to(package)): sha256_file(f) for f in files},
        accuracy={
            "against": info.file_for(precision)[0],
            "greedy_tokens_equal": equal,  # as they run (int8 activations in MatMulNBits)
            "greedy_tokens_equal_exact": exact_equal,  # float32 activations
            "greedy_parted_beyond_ties": parted,  # float32 activations; [] where equal or at a near-tie
            "greedy_tokens": total,
            "prompts": len(prompts),
            "max_relative_logits_error": float(error),  # float32 activations (exact math)
        },
        notes=report.summary(),
        inputs=inputs,
        outputs=outputs,
    )
    summary = (
        f"fused for ONNX Runtime: {report.src_nodes} -> {report.nodes} nodes; with float32 activations "
        f"logits within {error:.2g} of the portable graph's, greedy tokens equal to its "
        f"{exact_equal}/{total}{' (parting at near-ties)' if exact_equal != total and not parted else ''}; "
        f"as they run {equal}/{total} ({len(prompts)} prompts)"
    )
    return FusedBuild(variant, problems, summary)


def _prompts(feeds) -> list[np.ndarray]:
    """Up to MAX_PROMPTS prompts [1, T, H]: the prefills among `feeds` (no past), first row each."""
    found = []
    for feed in feeds:
        past = [v for k, v in feed.items() if k.startswith("past_key_values.")]
        if all(v.shape[2] == 0 for v in past) and feed["inputs_embeds"].shape[1] > 1:
            found.append(np.ascontiguousarray(feed["inputs_embeds"][:1], dtype=np.float32))
    return found[:MAX_PROMPTS]


def _interface(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    graph = onnx.load(str(path), load_external_data=False).graph

    def info(value) -> TensorInfo:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return TensorInfo(value.name, dtype, [d.dim_param or d.dim_value for d in tensor.shape.dim])

    return [info(v) for v in graph.input], [info(v) for v in graph.output]


class PortableRun:
    """One step of the portable decoder: (logits of the last position [B, V], the presents).
    `level`: the accuracy level ONNX Runtime fuses its DequantizeLinear -> MatMul at (None: its own)."""

    def __init__(self, path: Path, level: int | None = None):
        from vsal.runtime.backends import ort_session

        config = None if level is None else {"session.qdq_matmulnbits_accuracy_level": str(level)}
        self.session = ort_session(path, config=config)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def empty(self):
        return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past}

    def __call__(self, x, length, past):
        t = x.shape[1]
        feed = {
            "inputs_embeds": x,
            "attention_mask": np.ones((1, length + t), np.int64),
            "position_ids": np.arange(length, length + t)[None],
            **past,
        }
        values = self.session.run(self.outputs, feed)
        presents = {i.name: v for i, v in zip(self.past, values[1:], strict=True)}
        return values[0][:, -1], presents


class FusedRun(PortableRun):
    def __call__(self, x, length, past):
        t = x.shape[1]
        feed = {
            "inputs_embeds": x,
            "position_ids": np.arange(length, length + t)[None],
            "seqlens_k": np.array([length + t - 1], np.int32),
            "total_sequence_length": np.array(length + t, np.int32),
            "logits_to_keep": np.array(1, np.int64),
            **past,
        }
        values = self.session.run(self.outputs, feed)
        presents = {i.name: v for i, v in zip(self.past, values[1:], strict=True)}
        return values[0][:, -1], presents


def _worst_error(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    return max(
        float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)) for a, b in zip(expected, got, strict=True)
    )


@contextlib.contextmanager
def at_level(path: Path, level: int):
    """The graph at `path` with every MatMulNBits at accuracy `level`: its structure written beside
    it (the weights are the same side file), removed after."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i = level
    copy = path.with_name(f".{path.stem}.level{level}.onnx")
    onnx.save(model, str(copy))
    try:
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def _equal(expected: list[list[int]], got: list[list[int]]) -> tuple[int, int]:
    """(tokens equal at the same place, tokens in all)."""
    pairs = [(x, y) for e, g in zip(expected, got, strict=True) for x, y in zip(e, g, strict=True)]
    return sum(int(x == y) for x, y in pairs), len(pairs)


@dataclass
class Greedy:
    """Greedy tokens per prompt, each prefill's last logits, and per token the margin of its pick:
    (best - second best logit) / the largest |logit|, where a 1e-7 difference can flip a near-tie."""

    tokens: list[list[int]]
    prefill: list[np.ndarray]
    margins: list[list[float]]


def greedy(run: PortableRun, prompts, table, tokens: int = GREEDY_TOKENS) -> Greedy:
    """`tokens` greedy tokens per prompt through `run`; the session is freed."""
    found = Greedy([], [], [])
    for prompt in prompts:
        last, past = run(prompt, 0, run.empty())
        found.prefill.append(last[0])
        picks, margins, length = [], [], prompt.shape[1]
        for _ in range(tokens):
            logits = last[0]
            second, best = np.partition(logits, -2)[-2:]
            picks.append(int(logits.argmax()))
            margins.append(float((best - second) / max(np.abs(logits).max(), 1e-30)))
            last, past = run(np.asarray(table[picks[-1]], np.float32)[None, None], length, past)
            length += 1
        found.tokens.append(picks)
        found.margins.append(margins)
    del run.session
    return found


def parted_beyond_ties(expected: Greedy, got: list[list[int]], tie: float = FUSED_TOLERANCE) -> list[str]:
    """Where `got` first leaves `expected`'s tokens at a pick that was no near-tie (its margin over
    `tie`): '#prompt at token i (margin m)', one for each prompt that parts so."""
    found = []
    for p, (want, have, margins) in enumerate(zip(expected.tokens, got, expected.margins, strict=True)):
        i = next((i for i, (x, y) in enumerate(zip(want, have, strict=True)) if x != y), None)
        if i is not None and margins[i] > tie:
            found.append(f"#{p + 1} at token {i + 1} (margin {margins[i]:.2g})")
    return found
