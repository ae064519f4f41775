"""Token generation for the LLM, independent of the backend (numpy only).

The generator drives two callables and never sees how they run:

* a `DecoderStep`: one call of the `llm_decoder` graph,
  `step(inputs_embeds [B, T, H], attention_mask [B, P+T], position_ids [B, T], cache | None)
  -> (logits [B, T, V], cache)`. `cache` is opaque (it may live on the device, e.g. ONNX Runtime
  OrtValues bound with IO binding); the generator only passes it back, or asks for
  `cache.reorder(beam_indices)` in beam search. `None` means an empty past (the prefill).
  `NumpyKVCache` holds the past as plain arrays and `GraphDecoderStep` adapts any function that
  runs the graph on a dict of named numpy arrays (e.g. `Backend.run`).
* `embed(ids [N]) -> [N, H]`: the token-embedding table lookup.

Decoding reproduces transformers 5.24's `generate(inputs_embeds=..., attention_mask=ones, ...)`,
as the release calls it, token for token:

* logit processors in transformers' order: repetition penalty (over the generated ids only: the
  prompt is embeddings), min_length (transformers counts the prompt embeddings in it: eos is
  blocked while generated < min_length - prompt length), then, when sampling, temperature, top-k,
  top-p;
* greedy and sampling as a ladder: `prefill -> decode_one_token -> generate_tokens` (streaming);
* beam search (`beam_search`): log-softmax, processors on the log-probs, the top 2K candidates,
  finished hypotheses scored sum / generated_length ** length_penalty, transformers' default
  early-stopping heuristic (`early_stopping=False`), the best finished hypothesis returned;
* `stream_text`: text pieces as tokens arrive, holding back incomplete UTF-8 and the answer cut.

Returned token lists include the eos token when one was generated, as `generate` does. One prompt
at a time (batch 1; beam search runs its beams as the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from vsal.runtime.graphs import KVLayout
from vsal.runtime.prompt import ANSWER_CUT, DecodingOptions

NEG_INF = np.float32(-np.inf)
# transformers' score of the beams that may not propose the first token. Its other "not a candidate"
# marks are -1e9 too, which real scores pass below at a large repetition or negative length penalty
# (an empty slot then beats every finished hypothesis): those are -inf here, the same order otherwise.
BEAM_MASK = np.float32(-1.0e9)
REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for an incomplete UTF-8 byte sequence


# --- the backend protocol -------------------------------------------------------------------------


class KVCache(Protocol):
    """The past keys and values of a batch of sequences, wherever they live."""

    def reorder(self, beam_indices: np.ndarray) -> KVCache:
        """The cache of rows `beam_indices` [B'] (int64): row i of the result is row beam_indices[i]."""
        ...


class DecoderStep(Protocol):
    def __call__(
        self,
        inputs_embeds: np.ndarray,  # [B, T, H] float32
        attention_mask: np.ndarray,  # [B, P+T] int64, 1 = attend
        position_ids: np.ndarray,  # [B, T] int64
        cache: KVCache | None,  # past of length P; None: P = 0
    ) -> tuple[np.ndarray, KVCache]:  # logits [B, T, V], cache of length P+T
        ...


Embed = Callable[[np.ndarray], np.ndarray]  # ids [N] int64 -> embeddings [N, H] float32


@dataclass(frozen=True)
class NumpyKVCache:
    """The past as numpy arrays: key, value per layer, each [B, kvH, P, head_dim]."""

    arrays: tuple[np.ndarray, ...]

    @property
    def length(self) -> int:
        return self.arrays[0].shape[2]

    def reorder(self, beam_indices: np.ndarray) -> NumpyKVCache:
        return NumpyKVCache(tuple(np.take(a, beam_indices, axis=0) for a in self.arrays))


class GraphDecoderStep:
    """A `DecoderStep` over any runner of the `llm_decoder` graph that takes and returns named
    numpy arrays (`Backend.run`, or `lambda feeds: dict(zip(names, session.run(names, feeds)))`).
    The past goes round trip through host memory as a `NumpyKVCache`, named by `layout` and kept in
    its dtype: the running variant's (`GraphInfo.kv_layout`: float16 for the fp16 decoder); beam
    search's reorder keeps it."""

    def __init__(self, run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]], layout: KVLayout):
        self.run = run
        self.layout = layout
        self.past_names = layout.past_names()
        self.present_names = layout.present_names()

    def empty_cache(self, batch: int) -> NumpyKVCache:
        shape = self.layout.shape(batch, 0)  # P = 0
        dtype = np.dtype(self.layout.dtype)
        return NumpyKVCache(tuple(np.zeros(shape, dtype) for _ in self.past_names))

    def __call__(
        self,
        inputs_embeds: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: NumpyKVCache | None,
    ) -> tuple[np.ndarray, NumpyKVCache]:
        past = cache if cache is not None else self.empty_cache(inputs_embeds.shape[0])
        feeds = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        feeds |= dict(zip(self.past_names, past.arrays, strict=True))
        out = self.run(feeds)
        present = tuple(out[name] for name in self.present_names)
        return out["logits"], NumpyKVCache(present)


