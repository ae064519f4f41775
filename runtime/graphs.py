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

import re
import string
from collections.abc import Iterator, Mapping
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
    # sizes of its first input that the media's preprocessing sets: axis -> Preprocessing field
    media_dims: Mapping[int, str] = field(default_factory=dict)

    def quantizer_for(self, precision) -> str | None:
        """The quantizer that makes this graph's `precision` variant (a `Precision` row)."""
        return self.recipes.get(precision.name, precision.quantizer)


GRAPHS: Mapping[str, GraphRole] = MappingProxyType(
    {
        role.name: role
        for role in (
            GraphRole(
                "vision_encoder",
                "vision_encoder",
                "N",
                True,
                runtime_axes=("N",),
                media_dims={2: "image_size", 3: "image_size"},
            ),
            GraphRole("frame_qformer", "frame_qformer", "N", True, runtime_axes=("N",)),
            GraphRole(
                "whisper_encoder",
                "whisper_encoder",
                "B",
                True,
                media_dims={1: "whisper_n_mels", 2: "whisper_n_frames"},
            ),
            GraphRole("beats_encoder", "beats_encoder", "B", True, media_dims={2: "beats_n_mels"}),
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


KV_DTYPES = ("float32", "float16")  # numpy dtype names the runtime allocates a cache in
MAX_LAYERS = 1024  # bounds far above any LLM vsal runs (Vicuna-13B: 40 layers, 40 heads of 128)
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_KINDS = 4  # names per layer (key and value)
MAX_TEMPLATE = 200  # characters of a past or present name template
_KIND = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class KVLayout:
    """The llm_decoder graph's KV cache: past inputs and present outputs, key and value per layer,
    each [B, kv_heads, P, head_dim] of `dtype`. Names are templates over {layer} and {kind}, as
    genai_config's "past_key_values.%d.key". ValueError names what is out of bounds."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    past: str = "past_key_values.{layer}.{kind}"
    present: str = "present.{layer}.{kind}"
    kinds: tuple[str, ...] = ("key", "value")

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if not problems:  # the names can be made: no two alike ("{kind}{layer}", kinds k and k1)
            names = self.past_names() + self.present_names()
            if len(set(names)) != len(names):
                problems.append("the past and present templates give one name twice")
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> Iterator[str]:
        for name, most in (("layers", MAX_LAYERS), ("kv_heads", MAX_KV_HEADS), ("head_dim", MAX_HEAD_DIM)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                yield f"{name} is {value!r}, not an integer from 1 to {most}"
        if self.dtype not in KV_DTYPES:
            yield f"dtype is {self.dtype!r}, not one of {', '.join(KV_DTYPES)}"
        for name in ("past", "present"):
            template = getattr(self, name)
            if not isinstance(template, str) or len(template) > MAX_TEMPLATE:
                yield f"{name} is not a name template of at most {MAX_TEMPLATE} characters"
                continue
            fields = _template_fields(template)
            if fields != ["kind", "layer"]:
                yield (
                    f"{name} is {template!r}: a name template holds {{layer}} and {{kind}} "
                    f"once each and no other field, it has {fields}"
                )
        if self.past == self.present:
            yield "past and present are the same template: an output would take an input's name"
        if len(self.kinds) > MAX_KINDS:  # past_names() makes layers x kinds names
            yield f"kinds holds {len(self.kinds)} names, more than {MAX_KINDS}"
            return
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            yield f"kinds is {list(self.kinds)}, not distinct names"
        for kind in self.kinds:
            if not isinstance(kind, str) or len(kind) > MAX_TEMPLATE or not _KIND.match(kind):
                yield f"kinds holds {kind!r}, not a name (letters, digits, _)"

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


def _template_fields(template: str) -> list[str]:
    """The replacement fields of a name template, sorted ("{layer!r}" or "{0}" count as others)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:  # a lone brace
        return ["a lone brace"]
    found = []
    for _, name, spec, conversion in parsed:
        if name is not None:
            found.append(name if not spec and conversion is None else f"{name}!{conversion}:{spec}")
    return sorted(found)
