"""What one request may ask of the LLM decoder: its optimisation profile, read from the manifest.

The llm_decoder graph (and every engine built from it) takes B rows (beams), T new positions and
a past of P positions, each within its profile's [min, max]. A request reads its whole input at
once (T = bos + template + clip tokens + question), then one token per step, the past growing
by one each time: input + new tokens must fit the context, P max + 1 (the export's contract:
T max + max_tgt_len). Checking this before any encoder runs makes a request past a limit cost
nothing (a 50,000-token prompt once took 21.9 GB in the decoder), and the messages say what to ask
for instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from vsal.runtime.errors import LimitError
from vsal.runtime.manifest import GraphInfo
from vsal.runtime.prompt import DecodingOptions

# What `vsal serve` takes of one request by default (`--max-upload-mib`, `--max-new-tokens-limit`;
# parameters of the orchestrator's config.pbtxt), beside the decoder's own limits below.
PORTS = (1, 65535)  # TCP ports a server can listen on (0 would be one the kernel picks)
MAX_UPLOAD_MIB = 256  # MiB, each media file (video, audio)
MAX_NEW_TOKENS_LIMIT = 512  # new tokens a request may ask for: the release's max_tgt_len
# Characters one token of the question covers at most: sentencepiece caps a piece at 16 characters
# (LLaMA's max_sentencepiece_length; 32 leaves room for other vocabularies), so a question of more
# than T max * 32 characters cannot fit: it is refused by its length, before the tokenizer would
# spend memory on it (a 50 MB line once reached 2.86 GB of RSS in it).
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class DecoderLimits:
    max_beams: int  # B max: rows in one call
    max_input: int  # T max: LLM input tokens the prefill reads at once
    context: int  # P max + 1: LLM input + generated tokens

    @classmethod
    def of(cls, decoder: GraphInfo) -> DecoderLimits:
        profile = decoder.profile
        return cls(profile["B"]["max"], profile["T"]["max"], profile["P"]["max"] + 1)

    def check_question_length(self, characters: int) -> None:
        """LimitError when a question of this many characters cannot fit T max, whatever its tokens."""
        most = self.max_input * MAX_CHARS_PER_TOKEN
        if characters > most:
            raise LimitError(
                f"the question is {characters:,} characters, more than any LLM input holds: the decoder "
                f"reads at most {self.max_input} at once (llm_decoder profile T max), a token covers at "
                f"most {MAX_CHARS_PER_TOKEN} characters: shorten the question to at most {most:,} characters"
            )

    def check(self, options: DecodingOptions, text_tokens: int, av_tokens: int) -> None:
        """LimitError when the request does not fit: text_tokens (bos, template and question) and
        av_tokens (the clip) make the LLM input."""
        if options.num_beams > self.max_beams:
            raise LimitError(
                f"num_beams {options.num_beams} is more than the decoder takes (llm_decoder profile "
                f"B max {self.max_beams}): ask for at most {self.max_beams} beams (--beams)"
            )
        total = text_tokens + av_tokens
        if total > self.max_input:
            raise LimitError(
                f"the LLM input is {total} tokens (question and template {text_tokens}, clip {av_tokens}); "
                f"the decoder reads at most {self.max_input} at once (llm_decoder profile T max): "
                + (
                    f"shorten the question by at least {total - self.max_input} tokens"
                    if av_tokens < self.max_input
                    else "the clip alone is over it: use a shorter clip"
                )
            )
        room = self.context - total
        if options.max_new_tokens > room:
            raise LimitError(
                f"max_new_tokens {options.max_new_tokens} does not fit: the decoder's context holds "
                f"{self.context} tokens (llm_decoder profile P max {self.context - 1} + 1) and this "
                f"request's input takes {total}: ask for at most {room} new tokens (--max-new-tokens)"
            )
