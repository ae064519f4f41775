"""One declarative spec per exported graph: `graph_specs(config)` gives all of them.

Each `GraphSpec` names its inputs and outputs with dtypes and shapes over named axes, gives every
dynamic axis its min/opt/max (the TensorRT optimisation profile), the size traced at export and two
or more different sizes to validate at, and the tolerance to validate with. The exporter's
`dynamic_shapes`, the manifest's graph entries, TensorRT profiles and the tests are all generated
from these specs (practice 2 of docs/architecture.md).

Shape entries are ints (static) or expressions over axis names: "N", "3*S", "S*32", "P+T".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from vsal.export.config import LlmConfig, ModelConfig
from vsal.runtime.graphs import DECODER, GRAPHS
from vsal.runtime.shapes import axis_names, evaluate

# Release limits the profiles follow.
MAX_FRAMES = 120  # 60 s at 2 fps
MAX_SLOTS = 120  # one slot per frame beyond the 60 audio slots
MAX_INSTRUCTION = 512  # the release truncates the Q-Former instruction at max_tgt_len
MAX_PROMPT_TEXT = 512  # documented maximum of prompt text tokens fed to the LLM
MAX_NEW_TOKENS = 512  # max_tgt_len
MAX_AUDIO_BATCH = 4  # 30 s windows per call
MAX_BEAMS = 5  # the release's beam width
FBANK_30S = 2998  # fbank frames of 30 s at 10 ms (snip_edges)
MAX_TEMPLATE_TOKENS = 16  # "USER: <Img>" + "</Img> " + "\nASSISTANT:" around the prompt (~12 tokens)
PROMPT_ROUNDING = 256  # the longest prompt is rounded up to a multiple of this, for headroom


@dataclass(frozen=True)
class Axis:
    """A dynamic axis: TensorRT profile (min, opt, max), the traced size, the validated sizes."""

    name: str
    min: int
    opt: int
    max: int
    export: int  # size used to trace the graph
    validate: tuple[int, ...]  # >= 2 sizes, each different from `export`
    multiple: int = 1  # sizes must be multiples of this (slots come in windows of 10)

    def __post_init__(self) -> None:
        sizes = (self.min, self.opt, self.max, self.export, *self.validate)
        if not self.min <= self.opt <= self.max:
            raise ValueError(
                f"axis {self.name}: need min <= opt <= max, got {self.min}, {self.opt}, {self.max}"
            )
        if len(set(self.validate)) < 2 or self.export in self.validate:
            raise ValueError(f"axis {self.name}: validate at >= 2 sizes that differ from the export size")
        if any(s % self.multiple for s in sizes) or any(not self.min <= s <= self.max for s in sizes[3:]):
            raise ValueError(
                f"axis {self.name}: sizes must be multiples of {self.multiple} within [min, max]"
            )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int64
    shape: tuple[int | str, ...]

    def axis_names(self) -> set[str]:
        return {n for dim in self.shape if isinstance(dim, str) for n in axis_names(dim)}

    def resolve(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(dim if isinstance(dim, int) else evaluate(dim, sizes) for dim in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: tuple[Axis, ...]
    atol: float  # validation passes when max|onnx - torch| <= atol + rtol * max|torch|
    rtol: float
    make_inputs: Callable[[Mapping[str, int], np.random.Generator], dict[str, np.ndarray]] = field(
        repr=False, compare=False
    )

    def axis(self, name: str) -> Axis:
        for axis in self.axes:
            if axis.name == name:
                return axis
        raise KeyError(f"graph {self.name} has no axis {name!r}")

    def export_sizes(self) -> dict[str, int]:
        return {a.name: a.export for a in self.axes}

    def validation_sizes(self) -> list[dict[str, int]]:
        """Case i takes each axis's i-th validation size (its last one when it has fewer)."""
        count = max(len(a.validate) for a in self.axes)
        return [{a.name: a.validate[min(i, len(a.validate) - 1)] for a in self.axes} for i in range(count)]

    def profile(self) -> dict[str, dict[str, int]]:
        return {a.name: {"min": a.min, "opt": a.opt, "max": a.max} for a in self.axes}

    def check(self) -> None:
        """Every axis a shape names must be declared, and every declared axis used."""
        used = set().union(*(t.axis_names() for t in (*self.inputs, *self.outputs)))
        declared = {a.name for a in self.axes}
        if used - declared:
            raise ValueError(f"graph {self.name}: shapes name undeclared axes {sorted(used - declared)}")
        if declared - used:
            raise ValueError(f"graph {self.name}: axes {sorted(declared - used)} appear in no shape")


