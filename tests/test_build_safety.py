"""`vsal-export build` never leaves a false package: killed builds, builds below the thresholds,
concurrent builds, leftovers, and options checked before any model is built."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vsal.export.build import Thresholds, build
from vsal.export.package_update import FAULT_ENV, clean_leftovers
from vsal.runtime.errors import BuildError, ConfigError
from vsal.runtime.manifest import load_manifest, verify_files
from vsal.runtime.package_lock import PackageLock
from vsal.runtime.pipeline import Pipeline

EXE = Path(sys.executable).parent / "vsal-export"
GRAPH = "mrc_qformer"  # the fastest graph to rebuild


def _build_cli(folder: Path, precision: str, *extra: str, env: dict | None = None, **kwargs):
    args = [str(EXE), "build", str(folder), "--precision", precision, "--graphs", GRAPH, *extra]
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def _state(folder: Path) -> tuple[str, list[str]]:
    """The manifest's bytes and the graph files: what a build must leave alone or replace whole."""
    return (folder / "manifest.json").read_text(), sorted(p.name for p in (folder / "graphs").iterdir())


def _loads(folder: Path) -> None:
    """The package is whole: every file the manifest names is there with its sha256, and it loads."""
    manifest = load_manifest(folder)
    assert verify_files(manifest, folder) == []
    Pipeline.load(folder, verbose=False)


@pytest.fixture(scope="module")
def with_fp16(tiny_package, tmp_path_factory):
    """The tiny package with an fp16 variant of GRAPH (the 'old' state a later build replaces)."""
    folder = tmp_path_factory.mktemp("safety") / "tiny"
    shutil.copytree(tiny_package, folder)
    report = build(folder, "fp16", graphs=(GRAPH,), progress=False)
    assert report.recorded and report.problems == []
    return folder


