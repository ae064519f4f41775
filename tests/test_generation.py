"""Runtime decoding (vsal.runtime.generation) against transformers' `generate`, token for token.

The tiny preset's LLaMA runs as a numpy `DecoderStep` (torch under the hood, here only); prompts
are random `inputs_embeds`, as the release generates from embeddings. Greedy, repetition penalty,
min_length, beam search (3 and 5 beams, several length penalties) and eos reached early (by choice
of eos, and by an eos-biased LM head that makes beam search stop on its early-stopping heuristic)
must give transformers' tokens exactly. Sampling, the processors, the text streamer and the
runtime's torch-free import are checked on their own; one test runs greedy and beam search through
an exported `llm_decoder` ONNX graph in ONNX Runtime.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from vsal.runtime.errors import ConfigError
from vsal.runtime.generation import (
    GraphDecoderStep,
    NumpyKVCache,
    apply_repetition_penalty,
    apply_temperature,
    beam_search,
    block_eos,
    generate_tokens,
    select_token,
    stream_text,
    top_k_filter,
    top_p_filter,
)
from vsal.runtime.graphs import KVLayout
from vsal.runtime.prompt import ANSWER_CUT, BOUNDS, DecodingOptions, cut_answer

MAX_NEW = 20
PROMPT_LENGTH = 7
EOS = 2


# --- helpers ------------------------------------------------------------------------------------


class TorchStep:
    """A numpy `DecoderStep` over a transformers LlamaForCausalLM (tests only), counting its calls."""

    def __init__(self, lm):
        self.lm = lm
        self.calls = 0

    def __call__(self, inputs_embeds, attention_mask, position_ids, cache):
        self.calls += 1
        past = DynamicCache()
        if cache is not None:
            arrays = [torch.from_numpy(a) for a in cache.arrays]
            past = DynamicCache(ddp_cache_data=list(zip(arrays[0::2], arrays[1::2], strict=True)))
        with torch.no_grad():
            out = self.lm(
                inputs_embeds=torch.from_numpy(inputs_embeds),
                attention_mask=torch.from_numpy(attention_mask),
                position_ids=torch.from_numpy(position_ids),
                cache=past,
                use_cache=True,
            )
        present = tuple(t.numpy() for layer in out.cache.layers for t in (layer.keys, layer.values))
        return out.logits.numpy(), NumpyKVCache(present)


def embedder(lm):
    table = lm.get_input_embeddings().weight.detach().numpy()
    return lambda ids: table[ids]


def hf_run(lm, inputs_embeds: np.ndarray, options: DecodingOptions) -> tuple[list[int], int]:
    """transformers' generate as the reference pipeline calls it -> (tokens, decoding steps run)."""
    assert options.eos_token_id is not None  # None would fall back to the model's generation config
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = lm.generate(
            inputs_embeds=torch.from_numpy(inputs_embeds),
            attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long),
            max_new_tokens=options.max_new_tokens,
            min_length=options.min_length,
            do_sample=False,
            num_beams=options.num_beams,
            repetition_penalty=options.repetition_penalty,
            length_penalty=options.length_penalty,
            eos_token_id=options.eos_token_id,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,  # one entry per step: beam search's stopping step is compared too
        )
    return out.sequences[0].tolist(), len(out.scores)


def decode(step, embed, inputs_embeds: np.ndarray, options: DecodingOptions) -> list[int]:
    """The runtime's tokens: beam search when num_beams > 1, else greedy or sampled."""
    if options.num_beams > 1:
        return beam_search(step, embed, inputs_embeds, options)
    return list(generate_tokens(step, embed, inputs_embeds, options))


def hf_generate(lm, inputs_embeds: np.ndarray, options: DecodingOptions) -> list[int]:
    return hf_run(lm, inputs_embeds, options)[0]


def run_beams(lm, inputs_embeds: np.ndarray, options: DecodingOptions) -> tuple[list[int], int]:
    """vsal's beam search with the torch step -> (tokens, decoding steps run)."""
    steps: list[list[int]] = []
    tokens = beam_search(TorchStep(lm), embedder(lm), inputs_embeds, options, on_step=steps.append)
    assert [len(s) for s in steps] == list(range(1, len(steps) + 1))
    return tokens, len(steps)


