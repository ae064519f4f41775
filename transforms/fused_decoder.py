"""The ONNX Runtime decoder variant: a portable llm_decoder graph rebuilt with ONNX Runtime's fused ops.

The portable graph (standard ops, what TensorRT builds from) runs per decode step as some 1700
nodes after ONNX Runtime's own fusions: unfused RMSNorm and rotary, GQA heads expanded, the KV
cache concatenated into a fresh tensor every step. This variant is the same decoder, the same
weights and the same quantized values, written in ONNX Runtime's contrib ops:

  SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization  RMSNorm, the residual add inside
  MatMul (float) or MatMulNBits (int8 / int4)  q, k and v as one projection, gate and up as one
  GroupQueryAttention  rotary inside (cos/sin caches), grouped kv heads, the cache written in place
                       when past and present share one buffer

Inputs: inputs_embeds [B, T, H], position_ids [B, T] int64, seqlens_k [B] int32 (each row's
total length - 1), total_sequence_length [] int32, logits_to_keep [] int64 (the last k positions'
logits; 0 = all), past_key_values.{i}.key / .value [B, kvH, S, hd]. Outputs: logits [B, k, V],
present.{i}.key / .value. Rows are right-aligned to no padding: the variant has no attention mask,
so the runtime uses it where every row attends to all its past (one prompt, its beams).

The graph is read from the portable one by structure (`read_llama`): its RMSNorms in order, its
weighted MatMuls in order (q, k, v, o, gate, up, down per layer, then the LM head), each checked
against where it leads (k and v to the layer's present, gate to its SiLU). A graph of another shape
is refused by name, never guessed at. Weights are float (float32, or float16 read through a Cast:
written float32 here, as MatMul on the CPU wants), int8 per output channel (vsal.transforms.
weight_only) or int4 in blocks (vsal.transforms.int4); the quantized ones keep their values and
scales exactly, repacked into MatMulNBits' layout (column-major blocks, zero point 2^(bits-1)).
Each weight is made as it is written, so memory stays about one fused weight.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from vsal.runtime.errors import BuildError
from vsal.transforms.graph_index import GraphIndex
from vsal.transforms.onnx_io import declared, move_into, save_onnx, stored_data

OPSET = 21
CONTRIB = "com.microsoft"
# MatMulNBits blocks for int8 per-channel weights (the channel's scale in each, so the weights are the
# same at any size; the last block is zero-padded where K is not a multiple). At accuracy level 4 the
# activations are quantized per block too. 128 against 32: the LM head's step 1.16 against 1.72 ms
# (49152 x 576), 30 layers of SmolLM2-135M 5.0-5.5 against 6.0-7.7 ms, on this 2-core CPU.
INT8_BLOCK = 128
DEFAULT_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (ONNX Runtime's default for fused DQ too)
PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"


class FusedDecoderError(BuildError, ValueError):
    """A graph that is not a LLaMA decoder as vsal exports it; the message names the file."""


@dataclass(frozen=True)
class Weight:
    """One MatMul weight [K, N] of the portable graph, as stored there."""

    kind: str  # float (float32 / float16), int8 (per output channel), int4 (blocks along K)
    values: str  # the initializer of its values (quantized values for int8 / int4)
    k: int
    n: int
    scale: str | None = None  # int8: [N]; int4: [K / block, N]
    block_size: int | None = None  # int4


@dataclass(frozen=True)
class Layer:
    input_norm: str | None  # RMSNorm weight initializers (None: all ones, folded away by onnxslim)
    post_norm: str | None
    q: Weight
    k: Weight
    v: Weight
    o: Weight
    gate: Weight
    up: Weight
    down: Weight


@dataclass
class LlamaGraph:
    """What the fused graph needs from a portable llm_decoder graph."""

    layers: list[Layer]
    final_norm: str | None
    lm_head: Weight
    epsilon: float
    inv_freq: np.ndarray  # rotary frequencies [head_dim / 2]
    scale: float  # attention's softmax scale
    num_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    norm_dtype: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Norm:
    x: str  # the normalised tensor's input
    out: str
    gamma: str | None
    epsilon: float


class _Reader:
    """Reads a portable decoder graph: constants through Cast, norms, weights, paths."""

    def __init__(self, model: onnx.ModelProto, src: Path):
        self.graph, self.src = model.graph, src
        self.index = GraphIndex.of(model.graph)

    def fail(self, why: str) -> FusedDecoderError:
        return FusedDecoderError(f"{self.src}: not a LLaMA llm_decoder graph as vsal exports it ({why})")

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return list(self.index.consumers.get(name, ()))

    def constant(self, name: str) -> onnx.TensorProto | None:
        """The tensor `name` is, when it is a constant (an initializer, a Constant, or a Cast of one)."""
        if name in self.index.constant_values:
            return self.index.constant_values[name]
        node = self.index.producer.get(name)
        if node is not None and node.op_type == "Cast":
            return self.index.constant_values.get(node.input[0])
        return None

    def scalar(self, name: str) -> float | None:
        tensor = self.constant(name)
        if tensor is None or int(np.prod(tensor.dims)) != 1:
            return None
        return float(self.array(tensor).reshape(-1)[0])

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        return stored_data(tensor, self.src.parent).array()

    def only_reader(self, name: str, op_type: str) -> onnx.NodeProto:
        found = [n for n in self.readers(name) if n.op_type == op_type]
        if len(found) != 1:
            raise self.fail(f"expected one {op_type} reading {name}, found {len(found)}")
        return found[0]

    def norms(self) -> list[_Norm]:
        """Every RMSNorm (Pow 2, ReduceMean, Add eps, Sqrt, Reciprocal, Mul x, optional Mul weight)."""
        found = []
        for pow_node in self.graph.node:
            if pow_node.op_type != "Pow" or self.scalar(pow_node.input[1]) != 2.0:
                continue
            x = pow_node.input[0]
            mean = self.only_reader(pow_node.output[0], "ReduceMean")
            add = self.only_reader(mean.output[0], "Add")
            epsilon = self.scalar(next(i for i in add.input if i != mean.output[0]))
            root = self.only_reader(add.output[0], "Sqrt")
            inverse = self.only_reader(root.output[0], "Reciprocal")
            scaled = self.only_reader(inverse.output[0], "Mul")
            if epsilon is None or x not in scaled.input:
                raise self.fail(f"RMSNorm of {x} has no constant epsilon or does not scale its input")
            out, gamma = scaled.output[0], None
            readers = self.readers(out)
            if len(readers) == 1 and readers[0].op_type == "Mul":
                other = next(i for i in readers[0].input if i != out)
                if self.constant(other) is not None:
                    gamma, out = self.constant(other).name, readers[0].output[0]
            found.append(_Norm(x, out, gamma, epsilon))
        return found

    def weight(self, node: onnx.NodeProto) -> Weight | None:
        """The weight a MatMul reads as its B (None: two activations, attention's own MatMuls)."""
        b = node.input[1]
        tensor = self.constant(b)
        if tensor is not None:
            if len(tensor.dims) != 2 or tensor.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                raise self.fail(f"MatMul {node.name}: weight {tensor.name} is not a float 2-D tensor")
            return Weight("float", tensor.name, *tensor.dims)
        dq = self.index.producer.get(b)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        values, scale = (self.index.initializers.get(x) for x in dq.input[:2])
        if values is None or scale is None:
            return None
        if len(dq.input) > 2 and dq.input[2]:
            zero = self.constant(dq.input[2])
            if zero is None or self.array(zero).any():
                raise self.fail(f"MatMul {node.name}: weight {values.name} has a non-zero zero point")
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        k, n = values.dims
        if values.data_type == TensorProto.INT8 and attrs.get("axis") == 1 and list(scale.dims) == [n]:
            return Weight("int8", values.name, k, n, scale.name)
        block = attrs.get("block_size", 0)
        if values.data_type == TensorProto.INT4 and attrs.get("axis", 1) == 0 and block:
            return Weight("int4", values.name, k, n, scale.name, block)
        raise self.fail(
            f"MatMul {node.name}: weight {values.name} quantized in a form this variant does not take"
        )

    def reaches(self, start: str, target: str, hops: int = 12) -> bool:
        """`target` is computed from `start` within `hops` nodes."""
        frontier, seen = {start}, set()
        for _ in range(hops):
            if target in frontier:
                return True
            seen |= frontier
            frontier = {o for name in frontier for n in self.readers(name) for o in n.output} - seen
        return target in frontier


def read_llama(model: onnx.ModelProto, src: Path) -> LlamaGraph:
    """The LLaMA decoder in a portable llm_decoder graph (structure only; weights stay where stored)."""
    reader = _Reader(model, src)
    outputs = [o.name for o in model.graph.output]
    layers = sum(1 for o in outputs if o.startswith("present.") and o.endswith(".key"))
    norms = reader.norms()
    weighted = [(n, w) for n in model.graph.node if n.op_type == "MatMul" for w in [reader.weight(n)] if w]
    if not layers or len(norms) != 2 * layers + 1 or len(weighted) != 7 * layers + 1:
        raise reader.fail(
            f"{layers} layers, {len(norms)} RMSNorms, {len(weighted)} weighted MatMuls: a LLaMA decoder has "
            f"2L+1 and 7L+1"
        )
    present = {o.name: o for o in model.graph.output}
    dims = [d.dim_value for d in present[PRESENT.format(0, "key")].type.tensor_type.shape.dim]
    kv_heads, head_dim = dims[1], dims[3]
    parsed = []
    for i in range(layers):
        before, after = norms[2 * i], norms[2 * i + 1]
        (q, wq), (k, wk), (v, wv), (o, wo), (g, wg), (u, wu), (d, wd) = weighted[7 * i : 7 * i + 7]
        checks = {
            "q, k and v read the input RMSNorm": all(m.input[0] == before.out for m in (q, k, v)),
            "k leads to the present key": reader.reaches(k.output[0], PRESENT.format(i, "key")),
            "v leads to the present value": reader.reaches(v.output[0], PRESENT.format(i, "value")),
            "o feeds the residual the post-attention RMSNorm reads": reader.reaches(o.output[0], after.x, 2),
            "gate and up read the post-attention RMSNorm": g.input[0] == after.out
            and u.input[0] == after.out,
            "gate feeds SiLU's Sigmoid": any(n.op_type == "Sigmoid" for n in reader.readers(g.output[0])),
            "down reads the gated product": reader.reaches(u.output[0], d.output[0], 3),
        }
        failed = [what for what, ok in checks.items() if not ok]
        if failed:
            raise reader.fail(f"layer {i}: not true that {failed[0]}")
        for m in (q, k, v):
            if any(
                n.op_type == "Add" and any(reader.constant(x) for x in n.input)
                for n in reader.readers(m.output[0])
            ):
                raise reader.fail(f"layer {i}: q/k/v projections have biases")
        parsed.append(Layer(before.gamma, after.gamma, wq, wk, wv, wo, wg, wu, wd))
    final = norms[-1]
    head_node, head = weighted[-1]
    if head_node.input[0] != final.out:
        raise reader.fail("the LM head does not read the final RMSNorm")
    epsilons = {n.epsilon for n in norms}
    if len(epsilons) != 1:
        raise reader.fail(f"RMSNorms with different epsilons {sorted(epsilons)}")
    return LlamaGraph(
        layers=parsed,
        final_norm=final.gamma,
        lm_head=head,
        epsilon=epsilons.pop(),
        inv_freq=_inv_freq(reader, head_dim),
        scale=_attention_scale(reader, layers),
        num_heads=parsed[0].q.n // head_dim,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=parsed[0].q.k,
        vocab=head.n,
    )


def _inv_freq(reader: _Reader, head_dim: int) -> np.ndarray:
    """The rotary frequencies: the constant [head_dim / 2] that position ids are multiplied by ahead
    of the Cos; a scaled cos/sin (attention scaling of YaRN-like ropes) is refused."""
    cos = [n for n in reader.graph.node if n.op_type == "Cos"]
    if len(cos) != 1:
        raise reader.fail(f"{len(cos)} Cos nodes (one rotary table expected)")
    frontier = list(cos[0].input)
    for _ in range(4):
        nodes = [reader.index.producer[x] for x in frontier if x in reader.index.producer]
        for node in nodes:
            for x in node.input:
                tensor = reader.constant(x)
                if tensor is not None and list(tensor.dims) == [head_dim // 2]:
                    users = [n.op_type for n in reader.readers(cos[0].output[0])]
                    if any(op in ("Mul", "Div") for op in users):
                        raise reader.fail("the rotary cos is scaled (a rope this variant does not take)")
                    return reader.array(tensor).astype(np.float32)
        frontier = [x for n in nodes for x in n.input]
    raise reader.fail("no rotary frequencies of head_dim / 2 ahead of the Cos")


def _attention_scale(reader: _Reader, layers: int) -> float:
    """The constant each layer's attention scores are multiplied (or divided) by before Softmax."""
    scales = set()
    for softmax in (n for n in reader.graph.node if n.op_type == "Softmax"):
        node = reader.index.producer.get(softmax.input[0])
        for _ in range(3):
            if node is None:
                break
            if node.op_type in ("Mul", "Div"):
                value = next((reader.scalar(x) for x in node.input if reader.scalar(x) is not None), None)
                if value is not None:
                    scales.add(value if node.op_type == "Mul" else 1.0 / value)
                    break
            node = next((reader.index.producer[x] for x in node.input if x in reader.index.producer), None)
    if len(scales) != 1:
        raise reader.fail(f"attention scales {sorted(scales)} over {layers} layers (one expected)")
    return scales.pop()


# --- weights in the fused layouts ------------------------------------------------------------------


@dataclass(frozen=True)
class _LazyData:
    """An initializer's bytes, made when `save_onnx` writes them (one fused weight in memory)."""

    nbytes: int
    make: Callable[[], np.ndarray]

    def chunks(self) -> Iterator[bytes]:
        yield np.ascontiguousarray(self.make()).tobytes()


def _nbits_layout(weight: Weight) -> tuple[int, int]:
    """MatMulNBits (bits, block_size) for a quantized weight."""
    return (4, weight.block_size) if weight.kind == "int4" else (8, INT8_BLOCK)


def _nbits_arrays(reader_array, tensors, weight: Weight) -> tuple[np.ndarray, np.ndarray]:
    """B [N, blocks, bytes per block] uint8 and scales [N * blocks] of one weight, its values
    unchanged: stored unsigned with MatMulNBits' default zero point 2^(bits-1)."""
    bits, block = _nbits_layout(weight)
    q = reader_array(tensors[weight.values]).astype(np.int16)  # [K, N] signed
    scale = reader_array(tensors[weight.scale]).astype(np.float32)
    blocks = -(-weight.k // block)
    padded = np.zeros((blocks * block, weight.n), np.int16)
    padded[: weight.k] = q
    unsigned = (padded + (1 << (bits - 1))).astype(np.uint8).T.reshape(weight.n, blocks, block)
    if bits == 4:
        unsigned = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
        scales = scale.T.reshape(-1)  # [blocks, N] -> n-major
    else:
        scales = np.repeat(scale, blocks)  # one scale per channel, in each of its blocks
    return unsigned, scales


class _Writer:
    """Builds the fused graph's nodes and initializers (their data made as they are written)."""

    def __init__(self, reader: _Reader, accuracy_level: int):
        self.reader = reader
        self.tensors = reader.index.initializers
        self.accuracy_level = accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.data: dict[str, _LazyData] = {}

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        return self.reader.array(tensor)

    def add_initializer(self, name: str, dtype, shape: Sequence[int], make: Callable[[], np.ndarray]) -> str:
        tensor = declared(name, np.empty(0, dtype))
        del tensor.dims[:]
        tensor.dims.extend(shape)
        self.initializers.append(tensor)
        self.data[name] = _LazyData(int(np.prod(shape)) * np.dtype(dtype).itemsize, make)
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = "", **attrs) -> None:
        name = f"{op}_{len(self.nodes)}"
        self.nodes.append(
            helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs)
        )

    def norm_weight(self, gamma: str | None, hidden: int, name: str) -> str:
        if gamma is None:
            return self.add_initializer(name, np.float32, [hidden], lambda: np.ones(hidden, np.float32))
        tensor = self.tensors[gamma]
        return self.add_initializer(name, np.float32, [hidden], lambda: self.array(tensor).astype(np.float32))

    def matmul(self, x: str, parts: Sequence[Weight], out: str, name: str) -> None:
        """x @ [parts side by side]: one MatMul (float) or MatMulNBits (quantized)."""
        first = parts[0]
        k, n = first.k, sum(p.n for p in parts)
        if first.kind == "float":

            def make() -> np.ndarray:
                return np.concatenate(
                    [self.array(self.tensors[p.values]).astype(np.float32) for p in parts], axis=1
                )

            self.node("MatMul", [x, self.add_initializer(f"{name}.weight", np.float32, [k, n], make)], [out])
            return
        bits, block = _nbits_layout(first)
        blocks = -(-k // block)
        cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def packed() -> tuple[np.ndarray, np.ndarray]:  # made once, for both initializers
            if "arrays" not in cache:
                arrays = [_nbits_arrays(self.array, self.tensors, p) for p in parts]
                cache["arrays"] = (
                    np.concatenate([a for a, _ in arrays]),
                    np.concatenate([s for _, s in arrays]),
                )
            return cache["arrays"]

        def weights() -> np.ndarray:
            return packed()[0]

        def scales() -> np.ndarray:
            values = packed()[1]
            cache.clear()  # written after the weights: free them
            return values

        b = self.add_initializer(f"{name}.weight", np.uint8, [n, blocks, block * bits // 8], weights)
        s = self.add_initializer(f"{name}.scales", np.float32, [n * blocks], scales)
        self.node(
            "MatMulNBits",
            [x, b, s],
            [out],
            CONTRIB,
            K=k,
            N=n,
            bits=bits,
            block_size=block,
            accuracy_level=self.accuracy_level,
        )


def _fusable(parts: Sequence[Weight]) -> bool:
    """Weights that can sit side by side in one projection: the same kind, K and blocks."""
    return len({(p.kind, p.k, p.block_size) for p in parts}) == 1


def _fused_graph(llama: LlamaGraph, reader: _Reader, max_positions: int, accuracy_level: int, name: str):
    w = _Writer(reader, accuracy_level)
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", f32, ["B", "T", llama.hidden]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "T"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["B", "K", llama.vocab])]
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * llama.inv_freq[None, :]
    half = llama.head_dim // 2
    cos = w.add_initializer("cos_cache", np.float32, [max_positions, half], lambda: np.cos(angles))
    sin = w.add_initializer("sin_cache", np.float32, [max_positions, half], lambda: np.sin(angles))
    eps = llama.epsilon
    hidden = "inputs_embeds"
    normed = "layers.0.input_norm"
    gamma = w.norm_weight(llama.layers[0].input_norm, llama.hidden, "layers.0.input_norm.weight")
    w.node("SimplifiedLayerNormalization", [hidden, gamma], [normed], epsilon=eps, axis=-1)
    residual = hidden
    for i, layer in enumerate(llama.layers):
        p = f"layers.{i}"
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    PAST.format(i, kind), f32, ["B", llama.kv_heads, "P", llama.head_dim]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    PRESENT.format(i, kind), f32, ["B", llama.kv_heads, "S", llama.head_dim]
                )
            )
        qkv = (layer.q, layer.k, layer.v)
        if _fusable(qkv):
            w.matmul(normed, qkv, f"{p}.qkv", f"{p}.qkv_proj")
            attention_in = [f"{p}.qkv", "", ""]
        else:
            for part, weight in zip("qkv", qkv, strict=True):
                w.matmul(normed, [weight], f"{p}.{part}", f"{p}.{part}_proj")
            attention_in = [f"{p}.q", f"{p}.k", f"{p}.v"]
        w.node(
            "GroupQueryAttention",
            [
                *attention_in,
                PAST.format(i, "key"),
                PAST.format(i, "value"),
                "seqlens_k",
                "total_sequence_length",
                cos,
                sin,
                "position_ids",
            ],
            [f"{p}.attention", PRESENT.format(i, "key"), PRESENT.format(i, "value")],
            CONTRIB,
            num_heads=llama.num_heads,
            kv_num_heads=llama.kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=llama.scale,
        )
        w.matmul(f"{p}.attention", [layer.o], f"{p}.o", f"{p}.o_proj")
        gamma = w.norm_weight(layer.post_norm, llama.hidden, f"{p}.post_norm.weight")
        w.node(
            "SkipSimplifiedLayerNormalization",
            [f"{p}.o", residual, gamma],
            [f"{p}.post_norm", "", "", f"{p}.mid"],
            CONTRIB,
            epsilon=eps,
        )
        residual = f"{p}.mid"
        width = layer.gate.n
        if _fusable((layer.gate, layer.up)):
            w.matmul(f"{p}.post_norm", [layer.gate, layer.up], f"{p}.gate_up", f"{p}.gate_up_proj")
            split = w.add_initializer(
                f"{p}.split", np.int64, [2], lambda width=width: np.array([width, width])
            )
            w.node("Split", [f"{p}.gate_up", split], [f"{p}.gate", f"{p}.up"], axis=-1)
        else:
            w.matmul(f"{p}.post_norm", [layer.gate], f"{p}.gate", f"{p}.gate_proj")
            w.matmul(f"{p}.post_norm", [layer.up], f"{p}.up", f"{p}.up_proj")
        w.node("Sigmoid", [f"{p}.gate"], [f"{p}.sigmoid"])
        w.node("Mul", [f"{p}.gate", f"{p}.sigmoid"], [f"{p}.silu"])
        w.node("Mul", [f"{p}.silu", f"{p}.up"], [f"{p}.gated"])
        w.matmul(f"{p}.gated", [layer.down], f"{p}.down", f"{p}.down_proj")
        last = i + 1 == len(llama.layers)
        following = llama.final_norm if last else llama.layers[i + 1].input_norm
        normed = "final_norm" if last else f"layers.{i + 1}.input_norm"
        gamma = w.norm_weight(following, llama.hidden, f"{normed}.weight")
        w.node(
            "SkipSimplifiedLayerNormalization",
            [f"{p}.down", residual, gamma],
            [normed, "", "", f"layers.{i + 1}.residual"],
            CONTRIB,
            epsilon=eps,
        )
        residual = f"layers.{i + 1}.residual"
    # logits of the last `logits_to_keep` positions: Slice from -k (0: from 0, every position)
    axis_0 = w.add_initializer("axis_0", np.int64, [1], lambda: np.array([0]))
    axis_1 = w.add_initializer("axis_1", np.int64, [1], lambda: np.array([1]))
    end = w.add_initializer("end", np.int64, [1], lambda: np.array([np.iinfo(np.int64).max]))
    w.node("Neg", ["logits_to_keep"], ["keep_start"])
    w.node("Unsqueeze", ["keep_start", axis_0], ["keep_starts"])
    w.node("Slice", ["final_norm", "keep_starts", end, axis_1], ["kept"])
    w.matmul("kept", [llama.lm_head], "logits", "lm_head")
    graph = helper.make_graph(w.nodes, name, inputs, outputs, w.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB, 1)]
    )
    model.ir_version = 10
    return model, w.data