# --- input factories ----------------------------------------------------------------------------


def _random_inputs(inputs: tuple[TensorSpec, ...], sizes, rng: np.random.Generator, **special) -> dict:
    out = {}
    for spec in inputs:
        shape = spec.resolve(sizes)
        if spec.name in special:
            out[spec.name] = special[spec.name](shape)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out


# --- the graphs ----------------------------------------------------------------------------------


def graph_specs(config: ModelConfig) -> dict[str, GraphSpec]:
    """The spec of every graph in vsal.runtime.graphs.GRAPHS, in its order."""
    v, fq, w = config.vision, config.frame_qformer, config.whisper
    tokens = v.num_tokens
    width = fq.hidden_size
    n = Axis("N", 1, 16, MAX_FRAMES, export=2, validate=(1, 5))
    specs = {}

    def add(spec: GraphSpec) -> None:
        spec.check()
        specs[spec.name] = spec

    vision_in = (TensorSpec("pixel_values", "float32", ("N", 3, v.img_size, v.img_size)),)
    add(
        GraphSpec(
            "vision_encoder",
            vision_in,
            (TensorSpec("image_embeds", "float32", ("N", tokens, v.embed_dim)),),
            (n,),
            atol=1e-4,
            rtol=1e-4,
            make_inputs=lambda s, rng: _random_inputs(vision_in, s, rng),
        )
    )

    fq_in = (
        TensorSpec("image_embeds", "float32", ("N", tokens, v.embed_dim)),
        TensorSpec("instruction_ids", "int64", (1, "L")),
        TensorSpec("instruction_mask", "int64", (1, "L")),
    )
    add(
        GraphSpec(
            "frame_qformer",
            fq_in,
            (TensorSpec("frame_tokens", "float32", ("N", fq.num_query_tokens, width)),),
            (
                n,
                Axis(
                    "L", 1, 32, min(MAX_INSTRUCTION, fq.max_position_embeddings), export=7, validate=(3, 12)
                ),
            ),
            atol=1e-4,
            rtol=1e-4,
            make_inputs=lambda s, rng: _random_inputs(
                fq_in,
                s,
                rng,
                instruction_ids=lambda shape: rng.integers(1000, fq.vocab_size - 1, shape).astype("int64"),
                instruction_mask=lambda shape: np.ones(shape, dtype="int64"),
            ),
        )
    )

    b = Axis("B", 1, 1, MAX_AUDIO_BATCH, export=2, validate=(1, 3))
    whisper_in = (TensorSpec("input_features", "float32", ("B", w.num_mel_bins, w.n_frames)),)
    add(
        GraphSpec(
            "whisper_encoder",
            whisper_in,
            (TensorSpec("speech_tokens", "float32", ("B", w.max_source_positions, width)),),
            (b,),
            atol=1e-4,
            rtol=1e-4,
            make_inputs=lambda s, rng: _random_inputs(whisper_in, s, rng),
        )
    )

    beats_in = (TensorSpec("fbank", "float32", ("B", "F", config.beats.n_mels)),)
    audio_frames = config.alignment.audio_frames
    add(
        GraphSpec(
            "beats_encoder",
            beats_in,
            (TensorSpec("audio_tokens", "float32", ("B", audio_frames, width)),),
            (b, Axis("F", 16, FBANK_30S, FBANK_30S, export=500, validate=(998, FBANK_30S))),
            atol=1e-4,
            rtol=1e-4,
            make_inputs=lambda s, rng: _random_inputs(beats_in, s, rng),
        )
    )

    slots_per_window = config.alignment.high_window
    mrc_in = (
        TensorSpec(
            "av_features", "float32", ("B", f"S*{config.alignment.tokens_per_frame}", config.av_width)
        ),
        TensorSpec("slot_mask", "float32", ("B", "S")),
    )

    def slot_mask(shape):
        mask = np.ones(shape, dtype="float32")
        if shape[1] > slots_per_window:  # exercise padding: the last window half padded
            mask[:, -slots_per_window // 2 :] = 0
        return mask

    add(
        GraphSpec(
            "mrc_qformer",
            mrc_in,
            (
                TensorSpec(
                    "llm_tokens", "float32", ("B", f"{config.llm_tokens_per_slot}*S", config.llm.hidden_size)
                ),
            ),
            (
                Axis("B", 1, 1, MAX_AUDIO_BATCH, export=2, validate=(1, 3)),
                Axis("S", 10, 60, MAX_SLOTS, export=20, validate=(10, 70), multiple=slots_per_window),
            ),
            atol=1e-4,
            rtol=1e-4,
            make_inputs=lambda s, rng: _random_inputs(mrc_in, s, rng, slot_mask=slot_mask),
        )
    )
    add(llm_decoder_spec(config))
    if tuple(specs) != tuple(GRAPHS):
        raise AssertionError(f"specs {list(specs)} are not vsal.runtime.graphs.GRAPHS {list(GRAPHS)}")
    return specs


def max_prompt_tokens(config: ModelConfig | LlmConfig) -> int:
    """Longest LLM input: bos + template + av tokens (3 per slot) + prompt text, rounded up (889 -> 1024)."""
    per_slot = config.llm_tokens_per_slot if isinstance(config, ModelConfig) else 3
    longest = 1 + MAX_TEMPLATE_TOKENS + per_slot * MAX_SLOTS + MAX_PROMPT_TEXT
    return -(-longest // PROMPT_ROUNDING) * PROMPT_ROUNDING


def llm_decoder_spec(config: ModelConfig | LlmConfig) -> GraphSpec:
    """The `llm_decoder` GraphSpec (its I/O: vsal.export.llm_graph). Axes: B beams, T new tokens,
    P past tokens; the past and present names and sizes are the LLM's `kv_layout()`.

    T max is the longest prompt (`max_prompt_tokens`); the context holds it plus MAX_NEW_TOKENS
    (bounded by max_position_embeddings), so P max is one less: the past of the last decode step.
    Validation: prefill (B=1, T=7, P=0), decode (B=3, T=1, P=9), chunked (B=5, T=4, P=6).
    """
    llm = config.llm if isinstance(config, ModelConfig) else config
    layout = llm.kv_layout()
    context = min(max_prompt_tokens(config) + MAX_NEW_TOKENS, llm.max_position_embeddings)
    t_max = min(max_prompt_tokens(config), context)
    axes = (
        Axis("B", 1, 1, MAX_BEAMS, export=2, validate=(1, 3, 5)),
        Axis("T", 1, min(256, t_max), t_max, export=3, validate=(7, 1, 4)),
        Axis("P", 0, min(512, context - 1), context - 1, export=5, validate=(0, 9, 6)),
    )
    kv_shape = ("B", layout.kv_heads, "P", layout.head_dim)
    present_shape = ("B", layout.kv_heads, "P+T", layout.head_dim)
    inputs = (
        TensorSpec("inputs_embeds", "float32", ("B", "T", llm.hidden_size)),
        TensorSpec("attention_mask", "int64", ("B", "P+T")),
        TensorSpec("position_ids", "int64", ("B", "T")),
        *(TensorSpec(name, layout.dtype, kv_shape) for name in layout.past_names()),
    )
    outputs = (
        TensorSpec("logits", "float32", ("B", "T", llm.vocab_size)),
        *(TensorSpec(name, layout.dtype, present_shape) for name in layout.present_names()),
    )

    def make_inputs(sizes: Mapping[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        b, t, p = sizes["B"], sizes["T"], sizes["P"]
        arrays = {
            "inputs_embeds": rng.standard_normal((b, t, llm.hidden_size)).astype("float32"),
            "attention_mask": np.ones((b, p + t), dtype="int64"),
            "position_ids": np.tile(np.arange(p, p + t, dtype="int64"), (b, 1)),
        }
        for name in layout.past_names():
            arrays[name] = rng.standard_normal(layout.shape(b, p)).astype(layout.dtype)
        return arrays

    spec = GraphSpec(DECODER, inputs, outputs, axes, atol=1e-4, rtol=1e-4, make_inputs=make_inputs)
    spec.check()
    return spec