def options(**changes) -> DecodingOptions:
    return DecodingOptions(**{"max_new_tokens": MAX_NEW, "num_beams": 1, **changes})


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_model):
    return tiny_model.llm.model.eval()


@pytest.fixture(scope="module")
def prompt() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, PROMPT_LENGTH, 64)).astype(np.float32)


@pytest.fixture(scope="module", params=[0.6, 0.7])
def eos_biased_lm(lm, request):
    """A copy whose LM head favours eos (its row points along the mean final hidden state), so
    beam hypotheses finish early and often: beam search then ends on its early-stopping heuristic.
    With 0.6, a hypothesis outside the top K ends in eos and must not count as finished."""
    biased = copy.deepcopy(lm)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 30, 64)).astype(np.float32))
    with torch.no_grad():
        mean = biased.model(inputs_embeds=x).last_hidden_state.reshape(-1, 64).mean(0)
        biased.lm_head.weight[EOS] = request.param * mean / mean.norm() ** 2
    return biased


# --- the logit processors, one by one, against transformers' --------------------------------------


@pytest.fixture
def scores_and_ids():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((3, 50)).astype(np.float32)
    scores[0, 7] = scores[0, 8]  # a tie at the top-k boundary is kept by both
    ids = rng.integers(0, 50, size=(3, 6))
    ids[1, :3] = 4  # repeated ids
    return scores, ids


