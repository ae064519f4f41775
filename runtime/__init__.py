"""Torch-free runtime: media decoding, preprocessing, backends, alignment, generation.

`from vsal.runtime import Pipeline` loads the pipeline lazily, so importing this package stays light.
"""

__all__ = ["Pipeline"]


def __getattr__(name: str):
    if name == "Pipeline":
        from vsal.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'vsal.runtime' has no attribute {name!r}")
