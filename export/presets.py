"""Named model sizes. Every preset keeps the released structure (32 tokens per frame, 25 audio
frames per 0.5 s slot, 60 audio slots, windows of 10 and 1 slots, 224 px frames, 3000-frame
Whisper input, 128-bin fbank) and shrinks only widths and depths.

  tiny   tests: the whole pipeline in seconds on a CPU
  small  CPU benchmarks: realistic widths and op mix (LLM shaped like SmolLM2-135M)
  13b    the released dimensions (EVA-ViT-g, InstructBLIP Q-Former, Whisper large-v2, BEATs, Vicuna-13B)
"""

from __future__ import annotations

from dataclasses import replace

from vsal.export.config import (
    BeatsConfig,
    LlmConfig,
    ModelConfig,
    QFormerConfig,
    VisionConfig,
    WhisperEncoderConfig,
)
from vsal.runtime.errors import ConfigError


def _shrunk(
    name: str,
    width: int,
    heads: int,
    ffn: int,
    layers: int,
    vision: VisionConfig,
    beats: BeatsConfig,
    llm: LlmConfig,
) -> ModelConfig:
    """The released structure at `width` (frame Q-Former = video token width; the av width is 3x),
    every Q-Former, Whisper and BEATs with `heads`, `ffn` and `layers` (the MRC Q-Former keeps 2)."""

    def qformer(**kwargs) -> QFormerConfig:
        return QFormerConfig(hidden_size=width, num_attention_heads=heads, intermediate_size=ffn, **kwargs)

    return ModelConfig(
        name=name,
        vision=vision,
        frame_qformer=qformer(num_hidden_layers=layers, encoder_width=vision.embed_dim),
        whisper=WhisperEncoderConfig(
            d_model=width, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn
        ),
        beats=replace(
            beats,
            encoder_layers=layers,
            encoder_embed_dim=width,
            encoder_ffn_embed_dim=ffn,
            encoder_attention_heads=heads,
        ),
        mrc_qformer=qformer(
            num_hidden_layers=2, num_query_tokens=30, cross_attention_freq=1, encoder_width=3 * width
        ),
        llm=llm,
    )


def _tiny() -> ModelConfig:
    return _shrunk(
        "tiny",
        width=32,
        heads=4,
        ffn=64,
        layers=2,
        vision=VisionConfig(embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0),
        beats=BeatsConfig(embed_dim=24, conv_pos=16, conv_pos_groups=4),
        llm=LlmConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
    )


def _small() -> ModelConfig:
    return _shrunk(
        "small",
        width=384,
        heads=6,
        ffn=1536,
        layers=4,
        vision=VisionConfig(embed_dim=384, depth=6, num_heads=6, mlp_ratio=4.0),
        beats=BeatsConfig(embed_dim=256, conv_pos=64, conv_pos_groups=8),
        llm=LlmConfig(  # shaped like SmolLM2-135M
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
