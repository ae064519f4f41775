"""`vsal-export build`: reduced-precision graphs beside the fp32 ones, with an accuracy report.

Precision lives in the ONNX graph (TensorRT 11 builds only strongly typed networks). A precision is
a registry row (vsal.runtime.precisions) naming its quantizer (vsal.transforms.quantizers), which
a graph's role may override (vsal.runtime.graphs: the decoder's int8 is weight-only); the build
knows no precision by name. Calibrated quantizers get the graph's inputs recorded on clips: those
`vsal-export calibrate` stored while they still match the package, else recorded now. Each variant
is checked against the fp32 graph on held-out clips (never the calibration clips) and, end to end,
by greedy token agreement through the runtime. A build below the thresholds says so and fails
unless allowed. Variants are recorded in the manifest, which is rewritten last, so a crashed build
leaves the package as it was. The package's files are hashed once, under the lock, at the start.
"""

from __future__ import annotations

import copy
import json
import numbers
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from vsal.export.build_fused import FUSED_PRECISIONS
from vsal.export.onnx_export import ExportError
from vsal.export.package_update import (
    Update,
    clean_leftovers,
    commit,
    kill_point,
    variant_file,
    written_folder,
)
from vsal.runtime import precisions
from vsal.runtime.errors import BuildError, ConfigError, PackageError
from vsal.runtime.graphs import DECODER, GRAPHS
from vsal.runtime.log import say, sayer
from vsal.runtime.manifest import (
    CALIBRATION_DIR,
    ENGINE_DIR,
    GRAPH_DIR,
    WRITTEN_FOLDERS,
    TensorInfo,
    VariantInfo,
    load_manifest,
    sha256_file,
    verify_files,
)
from vsal.runtime.package_lock import PackageLock, write_json_durable
from vsal.runtime.package_paths import confined, package_folder, read_json
from vsal.transforms.quantizers import Quantizer, get_quantizer, uses_activations

HELD_OUT_FRACTION = 4  # one clip in four is held out from calibration
CLIPS_NAME = f"{CALIBRATION_DIR}/clips.json"  # the clips `vsal-export calibrate` used
MAX_CLIPS_BYTES = 1 << 20  # 1 MiB: some thousand paths


MAX_WORKSPACE_BYTES = 1 << 40  # 1 TiB: TensorRT's scratch memory cap, beyond any device's memory


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float = 0.99  # per graph output, against fp32 on held-out inputs
    min_token_agreement: float = 0.5  # end to end: greedy tokens equal to fp32's, position by position

    def __post_init__(self) -> None:
        _check_fraction("--min-cosine", self.min_cosine)
        _check_fraction("--min-token-agreement", self.min_token_agreement)


def _check_fraction(option: str, value) -> None:
    # NaN fails `0 <= value <= 1`: as a threshold it would turn the gate off (`x < nan` is never true).
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{option} {value!r}: expected a number from 0 to 1")


@dataclass
class BuildReport:
    precision: str
    graphs: dict[str, dict] = field(default_factory=dict)
    end_to_end: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    engines: dict[str, dict] = field(default_factory=dict)  # graph -> TensorRT engine and its accuracy
    build_id: str = ""  # in the new variants' file names
    recorded: bool = False  # the variants are in the manifest (the gate passed, or --allow-below)

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
        if self.precision != precisions.EXPORTED or self.engines:
            lines.append(f"  {'recorded in' if self.recorded else 'NOT recorded in'} the manifest")
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
    allow_below: bool = False,
) -> BuildReport:
    """Add `precision` variants of the package's graphs; returns the report (also saved in the package).

    The package is locked for the whole build (a second build waits), leftovers of interrupted
    builds are removed first, and the variants are recorded only when every check passes (or
    `allow_below`, which marks them below threshold in the manifest): in one rename of the manifest,
    after which the files of the variants they replace are removed (vsal.export.package_update).
    `report.recorded` says whether they were; a report not recorded goes to build_<p>.rejected.json.

    engines: also build a TensorRT engine per graph on this machine (vsal.runtime.backends.tensorrt_engines),
    check each against the fp32 graph in ONNX Runtime on the held-out inputs, and measure token
    agreement through the engines; `workspace_bytes` caps TensorRT's scratch memory (small devices).
    """
    row = precisions.get(precision)  # a ConfigError naming the choices
    _check_workspace(workspace_bytes)
    package = Path(package)
    names = chosen_graphs(load_manifest(package), graphs, row.graphs)
    quantizers = {} if row.is_export else {name: quantizer_of(name, row) for name in names}
    with PackageLock(package, f"vsal-export build --precision {precision}", quiet=not progress):
        manifest = load_manifest(package)  # re-read under the lock: another build may have added to it
        report = BuildReport(precision, build_id=secrets.token_hex(4))
        _clean(report, package, manifest, progress)
        if row.is_export and not engines:
            if DECODER in names and precision in FUSED_PRECISIONS:
                _verify(package, manifest)
                _build_exported_fused(report, package, manifest, allow_below, progress)
                _save_report(report, package)
            else:
                report.notes.append(
                    f"{precision}: the exported graphs are used as they are (nothing to record)"
                )
            _tensorrt_note(report)
            return report
        _verify(package, manifest)
        update = Update(precision)
        try:
            _build_all(
                report,
                update,
                package,
                manifest,
                names,
                quantizers,
                media,
                thresholds or Thresholds(),
                progress,
                engines,
                workspace_bytes,
            )
            kill_point("variants-written")
            _record(report, update, package, allow_below, progress)
        except BaseException:
            update.discard()  # nothing was recorded: the files this build wrote are nobody's
            raise
    if report.recorded:
        _static_check(report, package, names if row.is_export else tuple(update.variants), row)
    if not engines:
        _tensorrt_note(report)
    _save_report(report, package)
    return report


