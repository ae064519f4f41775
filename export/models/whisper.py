"""Speech encoder: transformers' WhisperEncoder + the release's `speech_pre_qformer_proj`.

The release loads the encoder of openai/whisper-large-v2 through its own copy of transformers'
Whisper, whose only change is accepting inputs shorter than 30 s; vsal always feeds the padded
3000-frame window the release feeds, where both compute the same thing.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from vsal.export.config import ModelConfig


def whisper_hf_config(config: ModelConfig) -> WhisperConfig:
    w = config.whisper
    hf = WhisperConfig(
        num_mel_bins=w.num_mel_bins,
        d_model=w.d_model,
        encoder_layers=w.encoder_layers,
        encoder_attention_heads=w.encoder_attention_heads,
        encoder_ffn_dim=w.encoder_ffn_dim,
        max_source_positions=w.max_source_positions,
        activation_function=w.activation_function,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
    )
    hf._attn_implementation = "eager"
    return hf


class WhisperSpeechEncoder(nn.Module):
    """input_features [B, n_mels, 3000] -> speech_tokens [B, 1500, frame_qformer.hidden_size]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.encoder = WhisperEncoder(whisper_hf_config(config))
        self.speech_pre_qformer_proj = nn.Linear(config.whisper.d_model, config.frame_qformer.hidden_size)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_features).last_hidden_state
        return self.speech_pre_qformer_proj(hidden)