# --- logit processors (transformers' order) -------------------------------------------------------


def apply_repetition_penalty(scores: np.ndarray, generated: np.ndarray, penalty: float) -> np.ndarray:
    """scores [B, V], generated [B, n] -> scores with every generated token's score penalised:
    times `penalty` where < 0, divided by it otherwise (transformers' RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0 or generated.shape[1] == 0:
        return scores
    rows = np.arange(scores.shape[0])[:, None]  # [B, 1]
    picked = scores[rows, generated]  # [B, n]; repeated ids gather and scatter the same value
    scores = scores.copy()
    scores[rows, generated] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def min_new_tokens(options: DecodingOptions, prompt_length: int) -> int:
    """transformers' min_length with inputs_embeds: it counts the prompt, so generate subtracts the
    prompt length (floored at 0) and compares the rest with the number of generated tokens."""
    return max(options.min_length - prompt_length, 0)


def block_eos(scores: np.ndarray, eos_token_id: int | None, generated: int, min_new: int) -> np.ndarray:
    """scores [B, V] with eos at -inf while fewer than `min_new` tokens have been generated."""
    if eos_token_id is None or generated >= min_new:
        return scores
    scores = scores.copy()
    scores[:, eos_token_id] = NEG_INF
    return scores


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    return scores if temperature == 1.0 else scores / scores.dtype.type(temperature)


def top_k_filter(scores: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """scores [B, V] with everything below the k-th best at -inf (ties with it are kept)."""
    if top_k == 0:
        return scores
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]  # [B, 1]
    return np.where(scores < kth, NEG_INF, scores)


def top_p_filter(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """scores [B, V] keeping the most likely tokens whose probability adds up to more than `top_p`
    (transformers' TopPLogitsWarper: in ascending order, drop while the cumulative probability is
    <= 1 - top_p, never the last `min_tokens_to_keep`)."""
    if top_p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, [B, V]
    ascending = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(ascending), axis=-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[:, -min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, scores)


def process_scores(
    scores: np.ndarray, generated: np.ndarray, options: DecodingOptions, min_new: int
) -> np.ndarray:
    """scores [B, V] (logits, or log-probs in beam search), generated [B, n] -> processed scores [B, V]."""
    scores = apply_repetition_penalty(scores, generated, options.repetition_penalty)
    scores = block_eos(scores, options.eos_token_id, generated.shape[1], min_new)
    if options.sample:
        scores = apply_temperature(scores, options.temperature)
        scores = top_k_filter(scores, options.top_k)
        scores = top_p_filter(scores, options.top_p)
    return scores


def softmax(x: np.ndarray) -> np.ndarray:
    """x [B, V] with a finite maximum per row -> probabilities [B, V] (exp of at most 0: no overflow)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """x [B, V] float32 -> log-probabilities [B, V] float32."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# --- greedy and sampling: prefill -> decode_one_token -> generate_tokens ---------------------------


def as_prompt(inputs_embeds: np.ndarray) -> np.ndarray:
    """[T, H] or [1, T, H] -> [1, T, H] float32."""
    x = np.asarray(inputs_embeds, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] == 0:
        raise ValueError(f"inputs_embeds must be one prompt, [T, H] or [1, T, H] with T > 0; got {x.shape}")
    return x


def prefill(step: DecoderStep, inputs_embeds: np.ndarray) -> tuple[np.ndarray, KVCache]:
    """inputs_embeds [1, T, H] -> logits of the last position [1, V], cache of length T."""
    t = inputs_embeds.shape[1]
    mask = np.ones((1, t), np.int64)  # [1, T]
    positions = np.arange(t, dtype=np.int64)[None]  # [1, T]
    logits, cache = step(inputs_embeds, mask, positions, None)
    return logits[:, -1], cache


def decode_one_token(
    step: DecoderStep, embed: Embed, tokens: np.ndarray, cache: KVCache, past_length: int
) -> tuple[np.ndarray, KVCache]:
    """tokens [B] at position `past_length` -> logits [B, V], cache of length past_length + 1."""
    b = tokens.shape[0]
    x = np.asarray(embed(tokens.astype(np.int64)), dtype=np.float32)[:, None]  # [B, 1, H]
    mask = np.ones((b, past_length + 1), np.int64)  # [B, P+1]
    positions = np.full((b, 1), past_length, np.int64)  # [B, 1]
    logits, cache = step(x, mask, positions, cache)
    return logits[:, -1], cache


def select_token(scores: np.ndarray, options: DecodingOptions, rng: np.random.Generator) -> int:
    """scores [1, V] -> the argmax, or a draw from softmax(scores) when sampling (in float64: the
    probabilities rng.choice checks add up to 1 closely enough)."""
    if not options.sample:
        return int(np.argmax(scores[0]))
    probs = softmax(scores[0].astype(np.float64))
    return int(rng.choice(probs.shape[0], p=probs))


def generate_tokens(
    step: DecoderStep, embed: Embed, inputs_embeds: np.ndarray, options: DecodingOptions
) -> Iterator[int]:
    """Greedy or sampled tokens, one at a time (num_beams must be 1); the last is eos if reached."""
    if options.num_beams != 1:
        raise ValueError(f"generate_tokens runs one beam, got num_beams {options.num_beams}: use beam_search")
    prompt = as_prompt(inputs_embeds)
    min_new = min_new_tokens(options, prompt.shape[1])
    rng = np.random.default_rng(options.seed)
    logits, cache = prefill(step, prompt)
    generated: list[int] = []
    while True:
        scores = process_scores(logits.astype(np.float32), np.array([generated], np.int64), options, min_new)
        token = select_token(scores, options, rng)
        generated.append(token)
        yield token
        if token == options.eos_token_id or len(generated) >= options.max_new_tokens:
            return
        past_length = prompt.shape[1] + len(generated) - 1
        logits, cache = decode_one_token(step, embed, np.array([token]), cache, past_length)


# --- beam search ----------------------------------------------------------------------------------


def top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of x [N], largest first."""
    part = np.argpartition(-x, k - 1)[:k]
    return part[np.argsort(-x[part], kind="stable")]