def _check_workspace(workspace_bytes: int | None) -> None:
    if workspace_bytes is None:
        return
    if not isinstance(workspace_bytes, int) or not 1 << 20 <= workspace_bytes <= MAX_WORKSPACE_BYTES:
        raise ConfigError(
            f"--workspace-mib: {workspace_bytes!r} bytes; give 1 to {MAX_WORKSPACE_BYTES >> 20} MiB"
        )


def quantizer_of(name: str, precision: precisions.Precision) -> Quantizer:
    """The quantizer that makes graph `name`'s `precision` variant: its role's recipe, else the
    precision's own (a graph the roles do not declare takes the precision's)."""
    role = GRAPHS.get(name)
    return get_quantizer(role.quantizer_for(precision) if role else precision.quantizer)


def _verify(package: Path, manifest) -> None:
    """The one sha256 pass of a build (under the lock, so no vsal writer changes them after): every
    later reader of the package in this build loads it with verify=False."""
    problems = verify_files(manifest, package)
    if problems:
        raise PackageError("; ".join(problems))


def chosen_graphs(manifest, graphs: tuple[str, ...] | None, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The graphs to build: `graphs`, else the precision's own (`default`, e.g. int4: the decoder),
    else all; ConfigError naming any the package does not have."""
    if not graphs:
        own = tuple(g for g in default if g in manifest.graphs)
        return own or tuple(manifest.graphs)
    unknown = [g for g in graphs if g not in manifest.graphs]
    if unknown:
        raise ConfigError(
            f"--graphs: {', '.join(unknown)} not in the package; it has {', '.join(manifest.graphs)}"
        )
    return tuple(dict.fromkeys(graphs))


def _build_all(
    report,
    update,
    package,
    manifest,
    names,
    quantizers,
    media,
    thresholds,
    progress,
    engines,
    workspace_bytes,
):
    """Every variant (and engine) of this build, written under new names and checked; none recorded.
    `quantizers`: graph -> the quantizer of its variant (none for the exported precision)."""
    from vsal.calib.collect import collect, synthetic_media

    precision = report.precision
    tell = sayer("vsal-export", enabled=progress, stdout=True)
    calibrated_clips = media is None and (media := _stored_media(report, package)) is not None
    with tempfile.TemporaryDirectory(prefix="vsal-build-") as tmp:
        if media is None:
            media = synthetic_media(Path(tmp) / "media")
            report.notes.append(
                "no --calib-media given: calibrated and checked on generated clips "
                "(real media calibrates better)"
            )
        calibration_clips, held_out = split_media(media)
        tell(f"{len(calibration_clips)} calibration clips, {len(held_out)} held-out clips")
        # Graphs whose quantizer needs recorded inputs, or weighs its work by them when it has them.
        calibrated = [name for name, q in quantizers.items() if uses_activations(q)]
        calibration = _calibration(
            report, package, manifest, calibrated, calibration_clips, calibrated_clips, progress
        )
        checks = collect(package, held_out, progress, "held-out clips", verify=False)
        candidate = copy.deepcopy(manifest)  # what the manifest will say if this build is recorded
        if quantizers:
            for name, quantizer in quantizers.items():
                tell(f"{name}: building {precision} ({quantizer.name})")
                _build_variant(
                    report, update, package, candidate, name, quantizer, calibration, checks, thresholds
                )
            if not update.variants:
                raise BuildError(
                    f"--precision {precision}: none of the graphs {', '.join(names)} gets a "
                    f"{precision} variant (the recipe changed nothing in them); nothing was recorded"
                )
        if engines:
            for name in update.variants or names:
                _check_engine(report, update, package, candidate, name, checks, thresholds, workspace_bytes)
        report.end_to_end = token_agreement(
            package,
            precision,
            held_out,
            "tensorrt" if engines else "onnxruntime",
            manifest=candidate,
            verify=False,
        )
    if report.end_to_end["token_agreement"] < thresholds.min_token_agreement:
        report.problems.append(
            f"end to end: greedy token agreement {report.end_to_end['token_agreement']:.1%} "
            f"< {thresholds.min_token_agreement:.0%}"
        )


def _calibration(
    report, package, manifest, graphs, clips, calibrated_clips: bool, progress: bool
) -> dict[str, list]:
    """The recorded inputs of `graphs` (those whose quantizer uses them): what `vsal-export
    calibrate` stored, when this build runs on its clips (`calibrated_clips`) and the store still
    matches the package and the clips (vsal.calib.collect.recorded_on); else recorded now on `clips`
    (the fp32 pipeline; the package is verified)."""
    from vsal.calib.collect import collect, load_calibration

    if not graphs:
        return {}
    if calibrated_clips:
        inputs, note = load_calibration(package, manifest, graphs, clips)
        report.notes.append(note)
        say("vsal-export", note, enabled=progress, stdout=True)
        if inputs is not None:
            return inputs
    return collect(package, clips, progress, verify=False, graphs=graphs)


def _stored_media(report: BuildReport, package: Path) -> list[Path] | None:
    """The clips `vsal-export calibrate` stored, if it ran: a small JSON file inside the package
    ({"clips": [path, ...], "held_out": [...]}), checked before it is read and after."""
    stored = package / CLIPS_NAME
    if package_folder(package, CALIBRATION_DIR, WRITTEN_FOLDERS[CALIBRATION_DIR]) is None:
        return None
    real = confined(package, CLIPS_NAME, "the calibration clip list", named_in=stored)
    if not real.is_file():
        return None
    clips = read_json(real, MAX_CLIPS_BYTES, 'it holds {"clips": [...]}').get("clips")
    if not isinstance(clips, list) or len(clips) < 2 or not all(isinstance(c, str) and c for c in clips):
        raise PackageError(
            f'{stored}: "clips" must be a list of at least 2 file names, got {json.dumps(clips)[:60]}; '
            "run `vsal-export calibrate` again"
        )
    media = [Path(p) for p in clips]
    missing = [str(p) for p in media if not p.is_file()]
    if missing:
        raise BuildError(f"{stored}: its clips are gone ({', '.join(missing[:3])}); run calibrate again")
    report.notes.append(f"media from {stored}")
    return media


def _build_variant(
    report, update, package, candidate, name, quantizer, calibration, checks, thresholds
) -> None:
    """One graph's variant, written under this build's name; recorded in `candidate` if it applies."""
    if quantizer.calibrated and not calibration.get(name):
        raise BuildError(f"{name}: no calibration inputs were recorded (is the graph used by these clips?)")
    result = _build_graph(
        package, candidate, name, report.precision, quantizer, calibration.get(name), checks, report.build_id
    )
    files = [package / result.variant.file, *(package / f for f in result.variant.external_data)]
    update.written += files
    if not result.applied:
        for path in files:
            path.unlink()
        before = " (its earlier variant stays)" if report.precision in candidate.graphs[name].variants else ""
        report.notes.append(
            f"{name}: NO {report.precision} variant: the recipe changed nothing in this graph, "
            f"it runs fp32{before}"
        )
        return
    report.graphs[name] = result.summary
    candidate.graphs[name].variants[report.precision] = result.variant
    update.variants[name] = result.variant
    _check(report, name, thresholds)
    if name == DECODER and report.precision in FUSED_PRECISIONS:
        _build_fused_variant(report, update, package, candidate, checks)


def _build_exported_fused(report, package, manifest, allow_below: bool, progress: bool) -> None:
    """`--precision fp32`: the exported decoder's fused twin (checked on the spec's prompts, no
    media needed), recorded like a variant."""
    update = Update(report.precision)
    try:
        _build_fused_variant(report, update, package, copy.deepcopy(manifest), {})
        _record(report, update, package, allow_below, progress)
    except BaseException:
        update.discard()
        raise


def _build_fused_variant(report, update, package, candidate, checks) -> None:
    """The decoder variant's fused twin for ONNX Runtime (vsal.export.build_fused), checked against
    it; recorded with the build, its problems the build's."""
    from vsal.export.build_fused import build_fused

    rel = variant_file(DECODER, report.precision, report.build_id, fused=True)
    update.written += [package / rel, package / f"{rel}.data"]  # removed if the build is not recorded
    feeds = checks.get(DECODER) or _random_feeds(candidate, DECODER)
    fused = build_fused(package, candidate, report.precision, report.build_id, feeds)
    candidate.graphs[DECODER].fused[report.precision] = fused.variant
    update.fused[DECODER] = fused.variant
    if DECODER in report.graphs:
        report.graphs[DECODER]["notes"] += f"; {fused.summary}"
    else:
        report.notes.append(f"{DECODER}: {fused.summary}")
    report.problems += fused.problems


