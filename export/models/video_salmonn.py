"""video-SALMONN as one torch module with a submodule per exported graph."""

from __future__ import annotations

from torch import nn
from vsal.export.config import ModelConfig
from vsal.export.models.beats import BeatsEncoder
from vsal.export.models.frame_qformer import FrameQFormer
from vsal.export.models.llm import LlmDecoder
from vsal.export.models.mrc_qformer import MrcQFormer
from vsal.export.models.vision import VisionEncoder
from vsal.export.models.whisper import WhisperSpeechEncoder

GRAPH_NAMES = ("vision_encoder", "frame_qformer", "whisper_encoder", "beats_encoder", "mrc_qformer", "llm")


class VideoSalmonn(nn.Module):
    """The released inference graph, part by part (names match the design page's graphs).

    vision_encoder(pixel_values) -> image_embeds
    frame_qformer(image_embeds, instruction_ids, instruction_mask) -> frame_tokens
    whisper_encoder(input_features) -> speech_tokens
    beats_encoder(fbank) -> audio_tokens
    mrc_qformer(av_features, slot_mask) -> llm_tokens
    llm(inputs_embeds, attention_mask, position_ids, cache) -> logits, cache
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_encoder = VisionEncoder(config.vision)
        self.frame_qformer = FrameQFormer(config.frame_qformer)
        self.whisper_encoder = WhisperSpeechEncoder(config)
        self.beats_encoder = BeatsEncoder(config)
        self.mrc_qformer = MrcQFormer(config)
        self.llm = LlmDecoder(config.llm)
        self.eval()

    def load_release_state_dict(self, state_dict):
        """Load a state dict in the release's OpenLLAMAPEFTModel key layout; LoRA is merged.

        Returns a `LoadReport` (missing, unexpected, ignored keys); a shape mismatch raises
        `CheckpointError` naming every offending key with both shapes.
        """
        from vsal.export.checkpoints import ReleaseLoader

        loader = ReleaseLoader(self)
        loader.load(state_dict, source="state dict")
        return loader.finish()

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per graph (shared tensors counted once per graph)."""
        return {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in GRAPH_NAMES}