@dataclass
class Beams:
    """Hypotheses of one prompt: K running (not finished) and the K best finished so far."""

    running: np.ndarray  # [K, max_new_tokens] tokens, valid up to the current length
    running_scores: np.ndarray  # [K] float32 sums of log-probs, best first
    finished: np.ndarray  # [K, max_new_tokens] tokens
    finished_lengths: np.ndarray  # [K] int64 generated length (incl. eos)
    finished_scores: np.ndarray  # [K] float64, length-normalised; -inf: an empty slot
    is_finished: np.ndarray  # [K] bool: the slot holds a finished hypothesis
    improvable: bool = True  # transformers' early-stopping heuristic is unsatisfied

    @classmethod
    def start(cls, num_beams: int, max_new_tokens: int) -> Beams:
        running_scores = np.zeros(num_beams, np.float32)
        running_scores[1:] = BEAM_MASK  # only beam 0 proposes the first token
        running = np.full((num_beams, max_new_tokens), -1, np.int64)  # -1: not generated yet
        return cls(
            running=running,
            running_scores=running_scores,
            finished=running.copy(),
            finished_lengths=np.zeros(num_beams, np.int64),
            finished_scores=np.full(num_beams, -np.inf),
            is_finished=np.zeros(num_beams, bool),
        )


