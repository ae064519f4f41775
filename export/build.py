"""`vsal-export build`: reduced-precision graphs beside the fp32 ones, with an accuracy report.

Precision lives in the ONNX graph (TensorRT 11 builds only strongly typed networks): fp16 is the
graph converted with fp32 islands (vsal.export.fp16), int8 is explicit Q/DQ calibrated on real
media (vsal.calib), weight-only for the LLM decoder. Each variant is checked against the fp32
graph on held-out clips (never the calibration clips) and, end to end, by greedy token agreement
through the runtime. A build below the thresholds says so and fails unless allowed. Variants are
recorded in the manifest, which is rewritten last, so a crashed build leaves the package as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from vsal.export.onnx_export import ExportError
from vsal.runtime.manifest import VariantInfo, load_manifest, save_manifest, sha256_file, write_json_atomic

PRECISIONS = ("fp32", "fp16", "int8")
HELD_OUT_FRACTION = 4  # one clip in four is held out from calibration


@dataclass
class Thresholds:
    min_cosine: float = 0.99  # per graph output, against fp32 on held-out inputs
    min_token_agreement: float = 0.5  # end to end: greedy tokens equal to fp32's, position by position


@dataclass
class BuildReport:
    precision: str
    graphs: dict[str, dict] = field(default_factory=dict)
    end_to_end: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    engines: dict[str, dict] = field(default_factory=dict)  # graph -> TensorRT engine and its accuracy

    def format(self) -> str:
        lines = [f"build {self.precision}:"]
        for name, g in self.graphs.items():
            lines.append(
                f"  {name:16s} cosine {g['cosine']:.5f}  max abs err {g['max_abs_error']:.3g}  "
                f"size {g['bytes'] / 2**20:.1f} MiB (fp32 {g['fp32_bytes'] / 2**20:.1f})  {g['notes']}"
            )
        for name, e in self.engines.items():
            lines.append(
                f"  {name:16s} TensorRT {e['tensorrt']} engine: cosine {e['cosine']:.5f}  max abs err "
                f"{e['max_abs_error']:.3g} vs ORT fp32 ({e['file']}, {e['build_seconds']} s to build)"
            )
        if self.end_to_end:
            lines.append(
                "  end to end: greedy tokens equal to fp32 "
                f"{self.end_to_end['token_agreement']:.1%} ({self.end_to_end['clips']} held-out clips)"
            )
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  BELOW THRESHOLD: {p}" for p in self.problems]
        return "\n".join(lines)


def split_media(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(calibration, held-out): every fourth clip is held out, at least one each."""
    if len(files) < 2:
        raise ExportError("give at least 2 media files: calibration and held-out clips must differ")
    held = files[HELD_OUT_FRACTION - 1 :: HELD_OUT_FRACTION] or files[-1:]
    return [f for f in files if f not in held], held


