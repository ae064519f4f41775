"""A package whose decoder is exported streaming (the 13b path: `ExportSource.llm_weights`), at the
tiny preset's size: float16 weights from a per-tensor source, validated layer by layer, answering."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from vsal.export import presets
from vsal.export.package import (
    STREAM_LLM_BYTES,
    ExportSource,
    TokenizerFiles,
    export_package,
    streamed_llm_weights,
)
from vsal.export.streaming import EMBEDDINGS, RandomWeights
from vsal.runtime.manifest import load_manifest, verify_files
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.prompt import DecodingOptions
from vsal.runtime.synthetic import write_tone

TINY = presets.get("tiny")


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, tokenizer_assets):
    weights = RandomWeights(TINY.llm, seed=5, dtype="float16")
    folder = tmp_path_factory.mktemp("streamed") / "pkg"
    source = ExportSource(TINY, True, llm_weights=weights)
    tokenizers = TokenizerFiles(tokenizer_assets.llama_dir, tokenizer_assets.bert_vocab)
    export_package(source, folder, tokenizers, progress=False)
    return folder, weights


def test_the_decoder_keeps_the_sources_float16_and_is_validated_streamed(streamed):
    folder, weights = streamed
    manifest = load_manifest(folder)
    assert verify_files(manifest, folder) == []
    assert manifest.weight_sources == {
        "encoders": "seeded random (preset tiny, seed 0)",
        "llm": "seeded random per tensor (float16, seed 5)",
    }
    graph = onnx.load(folder / manifest.graphs["llm_decoder"].file, load_external_data=False).graph
    halves = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) >= 7 * TINY.llm.num_hidden_layers  # every Linear weight, as the source has it
    report = json.loads((folder / "validation.json").read_text())["llm_decoder"]
    assert report["streamed"] and len(report["cases"]) >= 3
    for axis in ("T", "P"):  # prefill and decode, each at two sizes or more
        assert len({c["sizes"][axis] for c in report["cases"]}) >= 2
    table = np.load(folder / manifest.embeddings.file)
    np.testing.assert_array_equal(table, weights.tensor(EMBEDDINGS).astype(np.float32))


def test_the_streamed_package_answers(streamed, tmp_path):
    folder, _ = streamed
    audio = write_tone(tmp_path / "a.wav", seconds=2.0)
    answer = Pipeline.load(folder, verbose=False).ask(
        "What is it?", audio=audio, options=DecodingOptions(num_beams=1, max_new_tokens=4)
    )
    assert len(answer.token_ids) >= 1


def test_only_an_llm_past_the_limit_is_streamed():
    assert streamed_llm_weights(TINY) is None
    big = streamed_llm_weights(presets.get("13b"))
    assert isinstance(big, RandomWeights) and big.dtype == "float16"
    shapes = [big.info(n)[0] for n in big.names()]
    assert sum(int(np.prod(s)) for s in shapes) * 4 >= STREAM_LLM_BYTES


def test_a_large_reference_runs_a_section_at_a_time_and_agrees(streamed, tmp_path, monkeypatch):
    """What a 13b build's reference does (LARGE_GRAPH_BYTES lowered so the tiny decoder counts)."""
    import vsal.export.accuracy as accuracy_module
    from vsal.export.specs import llm_decoder_spec

    folder, _ = streamed
    monkeypatch.setattr(accuracy_module, "LARGE_GRAPH_BYTES", 1)
    decoder = folder / load_manifest(folder).graphs["llm_decoder"].file
    rng = np.random.default_rng(0)
    spec = llm_decoder_spec(TINY)
    feeds = [spec.make_inputs({"B": 1, "T": 4, "P": 0}, rng), spec.make_inputs({"B": 2, "T": 1, "P": 3}, rng)]
    result = accuracy_module.accuracy(decoder, decoder, feeds)
    assert all(r["cases"] == 2 and r["max_abs_error"] < 1e-5 for r in result.values())
    audio = write_tone(tmp_path / "a.wav", seconds=2.0)
    options = DecodingOptions(num_beams=1, max_new_tokens=5, eos_token_id=None)
    whole = Pipeline.load(folder, verbose=False).ask("What is it?", audio=audio, options=options)
    sectioned = Pipeline.load(
        folder, verbose=False, backend_factory=accuracy_module.large_graph_runners(folder)
    )
    answer = sectioned.ask("What is it?", audio=audio, options=options)
    assert isinstance(sectioned.backend("llm_decoder"), accuracy_module.SectionedRunner)
    assert answer.token_ids == whole.token_ids


def test_low_memory_holds_one_stage_at_a_time_and_answers_the_same(streamed, tmp_path):
    folder, _ = streamed
    audio = write_tone(tmp_path / "a.wav", seconds=2.0)
    options = DecodingOptions(num_beams=1, max_new_tokens=4, eos_token_id=None)
    want = Pipeline.load(folder, verbose=False).ask("What is it?", audio=audio, options=options)
    low = Pipeline.load(folder, verbose=False, low_memory=True, media_cache_size=0)
    for _ in range(2):  # the second question loads the encoders again
        answer = low.ask("What is it?", audio=audio, options=options)
        assert answer.token_ids == want.token_ids
        assert set(low.loaded_backends) == {"llm_decoder"}  # the encoders were freed before it ran
    assert set(answer.backends) == set(want.backends)  # what ran each graph is still said


def test_calibration_records_the_decoders_prefills_without_loading_it(streamed, tmp_path, monkeypatch):
    import vsal.runtime.pipeline as pipeline_module
    from vsal.calib.collect import collect, synthetic_media

    folder, _ = streamed
    opened = []
    real = pipeline_module.open_backend

    def spy(engine, folder_, name, *args, **kwargs):
        opened.append(name)
        return real(engine, folder_, name, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "open_backend", spy)
    clips = synthetic_media(tmp_path / "media", count=2)
    recorded = collect(folder, clips, progress=False, graphs=("llm_decoder", "mrc_qformer"))
    assert "llm_decoder" not in opened and "mrc_qformer" in opened
    prefills = recorded["llm_decoder"]
    assert len(prefills) >= 2 and all(p["past_key_values.0.key"].shape[2] == 0 for p in prefills)
    assert all(p["inputs_embeds"].shape[1] == p["attention_mask"].shape[1] for p in prefills)
