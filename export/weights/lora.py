"""LoRA as the release trains it (peft 0.5.0 layout), merged into the base weights for export."""

from __future__ import annotations

import torch


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update of one adapter: (B @ A) * alpha / r, shape [out, in], in fp32."""
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"LoRA factors do not fit: A {tuple(lora_a.shape)} (expected [r, in]), "
            f"B {tuple(lora_b.shape)} (expected [out, r])"
        )
    return (lora_b.float() @ lora_a.float()) * scale


def merge_lora(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """W + (B @ A) * scale, computed in fp32 and returned in W's dtype."""
    delta = lora_delta(lora_a, lora_b, scale)
    if delta.shape != weight.shape:
        raise ValueError(
            f"LoRA update has shape {tuple(delta.shape)} but the base weight is {tuple(weight.shape)}"
        )
    return (weight.float() + delta).to(weight.dtype)
