"""The release's prompt layout and decoding defaults (shared by the reference and the runtime).

LLM input = [bos] + embed("USER: <Img>") + av tokens + embed("</Img> " + prompt + "\\nASSISTANT:"),
text pieces tokenised without special tokens. The frame Q-Former reads the user's prompt as its
instruction.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import sys
import unicodedata
from dataclasses import dataclass, fields

from vsal.runtime.errors import ConfigError, PromptError

PROMPT_BEFORE = "USER: <Img>"
PROMPT_AFTER = "</Img> {prompt}\nASSISTANT:"
ANSWER_CUT = "\n#"  # the release keeps only what comes before this
# Control characters (C0, DEL, C1) but tab, newline and carriage return (multi-line questions).
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
SURROGATES = re.compile("[\ud800-\udfff]")  # what undecodable bytes become in a str


@dataclass(frozen=True)
class DecodingOptions:
    """Released decoding: beam search in forward(generate=True); generate() uses one beam.

    The first five fields are what the release sets; the sampling fields are the runtime's own
    (the release never samples). Every field is checked here, in one place. The float fields are
    bounded (`BOUNDS`) far past any real use, so that no value accepted can overflow the math.
    """

    num_beams: int = 5  # 1 = greedy or sampling, > 1 = beam search (transformers' semantics)
    max_new_tokens: int = 512  # max_tgt_len; the eos token counts as one of them
    min_length: int = 1  # transformers' min_length: prompt + generated tokens (eos blocked below it)
    repetition_penalty: float = 1.5  # [1e-3, 1e3]; > 1 penalises generated tokens (the prompt is embeddings)
    length_penalty: float = 1.0  # [-10, 10]; beam score = sum of log-probs / generated length**length_penalty
    sample: bool = False  # draw tokens from the distribution instead of taking the best (num_beams 1 only)
    temperature: float = 1.0  # [1e-3, 1e3]; sampling only: logits / temperature
    top_k: int = 0  # sampling only: keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # sampling only: keep the smallest set with probability > top_p; 1 = all
    seed: int | None = None  # sampling only: numpy Generator seed; None = fresh entropy
    eos_token_id: int | None = 2  # stops a sequence (LLaMA's "</s>"); None = run to max_new_tokens

    def __post_init__(self) -> None:
        problems = _type_problems(self)
        if problems:  # comparing a string or None with a number would fail with a TypeError
            raise ConfigError("invalid decoding options: " + "; ".join(problems))
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1, got {_shown(self.num_beams)}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {_shown(self.max_new_tokens)}")
        if self.min_length < 0:
            problems.append(f"min_length must be >= 0, got {_shown(self.min_length)}")
        if self.sample and self.num_beams > 1:
            problems.append(f"sampling works with num_beams 1, got num_beams {_shown(self.num_beams)}")
        problems += _bound_problems(self)
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {_shown(self.top_k)}")
        if self.seed is not None and self.seed < 0:
            problems.append(f"seed must be >= 0 or None, got {_shown(self.seed)}")
        if self.eos_token_id is not None and self.eos_token_id < 0:
            problems.append(f"eos_token_id must be >= 0 or None, got {_shown(self.eos_token_id)}")
        if problems:
            raise ConfigError("invalid decoding options: " + "; ".join(problems))


# The float options' [min, max]: transformers takes any value (any positive one for the first two);
# real use stays well inside (the release: repetition penalty 1.5, length penalty 1.0; sampling
# usually at temperature 0.1-2). Inside these bounds float32 logits cannot overflow the processors,
# and generated_length ** length_penalty stays finite in float64 for any length.
BOUNDS = {"repetition_penalty": (1e-3, 1e3), "length_penalty": (-10.0, 10.0), "temperature": (1e-3, 1e3)}


def _bound_problems(options: DecodingOptions) -> list[str]:
    """The float options: finite, and in BOUNDS (top_p in (0, 1])."""
    problems = []
    for name in (*BOUNDS, "top_p"):
        value = getattr(options, name)
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):  # an int may not fit a float
            problems.append(f"{name} must be a finite number, got {value}")
        elif name == "temperature" and value <= 0:
            problems.append(
                f"temperature must be > 0, got {_shown(value)} (greedy decoding, the default when not "
                "sampling, takes no temperature)"
            )
        elif name == "top_p" and not 0 < value <= 1:
            problems.append(f"top_p must be in (0, 1], got {_shown(value)}")
        elif name in BOUNDS and not BOUNDS[name][0] <= value <= BOUNDS[name][1]:
            low, high = BOUNDS[name]
            problems.append(f"{name} must be in [{low:g}, {high:g}], got {_shown(value)}")
    return problems


def _shown(value: object) -> str:
    """A value as a message shows it; an integer of more than 20 digits by its size (Python refuses
    to write one of more than 4300 digits as text)."""
    if isinstance(value, numbers.Integral) and abs(int(value)) >= 10**20:
        return f"{'a negative' if value < 0 else 'an'} integer of {abs(int(value)).bit_length()} bits"
    return str(value)


def _type_problems(options: DecodingOptions) -> list[str]:
    """Each field against its annotation (options also arrive as JSON from a server's client)."""
    problems = []
    for f in fields(options):
        value = getattr(options, f.name)
        if value is None and "None" in f.type:
            continue
        if f.type.startswith("bool"):
            ok = isinstance(value, bool)
        elif f.type.startswith("int"):
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        else:  # float: an int is a number too
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not ok:
            problems.append(f"{f.name} must be {f.type.replace(' | None', ' or None')}, got {value!r}")
    return problems


def check_prompt(prompt: str | bytes) -> str:
    """The prompt as text, or a PromptError saying what is wrong with it.

    Bytes (a server request) must be UTF-8. A str must encode as UTF-8: the command line hands
    undecodable bytes over as surrogate escapes, which no tokenizer can read. A prompt that is
    empty or only whitespace and invisible format characters is refused, and so are control
    characters other than tab, newline and carriage return (NUL, escape sequences: never part of a
    question, usually binary input).
    """
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptError(
                f"the prompt is not valid UTF-8 text (byte 0x{prompt[exc.start]:02x} at byte {exc.start}): "
                "send the question as UTF-8"
            ) from None
    if not isinstance(prompt, str):
        raise PromptError(f"the prompt must be text, got {type(prompt).__name__}")
    bad = SURROGATES.search(prompt)
    if bad:
        raise PromptError(
            f"the prompt is not valid UTF-8 text ({_surrogate(bad.group())} at character {bad.start()}): "
            "give the question as UTF-8 (check the terminal's or the file's encoding)"
        )
    bad = CONTROL_CHARS.search(prompt)
    if bad:
        raise PromptError(
            f"the prompt holds control character U+{ord(bad.group()):04X} at character {bad.start()}; "
            "only tab, newline and carriage return are accepted: remove it"
        )
    if _blank().fullmatch(prompt):
        raise PromptError("the prompt is empty (only whitespace or invisible characters): ask a question")
    return prompt


@functools.cache
def _blank() -> re.Pattern:
    """Text of nothing but whitespace and format characters (category Cf: U+200B, U+FEFF, ...),
    which show nothing. Built on first use: listing Cf takes a pass over all of Unicode (~60 ms)."""
    invisible = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c) == "Cf")
    return re.compile(f"[\\s{re.escape(invisible)}]*")


def _surrogate(char: str) -> str:
    """What a lone surrogate stands for: an undecodable byte (surrogateescape), or itself."""
    code = ord(char)
    return f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"


def prompt_after(prompt: str) -> str:
    return PROMPT_AFTER.format(prompt=prompt)


def cut_answer(text: str) -> str:
    """The release's post-processing: drop everything from the first "\\n#"."""
    return text.split(ANSWER_CUT, 1)[0]