def hf_process(processor, ids, scores) -> np.ndarray:
    return processor(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()


def test_repetition_penalty_and_min_length_match_transformers(scores_and_ids):
    from transformers.generation.logits_process import (
        MinLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    scores, ids = scores_and_ids
    for penalty in (1.5, 0.7):
        want = hf_process(RepetitionPenaltyLogitsProcessor(penalty), ids, scores)
        np.testing.assert_array_equal(apply_repetition_penalty(scores, ids, penalty), want)
    assert (apply_repetition_penalty(scores, ids, 1.5) != scores).sum() > 10
    for min_length in (6, 7):
        want = hf_process(MinLengthLogitsProcessor(min_length, EOS), ids, scores)
        np.testing.assert_array_equal(block_eos(scores, EOS, ids.shape[1], min_length), want)


def test_sampling_warpers_match_transformers(scores_and_ids):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores, ids = scores_and_ids
    np.testing.assert_allclose(
        apply_temperature(scores, 0.7), hf_process(TemperatureLogitsWarper(0.7), ids, scores), rtol=1e-6
    )
    for k in (1, 5, 50):
        np.testing.assert_array_equal(top_k_filter(scores, k), hf_process(TopKLogitsWarper(k), ids, scores))
    for p in (1e-6, 0.3, 0.8, 0.99):
        for keep in (1, 3):
            want = hf_process(TopPLogitsWarper(p, min_tokens_to_keep=keep), ids, scores)
            got = top_p_filter(scores, p, keep)
            np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"top_p {p}, keep {keep}")
            np.testing.assert_array_equal(got, want)
    assert np.isfinite(top_p_filter(scores, 1e-6)).sum(axis=1).tolist() == [1, 1, 1]
    # cumulative probability exactly at 1 - top_p: dropped (transformers' "<=")
    exact = np.log(np.array([[1.0, 1.0, 2.0]], np.float32))  # probabilities 0.25, 0.25, 0.5
    want = hf_process(TopPLogitsWarper(0.75), np.zeros((1, 0), np.int64), exact)
    np.testing.assert_array_equal(top_p_filter(exact, 0.75), want)
    assert np.isinf(want).sum() == 1


def test_sampling_draws_follow_the_filtered_distribution():
    scores = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    opts = DecodingOptions(num_beams=1, sample=True, top_k=2)
    rng = np.random.default_rng(0)
    draws = [select_token(top_k_filter(scores, 2), opts, rng) for _ in range(4000)]
    counts = np.bincount(draws, minlength=4) / len(draws)
    assert counts[2:].sum() == 0
    assert abs(counts[0] - 0.5 / 0.8) < 0.03


# --- greedy, against transformers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def repetitive_prompt(lm) -> np.ndarray:
    """The first of a few seeded prompts on which plain greedy decoding repeats a token, so that the
    repetition penalty changes the answer (on most random prompts the tiny LLM never repeats)."""
    for seed in range(20):
        x = (np.random.default_rng(seed).standard_normal((1, PROMPT_LENGTH, 64)) * 0.02).astype(np.float32)
        plain = decode(TorchStep(lm), embedder(lm), x, options(repetition_penalty=1.0))
        if len(set(plain)) < len(plain):
            return x
    raise AssertionError("no prompt on which greedy decoding repeats itself")


@pytest.mark.parametrize(
    "changes",
    [{"repetition_penalty": 1.0}, {"repetition_penalty": 1.5}, {"repetition_penalty": 1.5, "min_length": 12}],
    ids=["plain", "penalty", "penalty-min-length"],
)
@pytest.mark.parametrize("which", ["random", "repetitive"])
def test_greedy_matches_transformers(lm, prompt, repetitive_prompt, which, changes):
    x = prompt if which == "random" else repetitive_prompt
    opts = options(**changes)
    got = decode(TorchStep(lm), embedder(lm), x, opts)
    assert len(got) == MAX_NEW
    assert got == hf_generate(lm, x, opts)


def test_repetition_penalty_changes_the_tokens(lm, repetitive_prompt):
    """Guards the tests above and below: on this prompt the penalty matters."""
    for num_beams in (1, 5):
        plain = options(num_beams=num_beams, repetition_penalty=1.0)
        plain = decode(TorchStep(lm), embedder(lm), repetitive_prompt, plain)
        penalised = decode(TorchStep(lm), embedder(lm), repetitive_prompt, options(num_beams=num_beams))
        assert plain != penalised, num_beams
        assert len(set(penalised)) == len(penalised), num_beams


@pytest.mark.parametrize("eos_at", [0, 2, 5])
def test_greedy_stops_at_eos_as_transformers(lm, prompt, eos_at):
    """eos = the token greedy decoding picks at step `eos_at`: generation ends there, eos included."""
    free = decode(TorchStep(lm), embedder(lm), prompt, options(eos_token_id=None))
    opts = options(eos_token_id=free[eos_at])
    got = decode(TorchStep(lm), embedder(lm), prompt, opts)
    assert got == free[: eos_at + 1]
    assert got == hf_generate(lm, prompt, opts)


def test_min_length_counts_the_prompt_embeddings(lm, prompt):
    """transformers' min_length with inputs_embeds counts the prompt: with eos = the first greedy
    token, min_length = prompt + 3 blocks eos for 3 generated tokens; min_length = prompt, none."""
    first = decode(TorchStep(lm), embedder(lm), prompt, options(eos_token_id=None, max_new_tokens=1))[0]
    unblocked = options(eos_token_id=first, min_length=PROMPT_LENGTH)
    got = decode(TorchStep(lm), embedder(lm), prompt, unblocked)
    assert got == [first] == hf_generate(lm, prompt, unblocked)
    blocked = options(eos_token_id=first, min_length=PROMPT_LENGTH + 3)
    got = decode(TorchStep(lm), embedder(lm), prompt, blocked)
    assert first not in got[:3] and len(got) > 3
    assert got == hf_generate(lm, prompt, blocked)


# --- beam search, against transformers ------------------------------------------------------------


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
@pytest.mark.parametrize("num_beams", [3, 5])
@pytest.mark.parametrize("repetition_penalty", [1.5, 1.0])
@pytest.mark.parametrize("which", ["random", "repetitive"])
def test_beam_search_matches_transformers(
    lm, prompt, repetitive_prompt, which, num_beams, length_penalty, repetition_penalty
):
    x = prompt if which == "random" else repetitive_prompt
    opts = options(num_beams=num_beams, length_penalty=length_penalty, repetition_penalty=repetition_penalty)
    got = run_beams(lm, x, opts)
    assert len(got[0]) == MAX_NEW
    assert got == hf_run(lm, x, opts)
    assert decode(TorchStep(lm), embedder(lm), x, opts) == got[0]


def test_beam_search_differs_from_greedy(lm, prompt):
    """Guards the beam tests: with this model and prompt the beams find another answer."""
    greedy = decode(TorchStep(lm), embedder(lm), prompt, options())
    assert decode(TorchStep(lm), embedder(lm), prompt, options(num_beams=5)) != greedy


@pytest.mark.parametrize("eos_at", [0, 2, 5])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 0.0])
def test_beam_search_with_eos_matches_transformers(lm, prompt, length_penalty, eos_at):
    """eos = the token the beams pick at step `eos_at` without eos: finished hypotheses compete."""
    free = decode(TorchStep(lm), embedder(lm), prompt, options(num_beams=3, eos_token_id=None))
    opts = options(num_beams=3, length_penalty=length_penalty, eos_token_id=free[eos_at])
    got, steps = run_beams(lm, prompt, opts)
    assert (got, steps) == hf_run(lm, prompt, opts)
    if length_penalty < 1:  # short hypotheses win
        assert got[-1] == opts.eos_token_id and len(got) <= eos_at + 1


