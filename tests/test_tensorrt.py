"""TensorRT engines: profiles, cache keys, refusal of foreign engines, the ORT TensorRT EP options,
and clear errors where TensorRT is missing. The engine build and the native backend themselves need
TensorRT and a GPU: `test_engines_match_onnxruntime` runs them there and is skipped here."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from vsal.runtime.backends import tensorrt_engines as te
from vsal.runtime.backends.onnx_runtime import tensorrt_ep_options
from vsal.runtime.errors import VsalError
from vsal.runtime.manifest import load_manifest

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def manifest(tiny_package):
    return load_manifest(tiny_package)


def test_profiles_follow_the_manifest_ranges(manifest):
    llm = te.input_profiles(manifest.graphs["llm_decoder"])
    # B 1..5 (opt 1), T 1..1024 (opt 256), P 0..1535 (opt 512); the mask is P+T wide at every level.
    assert llm["inputs_embeds"] == ((1, 1, 64), (1, 256, 64), (5, 1024, 64))
    assert llm["attention_mask"] == ((1, 1), (1, 768), (5, 2559))
    assert llm["past_key_values.0.key"] == ((1, 4, 0, 16), (1, 4, 512, 16), (5, 4, 1535, 16))
    vision = te.input_profiles(manifest.graphs["vision_encoder"])
    assert vision["pixel_values"][0][1:] == (3, 224, 224)
    for name, info in manifest.graphs.items():  # every graph: min <= opt <= max, one per input
        profiles = te.input_profiles(info)
        assert set(profiles) == {t.name for t in info.inputs}, name
        for lo, opt, hi in profiles.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), name


def test_ort_tensorrt_ep_gets_one_profile_and_caches(manifest, tmp_path):
    options = tensorrt_ep_options(manifest.graphs["vision_encoder"], "fp16", tmp_path)
    assert options["trt_profile_min_shapes"] == "pixel_values:1x3x224x224"
    assert options["trt_profile_max_shapes"] == "pixel_values:120x3x224x224"
    assert options["trt_fp16_enable"] == "True" and options["trt_int8_enable"] == "False"
    assert options["trt_engine_cache_path"] == str(tmp_path / "ort-tensorrt")
    assert options["trt_timing_cache_enable"] == "True"
    llm = tensorrt_ep_options(manifest.graphs["llm_decoder"], "int8", tmp_path)
    assert "attention_mask:5x2559" in llm["trt_profile_max_shapes"] and llm["trt_int8_enable"] == "True"


def _key(**kw):
    base = dict(graph="vision_encoder", precision="fp16", onnx_sha256="ab" * 32, tensorrt="10.3.0")
    return te.EngineKey(**{**base, "compute_capability": "8.7", **kw})


def _cache(folder, key, data=b"engine"):
    cache = folder / te.ENGINE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"{key.stem}.engine").write_bytes(data)
    (cache / f"{key.stem}.json").write_text(json.dumps({"key": key.__dict__, "build_seconds": 12.5}))


def test_cache_key_names_what_differs():
    here = _key()
    assert here.mismatch(_key()) is None
    assert "TensorRT 11.0.0, this machine has 10.3.0" in here.mismatch(_key(tensorrt="11.0.0"))
    assert "compute capability 9.0, this one is 8.7" in here.mismatch(_key(compute_capability="9.0"))
    assert "another version of the graph" in here.mismatch(_key(onnx_sha256="cd" * 32))
    assert here.stem == f"vision_encoder.fp16.{'ab' * 8}.trt10.3.0.sm87"


def test_foreign_engines_are_refused_with_the_reason(tmp_path):
    _cache(tmp_path, _key(tensorrt="11.0.0"))
    _cache(tmp_path, _key(compute_capability="9.0"))
    found, refused = te.find_engine(tmp_path, _key())
    assert found is None and len(refused) == 2
    assert any("refused, it was built by TensorRT 11.0.0" in r for r in refused)
    assert any("compute capability 9.0" in r for r in refused)
    _cache(tmp_path, _key())
    found, refused = te.find_engine(tmp_path, _key())
    assert found is not None and found.key == _key() and found.build_seconds == 12.5
    assert found.path.name.endswith(".sm87.engine")


def test_half_written_engines_are_not_trusted(tmp_path):
    key = _key()
    _cache(tmp_path, key)
    (tmp_path / te.ENGINE_DIR / f"{key.stem}.engine").unlink()  # record without its engine
    (tmp_path / te.ENGINE_DIR / "vision_encoder.fp16.x.json").write_text("{not json")
    found, refused = te.find_engine(tmp_path, key)
    assert found is None
    assert any("engine file is missing" in r for r in refused) and any("unreadable" in r for r in refused)


def test_a_foreign_engine_without_its_onnx_is_a_clear_error(tmp_path, manifest, monkeypatch):
    monkeypatch.setattr(te, "engine_key", lambda name, precision, sha, device=0: _key(onnx_sha256=sha))
    _cache(tmp_path, _key(tensorrt="11.0.0"))
    info = manifest.graphs["vision_encoder"]
    with pytest.raises(te.EngineError) as err:
        te.engine_for(tmp_path, "vision_encoder", info, "graphs/gone.onnx", "ab" * 32, "fp16", progress=False)
    message = str(err.value)
    assert "no fp16 engine for this machine" in message and "built by TensorRT 11.0.0" in message
    assert "graphs/gone.onnx is not in the package" in message


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_runtime_says_so(tiny_package, clip_10s):
    from vsal.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(tiny_package, engine="tensorrt", verbose=False, verify=False)
    with pytest.raises(VsalError, match="TensorRT is not installed here"):
        pipeline.ask("What happens?", video=clip_10s)
    with pytest.raises(ValueError, match="unknown backend"):
        Pipeline.load(tiny_package, engine="tensorrt-llm", verbose=False, verify=False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and a CUDA GPU (run scripts/gpu_check.py there)")
@pytest.mark.parametrize("precision", ["fp32"])
def test_engines_match_onnxruntime(tiny_package, clip_10s, precision, tmp_path):
    """On a GPU machine: every graph as a native engine equals ONNX Runtime CPU fp32 end to end."""
    import shutil

    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions

    package = tmp_path / "pkg"
    shutil.copytree(tiny_package, package)
    options = DecodingOptions(num_beams=1, max_new_tokens=8, eos_token_id=None)
    cpu = Pipeline.load(package, provider="cpu", precision=precision, verbose=False)
    trt = Pipeline.load(package, engine="tensorrt", precision=precision, verbose=False)
    want = cpu.ask("What happens?", video=clip_10s, options=options)
    got = trt.ask("What happens?", video=clip_10s, options=options)
    assert got.token_ids == want.token_ids
    features = trt.encode_media(clip_10s, None)[0]
    reference = cpu.encode_media(clip_10s, None)[0]
    assert np.allclose(features.image_embeds, reference.image_embeds, atol=1e-3)
    assert any(p.suffix == ".engine" for p in (package / te.ENGINE_DIR).iterdir())


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_cli_without_tensorrt_is_one_line(tiny_package, clip_10s):
    from tests.test_cli import _run

    run = _run(
        "vsal", "run", str(tiny_package), "--backend", "tensorrt", "--video", str(clip_10s), "--prompt", "hi"
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "vsal: error: TensorRT is not installed here" in run.stderr
    build = _run("vsal-export", "build", str(tiny_package), "--precision", "fp16", "--backend", "tensorrt")
    assert build.returncode == 2 and "--backend tensorrt: TensorRT is not installed here" in build.stderr


def test_ort_tensorrt_provider_session_arguments(manifest, tiny_package, monkeypatch):
    """With provider tensorrt, the session gets ONNX Runtime's SessionOptions and the TensorRT EP
    (with its options) before CUDA and the CPU (checked on a stand-in session: no GPU here)."""
    import onnxruntime as ort
    from vsal.runtime.backends.onnx_runtime import OnnxRuntimeBackend

    seen = {}

    class Session:
        def __init__(self, source, options, providers):
            seen.update(source=source, options=options, providers=providers)

        def get_providers(self):
            return ["TensorrtExecutionProvider"]

        def get_outputs(self):
            return []

    monkeypatch.setattr(ort, "InferenceSession", Session)
    info = manifest.graphs["vision_encoder"]
    backend = OnnxRuntimeBackend(
        "vision_encoder", tiny_package / info.file, info, "tensorrt", precision="fp32", cache_dir=tiny_package
    )
    assert isinstance(seen["options"], ort.SessionOptions)
    (name, options), cuda, cpu = seen["providers"]
    assert (name, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert options["trt_engine_cache_path"] == str(tiny_package / "ort-tensorrt")
    assert "TensorrtExecutionProvider" in backend.description
