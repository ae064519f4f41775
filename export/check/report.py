"""What `vsal-export check` found: findings per graph and for the package, as text or JSON."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from vsal.export.check.tables import BASIS, SOURCES, VERSIONS


@dataclass
class Finding:
    level: str  # "error" | "warning" | "info"
    version: str  # "10" | "11" | "both"
    message: str


@dataclass
class GraphReport:
    name: str
    file: str
    opset: int | None = None
    nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)  # "Op" or "domain:Op" -> count
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, version: str, message: str) -> None:
        self.findings.append(Finding(level, version, message))

    def errors(self, version: str | None = None) -> list[Finding]:
        return [
            f
            for f in self.findings
            if f.level == "error" and (version is None or f.version in (version, "both"))
        ]

    def parses(self, version: str) -> bool:
        """Expected (from the documents) to parse and build on TensorRT `version`."""
        return not self.errors(version)


@dataclass
class CheckReport:
    folder: str
    package: list[Finding] = field(default_factory=list)  # integrity and manifest-level findings
    graphs: dict[str, GraphReport] = field(default_factory=dict)
    basis: str = BASIS

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.package) and all(
            not g.errors() for g in self.graphs.values()
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "ok": self.ok,
            "basis": self.basis,
            "sources": SOURCES,
            "package": [asdict(f) for f in self.package],
            "graphs": {
                name: {**asdict(g), "parses": {v: g.parses(v) for v in VERSIONS}}
                for name, g in self.graphs.items()
            },
        }

    def format(self) -> str:
        lines = [f"vsal-export check {self.folder}", f"  ({self.basis})", ""]
        errors = [f for f in self.package if f.level == "error"]
        lines.append(
            "package: " + ("files match the manifest" if not errors else f"{len(errors)} problem(s)")
        )
        lines += [_format_finding(f) for f in self.package]
        for g in self.graphs.values():
            opset = f"opset {g.opset}" if g.opset is not None else "opset ?"
            lines += ["", f"{g.name}  ({g.file}, {opset}, {g.nodes} nodes, {len(g.op_counts)} op types)"]
            if g.op_counts:
                lines.append("  ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(g.op_counts.items())))
            verdicts = []
            for v in VERSIONS:
                count = len(g.errors(v))
                verdicts.append(f"TensorRT {v}: " + ("yes" if not count else f"no ({count} error(s))"))
            lines.append("  expected to parse and build: " + "; ".join(verdicts))
            order = {"error": 0, "warning": 1, "info": 2}
            lines += [_format_finding(f) for f in sorted(g.findings, key=lambda f: order[f.level])]
        n_err = sum(f.level == "error" for f in self._all())
        n_warn = sum(f.level == "warning" for f in self._all())
        verdict = "OK" if self.ok else "PROBLEMS"
        lines += [
            "",
            f"result: {verdict} ({n_err} error(s), {n_warn} warning(s)); documents, not a real TensorRT",
        ]
        return "\n".join(lines)

    def _all(self) -> Iterator[Finding]:
        yield from self.package
        for g in self.graphs.values():
            yield from g.findings


def _format_finding(f: Finding) -> str:
    where = "TRT 10+11" if f.version == "both" else f"TRT {f.version}"
    return f"  {f.level:7s} [{where}] {f.message}"


def merge_versions(report: GraphReport) -> None:
    """One finding for both versions where 10 and 11 say the same thing; no duplicates."""
    by_key: dict[tuple[str, str], set[str]] = {}
    order: list[tuple[str, str]] = []
    for f in report.findings:
        key = (f.level, f.message)
        if key not in by_key:
            by_key[key] = set()
            order.append(key)
        by_key[key].add(f.version)
    merged = []
    for level, message in order:
        versions = by_key[(level, message)]
        if "both" in versions or versions >= set(VERSIONS):
            merged.append(Finding(level, "both", message))
        else:
            merged += [Finding(level, v, message) for v in VERSIONS if v in versions]
    report.findings = merged
