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
from vsal.export.build import MAX_CLIPS_BYTES, Thresholds, build
from vsal.export.package_update import KILL_AT_ENV, clean_leftovers, written_folder
from vsal.runtime.errors import BuildError, ConfigError, PackageError
from vsal.runtime.manifest import load_manifest, save_manifest, verify_files
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
    proc = _build_cli(package, "fp16", env={KILL_AT_ENV: "variants-written"})
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
    proc = _build_cli(package, "fp16", env={KILL_AT_ENV: "manifest-written"})
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
    proc = _build_cli(package, "fp16", "--min-cosine", "1.0")
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
        thresholds=Thresholds(min_cosine=1.0),
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
    import vsal.transforms.fp16 as fp16

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
    assert "missing BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt (BEATs iter3+ AS2M)" in message
    assert "vicuna-13b-v1.5: expected a folder" in message and "eva_vit_g" not in message


def test_an_existing_output_is_refused_before_the_model(no_model, tiny_package, tmp_path):
    result = _export("--preset", "tiny", "--output", str(tiny_package))
    assert "already exists (use --overwrite to replace it)" in str(result.exception)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("mine")
    result = _export("--output", str(tmp_path / "other"), "--overwrite")
    assert "it is not a vsal package" in str(result.exception)
    assert (tmp_path / "other" / "x").read_text() == "mine"


# --- the build writes and removes only inside the package ---------------------------------------------


@pytest.mark.parametrize("folder", ["graphs", "calibration", "engines"])
def test_a_build_never_cleans_or_writes_through_a_symlinked_folder(package, tmp_path, folder):
    """The reproduced attack: graph files moved to g/, `graphs -> ../victim`; the build's cleanup
    would delete victim/beats_encoder.int8.onnx and write its variants there."""
    victim = tmp_path / "victim"
    victim.mkdir()
    planted = ["beats_encoder.int8.onnx", ".x.onnx.partial", ".y.partial-999999999-00ff"]
    for name in planted:
        (victim / name).write_text("precious")
    manifest = load_manifest(package)  # read before the link is planted (a race, or another caller)
    if folder == "graphs":
        shutil.move(package / "graphs", package / "g")
        data = json.loads((package / "manifest.json").read_text())
        for info in data["graphs"].values():
            info["file"] = "g/" + info["file"].removeprefix("graphs/")
            for variant in info.get("variants", {}).values():
                variant["file"] = "g/" + variant["file"].removeprefix("graphs/")
        (package / "manifest.json").write_text(json.dumps(data))
    else:
        shutil.rmtree(package / folder, ignore_errors=True)
    (package / folder).symlink_to(victim)
    match = f"{folder}: the .* must be a folder inside the package, not a symlink"
    with pytest.raises(PackageError, match=match):
        clean_leftovers(package, manifest)
    with pytest.raises(PackageError, match=match):
        written_folder(package, folder)
    with pytest.raises(PackageError, match=match):
        build(package, "fp16", graphs=(GRAPH,), progress=False)
    proc = _build_cli(package, "fp16")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("vsal-export: error: ") and "not a symlink" in err
    assert sorted(p.name for p in victim.iterdir()) == sorted(planted)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("fifo", "the calibration clip list is a FIFO"),
        ("/dev/zero", "the calibration clip list resolves to /dev/zero, outside the package"),
        ("huge", "larger than 1 MiB"),
        ('{"held_out": []}', r'"clips" must be a list of at least 2 file names, got null'),
        ('{"clips": [1, 2]}', r'"clips" must be a list of at least 2 file names, got \[1, 2\]'),
        ('["a.wav", "b.wav"]', "holds JSON an array, expected an object"),
        ("[" * 100_000, "JSON nested deeper than 32 levels"),
        ("{not json", "not valid JSON"),
    ],
)
def test_stored_clip_list_is_checked_before_and_after_reading(package, content, match):
    clips = package / "calibration" / "clips.json"
    clips.parent.mkdir(exist_ok=True)
    if content == "fifo":
        os.mkfifo(clips)  # reading it would block the build forever
    elif content == "/dev/zero":
        clips.symlink_to(content)  # reading it would never end
    elif content == "huge":
        clips.write_text('{"clips": [' + " " * MAX_CLIPS_BYTES + "]}")
    else:
        clips.write_text(content)
    before = _state(package)
    with pytest.raises(PackageError, match=f"calibration/clips.json: .*{match}") as caught:
        build(package, "int8", graphs=(GRAPH,), progress=False)
    assert "\n" not in str(caught.value)
    assert _state(package) == before


# --- the manifest's one writer, the lock's messages --------------------------------------------------


