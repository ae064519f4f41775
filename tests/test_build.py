"""`vsal-export build`: fp16 and int8 variants of the tiny package, their report, the runtime using them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vsal.export.build import Thresholds, build
from vsal.runtime.manifest import load_manifest, verify_files
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.prompt import DecodingOptions


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
