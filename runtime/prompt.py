"""The release's prompt layout and decoding defaults (shared by the reference and the runtime).

LLM input = [bos] + embed("USER: <Img>") + av tokens + embed("</Img> " + prompt + "\\nASSISTANT:"),
text pieces tokenised without special tokens. The frame Q-Former reads the user's prompt as its
instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_BEFORE = "USER: <Img>"
PROMPT_AFTER = "</Img> {prompt}\nASSISTANT:"
ANSWER_CUT = "\n#"  # the release keeps only what comes before this


@dataclass(frozen=True)
class DecodingOptions:
    """Released decoding: beam search in forward(generate=True); generate() uses one beam."""

    num_beams: int = 5
    max_new_tokens: int = 512  # max_tgt_len
    min_length: int = 1
    repetition_penalty: float = 1.5
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def prompt_after(prompt: str) -> str:
    return PROMPT_AFTER.format(prompt=prompt)


def cut_answer(text: str) -> str:
    """The release's post-processing: drop everything from the first "\\n#"."""
    return text.split(ANSWER_CUT, 1)[0]
