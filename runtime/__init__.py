"""Torch-free runtime: media decoding, preprocessing, backends, alignment, generation.

`from vsal.runtime import Pipeline` (or `Client`) loads it lazily, so importing this package stays light.
"""

__all__ = ["Client", "Pipeline"]


def __getattr__(name: str):
    if name == "Pipeline":
        from vsal.runtime.pipeline import Pipeline

        return Pipeline
    if name == "Client":
        from vsal.runtime.serving.client import Client

        return Client
    raise AttributeError(f"module 'vsal.runtime' has no attribute {name!r}")
