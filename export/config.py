"""Model configuration: one dataclass per part, each in its upstream vocabulary.

`ModelConfig` is what the manifest stores (`to_dict`/`from_dict` round-trip) and what
`build_model` builds from. Field names follow the project each part comes from, so a value can
be checked against the upstream config by eye:
  vision          LAVIS EVA-ViT keyword arguments
  frame_qformer   BertConfig names + num_query_tokens, cross_attention_freq, encoder_width
  whisper         WhisperConfig names (encoder side)
  beats           BEATsConfig names, as stored in the BEATs checkpoint's "cfg"
  mrc_qformer     BertConfig names + num_query_tokens (high resolution), encoder_width
  llm             LlamaConfig names
  alignment       the release's temporal constants
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from vsal.runtime.errors import ConfigError
from vsal.runtime.graphs import KVLayout


@dataclass(frozen=True)
class VisionConfig:
    """EVA-ViT-g as LAVIS builds it (`create_eva_vit_g`), plus InstructBLIP's `ln_vision`."""

    img_size: int = 224
    patch_size: int = 14
    embed_dim: int = 1408
    depth: int = 39  # LAVIS drops EVA-CLIP's 40th block
    num_heads: int = 16
    mlp_ratio: float = 4.3637  # int(1408 * 4.3637) = 6144
    qkv_bias: bool = True  # q and v biases; k has none
    norm_eps: float = 1e-6  # every LayerNorm of the ViT; ln_vision uses torch's 1e-5

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # + CLS


@dataclass(frozen=True)
class QFormerConfig:
    """A BLIP-2 style Q-Former: BertConfig names plus the query/cross-attention settings."""

    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_query_tokens: int = 32
    cross_attention_freq: int = 2  # cross-attention in layers 0, freq, 2*freq, ...
    encoder_width: int = 1408


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """The encoder half of a WhisperConfig."""

    num_mel_bins: int = 80
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500  # 30 s at 50 Hz after the stride-2 conv
    activation_function: str = "gelu"

    @property
    def n_frames(self) -> int:
        return 2 * self.max_source_positions  # log-mel frames, 10 ms each


@dataclass(frozen=True)
class BeatsConfig:
    """BEATsConfig, field names as in the checkpoint's "cfg" (iter3+ AS2M fine-tuned)."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_class: int = 527
    n_mels: int = 128  # fbank bins; fixed by the released model

    @classmethod
    def from_checkpoint_cfg(cls, cfg: dict[str, Any]) -> BeatsConfig:
        """Keep the fields this model uses from a BEATs checkpoint's "cfg" (training-only ones drop)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


@dataclass(frozen=True)
class LlmConfig:
    """LlamaConfig names (Vicuna-13B v1.5 by default)."""

    vocab_size: int = 32000
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    num_key_value_heads: int = 40
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def kv_layout(self) -> KVLayout:
        """The llm_decoder graph's KV cache (the manifest's kv_cache)."""
        return KVLayout.of_llm(dataclasses.asdict(self))


