"""Every graph vsal exports and runs, declared once (torch-free): its role.

A role says which part of the model the graph is exported from, the axis the runtime feeds it in
chunks along, whether int8 calibrates it on media, which quantizer a precision uses for it where
that is not the precision's own (the decoder is int8 weight-only), and which profile axes the
runtime reads. The export side adds each graph's shapes (vsal.export.specs) and builder
(vsal.export.models.video_salmonn) under the same names; nothing else spells the list.

The KV cache's layout (names, layers, heads, head dim, dtype) is written into the manifest, as
onnxruntime-genai's genai_config does, and read back by the runtime (`KVLayout`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class GraphRole:
    name: str
    part: str  # the VideoSalmonn part it is exported from
    batch_axis: str  # the axis the runtime feeds in chunks along (the profile's opt size)
    calibrated: bool  # static int8 from inputs recorded on clips (vsal.calib.collect)
    recipes: Mapping[str, str] = field(default_factory=dict)  # precision -> quantizer, where not its own
    runtime_axes: tuple[str, ...] = ()  # profile axes the runtime reads (checked at load)

    def quantizer_for(self, precision) -> str | None:
        """The quantizer that makes this graph's `precision` variant (a `Precision` row)."""
        return self.recipes.get(precision.name, precision.quantizer)


GRAPHS: Mapping[str, GraphRole] = MappingProxyType(
    {
        role.name: role
        for role in (
            GraphRole("vision_encoder", "vision_encoder", "N", True, runtime_axes=("N",)),
            GraphRole("frame_qformer", "frame_qformer", "N", True, runtime_axes=("N",)),
            GraphRole("whisper_encoder", "whisper_encoder", "B", True),
            GraphRole("beats_encoder", "beats_encoder", "B", True),
            GraphRole("mrc_qformer", "mrc_qformer", "B", True),
            GraphRole(
                "llm_decoder",
                "llm",
                "B",
                False,  # no clip records the decoder's inputs per token: weight-only
                recipes={"int8": "int8-weight-only"},
                runtime_axes=("B", "T", "P"),
            ),
        )
    }
)
REQUIRED_GRAPHS = tuple(GRAPHS)  # a package runs only with all of them
CALIBRATED_GRAPHS = tuple(name for name, role in GRAPHS.items() if role.calibrated)
DECODER = "llm_decoder"


@dataclass(frozen=True)
class KVLayout:
    """The llm_decoder graph's KV cache: past inputs and present outputs, key and value per layer,
    each [B, kv_heads, P, head_dim] of `dtype`."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    past: str = "past_key_values.{layer}.{kind}"
    present: str = "present.{layer}.{kind}"
    kinds: tuple[str, ...] = ("key", "value")

    @classmethod
    def of_llm(cls, llm: Mapping[str, Any], dtype: str = "float32") -> KVLayout:
        """From a config's llm section (a package written before the manifest carried the layout)."""
        return cls(
            llm["num_hidden_layers"],
            llm["num_key_value_heads"],
            llm["hidden_size"] // llm["num_attention_heads"],
            dtype,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVLayout:
        data = dict(data)
        data["kinds"] = tuple(data.get("kinds", ("key", "value")))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "past": self.past,
            "present": self.present,
            "kinds": list(self.kinds),
        }

    def past_names(self) -> list[str]:
        """The past inputs in graph order (key, value per layer)."""
        return [self.past.format(layer=i, kind=k) for i in range(self.layers) for k in self.kinds]

    def present_names(self) -> list[str]:
        """The present outputs in graph order, each the next step's past at the same index."""
        return [self.present.format(layer=i, kind=k) for i in range(self.layers) for k in self.kinds]

    def shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, self.kv_heads, length, self.head_dim)
