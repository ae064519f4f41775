"""The backend registry and the runner base: a backend is one module and one registry row, every
runner's feeds are checked by the base, and each runner hands out its own decoder step."""

from __future__ import annotations

import numpy as np
import pytest
from vsal.runtime import backends
from vsal.runtime.backends import BackendError, BackendRow, HostTensor, Runner, open_backend, ort_session
from vsal.runtime.backends.onnx_runtime import BoundDecoderStep, OnnxRuntimeBackend
from vsal.runtime.errors import ConfigError
from vsal.runtime.generation import GraphDecoderStep
from vsal.runtime.manifest import load_manifest
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.prompt import DecodingOptions
from vsal.runtime.synthetic import write_tone

GREEDY = DecodingOptions(num_beams=1, max_new_tokens=4)


class CountingRunner(Runner):
    """A backend of its own: a plain ONNX Runtime session, counting the runs it was handed."""

    runs: list[str] = []
    closed: list[str] = []

    def __init__(self, folder, name, info, precision):
        file, got = info.file_for(precision)
        self.session = ort_session(folder / file)
        super().__init__(name, info, got, "counting runner")

    def input_names(self):
        return [i.name for i in self.session.get_inputs()]

    def output_names(self):
        return [o.name for o in self.session.get_outputs()]

    def _run(self, feeds, outputs):
        CountingRunner.runs.append(self.name)
        return dict(zip(outputs, self.session.run(outputs, dict(feeds)), strict=True))

    def close(self):
        CountingRunner.closed.append(self.name)


def open_counting(folder, name, info, precision, *, provider, threads, progress):
    return CountingRunner(folder, name, info, precision)


@pytest.fixture
def counting(monkeypatch):
    """The counting backend registered for one test (the registry is left as it was)."""
    monkeypatch.setitem(backends._ROWS, "counting", BackendRow(open_counting, lambda requested: "cpu"))
    CountingRunner.runs, CountingRunner.closed = [], []
    return "counting"


def test_the_registry_names_its_rows():
    assert backends.backend_names()[:2] == ("onnxruntime", "tensorrt")
    assert backends.backend_provider("tensorrt", None) == "cuda"
    with pytest.raises(ValueError, match="registered already"):
        backends.register_backend("onnxruntime", open_counting)


def test_an_unknown_backend_is_a_config_error_naming_the_choices(tiny_package):
    with pytest.raises(ConfigError, match="unknown backend 'nope'; choose onnxruntime or tensorrt"):
        Pipeline.load(tiny_package, engine="nope", verbose=False)
    info = load_manifest(tiny_package).graphs["mrc_qformer"]
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        open_backend("nope", tiny_package, "mrc_qformer", info, "fp32", provider="cpu")


def test_a_registered_backend_runs_the_package_with_checked_feeds(tiny_package, counting, tmp_path):
    pipeline = Pipeline.load(tiny_package, engine=counting, verbose=False)
    audio = write_tone(tmp_path / "a.wav", seconds=2.0)
    answer = pipeline.ask("What is it?", audio=audio, options=GREEDY)
    assert len(answer.token_ids) >= 1
    assert set(answer.backends.values()) == {"counting runner"}
    assert CountingRunner.runs.count("llm_decoder") == len(answer.token_ids)  # the host round trip
    assert isinstance(pipeline.decoder_step(), GraphDecoderStep)  # the base's step
    runner = pipeline.backend("mrc_qformer")
    before = len(CountingRunner.runs)
    with pytest.raises(BackendError, match="mrc_qformer: .*slot_mask is float64, expected float32"):
        runner.run({"av_features": np.zeros((1, 320, 768), np.float32), "slot_mask": np.ones((1, 10))})
    assert len(CountingRunner.runs) == before  # the base refused it: the backend never saw it


def test_runners_are_context_managers_and_keep_outputs_on_request(tiny_package, counting):
    info = load_manifest(tiny_package).graphs["beats_encoder"]
    with open_backend(counting, tiny_package, "beats_encoder", info, "fp32", provider="cpu") as runner:
        fbank = np.zeros((1, 100, 128), np.float32)  # F in [16, 2998]
        held = runner.run_device({"fbank": fbank})
        (name,) = held
        assert isinstance(held[name], HostTensor) and held[name].to_host().shape == held[name].shape
    assert CountingRunner.closed == ["beats_encoder"]


def test_onnx_runtime_keeps_outputs_and_the_cache_in_ort_values(tiny_package):
    manifest = load_manifest(tiny_package)
    info = manifest.graphs["beats_encoder"]
    with open_backend("onnxruntime", tiny_package, "beats_encoder", info, "fp32", provider="cpu") as runner:
        assert isinstance(runner, OnnxRuntimeBackend)
        fbank = np.random.default_rng(0).standard_normal((1, 100, 128)).astype(np.float32)
        held = runner.run_device({"fbank": fbank})
        plain = runner.run({"fbank": fbank})
        for name, tensor in held.items():
            assert tensor.shape == plain[name].shape and tensor.dtype == plain[name].dtype
            np.testing.assert_array_equal(tensor.to_host(), plain[name])
        with pytest.raises(BackendError, match="fbank is float64"):
            runner.run_device({"fbank": fbank.astype(np.float64)})
    decoder = open_backend(
        "onnxruntime", tiny_package, "llm_decoder", manifest.graphs["llm_decoder"], "fp32", provider="cpu"
    )
    assert isinstance(decoder.decoder_step(manifest.kv_layout()), BoundDecoderStep)


def test_low_memory_runs_weight_only_kernels_without_the_packed_copy(tiny_package):
    from vsal.runtime.backends.onnx_runtime import LOW_MEMORY_CONFIG

    info = load_manifest(tiny_package).graphs["llm_decoder"]
    key, value = next(iter(LOW_MEMORY_CONFIG.items()))
    low = open_backend(
        "onnxruntime", tiny_package, "llm_decoder", info, "fp32", provider="cpu", low_memory=True
    )
    plain = open_backend("onnxruntime", tiny_package, "llm_decoder", info, "fp32", provider="cpu")
    assert low.session.get_session_options().get_session_config_entry(key) == value
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default
        plain.session.get_session_options().get_session_config_entry(key)
