"""The command lines: the default job runs, user mistakes give one line and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_demo_answers_about_a_generated_clip(tiny_package):
    out = _run("vsal-export", "demo", "--package", str(tiny_package))
    assert out.returncode == 0, out.stderr
    assert "random weights" in out.stderr and "meaningless" in out.stderr
    assert "[24 tokens from 180 clip tokens]" in out.stderr
    assert out.stdout.strip()  # the streamed answer


def test_reference_json(tokenizer_assets, clip_10s):
    out = _run(
        "vsal-export",
        "reference",
        "--video",
        str(clip_10s),
        "--prompt",
        "Hi?",
        "--beams",
        "1",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["av_tokens"] == 180 and 1 <= len(result["token_ids"]) <= 3


def test_missing_video_is_one_line(tokenizer_assets, tmp_path):
    out = _run("vsal-export", "reference", "--video", str(tmp_path / "nope.mp4"), "--prompt", "x")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"vsal-export: error: {tmp_path / 'nope.mp4'}: no such file"
    assert "Traceback" not in out.stderr


def test_convert_of_a_bad_folder_names_what_is_missing(tmp_path):
    out = _run(
        "vsal-export",
        "convert",
        "--checkpoint-dir",
        str(tmp_path),
        "--output",
        str(tmp_path / "x.safetensors"),
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "missing eva_vit_g.pth" in out.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_presets_lists_parameter_counts():
    out = _run("vsal-export", "presets")
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == ["tiny", "small", "13b"]
    assert "15000.0M" in out.stdout or "14999.6M" in out.stdout


def test_vsal_probe(clip_10s):
    out = _run("vsal", "probe", str(clip_10s), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["clips"] == 10


def test_runtime_imports_without_torch():
    code = (
        "import sys, vsal.runtime, vsal.runtime.media, vsal.runtime.features, vsal.runtime.prompt, "
        "vsal.runtime.cli, vsal.runtime.synthetic, vsal.runtime.tokenizers, vsal.runtime.pipeline, "
        "vsal.runtime.backends, vsal.runtime.preprocess, vsal.runtime.generation, "
        "vsal.runtime.backends.onnx_runtime, vsal.runtime.backends.tensorrt, "
        "vsal.runtime.manifest, vsal.runtime.alignment, vsal.runtime.shapes\n"
        "from vsal.runtime import Pipeline\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
