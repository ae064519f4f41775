"""`vsal-export check`: will TensorRT 10 and 11 parse this package's graphs? Checked without a GPU.

Each graph of a model package is compared with TensorRT's *documented* ONNX support: the ONNX
parser's operator table (operator, data types, restrictions), its opset range, the data types it
accepts, and what TensorRT 11 removed (weak typing, implicit INT8 calibration). The package is
checked too: every file against its sha256, and every graph's inputs against the manifest (names,
dtypes, static dims, named dynamic axes, optimisation profiles). Nothing here runs TensorRT, so a
clean report means "expected to parse", never "verified on TensorRT": build on the target to know.

The check is a package: the documented tables (`tables`), the per-graph rules (`rules`), the
package's integrity (`integrity`) and the report (`report`); this module runs them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
from vsal.export.check.integrity import check_external_data, check_io, check_profile, runnable
from vsal.export.check.report import CheckReport, Finding, GraphReport, merge_versions
from vsal.export.check.rules import (
    check_model_validity,
    check_nodes,
    check_opset,
    check_precision,
    check_tensor_types,
    check_zero_points,
    infer,
)
from vsal.export.check.tables import BASIS, SOURCES, TABLES, TRT10, TRT11, VERSIONS, OpSupport, TrtTable
from vsal.runtime.manifest import GraphInfo, Manifest, load_manifest, verify_files


def check_package(folder: str | Path, only: set[str] | None = None) -> CheckReport:
    """Check a model package's files and graphs; PackageError if it has no readable manifest.

    `only`: just these graphs ("vision_encoder", "vision_encoder.int8", ...), without the package-wide
    sha256 pass (what `vsal-export build` checks of the graphs it has just written)."""
    folder = Path(folder)
    manifest = load_manifest(folder)  # raises PackageError (missing folder, corrupt manifest)
    report = CheckReport(str(folder))
    if only is None:
        problems = verify_files(manifest, folder)
        report.package += [Finding("error", "both", p) for p in problems]
        report.package += runnable(manifest, folder)
    for name, info in manifest.graphs.items():
        if only is None or name in only:
            report.graphs[name] = _check_graph(name, info, manifest, folder)
        for precision, variant in info.variants.items():  # what `vsal-export build` added
            if only is not None and f"{name}.{precision}" not in only:
                continue
            as_graph = replace(
                info.interface(precision),  # a variant's own I/O where it differs (fp16 KV cache)
                file=variant.file,
                sha256=variant.sha256,
                precision=precision,
                external_data=variant.external_data,
                variants={},
            )
            label = f"{name}.{precision}"
            report.graphs[label] = _check_graph(label, as_graph, manifest, folder)
        if only is None and info.fused:  # ONNX Runtime's own ops: never TensorRT's to parse
            fused = ", ".join(f"{name}.{p} ({v.file})" for p, v in info.fused.items())
            report.package.append(
                Finding(
                    "info", "both", f"fused ONNX Runtime variants, not for TensorRT (not checked): {fused}"
                )
            )
    return report


def main_check(folder: str | Path, as_json: bool) -> int:
    """Print the report (or its JSON); 0 when no errors, 1 otherwise. PackageError propagates."""
    import click

    report = check_package(folder)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    return 0 if report.ok else 1


def _check_graph(name: str, info: GraphInfo, manifest: Manifest, folder: Path) -> GraphReport:
    report = GraphReport(name, info.file)
    path = folder / info.file  # confined to the package by load_manifest (vsal.runtime.package_paths)
    if not path.is_file():
        report.add("error", "both", f"graph file {info.file} is missing: nothing else checked")
        return report
    try:
        # Weights stay on disk: ops, dtypes and shapes are all in the graph proto.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError
        report.add("error", "both", f"{info.file} is not a readable ONNX model ({type(exc).__name__}: {exc})")
        return report
    check_model_validity(model, path, report)
    check_opset(model, manifest, info, report)
    check_external_data(model, info, folder, report)
    inferred = infer(model, report)
    check_nodes(inferred, report)
    check_tensor_types(inferred, report)
    check_io(inferred.graph, info, report)
    check_profile(inferred.graph, info, report)
    check_precision(inferred, info, report)
    check_zero_points(model, report)
    merge_versions(report)
    return report


__all__ = [
    "BASIS",
    "CheckReport",
    "Finding",
    "GraphReport",
    "OpSupport",
    "SOURCES",
    "TABLES",
    "TRT10",
    "TRT11",
    "TrtTable",
    "VERSIONS",
    "check_package",
    "main_check",
]