def _check_engine(report, update, package, candidate, name, checks, thresholds, workspace_bytes) -> None:
    record, acc = _build_engine(package, candidate, name, report.precision, checks, workspace_bytes)
    info = candidate.graphs[name]
    info.engines = [e for e in info.engines if e.get("file") != record["file"]] + [record]
    update.engines[name] = [record]
    report.engines[name] = {**record, **acc}
    if acc["cosine"] < thresholds.min_cosine:
        report.problems.append(
            f"{name}: TensorRT engine cosine {_below(acc['cosine'], thresholds.min_cosine)} "
            f"< {thresholds.min_cosine}"
        )


def _record(report: BuildReport, update: Update, package: Path, allow_below: bool, progress: bool) -> None:
    """The gate: record the build in the manifest, or leave the package as it was."""
    if report.problems and not allow_below:
        update.discard()
        report.notes.append("below the thresholds: nothing was recorded, the package is as it was")
        return
    if report.problems:
        say(
            "vsal-export",
            f"WARNING: recording {report.precision} variants BELOW the accuracy "
            f"thresholds (--allow-below): {'; '.join(report.problems)}",
        )
        for variant in (*update.variants.values(), *update.fused.values()):
            variant.accuracy["below_threshold"] = True
            variant.accuracy["problems"] = list(report.problems)
    removed = commit(package, update)
    report.recorded = True
    if removed:
        say("vsal-export", f"replaced variants removed: {', '.join(removed)}", enabled=progress, stdout=True)