def test_eos_biased_model_matches_transformers(eos_biased_lm, prompt):
    """With eos likely, hypotheses finish at many lengths: beam search must return transformers'
    best finished one, whether it ends on the early-stopping heuristic or at max_new_tokens."""
    lm = eos_biased_lm
    ends_with_eos, stopped_early = [], []
    for num_beams, length_penalty in [(1, 1.0), (3, 1.0), (5, 1.0), (5, 2.0), (5, 0.5), (3, 0.5)]:
        opts = options(num_beams=num_beams, length_penalty=length_penalty)
        if num_beams > 1:
            got, steps = run_beams(lm, prompt, opts)
            assert (got, steps) == hf_run(lm, prompt, opts), (num_beams, length_penalty)
            stopped_early.append(steps < MAX_NEW)
        else:
            got = decode(TorchStep(lm), embedder(lm), prompt, opts)
            assert got == hf_generate(lm, prompt, opts)
        ends_with_eos.append(got[-1] == EOS)
    # guards: the cases cover eos reached early, the heuristic stopping the search, and max length
    assert ends_with_eos[0] and any(ends_with_eos[1:]), ends_with_eos
    assert any(stopped_early) and not all(stopped_early), stopped_early


def test_beam_search_runs_the_prompt_once(lm, prompt):
    step = TorchStep(lm)
    got = beam_search(step, embedder(lm), prompt, options(num_beams=5, eos_token_id=None, max_new_tokens=6))
    assert len(got) == 6 and step.calls == 6  # one prefill (batch 1) + 5 decode steps (batch 5)


# --- sampling ----------------------------------------------------------------------------------


def test_sampling_is_seeded(lm, prompt):
    def sample(**changes):
        opts = options(sample=True, **changes)
        return decode(TorchStep(lm), embedder(lm), prompt, opts)

    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    assert sample(seed=1, temperature=0.5) != sample(seed=1)
    greedy = decode(TorchStep(lm), embedder(lm), prompt, options())
    assert sample(seed=3, top_k=1) == greedy
    assert sample(seed=3, top_p=1e-6) == greedy
    assert sample(seed=3, top_p=1e-6, temperature=2.0) == greedy


def test_generate_tokens_streams(lm, prompt):
    """Tokens come one at a time: taking 3 runs the model 3 times (prefill + 2 decode steps)."""
    step = TorchStep(lm)
    tokens = generate_tokens(step, embedder(lm), prompt, options())
    first = [next(tokens) for _ in range(3)]
    assert step.calls == 3
    assert first == decode(TorchStep(lm), embedder(lm), prompt, options())[:3]


