"""The `llm_decoder` graph: the LLaMA decoder with flat, export-friendly inputs and outputs.

One graph serves prefill (past length P = 0, T prompt tokens), decode (T = 1, P > 0), chunked or
speculative steps (T > 1, P > 0) and any batch (beams):

  inputs   inputs_embeds [B, T, H] float32, attention_mask [B, P+T] int64 (1 = attend),
           position_ids [B, T] int64, then per layer i
           past_key_values.{i}.key, past_key_values.{i}.value [B, kvH, P, head_dim] float32
  outputs  logits [B, T, V], then per layer present.{i}.key, present.{i}.value [B, kvH, P+T, head_dim]

The causal + padding mask is built here from the 2D `attention_mask` as one additive 4D bias and
handed to transformers, which uses a 4D mask as given. That keeps the graph free of transformers'
mask-building code paths (which branch on tracing, on `cache.get_seq_length()` and on mask values)
and makes the semantics explicit: query t sits at key position P+t and sees key k when k <= P+t
and attention_mask[b, k] == 1. Left-padded batches work the same way (zeros at the start).

Exporting: every axis is dynamic. `llm_dynamic_shapes` gives torch.export's `dynamic_shapes` for
this module's signature (the past tensors arrive as `*past_key_values`), with a Dim of its own for
the mask length that torch.export itself ties to P+T. The spec traces at B=2, T=3, P=5 (no 0 or 1,
which torch.export may specialise) and declares P min 0: the graph only concatenates the past, and
it runs at P = 0, B = 1 and T = 1 in ONNX Runtime (tests/test_llm_graph.py). T must be >= 2 when
tracing: at T = 1 torch.export relates the mask length to P as P+1 and rejects the separate Dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM
from vsal.export.config import LlmConfig, ModelConfig
from vsal.export.models.llm import LlmDecoder
from vsal.export.specs import (
    MAX_BEAMS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_TEXT,
    MAX_SLOTS,
    Axis,
    GraphSpec,
    TensorSpec,
    evaluate,
)

MAX_TEMPLATE_TOKENS = 16  # "USER: <Img>" + "</Img> " + "\nASSISTANT:" around the prompt (~12 tokens)
PROMPT_ROUNDING = 256  # the longest prompt is rounded up to a multiple of this, for headroom


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def attention_bias(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """attention_mask [B, P+T] (1 = attend) -> additive bias [B, 1, T, P+T]: 0 where attended, else
    the dtype's minimum (as transformers' eager mask). Query t is key position P+t: causal within
    the new tokens, full view of the (unpadded) past."""
    kv_length = attention_mask.shape[1]
    key_pos = torch.arange(kv_length, device=attention_mask.device)
    query_pos = key_pos[kv_length - query_length :]  # P .. P+T-1, without computing P itself
    causal = key_pos[None, :] <= query_pos[:, None]  # [T, P+T]
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class LlmDecoderGraph(nn.Module):
    """A LLaMA causal LM as the `llm_decoder` graph (see the module docstring for the I/O).

    forward(inputs_embeds [B,T,H], attention_mask [B,P+T], position_ids [B,T], *past [B,kvH,P,hd])
      -> (logits [B,T,V], *present [B,kvH,P+T,hd]), past and present ordered key, value per layer.
    Tied input/output embeddings need nothing special: the LM head shares the embedding weight.
    """

    def __init__(self, decoder: LlmDecoder | LlamaForCausalLM):
        super().__init__()
        lm = decoder.model if isinstance(decoder, LlmDecoder) else decoder
        # Explicit MatMul/Softmax attention: the same graph for every backend, fused by TensorRT;
        # eager is what LlmDecoder builds anyway.
        lm.set_attn_implementation("eager")
        self.lm = lm.eval()
        config = lm.config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @classmethod
    def from_causal_lm(cls, model: LlamaForCausalLM) -> LlmDecoderGraph:
        """Wrap any transformers LlamaForCausalLM (e.g. SmolLM2); switches it to eager attention."""
        return cls(model)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_key_values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        if len(past_key_values) != 2 * self.num_layers:
            raise ValueError(
                f"expected {2 * self.num_layers} past tensors (key, value per layer), "
                f"got {len(past_key_values)}"
            )
        layers = zip(past_key_values[0::2], past_key_values[1::2], strict=True)
        cache = DynamicCache(ddp_cache_data=list(layers))
        bias = attention_bias(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=bias,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def llm_config_from_hf(config) -> LlmConfig:
    """The LlmConfig of a transformers LlamaConfig (e.g. SmolLM2's), for `llm_decoder_spec`."""
    return LlmConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=float(config.rope_parameters["rope_theta"]),
        hidden_act=config.hidden_act,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def max_prompt_tokens(config: ModelConfig | LlmConfig) -> int:
    """Longest LLM input: bos + template + av tokens (3 per slot) + prompt text, rounded up (889 -> 1024)."""
    per_slot = config.llm_tokens_per_slot if isinstance(config, ModelConfig) else 3
    longest = 1 + MAX_TEMPLATE_TOKENS + per_slot * MAX_SLOTS + MAX_PROMPT_TEXT
    return -(-longest // PROMPT_ROUNDING) * PROMPT_ROUNDING


def llm_decoder_spec(config: ModelConfig | LlmConfig) -> GraphSpec:
    """The `llm_decoder` GraphSpec. Axes: B beams, T new tokens, P past tokens.

    T max is the longest prompt (`max_prompt_tokens`); the context holds it plus MAX_NEW_TOKENS
    (bounded by max_position_embeddings), so P max is one less: the past of the last decode step.
    Validation: prefill (B=1, T=7, P=0), decode (B=3, T=1, P=9), chunked (B=5, T=4, P=6).
    """
    llm = config.llm if isinstance(config, ModelConfig) else config
    context = min(max_prompt_tokens(config) + MAX_NEW_TOKENS, llm.max_position_embeddings)
    t_max = min(max_prompt_tokens(config), context)
    axes = (
        Axis("B", 1, 1, MAX_BEAMS, export=2, validate=(1, 3, 5)),
        Axis("T", 1, min(256, t_max), t_max, export=3, validate=(7, 1, 4)),
        Axis("P", 0, min(512, context - 1), context - 1, export=5, validate=(0, 9, 6)),
    )
    kv_shape = ("B", llm.num_key_value_heads, "P", llm.head_dim)
    present_shape = ("B", llm.num_key_value_heads, "P+T", llm.head_dim)
    layers = llm.num_hidden_layers
    inputs = (
        TensorSpec("inputs_embeds", "float32", ("B", "T", llm.hidden_size)),
        TensorSpec("attention_mask", "int64", ("B", "P+T")),
        TensorSpec("position_ids", "int64", ("B", "T")),
        *(TensorSpec(name, "float32", kv_shape) for name in past_names(layers)),
    )
    outputs = (
        TensorSpec("logits", "float32", ("B", "T", llm.vocab_size)),
        *(TensorSpec(name, "float32", present_shape) for name in present_names(layers)),
    )

    def make_inputs(sizes: Mapping[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        b, t, p = sizes["B"], sizes["T"], sizes["P"]
        arrays = {
            "inputs_embeds": rng.standard_normal((b, t, llm.hidden_size)).astype("float32"),
            "attention_mask": np.ones((b, p + t), dtype="int64"),
            "position_ids": np.tile(np.arange(p, p + t, dtype="int64"), (b, 1)),
        }
        for name in past_names(layers):
            kv = rng.standard_normal((b, llm.num_key_value_heads, p, llm.head_dim))
            arrays[name] = kv.astype("float32")
        return arrays

    spec = GraphSpec("llm_decoder", inputs, outputs, axes, atol=1e-4, rtol=1e-4, make_inputs=make_inputs)
    spec.check()
    return spec


def llm_dynamic_shapes(spec: GraphSpec) -> dict[str, object]:
    """torch.export `dynamic_shapes` for `LlmDecoderGraph`, keyed by its forward's parameters.

    One Dim per axis (B, T, P), shared by every input. The past tensors arrive as
    `*past_key_values`, so their dims form one tuple under that name. The mask length "P+T" gets a
    Dim of its own over its whole range (torch.export cannot derive one Dim from two); torch.export
    ties it to P+T itself while tracing (the attention bias is added to the [.., P+T] scores).
    """
    from torch.export import Dim

    dims = {a.name: Dim(a.name, min=a.min, max=a.max) for a in spec.axes}
    mins = {a.name: a.min for a in spec.axes}
    maxes = {a.name: a.max for a in spec.axes}

    def shape_of(tensor: TensorSpec) -> dict[int, object]:
        shape = {}
        for i, dim in enumerate(tensor.shape):
            if isinstance(dim, int):
                continue
            if dim in dims:
                shape[i] = dims[dim]
            else:  # an expression over several axes
                name = "".join(c if c.isalnum() else "_" for c in f"{tensor.name}_{i}")
                shape[i] = Dim(name, min=max(1, evaluate(dim, mins)), max=evaluate(dim, maxes))
        return shape

    first, past = spec.inputs[:3], spec.inputs[3:]
    shapes: dict[str, object] = {t.name: shape_of(t) for t in first}
    shapes["past_key_values"] = tuple(shape_of(t) for t in past)
    return shapes


def export_kwargs(spec: GraphSpec, opset: int = 18) -> dict[str, object]:
    """Keyword arguments for `torch.onnx.export(LlmDecoderGraph, args in spec order, **kwargs)`."""
    return {
        "dynamo": True,
        "dynamic_shapes": llm_dynamic_shapes(spec),
        "input_names": [t.name for t in spec.inputs],
        "output_names": [t.name for t in spec.outputs],
        "opset_version": opset,
    }
