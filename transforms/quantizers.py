"""Quantizers: what makes a precision's variant of one graph, behind one protocol, in one registry.

A precision row (vsal.runtime.precisions) names its quantizer; a graph's role may name another for
that precision (vsal.runtime.graphs: the decoder's int8 is weight-only). The build looks the name up
here and calls `convert(src, dst, calibration)`; nothing else knows which transform a precision is.
Adding a precision = one `register_precision` row + one `register_quantizer` (docs/architecture.md).

The built-in rows wrap the transforms of this package, imported only when a graph is converted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from vsal.runtime.errors import BuildError, ConfigError

Feeds = Mapping[str, np.ndarray]


@dataclass
class TransformReport:
    """What a quantizer did to one graph."""

    applied: bool  # the graph changed (else the "variant" is the source graph again: not recorded)
    summary: str  # one line for the build report and the manifest's variant notes
    details: dict[str, Any] = field(default_factory=dict)  # the underlying transform's report, as a dict


@runtime_checkable
class Quantizer(Protocol):
    name: str  # what precision rows and graph recipes call it ("int8-static")
    calibrated: bool  # needs the graph's inputs recorded on clips (vsal.calib.collect)

    def convert(self, src: Path, dst: Path, calibration: Sequence[Feeds] | None) -> TransformReport:
        """Write the variant of the graph `src` to `dst` (its external data beside it, under dst's
        name); `calibration`: the graph's recorded inputs when `calibrated` (or when the quantizer
        has `activations = True` and they were recorded), else None."""
        ...


_REGISTRY: dict[str, Quantizer] = {}


def register_quantizer(quantizer: Quantizer, replace: bool = False) -> Quantizer:
    """Add a quantizer (a plug-in's, or a test's). ValueError for a name already taken unless replace."""
    if not isinstance(quantizer, Quantizer):
        raise TypeError(
            f"{quantizer!r}: a quantizer has a name, calibrated and convert(src, dst, calibration)"
        )
    if quantizer.name in _REGISTRY and not replace:
        raise ValueError(f"quantizer {quantizer.name!r} is already registered")
    _REGISTRY[quantizer.name] = quantizer
    return quantizer


def unregister_quantizer(name: str) -> None:
    _REGISTRY.pop(name, None)


def uses_activations(quantizer: Quantizer) -> bool:
    """Whether `quantizer` takes recorded inputs: it needs them (`calibrated`), or it uses them when
    they are there (an optional `activations` attribute)."""
    return quantizer.calibrated or bool(getattr(quantizer, "activations", False))


def quantizer_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_quantizer(name: str) -> Quantizer:
    """The quantizer `name`, or a ConfigError naming the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"quantizer {name!r} is not registered (a precision row or graph recipe names it); "
            f"registered: {', '.join(_REGISTRY)}"
        ) from None


@dataclass(frozen=True)
class Fp16:
    """fp16 tensors with fp32 islands (vsal.transforms.fp16)."""

    name: str = "fp16"
    calibrated: bool = False

    def convert(self, src: Path, dst: Path, calibration: Sequence[Feeds] | None = None) -> TransformReport:
        from vsal.transforms.fp16 import convert_fp16

        report = convert_fp16(src, dst)
        # No cast added and nothing smaller: the graph had nothing to convert.
        applied = report.casts_added > 0 or report.bytes_after < report.bytes_before
        return TransformReport(applied, report.summary(), asdict(report))


@dataclass(frozen=True)
class StaticInt8:
    """Explicit Q/DQ int8, activations calibrated on recorded inputs (vsal.transforms.int8)."""

    name: str = "int8-static"
    calibrated: bool = True

    def convert(self, src: Path, dst: Path, calibration: Sequence[Feeds] | None = None) -> TransformReport:
        from vsal.transforms.int8 import quantize_int8

        if not calibration:
            raise BuildError(f"{src}: static int8 needs the graph's inputs recorded on clips; none given")
        report = quantize_int8(src, dst, calibration)
        return TransformReport(bool(report.quantized), report.summary(), asdict(report))


@dataclass(frozen=True)
class WeightOnlyInt8:
    """Int8 weights per output channel, float activations (the LLM decoder)."""

    name: str = "int8-weight-only"
    calibrated: bool = False

    def convert(self, src: Path, dst: Path, calibration: Sequence[Feeds] | None = None) -> TransformReport:
        from vsal.transforms.weight_only import quantize_weights_int8

        report = quantize_weights_int8(src, dst)
        return TransformReport(bool(report.quantized), report.summary(), asdict(report))


@dataclass(frozen=True)
class WeightOnlyInt4:
    """Symmetric int4 weights in blocks along K (DequantizeLinear with block_size, opset 21), float
    activations (the LLM decoder); each block's scale searched with least squares, its error weighed
    by each input channel's mean square on the recorded prefills (vsal.transforms.int4)."""

    name: str = "int4-weight-only"
    calibrated: bool = False  # weight error alone without recorded inputs
    activations: bool = True  # weighs each block's clipping by the inputs it multiplies, when recorded

    def convert(self, src: Path, dst: Path, calibration: Sequence[Feeds] | None = None) -> TransformReport:
        """The LM head stays int8 (weight-only, per channel), as llama.cpp keeps its output table at
        8 bits or more: on SmolLM2-135M, whose tied head is a fifth of the weights, int4 there cost
        most of the perplexity gap to llama.cpp's Q4_0."""
        import onnx
        from vsal.transforms.int4 import quantize_weights_int4
        from vsal.transforms.weight_only import quantize_weights_int8

        head = lm_head(onnx.load(str(src), load_external_data=False).graph)
        if head is None:
            report = quantize_weights_int4(src, dst, calibration=calibration or None)
            return TransformReport(bool(report.weights), report.summary(), report.to_dict())
        staged = dst.with_name(f".{dst.stem}.int4{dst.suffix}")
        try:
            report = quantize_weights_int4(src, staged, calibration=calibration or None, exclude_nodes=[head])
            head_report = quantize_weights_int8(staged, dst)
        finally:
            for leftover in (staged, staged.with_name(staged.name + ".data")):
                leftover.unlink(missing_ok=True)
        final = sum(f.stat().st_size for f in (dst, dst.with_name(dst.name + ".data")) if f.exists())
        summary = (
            f"{report.summary()} before the LM head; LM head int8 ({len(head_report.quantized)} weight): "
            f"{final / 1e6:.1f} MB in all"
        )
        return TransformReport(bool(report.weights), summary, report.to_dict() | {"lm_head": head})


def lm_head(graph) -> str | None:
    """The MatMul that makes the `logits` output (through reshapes and casts), or None."""
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze"):
        node = producers.get(node.input[0])
    return node.name if node is not None and node.op_type == "MatMul" and node.name else None


for _quantizer in (Fp16(), StaticInt8(), WeightOnlyInt8(), WeightOnlyInt4()):
    register_quantizer(_quantizer)
