"""The `llm_decoder` graph at any size without building the model: traced on the meta device, its
weights streamed tensor by tensor from a source into external data, validated against a PyTorch
forward that holds one decoder layer at a time.

Trace. `LlmDecoderGraph` is built on the meta device (shapes, no memory: 13B costs nothing) and
traced by torch.onnx's dynamo exporter with meta inputs. torch 2.13 has no
`torch.onnx.enable_fake_mode` any more; meta tensors give the same graph and fail only in the
exporter's constant folding, which reads values. So the exporter runs without its optimizer, every
initializer the checkpoint supplies is taken out of the graph (its value unknown: never folded,
never merged with an equal one), the rotary `inv_freq` buffer (derived from the config, in no
checkpoint) gets its real values, and then the same onnxscript optimizer runs. The graph is the
one `export_graph` writes from a real model but for three things done here, as its folding does
with real weights: a weight read only through Transpose(perm 1,0) (every Linear) is stored
transposed, [in, out], and the Transpose dropped; each weight keeps its source name (with ".T"
when stored transposed) instead of "val_41", so it maps back to its source tensor; and weights
keep the checkpoint's dtype.

Dtype. A float16 checkpoint (the released Vicuna) gives float16 initializers, each read through
one Cast to float32: the graph computes in float32 as the fp32 export does, holds no fp32 copy of
any weight on disk, and matches a float32 PyTorch forward of the same (float16) values to float32
rounding. fp16 compute is a build step (vsal.transforms.fp16), as for every other graph. A float32
source gives float32 initializers and no Cast. ONNX Runtime constant-folds those Casts at session
load (one fp32 copy of the weights in its memory); validation runs it a section of layers at a
time with low-memory sessions (vsal.transforms.sections) instead.

Sources (`WeightSource`): names, shapes and dtypes up front, then one tensor at a time, named as
transformers' LlamaForCausalLM state dict ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
  RandomWeights       the preset's seeded random weights, generated per tensor from (seed, name).
                      NOT the values `build_model(config, seed)` gets (torch's one global stream
                      over the whole model cannot be drawn one tensor at a time); the same
                      std, 0.02 (uniform: half the time of normal draws), norms 1. Validation
                      does not need them equal: both sides read the same source.
  SafetensorsWeights  safetensors files, memory-mapped (a transformers folder's shards, or the
                      consolidated checkpoint's `llm.model.` tensors: `consolidated_weights`).
  ReleaseLlmWeights   the six released files as they lie (vsal.export.weights.release_stream): the
                      Vicuna folder's tensors, the delta's LoRA merged into each as it is read.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn
from vsal.export.config import LlmConfig, ModelConfig
from vsal.export.onnx_export import (
    DEFAULT_OPSET,
    CaseResult,
    ExportError,
    GraphValidation,
    Mismatch,
    ValidationError,
    _name_dims,
    _quiet_exporter,
)
from vsal.export.specs import GraphSpec, llm_decoder_spec
from vsal.export.weights.checkpoints import CheckpointError
from vsal.transforms.onnx_io import save_onnx
from vsal.transforms.sections import DEFAULT_SECTION_BYTES, CaseError, SectionedGraph

MODULE_PREFIX = "lm."  # LlmDecoderGraph holds the LlamaForCausalLM as `.lm`
INV_FREQ = "model.rotary_emb.inv_freq"  # a buffer derived from the config, in no checkpoint
EMBEDDINGS = "model.embed_tokens.weight"  # unused by the graph (it takes inputs_embeds)
LM_HEAD = "lm_head.weight"
TRANSPOSED = ".T"  # suffix of a weight stored [in, out]
INIT_STD = 0.02  # LlamaConfig.initializer_range: the std of random Linear weights
UNIFORM_HALF_WIDTH = INIT_STD * 3**0.5  # uniform(-a, a) has std INIT_STD; twice as fast to draw
CHUNK_BYTES = 64 << 20  # bytes handed to the writer at a time
INLINE_LIMIT = 64 << 20  # weights up to this stay in the graph file (the tiny preset's do)


class WeightSource(Protocol):
    """A checkpoint's LLM tensors by transformers' LlamaForCausalLM names, one at a time."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) without reading the values."""
        ...

    def tensor(self, name: str) -> np.ndarray:
        """The values in the checkpoint's own dtype (may be a read-only memory map)."""
        ...