def test_save_manifest_is_durable_and_leaves_no_temporary(package, monkeypatch):
    before = (package / "manifest.json").read_text()
    manifest = load_manifest(package)
    manifest.preset = "changed"

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_manifest(manifest, package)
    assert (package / "manifest.json").read_text() == before
    assert not [p for p in package.iterdir() if p.name.startswith(".manifest.json")]
    monkeypatch.undo()
    save_manifest(manifest, package)
    assert load_manifest(package).preset == "changed"
    assert not [p for p in package.iterdir() if p.name.startswith(".manifest.json")]


def test_lock_holder_is_named_or_called_another_process(package):
    import fcntl

    with PackageLock(package, "vsal-export build --precision fp16"):
        with pytest.raises(
            BuildError, match=r"being changed by pid \d+ \(vsal-export build --precision fp16\);"
        ):
            PackageLock(package, "second", wait=False).__enter__()
    fd = os.open(package / ".vsal.lock", os.O_RDWR)  # a holder that has not written itself yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        with pytest.raises(BuildError, match="being changed by another process; wait"):
            PackageLock(package, "second", wait=False).__enter__()
    finally:
        os.close(fd)


# --- options: a value that would turn a check off is refused ----------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("--opset", "99999"),  # above what torch.onnx exports
        ("--opset", "17"),  # below: torch.onnx would keep 18 for some graphs
        ("--graphs", ""),  # not "every graph"
        ("--graphs", "llm_decoder,,vision_encoder"),
    ],
)
def test_export_refuses_opsets_and_graph_lists_before_the_model(no_model, tmp_path, option, value):
    result = _export("--output", str(tmp_path / "out"), option, value)
    assert result.exit_code == 2 and "Invalid value for" in result.output and option in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value",
    [
        ("--min-cosine", "nan"),  # `cosine < nan` is never true: the gate would be off
        ("--min-cosine", "1.5"),
        ("--min-token-agreement", "-1"),
        ("--min-token-agreement", "inf"),
        ("--workspace-mib", "99999999999999999999"),
        ("--graphs", ""),
    ],
)
def test_build_refuses_thresholds_outside_0_to_1_before_touching_the_package(package, option, value):
    before = _state(package)
    proc = _build_cli(package, "fp16", option, value)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Invalid value for" in err and option in err, err
    assert _state(package) == before


@pytest.mark.parametrize("field", ["min_cosine", "min_token_agreement"])
@pytest.mark.parametrize("value", [float("nan"), -0.01, 1.01, float("inf"), "0.9", True])
def test_thresholds_in_the_python_api_are_numbers_from_0_to_1(field, value):
    with pytest.raises(ConfigError, match="expected a number from 0 to 1"):
        Thresholds(**{field: value})


@pytest.mark.parametrize("workspace", [0, 1 << 19, (1 << 40) + 1, 2.5])
def test_build_refuses_a_workspace_outside_1_mib_to_1_tib(package, workspace):
    before = _state(package)
    with pytest.raises(ConfigError, match="--workspace-mib"):
        build(package, "fp16", graphs=(GRAPH,), engines=True, workspace_bytes=workspace, progress=False)
    assert _state(package) == before


# --- calibration media: every skipped file is named ---------------------------------------------------


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """Two short clips and one corrupt file (a cut mp4 header)."""
    from vsal.runtime.synthetic import write_clip

    folder = tmp_path_factory.mktemp("media")
    for name in ("a.mp4", "b.mp4"):
        write_clip(folder / name, seconds=2.0, size=(96, 96))
    (folder / "c.mp4").write_bytes((folder / "a.mp4").read_bytes()[:600])
    return folder


def test_media_files_names_each_skipped_file(media_dir, capsys):
    from vsal.calib.collect import media_files

    assert [p.name for p in media_files(media_dir)] == ["a.mp4", "b.mp4"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"vsal-export: note: skipped {media_dir / 'c.mp4'}: ")
    assert "not a media file FFmpeg can read" in err[0]


def test_too_few_readable_media_files_is_an_error(media_dir, tmp_path):
    from vsal.calib.collect import media_files
    from vsal.runtime.errors import MediaError

    shutil.copy(media_dir / "a.mp4", tmp_path / "a.mp4")
    shutil.copy(media_dir / "c.mp4", tmp_path / "c.mp4")
    skipped = []
    with pytest.raises(MediaError, match="1 readable media file.s. of 2; calibration needs at least 2"):
        media_files(tmp_path, on_skip=lambda path, why: skipped.append(path.name))
    assert skipped == ["c.mp4"]


def test_calibrate_cli_says_which_file_it_skipped(package, media_dir):
    done = subprocess.run(
        [str(EXE), "calibrate", str(package), "--media", str(media_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert f"vsal-export: note: skipped {media_dir / 'c.mp4'}: not a media file" in done.stderr
    clips = json.loads((package / "calibration" / "clips.json").read_text())["clips"]
    assert [Path(c).name for c in clips] == ["a.mp4", "b.mp4"]
