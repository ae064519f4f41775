"""Torch side of vsal: model parts, presets, checkpoint loading, ONNX export."""

from vsal.export import presets
from vsal.export.config import ModelConfig

__all__ = ["ModelConfig", "build_model", "presets"]


def build_model(config: ModelConfig, seed: int | None = 0):
    """A `VideoSalmonn` for `config` with seeded random weights (None: torch's current RNG state)."""
    from vsal.export.models.video_salmonn import VideoSalmonn

    return VideoSalmonn(config, seed)
