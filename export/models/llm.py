"""LLM decoder: transformers' LlamaForCausalLM (Vicuna-13B v1.5 in the release).

The release wraps it with peft LoRA (r 32, alpha 32 on q/k/v/o); vsal merges the adapters into
the base weights when loading (vsal.export.weights.lora), so the decoder is a plain LLaMA.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from vsal.export.config import LlmConfig


def llama_hf_config(config: LlmConfig) -> LlamaConfig:
    """LlmConfig's fields carry LlamaConfig's names: passed as they are."""
    hf = LlamaConfig(**dataclasses.asdict(config), attention_dropout=0.0)
    hf._attn_implementation = "eager"
    return hf


class LlmDecoder(nn.Module):
    """inputs_embeds [B, T, H], attention_mask [B, P+T], position_ids [B, T], cache
    -> logits [B, T, V], cache (past length P)."""

    def __init__(self, config: LlmConfig):
        super().__init__()
        self.config = config
        self.model = LlamaForCausalLM(llama_hf_config(config))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> embeddings [B, T, H]: the table the runtime ships to embed prompt text."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
    ):
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        return out.logits, out.cache
