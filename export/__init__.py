"""Torch side of vsal: model parts, presets, checkpoint loading, ONNX export."""

from vsal.export import presets
from vsal.export.config import ModelConfig

__all__ = ["ModelConfig", "build_model", "presets"]


def build_model(config: ModelConfig):
    """Build a randomly initialised `VideoSalmonn` for `config` (load weights afterwards)."""
    from vsal.export.models.video_salmonn import VideoSalmonn

    return VideoSalmonn(config)
