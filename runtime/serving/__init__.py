"""Serving: `vsal serve` (a local Triton server), its model repository writer and the gRPC client."""
