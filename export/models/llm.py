"""LLM decoder: transformers' LlamaForCausalLM (Vicuna-13B v1.5 in the release).

The release wraps it with peft LoRA (r 32, alpha 32 on q/k/v/o); vsal merges the adapters into
the base weights when loading (vsal.export.weights.lora), so the decoder is a plain LLaMA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from vsal.export.config import LlmConfig


def llama_hf_config(config: LlmConfig) -> LlamaConfig:
    hf = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        hidden_act=config.hidden_act,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        attention_dropout=0.0,
    )
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