@pytest.fixture
def package(with_fp16, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(with_fp16, copy)
    return copy


def test_kill_before_the_manifest_leaves_the_old_package(package):
    before = _state(package)
    old = load_manifest(package).graphs[GRAPH].variants["fp16"]
    proc = _build_cli(package, "fp16", env={FAULT_ENV: "variants-written"})
    proc.communicate(timeout=600)
    assert proc.returncode == -9  # SIGKILL, after the new variant was written
    manifest_text, files = _state(package)
    assert manifest_text == before[0]  # the manifest is exactly the old one
    assert load_manifest(package).graphs[GRAPH].variants["fp16"] == old
    orphans = sorted(set(files) - set(before[1]))
    assert len(orphans) == 1 and orphans[0].startswith(f"{GRAPH}.fp16.")  # the new, unrecorded file
    _loads(package)
    removed, ignored = clean_leftovers(package, load_manifest(package))  # what the next build does first
    assert removed == [f"graphs/{orphans[0]}"] and ignored == []
    assert _state(package) == before


def test_kill_after_the_manifest_leaves_the_new_package(package):
    before = load_manifest(package)
    proc = _build_cli(package, "fp16", env={FAULT_ENV: "manifest-written"})
    proc.communicate(timeout=600)
    assert proc.returncode == -9  # SIGKILL, after the manifest, before the old files were removed
    after = load_manifest(package)
    old, new = before.graphs[GRAPH].variants["fp16"], after.graphs[GRAPH].variants["fp16"]
    assert new.file != old.file and (package / old.file).is_file()  # the old file is an orphan now
    for name in set(after.graphs) - {GRAPH}:
        assert after.graphs[name] == before.graphs[name]
    _loads(package)
    out = subprocess.run([str(EXE), "check", str(package)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    removed, _ = clean_leftovers(package, after)
    assert removed == [old.file] and not (package / old.file).exists() and (package / new.file).is_file()
    _loads(package)


def test_a_rebuild_replaces_the_variant_and_removes_its_old_file(package):
    old = load_manifest(package).graphs[GRAPH].variants["fp16"]
    report = build(package, "fp16", graphs=(GRAPH,), progress=False)
    new = load_manifest(package).graphs[GRAPH].variants["fp16"]
    assert report.recorded and new.file != old.file and new.file.endswith(f".{report.build_id}.onnx")
    assert not (package / old.file).exists()
    _loads(package)


def test_below_the_thresholds_nothing_is_recorded(package):
    before = _state(package)
    proc = _build_cli(package, "fp16", "--min-cosine", "1.1")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err
    assert "nothing was recorded, the package is as it was" in err
    assert "BELOW THRESHOLD: mrc_qformer: cosine" in out and "NOT recorded in the manifest" in out
    assert _state(package) == before  # not one file more or less
    rejected = json.loads((package / "build_fp16.rejected.json").read_text())
    assert rejected["recorded"] is False and rejected["problems"]
    _loads(package)


def test_allow_below_records_and_marks_the_variant(package, capsys):
    report = build(
        package,
        "fp16",
        graphs=(GRAPH,),
        thresholds=Thresholds(min_cosine=1.1),
        progress=False,
        allow_below=True,
    )
    assert report.recorded and "WARNING: recording fp16 variants BELOW" in capsys.readouterr().err
    accuracy = load_manifest(package).graphs[GRAPH].variants["fp16"].accuracy
    assert accuracy["below_threshold"] is True and "mrc_qformer: cosine" in accuracy["problems"][0]
    assert not (package / "build_fp16.rejected.json").exists()
    _loads(package)


def test_concurrent_builds_are_both_recorded(tiny_package, tmp_path):
    folder = tmp_path / "pkg"
    shutil.copytree(tiny_package, folder)
    with PackageLock(folder, "test"):  # both builds start while the package is locked: both wait
        procs = [_build_cli(folder, p) for p in ("fp16", "int8")]
        for proc in procs:
            for line in proc.stderr:
                if "waiting for pid" in line:
                    break
            else:
                pytest.fail(f"no waiting message: {proc.communicate()}")
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
    variants = load_manifest(folder).graphs[GRAPH].variants
    assert set(variants) == {"fp16", "int8"}
    _loads(folder)


def test_leftovers_are_removed_and_foreign_files_left_alone(package):
    before = _state(package)
    graphs = package / "graphs"
    (graphs / f"{GRAPH}.int8.0123abcd.onnx").write_bytes(b"half")  # a variant no manifest names
    (graphs / f".{GRAPH}.fp16.89abcdef.onnx.partial").write_bytes(b"half")  # save_onnx's temporary
    (graphs / f".{GRAPH}.int8.0123abcd.onnx.x1y2").mkdir()  # quantize_int8's work folder
    (package / ".manifest.json.partial-999999999-00ff").write_text("{")  # a dead writer's manifest
    (graphs / "notes.txt").write_text("the user's")
    removed, ignored = clean_leftovers(package, load_manifest(package))
    assert len(removed) == 4 and ignored == ["graphs/notes.txt"]
    (graphs / "notes.txt").unlink()
    assert _state(package) == before


def test_unknown_graphs_and_no_variant_at_all_are_errors(package, monkeypatch):
    before = _state(package)
    with pytest.raises(ConfigError, match="--graphs: nope not in the package"):
        build(package, "fp16", graphs=("nope",), progress=False)
    import vsal.export.fp16 as fp16

    real = fp16.convert_fp16

    def unchanged(src, dst):  # a recipe that does not apply: the "variant" is the fp32 graph
        report = real(src, dst)
        report.casts_added, report.bytes_after = 0, report.bytes_before
        return report

    monkeypatch.setattr(fp16, "convert_fp16", unchanged)
    with pytest.raises(BuildError, match="none of the graphs mrc_qformer gets a fp16 variant"):
        build(package, "fp16", graphs=(GRAPH,), progress=False)
    assert _state(package) == before  # and the file it wrote is gone again


# --- options checked before any model is built ---------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any part of a model is built."""
    import vsal.export as export
    from vsal.export.models import video_salmonn

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(export, "build_model", refuse)
    monkeypatch.setattr(video_salmonn, "build_part", refuse)


def _export(*args):
    from click.testing import CliRunner
    from vsal.export.cli import cli

    return CliRunner().invoke(cli, ["export", *args])


def test_a_missing_checkpoint_is_refused_before_the_model(no_model, tmp_path):
    result = _export(
        "--preset",
        "13b",
        "--checkpoint",
        str(tmp_path / "missing.safetensors"),
        "--output",
        str(tmp_path / "out"),
    )
    assert "no such file (--checkpoint)" in str(result.exception)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}")
    result = _export("--checkpoint", str(bad), "--output", str(tmp_path / "out"))
    assert "not a readable safetensors file" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_an_incomplete_checkpoint_dir_is_refused_before_the_model(no_model, tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "whisper-large-v2").mkdir(parents=True)
    (folder / "vicuna-13b-v1.5").write_text("not a folder")
    for name in ("eva_vit_g.pth", "instruct_blip_vicuna13b_trimmed.pth", "pytorch_model_4_5001.pt"):
        (folder / name).write_bytes(b"PK\x03\x04")
    result = _export("--checkpoint-dir", str(folder), "--output", str(tmp_path / "out"))
    message = str(result.exception)
    assert "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt (BEATs iter3+ AS2M) missing" in message
    assert "vicuna-13b-v1.5: expected a folder" in message and "eva_vit_g" not in message


def test_an_existing_output_is_refused_before_the_model(no_model, tiny_package, tmp_path):
    result = _export("--preset", "tiny", "--output", str(tiny_package))
    assert "already exists (use --overwrite to replace it)" in str(result.exception)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("mine")
    result = _export("--output", str(tmp_path / "other"), "--overwrite")
    assert "it is not a vsal package" in str(result.exception)
    assert (tmp_path / "other" / "x").read_text() == "mine"
