"""video-SALMONN as one torch module with a submodule per exported graph."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from vsal.export.config import ModelConfig
from vsal.export.models.beats import BeatsEncoder
from vsal.export.models.frame_qformer import FrameQFormer
from vsal.export.models.llm import LlmDecoder
from vsal.export.models.mrc_qformer import MrcQFormer
from vsal.export.models.vision import VisionEncoder
from vsal.export.models.whisper import WhisperSpeechEncoder
from vsal.runtime.graphs import GRAPHS

# Part (submodule) name -> builder; each graph's role names its part. Each part can be built alone,
# so an export holds one part at a time.
PART_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "vision_encoder": lambda c: VisionEncoder(c.vision),
    "frame_qformer": lambda c: FrameQFormer(c.frame_qformer),
    "whisper_encoder": WhisperSpeechEncoder,
    "beats_encoder": BeatsEncoder,
    "mrc_qformer": MrcQFormer,
    "llm": lambda c: LlmDecoder(c.llm),
}
PARTS = tuple(role.part for role in GRAPHS.values())  # in graph order: part i's seed is seed + i
if set(PARTS) != set(PART_BUILDERS):
    raise AssertionError(f"parts {sorted(PART_BUILDERS)} are not the graphs' parts {sorted(PARTS)}")


def build_part(config: ModelConfig, name: str, seed: int | None = 0) -> nn.Module:
    """One part, in eval mode. With a seed its random weights are those `VideoSalmonn(config, seed)` gets."""
    if name not in PART_BUILDERS:
        raise ValueError(f"unknown part {name!r}; parts are {', '.join(PARTS)}")
    if seed is not None:
        torch.manual_seed(seed + PARTS.index(name))
    return PART_BUILDERS[name](config).eval()


class VideoSalmonn(nn.Module):
    """The released inference graph, part by part (names match the design page's graphs).

    vision_encoder(pixel_values) -> image_embeds
    frame_qformer(image_embeds, instruction_ids, instruction_mask) -> frame_tokens
    whisper_encoder(input_features) -> speech_tokens
    beats_encoder(fbank) -> audio_tokens
    mrc_qformer(av_features, slot_mask) -> llm_tokens
    llm(inputs_embeds, attention_mask, position_ids, cache) -> logits, cache
    """

    def __init__(self, config: ModelConfig, seed: int | None = 0):
        super().__init__()
        self.config = config
        for name in PARTS:
            self.add_module(name, build_part(config, name, seed))
        self.eval()

    def load_release_state_dict(self, state_dict):
        """Load a state dict in the release's OpenLLAMAPEFTModel key layout; LoRA is merged.

        Returns a `LoadReport` (missing, unexpected, ignored keys); a shape mismatch raises
        `CheckpointError` naming every offending key with both shapes.
        """
        from vsal.export.weights.checkpoints import ReleaseLoader

        loader = ReleaseLoader(self)
        loader.load(state_dict, source="state dict")
        return loader.finish()

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per graph (shared tensors counted once per graph)."""
        return {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in PARTS}