@dataclass(frozen=True)
class LoraConfig:
    """The release's LoRA on the LLM; merged into the base weights before export."""

    r: int = 32
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class AlignmentConfig:
    """The release's temporal constants (`sequence_align_v2`, MRC windows)."""

    fps: int = 2  # frames sampled per 1-second clip
    max_clips: int = 60  # 60 s of video at most
    tokens_per_frame: int = 32  # frame Q-Former queries
    audio_frames_per_slot: int = 25  # 0.5 s at 50 Hz = one video frame
    audio_slots: int = 60  # 1500 audio frames / 25: audio always yields 60 slots
    high_window: int = 10  # slots per high-resolution window (groupsize)
    low_window: int = 1  # slots per low-resolution window (low_groupsize)
    sample_rate: int = 16000  # Hz
    min_audio_seconds: float = 3.0  # shorter audio is zero-padded
    max_audio_seconds: float = 30.0  # Whisper window; BEATs input is truncated to it

    @property
    def max_frames(self) -> int:
        return self.fps * self.max_clips

    @property
    def audio_frames(self) -> int:
        return self.audio_slots * self.audio_frames_per_slot

    def low_query_tokens(self, high_query_tokens: int) -> int:
        """Queries per low-resolution window: num_video_query * low_groupsize // groupsize."""
        return high_query_tokens * self.low_window // self.high_window


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build video-SALMONN at some size; stored in the manifest."""

    name: str = "13b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    frame_qformer: QFormerConfig = field(default_factory=QFormerConfig)
    whisper: WhisperEncoderConfig = field(default_factory=WhisperEncoderConfig)
    beats: BeatsConfig = field(default_factory=BeatsConfig)
    mrc_qformer: QFormerConfig = field(
        default_factory=lambda: QFormerConfig(
            num_hidden_layers=2,
            num_query_tokens=30,
            cross_attention_freq=1,
            encoder_width=2304,
        )
    )
    llm: LlmConfig = field(default_factory=LlmConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def av_width(self) -> int:
        """Width of one aligned slot token: video (frame Q-Former) + Whisper proj + BEATs proj."""
        return 3 * self.frame_qformer.hidden_size

    @property
    def low_query_tokens(self) -> int:
        return self.alignment.low_query_tokens(self.mrc_qformer.num_query_tokens)

    @property
    def llm_tokens_per_slot(self) -> int:
        return self.mrc_qformer.num_query_tokens // self.alignment.high_window

    def validate(self) -> None:
        """Raise ValueError when parts do not fit together."""
        width = self.frame_qformer.hidden_size
        problems = []
        if self.mrc_qformer.encoder_width != self.av_width:
            problems.append(
                f"mrc_qformer.encoder_width is {self.mrc_qformer.encoder_width}, expected "
                f"3 x frame_qformer.hidden_size = {self.av_width}"
            )
        if self.frame_qformer.encoder_width != self.vision.embed_dim:
            problems.append(
                f"frame_qformer.encoder_width is {self.frame_qformer.encoder_width}, expected "
                f"vision.embed_dim = {self.vision.embed_dim}"
            )
        if self.mrc_qformer.hidden_size != width:
            problems.append(
                f"mrc_qformer.hidden_size is {self.mrc_qformer.hidden_size}, expected {width} "
                "(video tokens and Q-Former queries share one width)"
            )
        if self.frame_qformer.num_query_tokens != self.alignment.tokens_per_frame:
            problems.append(
                f"frame_qformer.num_query_tokens is {self.frame_qformer.num_query_tokens}, expected "
                f"alignment.tokens_per_frame = {self.alignment.tokens_per_frame}"
            )
        if self.alignment.audio_frames_per_slot > self.alignment.tokens_per_frame:
            problems.append("alignment.audio_frames_per_slot must not exceed tokens_per_frame")
        if self.whisper.max_source_positions != self.alignment.audio_frames:
            problems.append(
                f"whisper.max_source_positions is {self.whisper.max_source_positions}, expected "
                f"audio_slots x audio_frames_per_slot = {self.alignment.audio_frames}"
            )
        q = self.mrc_qformer.num_query_tokens
        if (q * self.alignment.low_window) % self.alignment.high_window or q % self.alignment.high_window:
            problems.append(
                f"mrc_qformer.num_query_tokens ({q}) must be a multiple of the high window "
                f"({self.alignment.high_window}) so both resolutions give whole tokens per slot"
            )
        if self.llm.hidden_size % self.llm.num_attention_heads:
            problems.append("llm.hidden_size must be a multiple of llm.num_attention_heads")
        if self.llm.num_attention_heads % self.llm.num_key_value_heads:
            problems.append("llm.num_attention_heads must be a multiple of llm.num_key_value_heads")
        if problems:
            raise ConfigError(f"invalid ModelConfig {self.name!r}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error so a typo never passes silently."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            sub = _PART_TYPES.get(f.name)
            if sub is not None:
                known = {g.name for g in fields(sub)}
                unknown = set(value) - known
                if unknown:
                    raise ConfigError(f"unknown keys in {f.name}: {sorted(unknown)}")
                value = dict(value)
                for g in fields(sub):
                    if g.name in value and isinstance(value[g.name], list):
                        value[g.name] = tuple(value[g.name])
                value = sub(**value)
            kwargs[f.name] = value
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ModelConfig keys: {sorted(unknown)}")
        return cls(**kwargs)


_PART_TYPES = {
    "vision": VisionConfig,
    "frame_qformer": QFormerConfig,
    "whisper": WhisperEncoderConfig,
    "beats": BeatsConfig,
    "mrc_qformer": QFormerConfig,
    "llm": LlmConfig,
    "lora": LoraConfig,
    "alignment": AlignmentConfig,
}
