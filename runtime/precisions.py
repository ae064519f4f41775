"""Precisions as a registry: one row each, read by every CLI choice, the pipeline, the build,
the Triton repository writer, the bench and the TensorRT check.

A row says what a precision is (weight bits, the float type its activations run in, the lowest
ONNX opset its graphs need), which quantizer makes its variant of a graph (a name in
vsal.transforms.quantizers; a graph's role may name another, vsal.runtime.graphs), and on which
devices the runtime picks it by itself when a package has it built. Adding a precision is one
`register_precision` call plus one quantizer (docs/architecture.md, "Adding a precision").
"""

from __future__ import annotations

from dataclasses import dataclass

from vsal.runtime.errors import ConfigError

DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class Precision:
    name: str  # the CLI's and the manifest's spelling ("fp16"); lowercase letters and digits
    weight_bits: int  # bits per weight in its graphs: 32, 16, 8, 4
    activation: str  # numpy dtype of the float math between weights: "float32" | "float16"
    min_opset: int  # the lowest opset its ops exist in (int8's Q/DQ: 10, int4's: 21); the exporter writes 18+
    quantizer: str | None  # makes its variant of a graph (vsal.transforms.quantizers); None: the export
    default_on: tuple[str, ...] = ()  # devices where the runtime picks it when a graph has it built
    gpu_only: bool = False  # on the CPU it only adds casts: run fp32 there (unless asked to be exact)
    graphs: tuple[str, ...] = ()  # the graphs a build makes variants of by default; () every graph
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name.isalnum() or self.name != self.name.lower():
            raise ValueError(f"precision name {self.name!r}: lowercase letters and digits only")
        if self.activation not in ("float32", "float16"):
            raise ValueError(f"precision {self.name}: activation {self.activation!r} is not float32/float16")
        unknown = set(self.default_on) - set(DEVICES)
        if unknown:
            raise ValueError(f"precision {self.name}: unknown devices {sorted(unknown)}")

    @property
    def is_export(self) -> bool:
        """The exported graph itself (no variant is built for it)."""
        return self.quantizer is None


EXPORTED = "fp32"  # the precision every graph is exported at: each variant falls back to it

_REGISTRY: dict[str, Precision] = {}


def register_precision(precision: Precision, replace: bool = False) -> Precision:
    """Add a row (a plug-in's, or a test's). ValueError for a name already taken unless replace."""
    if precision.name in _REGISTRY and not replace:
        raise ValueError(f"precision {precision.name!r} is already registered")
    _REGISTRY[precision.name] = precision
    return precision


def unregister_precision(name: str) -> None:
    if name == EXPORTED:
        raise ValueError(f"{EXPORTED} is the exported graphs' precision: it cannot be removed")
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered precision, in registry order (the CLI's choices)."""
    return tuple(_REGISTRY)


def variant_names() -> tuple[str, ...]:
    """Precisions a build adds as variants beside the exported graph."""
    return tuple(n for n, p in _REGISTRY.items() if not p.is_export)


def get(name: str, option: str = "--precision") -> Precision:
    """The row for `name`, or a ConfigError naming the option and the choices."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"{option} {name!r}: unknown precision; choose {', '.join(_REGISTRY)}") from None


def defaults_for(device: str) -> tuple[str, ...]:
    """The precisions the runtime tries by itself on `device`, fewest weight bits first."""
    rows = [p for p in _REGISTRY.values() if device in p.default_on]
    return tuple(p.name for p in sorted(rows, key=lambda p: p.weight_bits))


def choose(variants, wanted: str | None, device: str, exact: bool = False) -> tuple[str, str | None]:
    """(precision to run, why it differs from `wanted`) for a graph whose built variants are
    `variants` (names). None wanted: the first of `defaults_for(device)` that is built, else the
    export. A gpu_only one runs the export on the CPU unless `exact` (the build's accuracy check runs
    fp16 graphs on the CPU). A precision the graph lacks runs its best other: the fewest-bit default
    built for `device` with at least as many bits, else the export."""
    if wanted is None:
        built = [p for p in defaults_for(device) if p in variants]
        return (built[0] if built else EXPORTED), None
    row = get(wanted)
    if row.is_export:
        return wanted, None
    if row.gpu_only and device != "gpu" and not exact:
        return EXPORTED, f"{wanted} graphs are for GPUs; on the CPU they only add casts"
    if wanted not in variants:
        # the graph's best other: the fewest-bit default built here with at least as many bits
        # (int4 asked, an encoder built int8 runs int8; int8 asked, a decoder built int4 runs fp32)
        wider = [p for p in defaults_for(device) if p in variants and get(p).weight_bits >= row.weight_bits]
        other = wider[0] if wider else EXPORTED
        return other, f"no {wanted} variant built: {other}"
    return wanted, None


for _row in (
    Precision("fp32", 32, "float32", 1, None, description="the exported graphs"),
    Precision(
        "fp16",
        16,
        "float16",
        1,
        "fp16",
        default_on=("gpu",),
        gpu_only=True,
        description="fp16 tensors with fp32 islands (norms, masks, rotary)",
    ),
    Precision(
        "int8",
        8,
        "float32",
        10,
        "int8-static",
        default_on=("cpu",),
        description="int8 Q/DQ calibrated on media; the decoder int8 weight-only",
    ),
    Precision(
        "int4",
        4,
        "float32",
        21,  # DequantizeLinear's block_size
        "int4-weight-only",
        default_on=("cpu",),
        graphs=("llm_decoder",),  # the decoder's weights are most of the model; encoders stay int8
        description="int4 weight-only in blocks of 32 along K (the decoder)",
    ),
):
    register_precision(_row)