@dataclass
class Candidates:
    """The top 2K continuations of one step, best first."""

    scores: np.ndarray  # [2K] float32 sums of log-probs
    parents: np.ndarray  # [2K] int64 running beam each extends
    sequences: np.ndarray  # [2K, max_new_tokens] parent tokens + the new one at the current length
    done: np.ndarray  # [2K] bool: ends with eos or reaches max_new_tokens


def top_candidates(beams: Beams, log_probs: np.ndarray, length: int, options: DecodingOptions) -> Candidates:
    """log_probs [K, V] of the running beams' next token (processed) -> the best 2K continuations."""
    k, vocab = log_probs.shape
    total = (log_probs + beams.running_scores[:, None]).reshape(-1)  # [K * V]
    best = top_k_indices(total, 2 * k)
    parents, tokens = best // vocab, best % vocab
    sequences = beams.running[parents]
    sequences[:, length] = tokens
    done = np.full(2 * k, length + 1 >= options.max_new_tokens)
    if options.eos_token_id is not None:
        done |= tokens == options.eos_token_id
    return Candidates(total[best], parents, sequences, done)


def next_running(beams: Beams, cand: Candidates) -> np.ndarray:
    """Keep the K best unfinished candidates as the running beams; returns their parents [K]."""
    k = beams.running.shape[0]
    scores = np.where(cand.done, NEG_INF, cand.scores)  # at least K are not done: one eos per parent
    keep = top_k_indices(scores, k)
    beams.running, beams.running_scores = cand.sequences[keep], scores[keep]
    return cand.parents[keep]


def update_finished(beams: Beams, cand: Candidates, length: int, length_penalty: float) -> None:
    """Merge the candidates among the top K that just finished into the K best finished ones.

    (transformers also masks them when the early-stopping heuristic is satisfied; with one prompt
    the search ends at that point, so that never applies here.)"""
    k = beams.running.shape[0]
    just_finished = cand.done & (np.arange(2 * k) < k)  # only the top K may finish
    scores = cand.scores / length_norm(length + 1, length_penalty)
    scores = np.where(just_finished, scores, -np.inf)
    merged_scores = np.concatenate([beams.finished_scores, scores])
    keep = top_k_indices(merged_scores, k)
    beams.finished = np.concatenate([beams.finished, cand.sequences])[keep]
    lengths = np.full(2 * k, length + 1, np.int64)
    beams.finished_lengths = np.concatenate([beams.finished_lengths, lengths])[keep]
    beams.finished_scores = merged_scores[keep]
    beams.is_finished = np.concatenate([beams.is_finished, just_finished])[keep]


def length_norm(length: int, length_penalty: float) -> np.float64:
    """length ** length_penalty, the divisor of a beam's score, in float64: finite for any length
    with the penalty in its bounds (a Python float power raises OverflowError past 1.8e308, and the
    float32 of transformers overflows past 3.4e38: 7132 tokens at length_penalty 10)."""
    return np.float64(length) ** length_penalty