def _clean(report: BuildReport, package: Path, manifest, progress: bool) -> None:
    removed, ignored = clean_leftovers(package, manifest)
    if removed:
        report.notes.append(f"removed {len(removed)} leftovers of an interrupted run: {', '.join(removed)}")
    if ignored:
        report.notes.append(f"files the manifest does not name, left alone: {', '.join(ignored)}")
    for note in report.notes:
        say("vsal-export", note, enabled=progress, stdout=True)


def _save_report(report: BuildReport, package: Path) -> None:
    """build_<p>.json describes what the package holds; a build not recorded goes beside it."""
    accepted = package / f"build_{report.precision}.json"
    rejected = package / f"build_{report.precision}.rejected.json"
    write_json_durable(accepted if report.recorded else rejected, report.__dict__)
    if report.recorded:
        rejected.unlink(missing_ok=True)


def calibrate(package: str | os.PathLike, media: list[Path], progress: bool = True) -> dict[str, Path]:
    """Record each graph's inputs on the calibration clips into `<package>/calibration/` (with what
    they were recorded on), and remember the clips (calibration and held-out): a later `build` on
    them reads the stored inputs instead of running the clips again, while they match the package."""
    from vsal.calib.collect import STORED_GRAPHS, collect, save_calibration

    package = Path(package)
    load_manifest(package)
    calibration_clips, held_out = split_media(media)
    with PackageLock(package, "vsal-export calibrate", quiet=not progress):
        manifest = load_manifest(package)  # under the lock: what the inputs are recorded on
        # Verifies the files against the manifest; records the decoder's prefills too (int4 uses them).
        inputs = collect(package, calibration_clips, progress, graphs=STORED_GRAPHS)
        written_folder(package, CALIBRATION_DIR)  # checked right before writing
        paths = save_calibration(package, manifest, inputs, calibration_clips)
        write_json_durable(
            package / CLIPS_NAME,
            {"clips": [str(p.resolve()) for p in media], "held_out": [str(p.resolve()) for p in held_out]},
        )
    return paths


