"""Weights: the released checkpoint files, consolidated safetensors, LoRA merging, real registry weights."""
