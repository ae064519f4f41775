"""The fused decoder through the build and the runtime: `vsal-export build --precision int4` records
the decoder's fused twin, checked against its portable graph; the CPU pipeline runs it with the KV
cache in place and answers as the portable graph does (greedy, beams, past a buffer's growth)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from vsal.export.build import build
from vsal.runtime.backends import fused_decoder
from vsal.runtime.backends.base import BackendError
from vsal.runtime.backends.fused_decoder import FusedDecoderBackend, FusedKVCache
from vsal.runtime.generation import beam_search, generate_tokens
from vsal.runtime.graphs import DECODER
from vsal.runtime.manifest import load_manifest, verify_files
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.prompt import DecodingOptions
from vsal.runtime.tools.perplexity import perplexity

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def built(tiny_package, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused") / "tiny"
    shutil.copytree(tiny_package, folder)
    return folder, build(folder, "int4", progress=False, allow_below=True)  # tiny: agreement ~30 %


def pipelines(folder):
    return (
        Pipeline.load(folder, verbose=False, precision="int4", verify=False),
        Pipeline.load(folder, verbose=False, precision="int4", verify=False, portable_decoder=True),
    )


def test_the_build_records_the_fused_twin_checked_against_its_portable_graph(built):
    folder, report = built
    manifest = load_manifest(folder)
    decoder = manifest.graphs[DECODER]
    fused = decoder.fused["int4"]
    assert verify_files(manifest, folder) == []
    assert fused.file.endswith(".fused.onnx") and fused.file in manifest.files()
    assert fused.accuracy["against"] == decoder.variants["int4"].file
    assert fused.accuracy["greedy_tokens_equal"] == fused.accuracy["greedy_tokens"] > 0
    assert fused.accuracy["greedy_tokens_equal_exact"] == fused.accuracy["greedy_tokens"]
    assert fused.accuracy["max_relative_logits_error"] < 1e-3
    assert [t.name for t in fused.inputs][:5] == [
        "inputs_embeds",
        "position_ids",
        "seqlens_k",
        "total_sequence_length",
        "logits_to_keep",
    ]
    assert not any("fused" in p for p in report.problems)
    assert "fused for ONNX Runtime" in report.graphs[DECODER]["notes"]


def test_a_tampered_fused_graph_is_refused_at_load(built, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(built[0], folder)
    fused = folder / load_manifest(folder).graphs[DECODER].fused["int4"].file
    fused.write_bytes(fused.read_bytes()[:-8] + b"\0" * 8)
    assert any("sha256 differs" in p for p in verify_files(load_manifest(folder), folder))


def test_the_cpu_pipeline_runs_the_fused_decoder_and_answers_as_the_portable_one(built, clip_10s):
    fast, portable = pipelines(built[0])
    assert isinstance(fast.backend(DECODER), FusedDecoderBackend)
    assert not isinstance(portable.backend(DECODER), FusedDecoderBackend)
    assert "fused" in fast.backend(DECODER).description
    for beams in (1, 3):
        options = DecodingOptions(num_beams=beams, max_new_tokens=12)
        answers = [
            p.ask("What happens?", video=clip_10s, options=options).token_ids for p in (fast, portable)
        ]
        assert answers[0] == answers[1], beams


def test_the_cache_grows_and_keeps_the_tokens(built, monkeypatch):
    """Buffers grow by 16 here: a prompt of 12 positions takes 32, its 24th new token 64."""
    monkeypatch.setattr(fused_decoder, "GROW", 16)
    fast, portable = pipelines(built[0])
    rng = np.random.default_rng(5)
    prompt = rng.standard_normal((1, 12, fast.llm["hidden_size"])).astype(np.float32)
    options = DecodingOptions(num_beams=1, max_new_tokens=24, eos_token_id=None)

    def embed(ids):
        return fast.embeddings[ids]

    caches, bindings = [], []
    step = fast.decoder_step()
    checks = []
    checker = step.backend.checker
    monkeypatch.setattr(checker, "check", lambda feeds, real=checker.check: checks.append(1) or real(feeds))

    def watched(*args):
        logits, cache = step(*args)
        caches.append((cache.capacity, cache.length))
        bindings.append(cache.binding)
        return logits, cache

    got = list(generate_tokens(watched, embed, prompt, options))
    assert got == list(generate_tokens(portable.decoder_step(), embed, prompt, options))
    assert [caches[0], caches[-1]] == [(32, 12), (64, 12 + 23)]  # grew once
    # one IO binding for the prefill, one for the decode steps in the first buffers, one after the
    # growth: each checked once, then only filled
    assert len({id(b) for b in bindings}) == 3 and len(checks) == 3
    assert bindings[1] is bindings[2] and bindings[-1] is not bindings[1]
    beams = DecodingOptions(num_beams=3, max_new_tokens=8, eos_token_id=None)
    short = prompt[:, :20]
    assert beam_search(fast.decoder_step(), embed, short, beams) == beam_search(
        portable.decoder_step(), embed, short, beams
    )


def test_reorder_gathers_rows_in_place(built):
    fast, _ = pipelines(built[0])
    layout = fast.manifest.kv_layout()
    cache = FusedKVCache.allocate(layout, 3, 8)
    for i, buffer in enumerate(cache.buffers):
        buffer[:] = np.arange(3)[:, None, None, None] + 10 * i
    cache.length = 5
    same = cache.reorder(np.array([2, 2, 0]))
    assert same is cache and same.buffers[1][:, 0, 0, 0].tolist() == [12, 12, 10]
    wider = cache.reorder(np.array([0, 0, 1, 1, 2]))
    assert wider.batch == 5 and wider.length == 5 and wider.buffers[0][:, 0, 4, 0].tolist() == [2, 2, 2, 2, 0]


def test_a_steps_logits_outlive_the_next_step(built):
    """The step's logits land in an array bound once; what a step returns is its own copy."""
    fast, _ = pipelines(built[0])
    step = fast.decoder_step()
    x = np.random.default_rng(0).standard_normal((1, 6, fast.llm["hidden_size"])).astype(np.float32)
    first, cache = step(x[:, :5], np.ones((1, 5), np.int64), np.arange(5)[None], None)
    kept = first.copy()
    second, cache = step(x[:, 5:], np.ones((1, 6), np.int64), np.array([[5]]), cache)
    assert np.array_equal(first, kept) and not np.array_equal(first, second)
    assert second is not cache.binding.logits


