"""Torch-free runtime: media decoding, preprocessing, backends, generation."""