def test_options_are_checked_in_one_place():
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        DecodingOptions(num_beams=0)
    with pytest.raises(ValueError, match="sampling works with num_beams 1"):
        DecodingOptions(num_beams=5, sample=True)
    with pytest.raises(ValueError, match=r"temperature must be > 0.*top_p must be in \(0, 1\]"):
        DecodingOptions(top_p=0.0, temperature=0.0)  # every problem in one message
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        DecodingOptions(top_k=-1)
    with pytest.raises(ValueError, match="inputs_embeds must be one prompt"):
        next(generate_tokens(None, None, np.zeros((2, 3, 4), np.float32), options()))
    with pytest.raises(ValueError, match="use beam_search"):
        next(generate_tokens(None, None, np.zeros((3, 4), np.float32), options(num_beams=2)))
    with pytest.raises(ValueError, match="use generate_tokens"):
        beam_search(None, None, np.zeros((3, 4), np.float32), options(num_beams=1))


# --- text streaming ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_tokenizer(tokenizer_assets):
    from vsal.runtime.tokenizers import LlamaTokenizer

    return LlamaTokenizer(tokenizer_assets.tokenizer_model)


def test_stream_text_holds_back_partial_characters_and_stops_at_the_cut(llama_tokenizer):
    text = "Héllo wörld 🙂 ok\n# cut here"
    ids = llama_tokenizer.encode(text) + [EOS]
    consumed = []

    def tokens():
        for i in ids:
            consumed.append(i)
            yield i

    pieces = list(stream_text(tokens(), llama_tokenizer))
    assert "".join(pieces) == cut_answer(llama_tokenizer.decode(ids)) == "Héllo wörld 🙂 ok"
    assert any("🙂" in p for p in pieces) and not any("\ufffd" in p for p in pieces)  # 4 byte pieces
    assert not any(p.endswith("\n") for p in pieces)  # the "\n" of "\n#" was held back
    assert consumed == ids[: ids.index(29937) + 1]  # reading stopped at "#"


