"""The release's prompt layout and decoding defaults (shared by the reference and the runtime).

LLM input = [bos] + embed("USER: <Img>") + av tokens + embed("</Img> " + prompt + "\\nASSISTANT:"),
text pieces tokenised without special tokens. The frame Q-Former reads the user's prompt as its
instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

from vsal.runtime.errors import ConfigError

PROMPT_BEFORE = "USER: <Img>"
PROMPT_AFTER = "</Img> {prompt}\nASSISTANT:"
ANSWER_CUT = "\n#"  # the release keeps only what comes before this


@dataclass(frozen=True)
class DecodingOptions:
    """Released decoding: beam search in forward(generate=True); generate() uses one beam.

    The first five fields are what the release sets; the sampling fields are the runtime's own
    (the release never samples). Every field is checked here, in one place.
    """

    num_beams: int = 5  # 1 = greedy or sampling, > 1 = beam search (transformers' semantics)
    max_new_tokens: int = 512  # max_tgt_len; the eos token counts as one of them
    min_length: int = 1  # transformers' min_length: prompt + generated tokens (eos blocked below it)
    repetition_penalty: float = 1.5  # > 1 penalises generated tokens (not the prompt, which is embeddings)
    length_penalty: float = 1.0  # beam score = sum of log-probs / generated length ** length_penalty
    sample: bool = False  # draw tokens from the distribution instead of taking the best (num_beams 1 only)
    temperature: float = 1.0  # sampling only: logits / temperature
    top_k: int = 0  # sampling only: keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # sampling only: keep the smallest set with probability > top_p; 1 = all
    seed: int | None = None  # sampling only: numpy Generator seed; None = fresh entropy
    eos_token_id: int | None = 2  # stops a sequence (LLaMA's "</s>"); None = run to max_new_tokens

    def __post_init__(self) -> None:
        problems = []
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_length < 0:
            problems.append(f"min_length must be >= 0, got {self.min_length}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.sample and self.num_beams > 1:
            problems.append(f"sampling works with num_beams 1, got num_beams {self.num_beams}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (use sample=False for greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.eos_token_id is not None and self.eos_token_id < 0:
            problems.append(f"eos_token_id must be >= 0 or None, got {self.eos_token_id}")
        if problems:
            raise ConfigError("invalid decoding options: " + "; ".join(problems))


def prompt_after(prompt: str) -> str:
    return PROMPT_AFTER.format(prompt=prompt)


def cut_answer(text: str) -> str:
    """The release's post-processing: drop everything from the first "\\n#"."""
    return text.split(ANSWER_CUT, 1)[0]
