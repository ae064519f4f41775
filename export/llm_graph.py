"""The `llm_decoder` graph: the LLaMA decoder with flat, export-friendly inputs and outputs.

One graph serves prefill (past length P = 0, T prompt tokens), decode (T = 1, P > 0), chunked or
speculative steps (T > 1, P > 0) and any batch (beams):

  inputs   inputs_embeds [B, T, H] float32, attention_mask [B, P+T] int64 (1 = attend),
           position_ids [B, T] int64, then per layer i
           past_key_values.{i}.key, past_key_values.{i}.value [B, kvH, P, head_dim] float32
  outputs  logits [B, T, V], then per layer present.{i}.key, present.{i}.value [B, kvH, P+T, head_dim]

(the names and sizes of the past and present are the LLM's KVLayout, vsal.runtime.graphs; the spec
is vsal.export.specs.llm_decoder_spec).

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

import dataclasses

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM
from vsal.export.config import LlmConfig
from vsal.export.models.llm import LlmDecoder
from vsal.export.specs import GraphSpec, TensorSpec
from vsal.runtime.shapes import evaluate


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
    """The LlmConfig of a transformers LlamaConfig (e.g. SmolLM2's), for `llm_decoder_spec`: the
    fields of the same names, rope_theta from its rope_parameters."""
    values = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(LlmConfig) if f.name != "rope_theta"
    }
    values["tie_word_embeddings"] = bool(values["tie_word_embeddings"])
    return LlmConfig(**values, rope_theta=float(config.rope_parameters["rope_theta"]))


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