@dataclass
class GraphBuild:
    variant: VariantInfo
    summary: dict  # the report's line for this graph
    applied: bool  # the recipe changed the graph (else the "variant" is the fp32 graph again)


def _build_graph(
    package: Path, manifest, name: str, precision: str, quantizer, calibration, checks, build_id: str
):
    from vsal.export.accuracy import accuracy
    from vsal.transforms.onnx_io import external_files

    info = manifest.graphs[name]
    src = package / info.file
    rel = variant_file(name, precision, build_id)
    written_folder(package, GRAPH_DIR)  # checked right before writing: never through a symlink
    dst = package / rel
    start = time.perf_counter()
    done = quantizer.convert(src, dst, (calibration or None) if uses_activations(quantizer) else None)
    applied = done.applied
    notes = done.summary
    removed = _carry_state(manifest, name, precisions.get(precision), dst) if applied else 0
    if removed:
        notes += f"; KV cache float16 at the boundary (-{removed} casts)"
    seconds = time.perf_counter() - start
    digest = sha256_file if applied else lambda f: ""  # a graph left as it was is removed unrecorded
    external = {str(f.relative_to(package)): digest(f) for f in external_files(dst)}
    feeds = checks.get(name) or _random_feeds(manifest, name)
    acc = accuracy(src, dst, feeds) if applied else {}
    cosine = min((v["cosine"] for v in acc.values()), default=1.0)
    max_err = max((v["max_abs_error"] for v in acc.values()), default=0.0)
    inputs, outputs = _own_interface(dst, info) if applied else ([], [])
    variant = VariantInfo(
        precision=precision,
        file=rel,
        sha256=digest(dst),
        external_data=external,
        accuracy={"cosine": cosine, "max_abs_error": max_err, "per_output": acc, "inputs": len(feeds)},
        notes=notes,
        inputs=inputs,
        outputs=outputs,
    )
    summary = {
        "cosine": cosine,
        "max_abs_error": max_err,
        "bytes": dst.stat().st_size + sum((package / f).stat().st_size for f in external),
        "fp32_bytes": src.stat().st_size + sum((package / f).stat().st_size for f in info.external_data),
        "seconds": round(seconds, 2),
        "notes": notes,
        "file": rel,
    }
    return GraphBuild(variant, summary, applied)


def _carry_state(manifest, name: str, precision: precisions.Precision, dst: Path) -> int:
    """The decoder's KV cache crosses the graph's boundary in the precision's activation type: a
    float16 decoder takes and returns it in float16 (half the cache's bytes and traffic per step;
    the same values, as the graph rounds it to float16 inside anyway). The Casts removed from `dst`."""
    if name != DECODER or precision.activation != "float16":
        return 0
    from vsal.transforms.fp16 import float16_boundary

    layout = manifest.kv_layout()
    return float16_boundary(dst, layout.past_names() + layout.present_names())


def _own_interface(dst: Path, info) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The variant's inputs and outputs as its ONNX header gives them, where a dtype differs from
    the graph's (recorded in the manifest, checked at load); ([], []) where none does."""
    from vsal.runtime.graph_header import read_graph_header

    header = read_graph_header(dst)
    dtypes = {t.name: t.dtype for t in (*header.inputs, *header.outputs)}
    own = [
        [TensorInfo(t.name, dtypes.get(t.name, t.dtype), list(t.shape)) for t in tensors]
        for tensors in (info.inputs, info.outputs)
    ]
    differs = any(
        a.dtype != b.dtype for mine, graph in zip(own, (info.inputs, info.outputs), strict=True)
        for a, b in zip(mine, graph, strict=True)
    )  # fmt: skip
    return (own[0], own[1]) if differs else ([], [])


