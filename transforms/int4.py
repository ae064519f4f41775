"""Int4 weight-only graphs (the LLM decoder): blockwise DequantizeLinear(INT4) -> MatMul, opset 21.

The weights int8 weight-only picks (vsal.transforms.weight_only: each MatMul whose B is a float
2-D initializer [K, N]) read DequantizeLinear(INT4 [K, N], float scale [K/bs, N], axis=0,
block_size=bs) instead: symmetric (no zero point, as TensorRT wants), values in [-8, 7], one scale
per block of bs rows of one output column. Standard ONNX at opset 21 (the graph's default-domain
opset is converted to 21). TensorRT 10/11 parse it as INT4 block quantization; ONNX Runtime's CPU
EP fuses it into MatMulNBits at session load (figures below).

Scale search, per block and column: candidates q = round(w / (ratio * s0)) for the ratios of
CLIP_RATIOS, s0 being the smallest scale that clips nothing (max w / 7, or -min w / 8: the -8
level serves a block whose extreme is negative, as llama.cpp's Q4_0 uses it), each at its
least-squares scale, then REFINE_STEPS re-roundings at the best scale; the one with the least
error sum_k h_k (w_k - q_k s)^2 over the block's rows k is kept. With calibration (feed dicts for
the graph's inputs, e.g. the decoder's prefills that the build records on clips) h_k is the mean
square of the MatMul's input channel k over those tokens (damped), AWQ's measure of a channel's
salience; without, h = 1 (the weight's own error). The full Gram per block (cross terms
included) models the output error better on the calibration tokens but follows them too closely:
on SmolLM2-135M (botchan, the perplexity table in docs/performance.md, ratio to fp32) with the
build's clip prefills (random preset encoders) it gave 1.169, the diagonal 1.122, the weight
error alone 1.179 (the previous search, ratio * max|w| / 7 without the least-squares fit: 1.157
on weights, 1.177 on the Gram); on held-out text of the book the Gram gave 1.096, the diagonal
1.085. llama.cpp's Q4_0 scores 1.149 there. Weights are quantized one at a time, each int4
weight and scale spilled to disk as it is made, then streamed into the side file by
vsal.transforms.onnx_io: peak memory is about 3x the largest weight in fp32 (the source read, its
chunks, the search's temporaries) plus K floats per distinct input.

K not a multiple of the block size: the weight takes the largest power of two <= block_size that
divides K (576 = 9 * 64 at block 128 -> blocks of 64; the report names each weight's block).
Padding would need a Pad on every such MatMul's activation (and 11 % more bytes at 576 / 128);
partial last blocks are legal ONNX and ONNX Runtime runs them, but TensorRT's parser rejects them
("Inferred block size is not an integer"). K not a multiple of MIN_BLOCK_SIZE, or N odd (TensorRT
packs int4 in pairs along the last axis): QuantizeError, naming the weight; exclude it by name.

ONNX Runtime 1.32, CPU EP (measured on the small preset's decoder, 30 layers shaped like
SmolLM2-135M, random weights, this 2-core x86 machine):
* it fuses every DequantizeLinear -> MatMul into MatMulNBits (211 of 211; the 30 attention MatMuls
  stay). At its default `session.qdq_matmulnbits_accuracy_level` 4 (int8 activations) the logits
  differ from the dequantized math by up to 0.037 (prefill) / 0.020 (decode), logits' std 0.48;
  at "0" by 3e-6. int4's own error vs fp32 is 0.29 there, so level 4 adds little.
* decode step (T 1, P 64), median of 30: fp32 35 ms, int8 weight-only 18 ms, int4 11 ms (level 0:
  15 ms); prefill of 64 tokens, median of 8: 127, 128, 139 (level 0: 156) ms. 499 MB -> 78 MB.
* peak memory converting it from external data: 289 MB (42 of them Python), largest weight 74 MB.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, version_converter
from vsal.runtime.errors import ConfigError
from vsal.transforms.graph_index import name_nodes
from vsal.transforms.int8 import QuantizeError, check_graph
from vsal.transforms.onnx_io import (
    CHUNK_ELEMENTS,
    INLINE_BYTES,
    ArrayData,
    TensorData,
    declared,
    graph_bytes,
    is_external,
    move_into,
    read_array,
    save_onnx,
    stash_data,
)
from vsal.transforms.weight_only import weight_targets

OPSET = 21  # DequantizeLinear's block_size and INT4 (IR version 10)
MIN_IR_VERSION = 10
QMIN, QMAX = -8, 7
MIN_BLOCK_SIZE = 16  # ONNX Runtime's smallest MatMulNBits block
# Decoder logits vs fp32, mean |difference| teacher-forced on 3 held-out text prompts x 17 steps,
# for block 32 / 64 / 128 (random weights have no outliers; real ones should favour small blocks more),
# with the earlier search (ratio * max|w| / 7; "on activations": the full Gram per block):
#   tiny package (logits' std 0.16; K = 64 takes blocks of 64 at 128):
#     round to nearest 0.0166 / 0.0183 / 0.0184, searched on weights 0.0154 / 0.0165 / 0.0166,
#     on 8 text prompts' activations 0.0145 / 0.0155 / 0.0155;
#   4 layers at width 512 / 1536 (logits' std 0.45; every K a multiple of 128):
#     round to nearest 0.107 / 0.118 / 0.131, on weights 0.099 / 0.104 / 0.115, on activations
#     0.087 / 0.092 / 0.102;
#   the small preset (30 layers like SmolLM2-135M, logits' std 0.48), block 32 only (K = 576):
#     round to nearest 0.164, on weights 0.150, on activations 0.110 (13 s to convert, 4.6 s).
# 32 is best in every row (llama.cpp's Q4_0 block too); its float32 scales cost 1 bit a weight
# (5 bits in all, 4.25 at 128).
DEFAULT_BLOCK_SIZE = 32
CLIP_RATIOS = tuple(float(r) for r in np.linspace(1.0, 0.5, 21))  # 1.0 first: nothing clipped
REFINE_STEPS = 2  # re-roundings at the best scale after the candidates (SmolLM2: 0.3 % less weight error)
DAMPING = 0.01  # added to each channel's mean square, times their mean: no channel weighs nothing


@dataclass
class Int4Report:
    """What `quantize_weights_int4` did to one graph."""

    src: str
    dst: str
    block_size: int  # asked for; a weight whose K it does not divide takes a smaller one (weights)
    search: str  # "activations" (calibration given), "weights" (none given) or "none" (round to nearest)
    # weight name -> {"shape": [K, N], "block_size", "rel_error": |W - dq(W)| / |W|, "max_error",
    # "clipped": share of scales below max|w| / 7}
    weights: dict[str, dict]
    excluded: list[dict[str, str]]  # {"node", "op_type", "reason"}: MatMuls left float
    calibration_samples: int
    calibration_tokens: int
    src_bytes: int
    dst_bytes: int
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        sizes = sorted({w["block_size"] for w in self.weights.values()})
        worst = max((w["rel_error"] for w in self.weights.values()), default=0.0)
        return (
            f"{Path(self.dst).name}: int4 weight-only, {len(self.weights)} weights in blocks of "
            f"{'/'.join(map(str, sizes)) or '-'} (scale search: {self.search}, "
            f"{self.calibration_samples} calibration feeds); worst relative weight error {worst:.3g}; "
            f"{len(self.excluded)} excluded; {self.src_bytes / 1e6:.1f} -> {self.dst_bytes / 1e6:.1f} MB"
        )


# --- one weight --------------------------------------------------------------------------------------


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE:
        raise ConfigError(f"int4 block size {block_size!r}: a power of two, at least {MIN_BLOCK_SIZE}")
    if block_size & (block_size - 1):
        raise ConfigError(f"int4 block size {block_size}: a power of two (16, 32, 64, 128)")


def block_size_for(k: int, block_size: int) -> int | None:
    """The largest power of two <= `block_size` and >= MIN_BLOCK_SIZE that divides `k`, or None."""
    size = block_size
    while size >= MIN_BLOCK_SIZE:
        if k % size == 0:
            return size
        size //= 2
    return None


def _column_chunks(k: int, n: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for begin in range(0, n, step):
        yield slice(begin, min(n, begin + step))


def quantize_blocks(
    w: np.ndarray, block_size: int, importance: np.ndarray | None = None, search: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [K, N] in [-8, 7], scale float32 [K / block_size, N]) for w [K, N] (any float type),
    dequantized as q * scale of its block. search: per block and column, the candidate of
    `_search_chunk` with the least error, each row k weighted by `importance` [K] (the mean square
    of input channel k) when given; else scale = max|w| / 7 of the block (round to nearest)."""
    k, n = w.shape
    if k % block_size:
        raise ValueError(f"K = {k} is not a multiple of the block size {block_size}")
    blocks = w.reshape(k // block_size, block_size, n)
    scale = np.empty((k // block_size, n), np.float32)
    q = np.empty(blocks.shape, np.int8)
    h = None if importance is None else np.asarray(importance, np.float32).reshape(-1, block_size, 1)
    for cols in _column_chunks(k, n):
        part = blocks[:, :, cols].astype(np.float32)
        if search:
            q[:, :, cols], scale[:, cols] = _search_chunk(part, h)
        else:
            amax = np.abs(part).max(axis=1)
            best = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
            scale[:, cols] = best
            q[:, :, cols] = np.clip(np.rint(part / best[:, None]), QMIN, QMAX)
    return q.reshape(k, n), scale


def _search_chunk(part: np.ndarray, h: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) for part [blocks, bs, columns]: the least error sum_k h_k d_k^2 (d = w - q * s;
    h [blocks, bs, 1] the rows' importance, else 1) over the candidates q = round(w / (r * s0)),
    r in CLIP_RATIOS and s0 the smallest scale that clips nothing (max w / 7 or -min w / 8: the -8
    level serves a negative extreme), each at its least-squares scale s = <w, q>_h / <q, q>_h; then
    REFINE_STEPS times: w re-rounded at the best scale and fitted again, kept where it does better."""
    s0 = np.maximum(part.max(axis=1) / QMAX, part.min(axis=1) / QMIN)
    s0 = np.where(s0 > 0, s0, 1.0).astype(np.float32)
    gw = part if h is None else part * h  # shared by every candidate
    best_q = np.empty(part.shape, np.int8)
    best_s = s0.copy()
    best_error = np.full(s0.shape, np.inf, np.float32)
    steps = [s0 * np.float32(r) for r in CLIP_RATIOS] + [None] * REFINE_STEPS
    for s in steps:
        q = part / (best_s if s is None else s)[:, None]  # None: re-round at the best scale so far
        np.clip(np.rint(q, out=q), QMIN, QMAX, out=q)
        gq = q if h is None else q * h
        wgq = np.einsum("bkn,bkn->bn", gw, q)
        qgq = np.einsum("bkn,bkn->bn", q, gq)
        fit = np.divide(wgq, qgq, out=np.zeros_like(wgq), where=qgq > 0)
        base = np.where(fit > 0, fit, best_s if s is None else s)  # q = 0: any scale, keep the grid's
        error = base * (base * qgq - 2 * wgq)  # the error less <w, w>_h, the same for every candidate
        better = error < best_error  # ties keep the earlier, larger scale
        best_s = np.where(better, base, best_s)
        best_error = np.where(better, error, best_error)
        np.copyto(best_q, q, casting="unsafe", where=better[:, None])
    return best_q, best_s


def dequantize_blocks(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w [K, N] float32 from q [K, N] and scale [K / bs, N] (DequantizeLinear with axis 0)."""
    k, n = q.shape
    block = k // scale.shape[0]
    return (q.reshape(-1, block, n).astype(np.float32) * scale[:, None]).reshape(k, n)


def weight_stats(w: np.ndarray, q: np.ndarray, scale: np.ndarray) -> dict[str, float]:
    """What the report says of a weight: rel_error |w - dq| / |w|, max_error max |w - dq|, and
    clipped, the share of blocks (of one column) whose grid stops short of their extremes (max w
    above 7 * scale or min w below -8 * scale). A column chunk at a time."""
    k, n = w.shape
    block = k // scale.shape[0]
    squares, norm, worst, clipped = 0.0, 0.0, 0.0, 0
    for cols in _column_chunks(k, n):
        part = w[:, cols].reshape(-1, block, cols.stop - cols.start).astype(np.float32)
        d = np.multiply(q[:, cols].reshape(part.shape), scale[:, None, cols], dtype=np.float32)
        np.subtract(part, d, out=d)
        squares += float(np.einsum("bkn,bkn->", d, d, dtype=np.float64))
        norm += float(np.einsum("bkn,bkn->", part, part, dtype=np.float64))
        worst = max(worst, float(np.abs(d, out=d).max()))
        reach = np.maximum(part.max(axis=1) / QMAX, part.min(axis=1) / QMIN) * (1 - 1e-6)
        clipped += int((scale[:, cols] < reach).sum())
    rel = float(np.sqrt(squares / norm)) if norm else 0.0
    return {"rel_error": rel, "max_error": worst, "clipped": clipped / scale.size}


@dataclass(frozen=True)
class Int4Data:
    """int4 values (an int8 array in [-8, 7]) packed as ONNX stores them: two a byte, the first in
    the low nibble."""

    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return (self.values.size + 1) // 2

    def chunks(self) -> Iterator[bytes]:
        flat = self.values.reshape(-1)
        step = CHUNK_ELEMENTS  # even: a chunk never splits a byte
        for begin in range(0, flat.size, step):
            nibbles = (flat[begin : begin + step] & 0x0F).astype(np.uint8)
            if nibbles.size % 2:
                nibbles = np.append(nibbles, np.uint8(0))
            yield (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def int4_tensor(name: str, shape: Sequence[int]) -> TensorProto:
    """An INT4 initializer without its data: give `Int4Data(q)` to `save_onnx`."""
    tensor = TensorProto(name=name, data_type=TensorProto.INT4)
    tensor.dims.extend(shape)
    return tensor


@dataclass(frozen=True)
class SpilledData:
    """A tensor's bytes written to a spill file as they were made, read back by `save_onnx`."""

    path: Path
    offset: int
    nbytes: int

    @classmethod
    def write(cls, out, data: TensorData) -> SpilledData:
        offset = out.tell()
        for piece in data.chunks():
            out.write(piece)
        return cls(Path(out.name), offset, out.tell() - offset)

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.nbytes
            while left:
                piece = f.read(min(left, 1 << 24))
                if not piece:
                    raise QuantizeError(f"{self.path}: spill file shorter than written")
                left -= len(piece)
                yield piece


# --- activations -------------------------------------------------------------------------------------


def activation_importance(
    src: str | os.PathLike, calibration: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]
) -> tuple[dict[str, np.ndarray], int]:
    """({activation: damped mean square per channel [K] float32}, tokens seen): the graph `src`
    runs on every feed dict, a section of layers at a time (vsal.transforms.sections: the streamed
    13B decoder never loads whole), and each activation of `names` is folded into its sums of
    squares as it is made, never kept."""
    from vsal.transforms.sections import CaseError, SectionedGraph

    src = Path(src)
    graph = SectionedGraph(src)
    sums: dict[str, np.ndarray] = {}
    rows: dict[int, int] = {}  # case -> tokens, from the first activation
    first = next(iter(names), None)

    def fold(case: int, x_name: str, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        squares = np.einsum("mk,mk->k", x, x)  # [K]
        sums[x_name] = sums[x_name] + squares if x_name in sums else squares
        if x_name == first:
            rows[case] = x.shape[0]

    outputs = [graph.model.graph.output[0].name]
    try:
        graph.run(outputs, [dict(f) for f in calibration], observe=list(names), observer=fold)
    except CaseError as e:  # a feed the graph does not take
        raise QuantizeError(f"{src}: calibration feed {e.case} does not run: {e.detail}") from e
    tokens = sum(rows.values())
    importance = {}
    for name, total in sums.items():
        mean = total / max(tokens, 1)
        importance[name] = (mean + DAMPING * mean.mean() + 1e-12).astype(np.float32)
    return importance, tokens


# --- the graph ---------------------------------------------------------------------------------------


def quantize_weights_int4(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
    search: bool = True,
    exclude_nodes: Iterable[str] = (),
    min_elements: int = 4096,
    check: bool = True,
) -> Int4Report:
    """Int4 weight-only: every MatMul whose B is a float 2-D initializer [K, N] (at least
    `min_elements`) reads DequantizeLinear(INT4 [K, N], scale [K / bs, N], axis=0, block_size=bs).

    calibration: feed dicts for the graph's inputs; the scale search then minimises each layer's
    output error on them (else the weight error; `search=False`: round to nearest). Weights shared
    by several MatMuls are quantized once. The graph is converted to opset 21; its inputs and
    outputs are unchanged. QuantizeError for a weight int4 cannot take (exclude it by name).
    """
    check_block_size(block_size)
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=False)
    external = any(is_external(t) for t in model.graph.initializer)
    data = stash_data(model, src.parent, INLINE_BYTES)
    model = _at_opset(model, src)
    graph = model.graph
    name_nodes(graph)
    excluded, targets = weight_targets(graph, list(exclude_nodes), min_elements)
    inits = {t.name: t for t in graph.initializer}
    blocks = _weight_blocks(src, {w: tuple(inits[w].dims) for w in targets}, block_size)
    inputs_of = _weight_inputs(graph, targets)
    importance, tokens = {}, 0
    if calibration and search and targets:
        acts = sorted({x for xs in inputs_of.values() for x in xs})
        importance, tokens = activation_importance(src, calibration, acts)
    importance_of = {w: _weight_importance(importance, xs) for w, xs in inputs_of.items()}

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as work:
        # each int4 weight and scale goes to disk as soon as it is made, so no step holds them all
        spill = Path(work) / "int4.spill"
        with open(spill, "wb") as out:
            weights = _quantize_initializers(model, src, data, targets, blocks, importance_of, search, out)
        staged = save_onnx(model, Path(work) / dst.name, data, external=True if external else None)
        del model, data
        spill.unlink()
        if check:
            check_graph(staged[0], src)
        files = move_into(staged, dst.parent)
    mode = "none" if not search else ("activations" if importance else "weights")
    odd = sorted(w for w, b in blocks.items() if b != block_size)
    notes = [f"{len(weights)} weight tensors int4 (blocks along K, symmetric, opset {OPSET})"]
    if odd:
        notes.append(
            f"{len(odd)} weights in smaller blocks (K not a multiple of {block_size}), e.g. {odd[0]}"
        )
    return Int4Report(
        src=str(src),
        dst=str(dst),
        block_size=block_size,
        search=mode,
        weights=weights,
        excluded=excluded,
        calibration_samples=len(calibration or ()) if mode == "activations" else 0,
        calibration_tokens=tokens,
        src_bytes=graph_bytes(src),
        dst_bytes=graph_bytes(dst),
        files=[str(f) for f in files],
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def _weight_blocks(src: Path, shapes: Mapping[str, tuple[int, ...]], block_size: int) -> dict[str, int]:
    """Each weight's block size; QuantizeError names the first weight int4 cannot take."""
    blocks = {}
    for name, (k, n) in shapes.items():
        size = block_size_for(k, block_size)
        if size is None or n % 2:
            why = f"K = {k} is not a multiple of {MIN_BLOCK_SIZE}" if size is None else f"N = {n} is odd"
            raise QuantizeError(
                f"{src}: weight {name} [{k}, {n}] cannot be int4 ({why}; TensorRT takes whole blocks "
                "and int4 pairs along N): exclude its MatMul by name"
            )
        blocks[name] = size
    return blocks


def _weight_inputs(graph: onnx.GraphProto, targets: Mapping[str, str]) -> dict[str, list[str]]:
    """Weight -> the activations its MatMuls multiply it with (`targets`: weight -> its DQ output)."""
    readers = {dq_out: w for w, dq_out in targets.items()}
    inputs_of: dict[str, list[str]] = {w: [] for w in targets}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in readers:
            inputs_of[readers[node.input[1]]].append(node.input[0])
    return inputs_of


def _quantize_initializers(model, src, data, targets, blocks, importance_of, search, out) -> dict[str, dict]:
    """Replace each weight of `targets` by its int4 values and scales (their bytes spilled to the
    open file `out`, located in `data`) behind a DequantizeLinear; returns the report's weights."""
    graph = model.graph
    still_float = {x for n in graph.node for x in n.input} & set(targets)  # shared with another op
    initializers, dq_nodes, weights = [], [], {}
    for tensor in list(graph.initializer):
        if tensor.name not in targets:
            initializers.append(tensor)
            continue
        stored = data.pop(tensor.name, None)
        w = stored.array() if stored is not None else read_array(tensor, src.parent)
        base, bs = tensor.name, blocks[tensor.name]
        q, scale = quantize_blocks(w, bs, importance_of[base], search)
        weights[base] = {"shape": list(w.shape), "block_size": bs, **weight_stats(w, q, scale)}
        names = [f"{base}_quantized", f"{base}_scale"]
        initializers += [int4_tensor(names[0], q.shape), declared(names[1], scale)]
        data[names[0]] = SpilledData.write(out, Int4Data(q))
        data[names[1]] = SpilledData.write(out, ArrayData(scale))
        if base in still_float:
            initializers.append(tensor)
            if stored is not None:
                data[base] = stored
        dq_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                names,
                [targets[base]],
                name=f"{base}_DequantizeLinear",
                axis=0,
                block_size=bs,
            )
        )
        del w, q, scale
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    for i, n in enumerate(dq_nodes):  # DQ nodes first: the graph stays topologically sorted
        graph.node.insert(i, n)
    return weights


def _weight_importance(importance: Mapping[str, np.ndarray], activations: Sequence[str]) -> np.ndarray | None:
    """What a weight's rows are weighted by: its input's mean squares, summed over the MatMuls that
    share the weight; None without calibration."""
    found = [importance[x] for x in activations if x in importance]
    return sum(found[1:], found[0]) if found else None


def _at_opset(model: onnx.ModelProto, src: Path) -> onnx.ModelProto:
    """The model (its weights stashed: structure only) at default-domain opset OPSET."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current < OPSET:
        inputs, outputs = list(model.graph.input), list(model.graph.output)
        try:
            model = version_converter.convert_version(model, OPSET)
        except Exception as e:  # the converter's own errors: an op it has no adapter for
            raise QuantizeError(f"{src}: cannot convert the graph to opset {OPSET}: {e}") from e
        for field_, values in ((model.graph.input, inputs), (model.graph.output, outputs)):
            del field_[:]  # as declared: the converter's shape inference may have refined them
            field_.extend(values)
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return model