def build(
    package: str | os.PathLike,
    precision: str,
    media: list[Path] | None = None,
    graphs: tuple[str, ...] | None = None,
    thresholds: Thresholds | None = None,
    progress: bool = True,
    engines: bool = False,
    workspace_bytes: int | None = None,
) -> BuildReport:
    """Add `precision` variants of the package's graphs; returns the report (also saved in the package).

    engines: also build a TensorRT engine per graph on this machine (vsal.runtime.tensorrt_engines),
    check each against the fp32 graph in ONNX Runtime on the held-out inputs, and measure token
    agreement through the engines; `workspace_bytes` caps TensorRT's scratch memory (small devices).
    """
    from vsal.calib.collect import collect, synthetic_media

    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    package = Path(package)
    manifest = load_manifest(package)
    thresholds = thresholds or Thresholds()
    report = BuildReport(precision)
    names = graphs or tuple(manifest.graphs)
    if precision == "fp32" and not engines:
        report.notes.append("fp32: the exported graphs are used as they are")
        _tensorrt_note(report)
        return report
    stored = package / "calibration" / "clips.json"
    if media is None and stored.is_file():  # from `vsal-export calibrate`
        media = [Path(p) for p in json.loads(stored.read_text())["clips"]]
        missing = [str(p) for p in media if not p.is_file()]
        if missing:
            raise ExportError(f"{stored}: its clips are gone ({', '.join(missing[:3])}); run calibrate again")
        report.notes.append(f"media from {stored}")
    with tempfile.TemporaryDirectory(prefix="vsal-build-") as tmp:
        if media is None:
            media = synthetic_media(Path(tmp) / "media")
            report.notes.append(
                "no --calib-media given: calibrated and checked on generated clips "
                "(real media calibrates better)"
            )
        calibration_clips, held_out = split_media(media)
        _say(progress, f"{len(calibration_clips)} calibration clips, {len(held_out)} held-out clips")
        calibration = collect(package, calibration_clips, progress) if precision == "int8" else {}
        checks = collect(package, held_out, progress, "held-out clips")
        if precision != "fp32":
            for name in names:
                _say(progress, f"{name}: building {precision}")
                report.graphs[name] = _build_graph(package, manifest, name, precision, calibration, checks)
                _check(report, name, thresholds)
            save_manifest(manifest, package)  # variants become visible only now
        if engines:
            for name in names:
                report.engines[name] = _build_engine(
                    package, manifest, name, precision, checks, workspace_bytes
                )
                if report.engines[name]["cosine"] < thresholds.min_cosine:
                    report.problems.append(
                        f"{name}: TensorRT engine cosine {report.engines[name]['cosine']:.4f} "
                        f"< {thresholds.min_cosine}"
                    )
            save_manifest(manifest, package)  # the engine records
        report.end_to_end = token_agreement(
            package, precision, held_out, "tensorrt" if engines else "onnxruntime"
        )
        if report.end_to_end["token_agreement"] < thresholds.min_token_agreement:
            report.problems.append(
                f"end to end: greedy token agreement {report.end_to_end['token_agreement']:.1%} "
                f"< {thresholds.min_token_agreement:.0%}"
            )
    _static_check(report, package, names, precision)
    if not engines:
        _tensorrt_note(report)
    write_json_atomic(package / f"build_{precision}.json", report.__dict__)
    return report


def calibrate(package: str | os.PathLike, media: list[Path], progress: bool = True) -> dict[str, Path]:
    """Record each graph's inputs on the calibration clips into `<package>/calibration/`, and remember
    the clips (calibration and held-out) for `build`."""
    from vsal.calib.collect import collect, save_calibration

    package = Path(package)
    load_manifest(package)
    calibration_clips, held_out = split_media(media)
    paths = save_calibration(package / "calibration", collect(package, calibration_clips, progress))
    write_json_atomic(
        package / "calibration" / "clips.json",
        {"clips": [str(p.resolve()) for p in media], "held_out": [str(p.resolve()) for p in held_out]},
    )
    return paths


def _build_graph(package: Path, manifest, name: str, precision: str, calibration, checks) -> dict:
    from vsal.export.accuracy import accuracy

    info = manifest.graphs[name]
    src = package / info.file
    rel = f"graphs/{name}.{precision}.onnx"
    dst = package / rel
    start = time.perf_counter()
    if precision == "fp16":
        from vsal.export.fp16 import convert_fp16

        details = convert_fp16(src, dst)
    elif name == "llm_decoder":
        from vsal.calib.quantize import quantize_weights_int8

        details = quantize_weights_int8(src, dst)
    else:
        from vsal.calib.quantize import quantize_int8

        if not calibration.get(name):
            raise ExportError(
                f"{name}: no calibration inputs were recorded (is the graph used by these clips?)"
            )
        details = quantize_int8(src, dst, calibration[name])
    seconds = time.perf_counter() - start
    feeds = checks.get(name) or _random_feeds(manifest, name)
    acc = accuracy(src, dst, feeds)
    cosine = min(v["cosine"] for v in acc.values())
    max_err = max(v["max_abs_error"] for v in acc.values())
    notes = _describe(details)
    info.variants[precision] = VariantInfo(
        precision=precision,
        file=rel,
        sha256=sha256_file(dst),
        accuracy={"cosine": cosine, "max_abs_error": max_err, "per_output": acc, "inputs": len(feeds)},
        notes=notes,
    )
    return {
        "cosine": cosine,
        "max_abs_error": max_err,
        "bytes": dst.stat().st_size,
        "fp32_bytes": src.stat().st_size,
        "seconds": round(seconds, 2),
        "notes": notes,
    }