def test_a_padded_mask_is_refused_by_name(built):
    fast, _ = pipelines(built[0])
    step = fast.decoder_step()
    x = np.zeros((1, 3, fast.llm["hidden_size"]), np.float32)
    with pytest.raises(BackendError, match="takes no padding.*--portable-decoder"):
        step(x, np.array([[0, 1, 1]]), np.arange(3)[None], None)


def test_perplexity_scores_every_position_through_the_fused_decoder(built, tmp_path):
    """`vsal perplexity` asks the step for every position's logits: the same figure either way."""
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    fused = perplexity(built[0], text, precision="int4", window=64, progress=False)
    assert "fused" in fused.backends[DECODER]
    manifest = load_manifest(built[0])
    del manifest.graphs[DECODER].fused["int4"]
    portable = tmp_path / "portable"
    shutil.copytree(built[0], portable)
    from vsal.runtime.manifest import save_manifest

    save_manifest(manifest, portable)
    plain = perplexity(portable, text, precision="int4", window=64, progress=False)
    assert "fused" not in plain.backends[DECODER]
    assert fused.perplexity == pytest.approx(plain.perplexity, rel=1e-4)


def test_an_fp32_build_fuses_the_exported_decoder(tiny_package, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_package, folder)
    report = build(folder, "fp32", progress=False)
    fused = load_manifest(folder).graphs[DECODER].fused["fp32"]
    assert report.recorded and report.problems == [] and fused.accuracy["greedy_tokens_equal"] > 0
    assert fused.accuracy["greedy_tokens_equal_exact"] == fused.accuracy["greedy_tokens"]
    assert isinstance(
        Pipeline.load(folder, verbose=False, precision="fp32").backend(DECODER), FusedDecoderBackend
    )


def test_the_longer_greedy_check_script_finds_the_fused_twin_exact(built, capsys):
    """scripts/fused_greedy_check.py on the tiny int4 package: equal from the first token to the
    last at float32 activations; an absent precision is named, with what is built."""
    spec = importlib.util.spec_from_file_location("fused_greedy_check", SCRIPTS / "fused_greedy_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder, _ = built
    exact, as_run = script.check(folder, "int4", 12)
    assert exact.startswith("| int4 | exact | 12/12 | never |")
    assert as_run.startswith("| int4 | as run | ")
    assert script.main([str(folder), "--precisions", "int8"]) == 2
    assert "no fused decoder at int8 (built: int4)" in capsys.readouterr().out


def test_only_a_parting_beyond_a_near_tie_is_a_problem():
    """At float32 activations the graphs differ by 1e-7: a pick whose two best logits are that close
    may go either way (reported); any other parting is a problem."""
    from vsal.export.build_fused import Greedy, parted_beyond_ties

    expected = Greedy(tokens=[[1, 2, 3], [4, 5, 6]], prefill=[], margins=[[0.5, 0.5, 0.5], [0.5, 1e-6, 0.5]])
    assert parted_beyond_ties(expected, [[1, 2, 3], [4, 5, 6]]) == []
    assert parted_beyond_ties(expected, [[1, 2, 3], [4, 9, 9]]) == []  # prompt 2 parts at a near-tie
    assert parted_beyond_ties(expected, [[1, 7, 3], [4, 5, 6]]) == ["#1 at token 2 (margin 0.5)"]