@pytest.mark.parametrize("seed", range(5))
def test_stream_text_concatenates_to_the_answer(llama_tokenizer, seed):
    """Random ids, many of them byte pieces (3..258) and "\\n" (13), "#" (29937): the pieces always
    join to cut_answer(decode(ids)): nothing shown is ever taken back."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 400, size=120)
    ids[rng.choice(120, size=4, replace=False)] = [13, 13, 29937, 30325] if seed % 2 else [13, 13, 13, 30325]
    ids = ids.tolist()
    pieces = list(stream_text(ids, llama_tokenizer))
    assert "".join(pieces) == cut_answer(llama_tokenizer.decode(ids))
    assert all(pieces)  # nothing empty; a held-back character would break the join above
    assert "".join(stream_text(ids, llama_tokenizer, cut=None)) == llama_tokenizer.decode(ids)


def test_stream_text_of_generated_tokens(lm, prompt, llama_tokenizer):
    tokens = generate_tokens(TorchStep(lm), embedder(lm), prompt, options(max_new_tokens=30))
    ids = decode(TorchStep(lm), embedder(lm), prompt, options(max_new_tokens=30))
    assert "".join(stream_text(tokens, llama_tokenizer)) == cut_answer(llama_tokenizer.decode(ids))
    assert ANSWER_CUT == "\n#"


# --- the runtime stays torch-free --------------------------------------------------------------


def test_generation_imports_no_torch():
    code = (
        "import sys, vsal.runtime.generation\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- through an exported llm_decoder graph ---------------------------------------------------------


def test_onnx_graph_generation_matches_transformers(tiny_config, lm, prompt, tmp_path):
    """Greedy (with repetition penalty) and 3-beam search through ONNX Runtime = transformers."""
    ort = pytest.importorskip("onnxruntime")
    llm_graph = pytest.importorskip("vsal.export.llm_graph")
    from vsal.export.specs import llm_decoder_spec

    graph = llm_graph.LlmDecoderGraph(copy.deepcopy(lm))
    spec = llm_decoder_spec(tiny_config)
    arrays = spec.make_inputs(spec.export_sizes(), np.random.default_rng(0))
    path = tmp_path / "llm_decoder.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        args = tuple(torch.from_numpy(arrays[t.name]) for t in spec.inputs)
        torch.onnx.export(graph, args, str(path), **llm_graph.export_kwargs(spec))
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feeds):
        return dict(zip(names, session.run(names, feeds), strict=True))

    step = GraphDecoderStep(run, tiny_config.llm.kv_layout())
    for opts in (options(), options(num_beams=3)):
        got = decode(step, embedder(lm), prompt, opts)
        assert len(got) == MAX_NEW
        assert got == hf_generate(lm, prompt, opts), opts.num_beams


def test_graph_decoder_step_names_the_cache_by_its_layout():
    """The past and present names and the empty past's shape and dtype are the layout's (the
    manifest's kv_cache), not spelled by the step."""
    layout = KVLayout(2, 3, 4, "float16", past="in_{kind}_{layer}", present="out/{layer}/{kind}")
    seen = {}

    def run(feeds):
        seen.update(feeds)
        b, t = feeds["inputs_embeds"].shape[:2]
        grown = layout.shape(b, feeds["attention_mask"].shape[1])
        return {"logits": np.zeros((b, t, 5), np.float32)} | {
            name: np.full(grown, i, np.float16) for i, name in enumerate(layout.present_names())
        }

    step = GraphDecoderStep(run, layout)
    x = np.zeros((1, 2, 8), np.float32)
    _, cache = step(x, np.ones((1, 2), np.int64), np.arange(2)[None], None)
    assert sorted(k for k in seen if k.startswith("in_")) == sorted(layout.past_names())
    assert all(seen[n].shape == (1, 3, 0, 4) and seen[n].dtype == np.float16 for n in layout.past_names())
    assert [a[0, 0, 0, 0] for a in cache.arrays] == [0, 1, 2, 3] and cache.length == 2
    step(x[:, :1], np.ones((1, 3), np.int64), np.full((1, 1), 2), cache)
    assert [seen[n][0, 0, 0, 0] for n in layout.past_names()] == [0, 1, 2, 3]  # presents fed back as pasts


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"past": "{kind}{layer}", "kinds": ("k", "k1")}, "give one name twice"),  # k1 + 0 = k + 10
        ({"kinds": tuple(f"k{i}" for i in range(10**5))}, "kinds holds 100000 names, more than 4"),
        ({"present": "p" * 10**6 + "{layer}{kind}"}, "present is not a name template of at most 200"),
    ],
)
def test_a_hostile_kv_layout_names_no_input_twice_and_stays_small(changes, match):
    with pytest.raises(ValueError, match=match):
        KVLayout(40, 8, 64, **changes)


# --- decoding options at their bounds: refused outside, robust inside ------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"sample": True, "temperature": 1e-39}, r"temperature must be in \[0.001, 1000\], got 1e-39"),
        ({"sample": True, "temperature": 1e300}, r"temperature must be in \[0.001, 1000\], got 1e\+300"),
        ({"temperature": 0.00099}, r"temperature must be in \[0.001, 1000\]"),
        ({"temperature": 1000.5}, r"temperature must be in \[0.001, 1000\]"),
        ({"repetition_penalty": 1e-45}, r"repetition_penalty must be in \[0.001, 1000\], got 1e-45"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be in \[0.001, 1000\], got 0"),
        ({"repetition_penalty": 1001}, r"repetition_penalty must be in \[0.001, 1000\], got 1001"),
        ({"num_beams": 2, "length_penalty": 2000}, r"length_penalty must be in \[-10, 10\], got 2000"),
        ({"length_penalty": -10.01}, r"length_penalty must be in \[-10, 10\], got -10.01"),
        ({"length_penalty": float("nan")}, "length_penalty must be a finite number, got nan"),
        ({"temperature": float("-inf")}, "temperature must be a finite number, got -inf"),
        ({"top_p": float("inf")}, r"top_p must be a finite number, got inf$"),  # said once
        ({"temperature": np.float32("nan")}, "temperature must be a finite number, got nan"),
        ({"temperature": 10**400}, r"temperature must be in \[0.001, 1000\], got an integer of 1329 bits"),
        ({"seed": -(10**5000)}, "seed must be >= 0 or None, got a negative integer of 16610 bits"),
    ],
)
def test_options_out_of_bounds_are_refused_naming_the_option(fields, message):
    with pytest.raises(ConfigError, match=message):
        DecodingOptions(**fields)