def check_improvable(beams: Beams, length: int, length_penalty: float) -> None:
    """transformers' early-stopping heuristic (early_stopping=False): stop improving once the best
    running beam, scored at its current length, is no better than the worst finished one."""
    best_running = beams.running_scores[0] / length_norm(length, length_penalty)
    worst_finished = np.where(beams.is_finished, beams.finished_scores.min(), -np.inf)
    beams.improvable = beams.improvable and bool(np.any(best_running > worst_finished))


def beam_search(
    step: DecoderStep,
    embed: Embed,
    inputs_embeds: np.ndarray,
    options: DecodingOptions,
    on_step: Callable[[list[int]], None] | None = None,
) -> list[int]:
    """The best hypothesis of transformers' beam search (num_beams K, do_sample=False, early_stopping
    False), generated tokens incl. eos. `on_step(tokens)` gets the best running beam after each step.

    The prompt is run once (batch 1); the first reorder spreads its cache over the K beams."""
    if options.num_beams < 2:
        raise ValueError(f"beam_search needs num_beams >= 2, got {options.num_beams}: use generate_tokens")
    prompt = as_prompt(inputs_embeds)
    k = options.num_beams
    min_new = min_new_tokens(options, prompt.shape[1])
    beams = Beams.start(k, options.max_new_tokens)
    logits, cache = prefill(step, prompt)  # [1, V]
    length = 0  # tokens generated so far
    while True:
        log_probs = log_softmax(logits.astype(np.float32))  # [1 or K, V]
        log_probs = process_scores(log_probs, beams.running[: log_probs.shape[0], :length], options, min_new)
        log_probs = np.broadcast_to(log_probs, (k, log_probs.shape[1]))  # the prefill's row for every beam
        cand = top_candidates(beams, log_probs, length, options)
        parents = next_running(beams, cand)
        update_finished(beams, cand, length, options.length_penalty)
        cache = cache.reorder(np.minimum(parents, logits.shape[0] - 1))  # after the prefill: row 0
        length += 1
        check_improvable(beams, length, options.length_penalty)
        if on_step is not None:
            on_step(beams.running[0, :length].tolist())
        if not beams.improvable or cand.done.all():
            break
        past_length = prompt.shape[1] + length - 1
        logits, cache = decode_one_token(step, embed, beams.running[:, length - 1], cache, past_length)
    return beams.finished[0, : beams.finished_lengths[0]].tolist()


# --- text streaming -------------------------------------------------------------------------------


class Detokenizer(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def releasable(text: str, cut: str | None) -> tuple[int, bool]:
    """How much of `text` can be shown now, and whether the cut was reached. Holds back a trailing
    partial cut (text ending in "\\n" might become "\\n#")."""
    if cut:
        at = text.find(cut)
        if at >= 0:
            return at, True
        for n in range(len(cut) - 1, 0, -1):
            if text.endswith(cut[:n]):
                return len(text) - n, False
    return len(text), False


def stream_text(tokens: Iterable[int], tokenizer: Detokenizer, cut: str | None = ANSWER_CUT) -> Iterator[str]:
    """New text as tokens arrive; the pieces concatenate to `cut_answer(tokenizer.decode(tokens))`.

    The whole sequence is decoded each time and the new suffix emitted (sentencepiece joins pieces
    with context), held back while it ends in an incomplete UTF-8 sequence (U+FFFD). Stops reading
    `tokens` at the cut, which stops a lazy generator too."""
    ids: list[int] = []
    shown = 0
    for token in tokens:
        ids.append(int(token))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT_CHAR):
            continue
        ready, reached_cut = releasable(text, cut)
        if ready > shown:
            yield text[shown:ready]
            shown = ready
        if reached_cut:
            return
    text = tokenizer.decode(ids, skip_special_tokens=True)
    end = text.find(cut) if cut and cut in text else len(text)
    if end > shown:
        yield text[shown:end]
