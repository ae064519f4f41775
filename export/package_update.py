"""Changing a built package in one step: new files under new names, one manifest rename, then cleanup.

A build writes each variant to a name no manifest has used (`graphs/<graph>.<precision>.<build id>.onnx`
and its `.data`), so nothing the current manifest names is ever touched. `commit` then re-reads the
manifest (under the package lock), merges the new variants and engine records in, and replaces
`manifest.json` durably; only after that are the files of the replaced variants removed. A kill at
any point leaves the old manifest with its old files (intact), or the new manifest with its new
files: at worst some unnamed files, which `clean_leftovers` removes at the next build. Torch-free.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from vsal.runtime import precisions
from vsal.runtime.manifest import (
    CALIBRATION_DIR,
    ENGINE_DIR,
    GRAPH_DIR,
    WRITTEN_FOLDERS,
    Manifest,
    VariantInfo,
    load_manifest,
    save_manifest,
)
from vsal.runtime.package_lock import LOCK_NAME, fsync_folder, stale_partial
from vsal.runtime.package_paths import package_folder

# Temporary names of earlier vsal versions' writers: `.<name>.partial` / `.<name>.data.partial`,
# save_calibration's `.<name>.partial.npz`, the manifest's `.manifest.json.partial` (today every
# writer goes through package_lock.replacing, whose names `stale_partial` recognises; and
# quantize_int8 stages in a `.<name>.<random>/` folder).
_OLD_PARTIAL = re.compile(r"^\..+\.partial(\.npz)?$")


def variant_file(name: str, precision: str, build_id: str, fused: bool = False) -> str:
    """The package-relative file of a new variant (or fused variant): a name no earlier build used."""
    return f"{GRAPH_DIR}/{name}.{precision}.{build_id}{FUSED_SUFFIX if fused else ''}.onnx"


FUSED_SUFFIX = ".fused"  # in a fused variant's file name, before .onnx


@dataclass
class Update:
    """What one build adds: per graph its new variant and engine records, and the files it wrote."""

    precision: str
    variants: dict[str, VariantInfo] = field(default_factory=dict)
    fused: dict[str, VariantInfo] = field(default_factory=dict)  # graph -> its fused variant
    engines: dict[str, list[dict]] = field(default_factory=dict)  # graph -> records to add or replace
    written: list[Path] = field(default_factory=list)  # new files, removed again if not recorded
    committed: bool = False  # the manifest names them now: never discard

    def discard(self) -> None:
        if self.committed:
            return
        for path in self.written:
            path.unlink(missing_ok=True)


def commit(package: Path, update: Update) -> list[str]:
    """Record `update` in the package's manifest (re-read now: the caller holds the lock), in one
    durable rename; then remove the files of the variants it replaced. Returns those files."""
    manifest = load_manifest(package)
    replaced = []
    for key in ("variants", "fused"):
        for name, variant in getattr(update, key).items():
            recorded = getattr(manifest.graphs[name], key)
            old = recorded.get(update.precision)
            if old is not None:
                replaced += [old.file, *old.external_data]
            recorded[update.precision] = variant
    for name, records in update.engines.items():
        files = {r["file"] for r in records}
        info = manifest.graphs[name]
        info.engines = [e for e in info.engines if e.get("file") not in files] + records
    save_manifest(manifest, package)
    update.committed = True
    kill_point("manifest-written")
    named = set(manifest.files())
    removed = [rel for rel in replaced if rel not in named and _remove_variant_file(package, rel)]
    if removed:
        fsync_folder(package / GRAPH_DIR)
    return removed


def clean_leftovers(package: Path, manifest: Manifest) -> tuple[list[str], list[str]]:
    """(removed, ignored): files that interrupted runs left in the package. Call under the lock.

    Removed: temporary files of our writers, and variant files (our naming) that the manifest does
    not name. Ignored: anything else in graphs/ that the manifest does not name (not ours to delete).
    Folders that are symlinks are refused (PackageError), never globbed or cleaned through.
    """
    named = set(manifest.files())
    removed, ignored = [], []
    folders = {name: package_folder(package, name, role) for name, role in WRITTEN_FOLDERS.items()}
    for name in (None, CALIBRATION_DIR, ENGINE_DIR):
        folder = package if name is None else folders[name]
        for path in sorted(folder.glob(".*")) if folder is not None else []:
            if path.name == LOCK_NAME:
                continue
            if stale_partial(path) or (name != ENGINE_DIR and _OLD_PARTIAL.match(path.name)):
                _remove(path)
                removed.append(str(path.relative_to(package)))
    graphs = folders[GRAPH_DIR]
    ours = _variant_pattern(manifest)
    for path in sorted(graphs.iterdir()) if graphs is not None else []:
        rel = f"{GRAPH_DIR}/{path.name}"
        if rel in named:
            continue
        if ours.match(path.name) or (path.name.startswith(".") and ours.match(path.name[1:])):
            _remove(path)
            removed.append(rel)
        else:
            ignored.append(rel)
    return removed, ignored


def written_folder(package: Path, name: str) -> Path:
    """One of the package's WRITTEN_FOLDERS, made if absent, checked (lstat) to be a real folder
    right before a writer puts files in it: a symlink planted there is refused, never written through."""
    path = package_folder(package, name, WRITTEN_FOLDERS[name])
    if path is None:
        path = package / name
        path.mkdir()  # never follows a link: one planted meanwhile makes it fail
    return path


def _variant_pattern(manifest: Manifest) -> re.Pattern:
    """Names our builds give variant files and their temporaries (`<graph>.<precision>[.<id>].onnx`,
    `.data`, `.partial`, quantize_int8's work folder), for every registered variant precision."""
    graphs = "|".join(re.escape(g) for g in manifest.graphs)
    variants = "|".join(re.escape(p) for p in (*precisions.variant_names(), precisions.EXPORTED))
    fused = re.escape(FUSED_SUFFIX)
    return re.compile(rf"^({graphs})\.({variants})(\.[0-9a-f]+)?({fused})?\.onnx(\.data)?(\.partial|\..+)?$")


def _remove_variant_file(package: Path, rel: str) -> bool:
    """Remove a file a replaced variant named, only if it lies directly in the package's graphs/
    (a real folder, never a symlink: a manifest from elsewhere must not make a build delete files
    outside the package)."""
    graphs = package_folder(package, GRAPH_DIR, WRITTEN_FOLDERS[GRAPH_DIR])
    path = Path(os.path.abspath(package / rel))
    if graphs is None or path.parent != Path(os.path.abspath(graphs)) or not os.path.lexists(path):
        return False
    if os.path.isdir(path) and not os.path.islink(path):
        return False
    path.unlink()
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# For the killed-build tests only (tests/test_build_safety.py): they kill a build at a known step to
# show that a kill anywhere leaves a package a later run accepts. Nothing else sets it.
KILL_AT_ENV = "VSAL_TEST_KILL_BUILD_AT"


def kill_point(step: str) -> None:
    """VSAL_TEST_KILL_BUILD_AT=<step> makes the build SIGKILL itself here (the kill tests)."""
    if os.environ.get(KILL_AT_ENV) == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