def _check_loads(path: Path) -> None:
    """ONNX Runtime loads it (onnx's checker does not know its SimplifiedLayerNormalization). The
    session is unoptimised: loading is the check, without repacking every weight."""
    from vsal.runtime.backends import ort_session

    try:
        session = ort_session(path, optimization="disable")
    except Exception as error:  # ONNX Runtime raises its own types; the message says what is wrong
        raise FusedDecoderError(f"{path}: ONNX Runtime does not load the fused decoder: {error}") from error
    del session


@dataclass
class FusedReport:
    """What `fuse_decoder` wrote."""

    src: str
    dst: str
    layers: int
    weights: dict[str, int]  # weight kind -> MatMul weights read
    nodes: int
    src_nodes: int
    dst_bytes: int
    max_positions: int
    accuracy_level: int
    seconds: float
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.weights.items()))
        return (
            f"{Path(self.dst).name}: ONNX Runtime fused decoder, {self.layers} layers, {self.src_nodes} -> "
            f"{self.nodes} nodes, weights {kinds}; {self.dst_bytes / 1e6:.1f} MB"
        )


def fuse_decoder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    max_positions: int,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> FusedReport:
    """The fused ONNX Runtime variant of the portable llm_decoder graph `src`, written to `dst`.

    max_positions   the rotary tables' length: the longest sequence (prompt and answer) it runs
    accuracy_level  MatMulNBits' compute type: 4 int8 activations (fastest on the CPU), 1 float32
    """
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=False)
    llama = read_llama(model, src)
    reader = _Reader(model, src)
    fused, data = _fused_graph(llama, reader, max_positions, accuracy_level, dst.stem)
    weights: dict[str, int] = {}
    for layer in llama.layers:
        for weight in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down):
            weights[weight.kind] = weights.get(weight.kind, 0) + 1
    weights[llama.lm_head.kind] = weights.get(llama.lm_head.kind, 0) + 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as work:
        staged = save_onnx(fused, Path(work) / dst.name, data, external=True)
        _check_loads(staged[0])
        files = move_into(staged, dst.parent)
    return FusedReport(
        src=str(src),
        dst=str(dst),
        layers=len(llama.layers),
        weights=weights,
        nodes=len(fused.graph.node),
        src_nodes=len(model.graph.node),
        dst_bytes=sum(f.stat().st_size for f in files),
        max_positions=max_positions,
        accuracy_level=accuracy_level,
        seconds=time.perf_counter() - start,
        files=[str(f) for f in files],
    )
