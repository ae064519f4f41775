"""`vsal-export build`: fp16 and int8 variants of the tiny package, their report, the runtime using
them; the calibration inputs `vsal-export calibrate` stored; the package hashed once per build."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from vsal.calib.collect import STORED_GRAPHS
from vsal.export.build import Thresholds, build, calibrate
from vsal.runtime.errors import PackageError
from vsal.runtime.manifest import load_manifest, verify_files
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.prompt import DecodingOptions

GRAPH = "mrc_qformer"  # the fastest graph to rebuild


@pytest.fixture(scope="module")
def built(tiny_package, tmp_path_factory):
    folder = tmp_path_factory.mktemp("build") / "tiny"
    shutil.copytree(tiny_package, folder)
    reports = {p: build(folder, p, progress=False) for p in ("fp16", "int8")}
    return folder, reports


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variants_are_recorded_checked_and_accurate(built, precision):
    folder, reports = built
    report = reports[precision]
    manifest = load_manifest(folder)
    assert verify_files(manifest, folder) == []
    for name, graph in manifest.graphs.items():
        variant = graph.variants[precision]
        assert (folder / variant.file).is_file() and variant.file != graph.file
        assert variant.accuracy["cosine"] >= 0.99, (name, variant.accuracy)
    assert report.problems == []
    assert report.end_to_end["token_agreement"] >= 0.5
    saved = json.loads((folder / f"build_{precision}.json").read_text())
    assert set(saved["graphs"]) == set(manifest.graphs)
    assert any("TensorRT is not installed" in n for n in report.notes)  # nothing pretends to be an engine
    assert report.engines == {} and not (folder / "engines").exists()
    assert f"all 6 {precision} graphs expected to parse on TensorRT 10 and 11" in " ".join(report.notes)


def test_int8_shrinks_the_decoder_and_runs_on_cpu(built):
    folder, reports = built
    assert (
        reports["int8"].graphs["llm_decoder"]["bytes"]
        < 0.4 * reports["int8"].graphs["llm_decoder"]["fp32_bytes"]
    )
    pipeline = Pipeline.load(folder, verbose=False)  # CPU: int8 when built
    assert pipeline.backend("vision_encoder").precision == "int8"


def test_fp16_is_for_gpus(built):
    folder, _ = built
    pipeline = Pipeline.load(folder, verbose=False, precision="fp16")
    assert pipeline.backend("mrc_qformer").precision == "fp32"  # the CPU runs fp32 instead, and says so


def test_the_runtime_answers_with_int8_graphs(built, clip_10s):
    folder, _ = built
    answer = Pipeline.load(folder, verbose=False, precision="int8").ask(
        "What is it?", video=clip_10s, options=DecodingOptions(num_beams=1, max_new_tokens=4)
    )
    assert len(answer.token_ids) == 4 and answer.av_tokens == 180


def test_a_build_below_threshold_fails_loudly(built, tmp_path):
    folder, _ = built
    copy = tmp_path / "pkg"
    shutil.copytree(folder, copy)
    report = build(
        copy, "fp16", graphs=("mrc_qformer",), thresholds=Thresholds(min_cosine=1.0), progress=False
    )
    assert any("mrc_qformer: cosine" in p for p in report.problems)
    exe = Path(sys.executable).parent / "vsal-export"
    out = subprocess.run(
        [
            str(exe),
            "build",
            str(copy),
            "--precision",
            "fp16",
            "--graphs",
            "mrc_qformer",
            "--min-cosine",
            "1.0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (
        out.returncode == 1
        and "below its accuracy thresholds" in out.stderr
        and "Traceback" not in out.stderr
    )


# --- a build hashes each file once --------------------------------------------------------------------


@pytest.fixture
def hashes(monkeypatch):
    """Every sha256_file call of every vsal module, counted per file (resolved path)."""
    from vsal.runtime import manifest

    counts: Counter[str] = Counter()
    real = manifest.sha256_file

    def counted(path):
        counts[str(Path(path).resolve())] += 1
        return real(path)

    for module in list(sys.modules.values()):
        if (
            getattr(module, "__name__", "").startswith("vsal.")
            and getattr(module, "sha256_file", None) is real
        ):
            monkeypatch.setattr(module, "sha256_file", counted)
    return counts


def test_a_build_hashes_each_file_once(tiny_package, tmp_path, hashes):
    """Before: an int8 build hashed the exported files 3 times (both clip collections and the token
    agreement's reference loaded the package verified), fp16 twice."""
    folder = tmp_path / "pkg"
    shutil.copytree(tiny_package, folder)
    report = build(folder, "int8", graphs=(GRAPH,), progress=False)
    assert report.recorded
    files = {str((folder / f).resolve()) for f in load_manifest(folder).files()}
    assert set(hashes) == files and max(hashes.values()) == 1, hashes


# --- calibrate stores the inputs, build reads them -------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from vsal.calib.collect import synthetic_media

    return synthetic_media(tmp_path_factory.mktemp("clips"), count=3)  # 2 to calibrate, 1 held out


@pytest.fixture(scope="module")
def calibrated(tiny_package, tmp_path_factory, clips):
    folder = tmp_path_factory.mktemp("calibrated") / "tiny"
    shutil.copytree(tiny_package, folder)
    paths = calibrate(folder, clips, progress=False)
    assert sorted(paths) == sorted(STORED_GRAPHS)  # the encoders and the decoder's prefills
    return folder


@pytest.fixture
def package(calibrated, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(calibrated, copy)
    return copy


@pytest.fixture
def collected(monkeypatch):
    """The labels of the clip sets the fp32 pipeline ran over."""
    import vsal.calib.collect as collect

    labels, real = [], collect.collect

    def spy(package, clips, progress=True, label="calibration clips", verify=True, **kwargs):
        labels.append(label)
        return real(package, clips, progress, label, verify, **kwargs)

    monkeypatch.setattr(collect, "collect", spy)
    return labels


def test_build_reads_the_stored_calibration_inputs(package, collected):
    stored = build(package, "int8", graphs=(GRAPH,), progress=False)
    assert stored.recorded and collected == ["held-out clips"]  # the calibration clips did not run again
    assert f"calibration inputs from {package / 'calibration'} (recorded by `vsal-export calibrate`)" in (
        stored.notes
    )
    variant = load_manifest(package).graphs[GRAPH].variants["int8"]
    index = package / "calibration" / "inputs.json"
    data = json.loads(index.read_text())
    data["recorded_on"]["graphs/vision_encoder.onnx"] = "0" * 64  # as if re-exported since
    index.write_text(json.dumps(data))
    collected.clear()
    again = build(package, "int8", graphs=(GRAPH,), progress=False)
    assert collected == ["calibration clips", "held-out clips"]
    assert any("recorded on other graphs or by another vsal" in n for n in again.notes)
    assert load_manifest(package).graphs[GRAPH].variants["int8"].sha256 == variant.sha256  # the same inputs


def test_a_changed_clip_is_recorded_again(package, clips, collected):
    """The index names the clips by path, size and mtime: a clip replaced under its name since
    `vsal-export calibrate` is another clip, its stored inputs are not used."""
    clip = clips[0]
    before = os.stat(clip)
    os.utime(clip, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        again = build(package, "int8", graphs=(GRAPH,), progress=False)
    finally:
        os.utime(clip, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert collected == ["calibration clips", "held-out clips"]
    assert any("or on other clips or settings" in n for n in again.notes), again.notes


def _npy(header: dict, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + data


@pytest.mark.parametrize(
    "damage", ["not a zip", "foreign array", "huge header", "compressed", "huge count", "a feed short"]
)
def test_a_broken_calibration_store_is_refused(package, damage):
    path = package / "calibration" / f"{GRAPH}.npz"
    if damage == "not a zip":
        path.write_bytes(b"PK\x03\x04 cut short")
        want = "not a calibration set"
    elif damage == "foreign array":
        np.savez(path, **{"0/av_features": np.zeros((1, 2), np.float32), "0/payload": np.zeros(3)})
        want = "array '0/payload' is not <feed>/<input> of mrc_qformer's"
    elif damage in ("huge header", "compressed"):
        # 200 bytes that would make numpy allocate 36 TiB, or 1 MiB of zeros deflated to 1 KiB
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if damage == "compressed" else 0) as z:
            header = {"descr": "<f4", "fortran_order": False, "shape": (10**13,)}
            if damage == "compressed":
                header["shape"] = (1 << 18,)
            z.writestr(
                "0/av_features.npy", _npy(header, b"\0" * (16 if damage == "huge header" else 1 << 20))
            )
        want = "not a calibration set (member '0/av_features.npy' "
    else:
        index = package / "calibration" / "inputs.json"
        data = json.loads(index.read_text())
        if damage == "huge count":
            want = f"feed {data['feeds'][GRAPH]} "  # the first feed past those stored
            data["feeds"][GRAPH] = 10**15  # a list of that many feeds would never fit
            index.write_text(json.dumps(data))
        else:
            with np.load(path) as stored:
                arrays = {k: stored[k] for k in stored.files if not k.startswith("0/")}
            np.savez(path, **arrays)
            want = "feed 0 "
    manifest_before = (package / "manifest.json").read_text()
    with pytest.raises(PackageError) as caught:
        build(package, "int8", graphs=(GRAPH,), progress=False)
    assert str(caught.value).startswith(f"{path}: {want}"), caught.value
    assert (package / "manifest.json").read_text() == manifest_before
