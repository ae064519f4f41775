"""Named model sizes. Every preset keeps the released structure (32 tokens per frame, 25 audio
frames per 0.5 s slot, 60 audio slots, windows of 10 and 1 slots, 224 px frames, 3000-frame
Whisper input, 128-bin fbank) and shrinks only widths and depths.

  tiny   tests: the whole pipeline in seconds on a CPU
  small  CPU benchmarks: realistic widths and op mix (LLM shaped like SmolLM2-135M)
  13b    the released dimensions (EVA-ViT-g, InstructBLIP Q-Former, Whisper large-v2, BEATs, Vicuna-13B)
"""

from __future__ import annotations

from vsal.export.config import (
    BeatsConfig,
    LlmConfig,
    ModelConfig,
    QFormerConfig,
    VisionConfig,
    WhisperEncoderConfig,
)
from vsal.runtime.errors import ConfigError


def _tiny() -> ModelConfig:
    width = 32  # frame Q-Former width = video token width; av width is 3x
    return ModelConfig(
        name="tiny",
        vision=VisionConfig(embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0),
        frame_qformer=QFormerConfig(
            hidden_size=width,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            encoder_width=48,
        ),
        whisper=WhisperEncoderConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64
        ),
        beats=BeatsConfig(
            embed_dim=24,
            encoder_layers=2,
            encoder_embed_dim=32,
            encoder_ffn_embed_dim=64,
            encoder_attention_heads=4,
            conv_pos=16,
            conv_pos_groups=4,
        ),
        mrc_qformer=QFormerConfig(
            hidden_size=width,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_query_tokens=30,
            cross_attention_freq=1,
            encoder_width=3 * width,
        ),
        llm=LlmConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
    )


def _small() -> ModelConfig:
    width = 384
    return ModelConfig(
        name="small",
        vision=VisionConfig(embed_dim=384, depth=6, num_heads=6, mlp_ratio=4.0),
        frame_qformer=QFormerConfig(
            hidden_size=width,
            num_hidden_layers=4,
            num_attention_heads=6,
            intermediate_size=1536,
            encoder_width=384,
        ),
        whisper=WhisperEncoderConfig(
            d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536
        ),
        beats=BeatsConfig(
            embed_dim=256,
            encoder_layers=4,
            encoder_embed_dim=384,
            encoder_ffn_embed_dim=1536,
            encoder_attention_heads=6,
            conv_pos=64,
            conv_pos_groups=8,
        ),
        mrc_qformer=QFormerConfig(
            hidden_size=width,
            num_hidden_layers=2,
            num_attention_heads=6,
            intermediate_size=1536,
            num_query_tokens=30,
            cross_attention_freq=1,
            encoder_width=3 * width,
        ),
        llm=LlmConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
        ),
    )


_PRESETS = {"tiny": _tiny, "small": _small, "13b": ModelConfig}


def names() -> list[str]:
    return list(_PRESETS)


def get(name: str) -> ModelConfig:
    """The ModelConfig of a preset; ValueError names the presets that exist."""
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}") from None
    return factory()
