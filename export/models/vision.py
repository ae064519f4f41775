"""Visual encoder: EVA-ViT-g (LAVIS) followed by InstructBLIP's `ln_vision`.

transformers' `InstructBlipVisionModel` computes the same network as LAVIS's EVA-ViT-g with
`use_mean_pooling=False`, no layer scale and no relative position bias: pre-LN blocks, fused qkv
with q and v biases (k has none; the k third of the fused bias stays zero), exact GELU, and its
`post_layernorm` applied to every token plays the part of `ln_vision`
(tests/test_vision.py checks this against an independent reading of LAVIS's forward).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import InstructBlipVisionConfig, InstructBlipVisionModel
from vsal.export.config import VisionConfig

LN_VISION_EPS = 1e-5  # LAVIS builds ln_vision as nn.LayerNorm(1408): torch's default eps, not the ViT's 1e-6


class VisionEncoder(nn.Module):
    """pixel_values [N, 3, H, W] -> image_embeds [N, 1 + (H/14)(W/14), embed_dim] (ln_vision applied)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        hf_config = InstructBlipVisionConfig(
            hidden_size=config.embed_dim,
            intermediate_size=config.mlp_hidden_dim,
            num_hidden_layers=config.depth,
            num_attention_heads=config.num_heads,
            image_size=config.img_size,
            patch_size=config.patch_size,
            hidden_act="gelu",
            layer_norm_eps=config.norm_eps,
            qkv_bias=config.qkv_bias,
            attention_dropout=0.0,
            initializer_range=0.02,  # HF's default (1e-10) makes a random preset's ViT output constant
        )
        hf_config._attn_implementation = "eager"
        self.model = InstructBlipVisionModel(hf_config)
        # HF gives post_layernorm the ViT's eps; the release's ln_vision uses 1e-5.
        self.model.post_layernorm = nn.LayerNorm(config.embed_dim, eps=LN_VISION_EPS)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state