def test_temperature_zero_says_greedy_is_the_default_in_words_for_any_caller():
    with pytest.raises(ConfigError) as caught:
        DecodingOptions(temperature=0)
    message = str(caught.value)
    assert message.startswith("invalid decoding options: temperature must be > 0, got 0 (greedy decoding")
    assert "sample=" not in message and "\n" not in message


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty", "length_penalty"])
def test_the_bounds_themselves_are_accepted(name):
    for bound in BOUNDS[name]:
        assert getattr(DecodingOptions(**{name: bound}), name) == bound


class LargeLogitsStep:
    """A numpy `DecoderStep` whose logits are a fixed projection of the input, times `scale` (1e4:
    far past a real LM's, so that a bound's overflow would show); its cache is never read."""

    def __init__(self, scale: float, vocab: int = 40, hidden: int = 8):
        rng = np.random.default_rng(1)
        self.head = (rng.standard_normal((hidden, vocab)) * scale).astype(np.float32)
        self.table = rng.standard_normal((vocab, hidden)).astype(np.float32)

    def __call__(self, inputs_embeds, attention_mask, position_ids, cache):
        return inputs_embeds @ self.head, self

    def reorder(self, beam_indices):
        return self

    def embed(self, ids):
        return self.table[ids]


EDGES = [
    {"sample": True, "temperature": 1e-3},
    {"sample": True, "temperature": 1e3, "top_p": 0.9, "top_k": 5},
    {"sample": True, "repetition_penalty": 1e-3},
    {"sample": True, "repetition_penalty": 1e3, "temperature": 1e-3},
    {"repetition_penalty": 1e-3},
    {"repetition_penalty": 1e3},
    {"num_beams": 3, "length_penalty": -10.0},
    {"num_beams": 3, "length_penalty": 10.0, "repetition_penalty": 1e-3},
    {"num_beams": 3, "length_penalty": -10.0, "repetition_penalty": 1e3},
    {"num_beams": 3, "length_penalty": 0.0, "repetition_penalty": 1e3},
]


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("changes", EDGES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_decoding_at_the_bounds_gives_an_answer_without_warnings(changes, scale):
    """No overflow, no NaN for rng.choice, no exception; and beam search never returns an empty
    slot (real scores far below transformers' -1e9 mark: a negative length penalty, a large
    repetition penalty)."""
    step = LargeLogitsStep(scale)
    prompt = np.random.default_rng(2).standard_normal((1, 5, 8)).astype(np.float32)
    opts = options(seed=0, max_new_tokens=30, **changes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = decode(step, step.embed, prompt, opts)
    assert 1 <= len(tokens) <= 30 and all(0 <= t < 40 for t in tokens)
    assert EOS not in tokens[:-1]


def test_huge_integers_that_are_valid_run():
    """A seed of 40 digits is a numpy seed like any other; a min_length past any context only keeps
    eos blocked, so generation runs to max_new_tokens."""
    step = LargeLogitsStep(1.0)  # flat enough for two seeds to differ
    prompt = np.random.default_rng(2).standard_normal((1, 5, 8)).astype(np.float32)
    sampled = [decode(step, step.embed, prompt, options(sample=True, seed=10**40)) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert decode(step, step.embed, prompt, options(sample=True, seed=10**40 + 1)) != sampled[0]
    eos = decode(step, step.embed, prompt, options(max_new_tokens=1))[0]  # the greedy first token
    assert decode(step, step.embed, prompt, options(eos_token_id=eos)) == [eos]
    tokens = decode(step, step.embed, prompt, options(eos_token_id=eos, min_length=10**30, max_new_tokens=25))
    assert len(tokens) == 25 and eos not in tokens