def _build_engine(package: Path, manifest, name: str, precision: str, checks, workspace_bytes) -> dict:
    """The graph's TensorRT engine on this machine (cached or built), checked against fp32 in ORT."""
    from vsal.export.accuracy import compare, session, worst_cosine
    from vsal.runtime.tensorrt_backend import TensorRTBackend

    info = manifest.graphs[name]
    backend = TensorRTBackend.for_graph(package, name, info, precision, workspace_bytes)
    cached = backend.cached
    reference = session(package / info.file)
    outputs = [t.name for t in info.outputs]
    feeds = checks.get(name) or _random_feeds(manifest, name)
    acc = compare(
        lambda f: reference.run(outputs, f),
        lambda f: [backend.run(dict(f), outputs)[n] for n in outputs],
        outputs,
        feeds,
    )
    record = {
        "file": str(cached.path.relative_to(package)),
        "tensorrt": cached.key.tensorrt,
        "compute_capability": cached.key.compute_capability,
        "precision": precision,
        "build_seconds": cached.build_seconds,
    }
    info.engines = [e for e in info.engines if e.get("file") != record["file"]] + [record]
    return {
        **record,
        "cosine": worst_cosine(acc),
        "max_abs_error": max(v["max_abs_error"] for v in acc.values()),
    }


def _describe(details) -> str:
    for attr in ("summary", "format"):
        if hasattr(details, attr):
            value = getattr(details, attr)
            return value() if callable(value) else str(value)
    return ""


def _random_feeds(manifest, name: str) -> list[dict[str, np.ndarray]]:
    """Feeds for graphs the held-out clips do not reach (the LLM): the spec's validation inputs."""
    from vsal.export.config import ModelConfig
    from vsal.export.package import graph_specs

    spec = graph_specs(ModelConfig.from_dict(manifest.config))[name]
    rng = np.random.default_rng(0)
    return [spec.make_inputs(sizes, rng) for sizes in spec.validation_sizes()]


def _check(report: BuildReport, name: str, thresholds: Thresholds) -> None:
    cosine = report.graphs[name]["cosine"]
    if cosine < thresholds.min_cosine:
        report.problems.append(f"{name}: cosine {cosine:.4f} < {thresholds.min_cosine}")


def token_agreement(
    package: Path, precision: str, clips: list[Path], engine: str = "onnxruntime", tokens: int = 16
) -> dict[str, float]:
    """Greedy answers of the `precision` variants (run by `engine`) against fp32's in ONNX Runtime
    on the held-out clips."""
    from vsal.calib.collect import AUDIO_SUFFIXES
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions

    options = DecodingOptions(num_beams=1, max_new_tokens=tokens, eos_token_id=None)
    reference = Pipeline.load(package, verbose=False, precision="fp32")
    variant = Pipeline.load(package, verbose=False, precision=precision, exact_precision=True, engine=engine)
    equal = total = exact = 0
    for clip in clips:
        kind = "audio" if clip.suffix.lower() in AUDIO_SUFFIXES else "video"
        want = reference.ask("What happens in this clip?", options=options, **{kind: clip}).token_ids
        got = variant.ask("What happens in this clip?", options=options, **{kind: clip}).token_ids
        equal += sum(a == b for a, b in zip(want, got, strict=False))
        total += len(want)
        exact += want == got
    return {
        "token_agreement": equal / max(total, 1),
        "exact_answers": exact / len(clips),
        "clips": len(clips),
    }


def _static_check(report: BuildReport, package: Path, names, precision: str) -> None:
    """`vsal-export check` on what this build made: is each graph expected to parse on TensorRT
    10 and 11 (from NVIDIA's documents; a note, the ONNX Runtime graphs work either way)."""
    from vsal.export.trt_check import VERSIONS, check_package

    labels = [name if precision == "fp32" else f"{name}.{precision}" for name in names]
    checked = check_package(package, only=set(labels))
    failing = []
    for label in labels:
        graph = checked.graphs.get(label)
        if graph is None:
            continue
        for version in VERSIONS:
            if not graph.parses(version):
                failing.append(f"{label} on TensorRT {version}: {graph.errors(version)[0].message}")
    if failing:
        report.notes += [f"TensorRT check (documents): NOT expected to parse: {f}" for f in failing]
    else:
        report.notes.append(
            f"TensorRT check (documents): all {len(labels)} {precision} graphs expected to parse on "
            f"TensorRT {' and '.join(VERSIONS)}"
        )


def _tensorrt_note(report: BuildReport) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        report.notes.append(
            "TensorRT is not installed here: no engines were built; build them on the GPU target "
            "(`vsal-export build --backend tensorrt`)"
        )
        return
    report.notes.append("TensorRT is installed: `--backend tensorrt` also builds and checks engines")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"vsal-export: {message}", flush=True)