def _build_engine(package: Path, manifest, name: str, precision: str, checks, workspace_bytes):
    """(engine record, accuracy): the graph's TensorRT engine on this machine (cached or built),
    checked against fp32 in ONNX Runtime."""
    from vsal.export.accuracy import as_declared, compare, session, worst_cosine
    from vsal.runtime.backends.tensorrt import TensorRTBackend

    info = manifest.graphs[name]
    written_folder(package, ENGINE_DIR)  # checked right before TensorRT writes the engine there
    backend = TensorRTBackend.for_graph(package, name, info, precision, workspace_bytes)
    cached = backend.cached
    reference = session(package / info.file)
    outputs = [t.name for t in info.outputs]
    feeds = checks.get(name) or _random_feeds(manifest, name)
    acc = compare(
        lambda f: reference.run(outputs, f),
        lambda f: [backend.run(as_declared(f, backend.info.inputs), outputs)[n] for n in outputs],
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
    return record, {
        "cosine": worst_cosine(acc),
        "max_abs_error": max(v["max_abs_error"] for v in acc.values()),
    }


def _random_feeds(manifest, name: str) -> list[dict[str, np.ndarray]]:
    """Feeds for graphs the held-out clips do not reach (the LLM): the spec's validation inputs."""
    from vsal.export.config import ModelConfig
    from vsal.export.specs import graph_specs

    spec = graph_specs(ModelConfig.from_dict(manifest.config))[name]
    rng = np.random.default_rng(0)
    return [spec.make_inputs(sizes, rng) for sizes in spec.validation_sizes()]


def _check(report: BuildReport, name: str, thresholds: Thresholds) -> None:
    cosine = report.graphs[name]["cosine"]
    if cosine < thresholds.min_cosine:
        shown = _below(cosine, thresholds.min_cosine)
        report.problems.append(f"{name}: cosine {shown} < {thresholds.min_cosine}")


def _below(value: float, limit: float) -> str:
    """`value` with as many digits as show it below `limit` (0.99999 is not "1.0000 < 0.99999")."""
    for digits in (4, 6, 9):
        text = f"{value:.{digits}f}"
        if float(text) < limit:
            return text
    return repr(value)


def token_agreement(
    package: Path,
    precision: str,
    clips: list[Path],
    engine: str = "onnxruntime",
    tokens: int = 16,
    manifest=None,
    verify: bool = True,
) -> dict[str, float]:
    """Greedy answers of the `precision` variants (run by `engine`) against fp32's in ONNX Runtime
    on the held-out clips. `manifest`: the variants a build has not recorded yet (default: the
    package's own). verify=False: the caller has checked the package's sha256 already."""
    from vsal.calib.collect import AUDIO_SUFFIXES
    from vsal.runtime.backends import choose_provider
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions

    options = DecodingOptions(num_beams=1, max_new_tokens=tokens, eos_token_id=None)
    from vsal.export.accuracy import large_graph_runners

    def answers(pipeline) -> list[list[int]]:
        found = []
        for clip in clips:
            kind = "audio" if clip.suffix.lower() in AUDIO_SUFFIXES else "video"
            found.append(
                pipeline.ask("What happens in this clip?", options=options, **{kind: clip}).token_ids
            )
        pipeline.close()  # one pipeline's graphs in memory at a time (13b: 8 GB of encoders each)
        return found

    reference = Pipeline.load(
        package,
        verbose=False,
        precision=precisions.EXPORTED,
        verify=verify,
        backend_factory=large_graph_runners(package),  # the 13B decoder a section at a time
    )
    wanted = answers(reference)
    del reference
    if manifest is None:
        variant = Pipeline.load(
            package,
            verbose=False,
            precision=precision,
            exact_precision=True,
            engine=engine,
            verify=verify,
            backend_factory=large_graph_runners(package),
        )
    else:
        provider = "cuda" if engine == "tensorrt" else choose_provider(None)
        variant = Pipeline(
            package,
            manifest,
            provider,
            verbose=False,
            precision=precision,
            engine=engine,
            backend_factory=large_graph_runners(package),  # the exported 13B decoder, if it runs
        )
        variant.exact_precision = True
    got_all = answers(variant)
    equal = total = exact = 0
    for want, got in zip(wanted, got_all, strict=True):
        equal += sum(a == b for a, b in zip(want, got, strict=False))
        total += len(want)
        exact += want == got
    return {
        "token_agreement": equal / max(total, 1),
        "exact_answers": exact / len(clips),
        "clips": len(clips),
    }


def _static_check(report: BuildReport, package: Path, names, precision: precisions.Precision) -> None:
    """`vsal-export check` on what this build made: is each graph expected to parse on TensorRT
    10 and 11 (from NVIDIA's documents; a note, the ONNX Runtime graphs work either way)."""
    from vsal.export.check import VERSIONS, check_package

    labels = [name if precision.is_export else f"{name}.{precision.name}" for name in names]
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
            f"TensorRT check (documents): all {len(labels)} {precision.name} graphs expected to parse on "
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