def llama_shapes(llm: LlmConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict tensor of the LlamaForCausalLM of `llm` and its shape (built on meta)."""
    from transformers import LlamaForCausalLM
    from vsal.export.models.llm import llama_hf_config

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_hf_config(llm))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class RandomWeights:
    """Seeded random weights, one tensor at a time: uniform with std INIT_STD, RMSNorm weights 1.
    Each tensor's stream is seeded by (seed, crc32 of its name), so any tensor can be drawn alone."""

    llm: LlmConfig
    seed: int = 0
    dtype: str = "float16"
    _shapes: dict[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shapes = llama_shapes(self.llm)
        if self.llm.tie_word_embeddings:
            shapes.pop(LM_HEAD, None)
        object.__setattr__(self, "_shapes", shapes)

    def names(self) -> list[str]:
        return list(self._shapes)

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        return self._shapes[name], np.dtype(self.dtype)

    def tensor(self, name: str) -> np.ndarray:
        shape = self._shapes[name]
        if len(shape) == 1:  # RMSNorm weights, as transformers initialises them
            return np.ones(shape, dtype=self.dtype)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        values = np.empty(shape, dtype=self.dtype)
        rows = max(1, CHUNK_BYTES // (4 * int(np.prod(shape[1:]))))
        for begin in range(0, shape[0], rows):  # float32 draws a block at a time, not a full copy
            block = rng.random((min(rows, shape[0] - begin), *shape[1:]), dtype=np.float32)
            block -= 0.5
            block *= 2 * UNIFORM_HALF_WIDTH
            values[begin : begin + len(block)] = block
        return values


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32"}


@dataclass(frozen=True)
class _Stored:
    path: Path
    offset: int  # from the start of the file
    shape: tuple[int, ...]
    dtype: np.dtype


class SafetensorsWeights:
    """Tensors of one or more safetensors files, memory-mapped; `prefix` is stripped from their
    names (the consolidated checkpoint's LLM lives under "llm.model.")."""

    def __init__(self, files: Sequence[str | Path], prefix: str = ""):
        self._index: dict[str, _Stored] = {}
        for path in map(Path, files):
            for key, stored in _safetensors_index(path).items():
                if key.startswith(prefix):
                    self._index[key[len(prefix) :]] = stored
        if not self._index:
            raise CheckpointError(f"{', '.join(map(str, files))}: no tensors named {prefix}*")

    def names(self) -> list[str]:
        return list(self._index)

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        stored = self._index[name]
        return stored.shape, stored.dtype

    def tensor(self, name: str) -> np.ndarray:
        s = self._index[name]
        if not s.shape or 0 in s.shape:
            return np.fromfile(s.path, dtype=s.dtype, count=int(np.prod(s.shape)), offset=s.offset).reshape(
                s.shape
            )
        return np.memmap(s.path, dtype=s.dtype, mode="r", offset=s.offset, shape=s.shape)


def _safetensors_index(path: Path) -> dict[str, _Stored]:
    """A safetensors file's header: name -> where its data is (no data read)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    index = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in _ST_DTYPES:
            raise CheckpointError(
                f"{path}: {key} is {entry['dtype']}; streaming export reads "
                f"{', '.join(_ST_DTYPES)} (convert the checkpoint to float16 first)"
            )
        begin, _ = entry["data_offsets"]
        index[key] = _Stored(
            path, 8 + length + begin, tuple(entry["shape"]), np.dtype(_ST_DTYPES[entry["dtype"]])
        )
    return index


def consolidated_weights(path: str | Path) -> SafetensorsWeights:
    """The LLM of a consolidated checkpoint (vsal.export.weights.consolidated), memory-mapped."""
    from vsal.export.weights.consolidated import read_consolidated_config

    read_consolidated_config(path)  # a vsal consolidated file, or a clear CheckpointError
    return SafetensorsWeights([path], prefix="llm.model.")


def _source_name(source: WeightSource, name: str, llm: LlmConfig) -> str:
    """A tied LM head reads the embedding table when the checkpoint stores only that."""
    if name == LM_HEAD and llm.tie_word_embeddings and LM_HEAD not in source.names():
        return EMBEDDINGS
    return name


# --- trace ---------------------------------------------------------------------------------------


def _trace_on_meta(spec: GraphSpec, llm: LlmConfig, opset: int):
    """torch.onnx's ONNXProgram of LlmDecoderGraph built and traced on the meta device, unoptimised."""
    from vsal.export.llm_graph import LlmDecoderGraph, export_kwargs
    from vsal.export.models.llm import LlmDecoder

    with torch.device("meta"):
        module = LlmDecoderGraph(LlmDecoder(llm)).eval()
    sizes = spec.export_sizes()
    args = tuple(
        torch.empty(t.resolve(sizes), dtype=getattr(torch, t.dtype), device="meta") for t in spec.inputs
    )
    with _quiet_exporter(), torch.no_grad():
        try:
            return torch.onnx.export(module, args, **export_kwargs(spec, opset), optimize=False)
        except Exception as exc:  # the exporter raises many types; name the graph, keep the cause
            raise ExportError(
                f"{spec.name}: torch.onnx export on meta failed: {type(exc).__name__}: {exc}"
            ) from exc


def _inv_freq(llm: LlmConfig) -> np.ndarray:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from vsal.export.models.llm import llama_hf_config

    return LlamaRotaryEmbedding(llama_hf_config(llm)).inv_freq.numpy()


def _detach_weights(program, source: WeightSource, llm: LlmConfig) -> dict[str, str]:
    """Take every checkpoint tensor out of the traced graph (checking its shape against the
    source) and give the derived buffers their values; returns {graph value name: source name}.
    Any other initializer without values is an ExportError: nothing could fill it."""
    import onnx_ir as ir

    graph = program.model.graph
    taken, problems = {}, []
    for name, value in list(graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        if not (isinstance(raw, torch.Tensor) and raw.is_meta):
            continue  # a constant the exporter made, with its values
        plain = name.removeprefix(MODULE_PREFIX)
        if plain == INV_FREQ:
            value.const_value = ir.tensor(_inv_freq(llm), name=name)
            continue
        wanted = _source_name(source, plain, llm)
        if wanted not in source.names():
            problems.append(f"{name}: no tensor {wanted} in the weights")
            continue
        shape, _ = source.info(wanted)
        if shape != tuple(raw.shape):
            problems.append(f"{wanted}: the weights give shape {shape}, the graph needs {tuple(raw.shape)}")
            continue
        taken[name] = wanted
        value.const_value = None  # unknown to the optimizer: never folded, never merged
        graph.initializers.pop(name)
        graph.inputs.append(value)  # held as an input while optimizing; declared again after
    if problems:
        raise ExportError("llm_decoder weights do not match the graph:\n  " + "\n  ".join(problems))
    return taken


def _optimize(program, taken: Mapping[str, str]) -> onnx.ModelProto:
    """The exporter's own optimizer, then the proto with the detached weights inputs no more."""
    import onnxscript.optimizer

    with _quiet_exporter():
        onnxscript.optimizer.optimize_ir(program.model)
    graph = program.model.graph
    for value in [v for v in graph.inputs if v.name in taken]:
        graph.inputs.remove(value)
    return program.model_proto


# --- bind the weights --------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceTensor:
    """One initializer's bytes, read from the source when written (`TensorData` of onnx_io)."""

    source: WeightSource
    name: str
    transposed: bool

    @property
    def nbytes(self) -> int:
        shape, dtype = self.source.info(self.name)
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def chunks(self) -> Iterator[bytes]:
        values = self.source.tensor(self.name)
        if self.transposed:
            values = values.T
        if values.ndim == 0:
            yield values.tobytes()
            return
        row_bytes = max(1, values[0].nbytes)
        step = max(1, CHUNK_BYTES // row_bytes)
        for begin in range(0, values.shape[0], step):
            yield np.ascontiguousarray(values[begin : begin + step]).tobytes()


@dataclass
class StreamedExport:
    """What `export_decoder_streaming` wrote: the files, and each initializer's source tensor."""

    files: list[Path]
    weights: dict[str, tuple[str, bool]]  # ONNX initializer -> (source name, stored transposed)
    weight_bytes: int
    export_seconds: float

    def to_dict(self) -> dict:
        return {
            "files": [str(f) for f in self.files],
            "initializers": len(self.weights),
            "weight_bytes": self.weight_bytes,
            "export_seconds": round(self.export_seconds, 2),
        }


def _bind_weights(
    model: onnx.ModelProto, taken: Mapping[str, str], source: WeightSource
) -> tuple[dict[str, SourceTensor], dict[str, tuple[str, bool]]]:
    """Declare each detached weight as an initializer in the source's dtype (transposed where it is
    read only through Transpose(perm 1,0), the Transpose dropped; a Cast to float where it is not
    float32); returns the data to stream and the initializer -> (source name, transposed) map."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    renamed: dict[str, str] = {}  # value name -> the name that now carries it
    dropped: set[int] = set()
    casts: dict[str, onnx.NodeProto] = {}  # the value each Cast makes -> the Cast
    initializers, data, bound = [], {}, {}
    for value_name, source_name in taken.items():
        shape, dtype = source.info(source_name)
        users = readers.get(value_name, [])
        transposed = len(shape) == 2 and bool(users) and all(_is_transpose_2d(n) for n in users)
        onnx_name = source_name + (TRANSPOSED if transposed else "")
        carried = onnx_name
        if dtype != np.float32:
            carried = f"{onnx_name}/to_float"
            casts[carried] = helper.make_node(
                "Cast", [onnx_name], [carried], to=TensorProto.FLOAT, name=f"{onnx_name}/Cast"
            )
        if transposed:
            for node in users:
                dropped.add(id(node))
                renamed[node.output[0]] = carried
        else:
            renamed[value_name] = carried
        tensor = TensorProto(name=onnx_name, data_type=helper.np_dtype_to_tensor_dtype(dtype))
        tensor.dims.extend(shape[::-1] if transposed else shape)
        initializers.append(tensor)
        data[onnx_name] = SourceTensor(source, source_name, transposed)
        bound[onnx_name] = (source_name, transposed)
    nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
            if node.input[i] in casts:  # each Cast just before its first reader, so that a
                nodes.append(casts.pop(node.input[i]))  # runtime frees each float copy after use
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    outputs = {o.name for o in graph.output}
    if outputs & set(renamed):
        raise ExportError(f"llm_decoder: a weight is a graph output: {sorted(outputs & set(renamed))}")
    return data, bound


def _is_transpose_2d(node: onnx.NodeProto) -> bool:
    if node.op_type != "Transpose":
        return False
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return perm == [1, 0]


def export_decoder_streaming(
    config: ModelConfig | LlmConfig,
    weights: WeightSource,
    out_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    external: bool | None = None,
) -> StreamedExport:
    """Write the llm_decoder graph of `config` to `out_path` with the weights of `weights`, one
    tensor in memory at a time. `external`: weights into the side file `<name>.data`; None: when
    they reach INLINE_LIMIT (an inline graph is built whole in memory before it is written).
    Raises ExportError when an initializer has no source tensor of its shape."""
    start = time.perf_counter()
    llm = config.llm if isinstance(config, ModelConfig) else config
    spec = llm_decoder_spec(config)
    program = _trace_on_meta(spec, llm, opset)
    taken = _detach_weights(program, weights, llm)
    model = _optimize(program, taken)
    del program
    _name_dims(model, spec)
    data, bound = _bind_weights(model, taken, weights)
    unused = set(weights.names()) - {s for s, _ in bound.values()} - {EMBEDDINGS}
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}  # old checkpoints store it
    if unused:
        raise ExportError(f"llm_decoder: the graph reads none of {sorted(unused)[:5]} (an exporter change?)")
    weight_bytes = sum(d.nbytes for d in data.values())
    if external is None:
        external = weight_bytes >= INLINE_LIMIT
    files = save_onnx(model, out_path, data, external=external)
    return StreamedExport(files, bound, weight_bytes, time.perf_counter() - start)


def write_embeddings(weights: WeightSource, path: str | Path) -> Path:
    """The token-embedding table as the float32 .npy the runtime reads, filled a block of rows at
    a time (no second copy of the table)."""
    table = weights.tensor(EMBEDDINGS)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=table.shape)
    step = max(1, CHUNK_BYTES // max(1, table[0].nbytes * 2))
    for begin in range(0, table.shape[0], step):
        out[begin : begin + step] = table[begin : begin + step]
    out.flush()
    del out
    return Path(path)


# --- validation: a PyTorch forward with one layer in memory ---------------------------------------


class StreamedReference:
    """The llm_decoder's forward in float32 PyTorch, one LlamaDecoderLayer in memory at a time:
    each layer is built from `weights`, run on every case, and dropped, so the weights are read
    once for all cases (peak: one layer in float32, the LM head, the activations)."""

    def __init__(self, config: ModelConfig | LlmConfig, weights: WeightSource):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        from vsal.export.models.llm import llama_hf_config

        self.llm = config.llm if isinstance(config, ModelConfig) else config
        self.hf = llama_hf_config(self.llm)
        self.weights = weights
        self.rotary = LlamaRotaryEmbedding(self.hf)

    def _float(self, name: str) -> torch.Tensor:
        name = _source_name(self.weights, name, self.llm)
        return torch.from_numpy(np.asarray(self.weights.tensor(name), dtype=np.float32))

    def _layer(self, index: int) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.hf, layer_idx=0)  # each call gets a one-layer cache
        prefix = f"model.layers.{index}."
        layer.load_state_dict({k: self._float(prefix + k) for k in layer.state_dict()}, assign=True)
        return layer.eval()

    @torch.no_grad()
    def run(self, cases: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Per case (the graph's inputs by name): [logits, present.0.key, present.0.value, ...]."""
        from transformers import DynamicCache
        from vsal.export.llm_graph import attention_bias

        layout = self.llm.kv_layout()
        states = []
        for feeds in cases:
            hidden = torch.from_numpy(np.asarray(feeds["inputs_embeds"], dtype=np.float32))
            positions = torch.from_numpy(feeds["position_ids"])
            bias = attention_bias(torch.from_numpy(feeds["attention_mask"]), hidden.shape[1], hidden.dtype)
            states.append(
                {
                    "hidden": hidden,
                    "bias": bias,
                    "positions": positions,
                    "presents": [],
                    "rotary": self.rotary(hidden, positions),
                }
            )
        pasts = layout.past_names()
        for i in range(self.llm.num_hidden_layers):
            layer = self._layer(i)
            for feeds, state in zip(cases, states, strict=True):
                past = [torch.from_numpy(feeds[name]) for name in pasts[2 * i : 2 * i + 2]]
                cache = DynamicCache(ddp_cache_data=[tuple(past)])
                state["hidden"] = layer(
                    state["hidden"],
                    attention_mask=state["bias"],
                    position_ids=state["positions"],
                    cache=cache,
                    use_cache=True,
                    position_embeddings=state["rotary"],
                )
                state["presents"] += [cache.layers[0].keys.numpy(), cache.layers[0].values.numpy()]
            del layer
        norm, head = self._float("model.norm.weight"), self._float(LM_HEAD)
        outputs = []
        for state in states:
            hidden = state["hidden"]
            variance = hidden.pow(2).mean(-1, keepdim=True)  # LlamaRMSNorm, in float32
            hidden = hidden * torch.rsqrt(variance + self.llm.rms_norm_eps) * norm
            outputs.append([(hidden @ head.T).numpy(), *state["presents"]])
        return outputs


def validate_streaming(
    config: ModelConfig | LlmConfig,
    weights: WeightSource,
    path: str | Path,
    seed: int = 1,
    max_section_bytes: int = DEFAULT_SECTION_BYTES,
) -> GraphValidation:
    """The exported graph (ONNX Runtime CPU) against `StreamedReference` at the spec's validation
    sizes (prefill, decode, chunked); ValidationError lists every mismatch. `to_dict()` is
    validation.json's entry. ONNX Runtime runs the graph a section of layers at a time
    (vsal.transforms.sections: one layer's weights in memory, not the whole graph's)."""
    spec = llm_decoder_spec(config)
    graph = SectionedGraph(path, max_section_bytes=max_section_bytes)
    if graph.input_names != [t.name for t in spec.inputs]:
        raise ExportError(f"{spec.name}: graph inputs {graph.input_names} differ from the spec's")
    rng = np.random.default_rng(seed)
    sizes = spec.validation_sizes()
    cases = [spec.make_inputs(s, rng) for s in sizes]
    names = [t.name for t in spec.outputs]
    start = time.perf_counter()
    try:
        got = graph.run(names, [{t.name: feeds[t.name] for t in spec.inputs} for feeds in cases])
    except CaseError as e:  # ONNX Runtime failed on a case: a mismatch, as validate_graph says it
        detail = f"ONNX Runtime failed: {e.detail.splitlines()[0][:300]}"
        raise ValidationError([Mismatch("runtime", spec.name, "*", dict(sizes[e.case]), detail)]) from e
    seconds_onnx = [(time.perf_counter() - start) / len(cases)] * len(cases)
    del graph
    start = time.perf_counter()
    refs = StreamedReference(config, weights).run(cases)
    seconds_torch = (time.perf_counter() - start) / len(cases)
    result = GraphValidation(spec.name, spec.atol, spec.rtol)
    mismatches: list[Mismatch] = []
    for case_sizes, onnx_out, torch_out, seconds in zip(sizes, got, refs, seconds_onnx, strict=True):
        case = CaseResult(dict(case_sizes), {}, {}, seconds, seconds_torch)
        for tensor, a, b in zip(spec.outputs, onnx_out, torch_out, strict=True):
            problem = _compare(spec, tensor.resolve(case_sizes), a, b, case, tensor.name)
            if problem:
                mismatches.append(Mismatch(problem[0], spec.name, tensor.name, dict(case_sizes), problem[1]))
        result.cases.append(case)
    if mismatches:
        raise ValidationError(mismatches)
    return result


def _compare(spec: GraphSpec, shape, onnx_out, torch_out, case: CaseResult, name: str):
    """(kind, detail) of a mismatch as validate_graph judges it, or None; records the errors."""
    if onnx_out.shape != shape or torch_out.shape != shape:
        return "shape", f"expected {shape}, ONNX gave {onnx_out.shape}, PyTorch {torch_out.shape}"
    if not np.isfinite(onnx_out).all():
        return "nonfinite", "ONNX output has NaN/inf"
    err = float(np.abs(onnx_out.astype(np.float64) - torch_out).max()) if onnx_out.size else 0.0
    scale = float(np.abs(torch_out).max()) if torch_out.size else 0.0
    case.max_abs_error[name], case.max_abs_reference[name] = err, scale
    limit = spec.atol + spec.rtol * scale
    if err > limit:
        return (
            "tolerance",
            f"max abs error {err:.3g} > {limit:.3g} (atol {spec.atol:g} + rtol {spec.rtol:g} x {scale:.3g})",
        )
    return None
