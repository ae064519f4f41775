"""Limits on every path: requests past the decoder's profile are refused before any encoder runs,
every backend checks its feeds (the IO-binding decoder step too), prompts must be valid text."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vsal.runtime.backends import BackendError
from vsal.runtime.backends.onnx_runtime import OrtKVCache
from vsal.runtime.errors import ConfigError, LimitError, PromptError
from vsal.runtime.graphs import KVLayout
from vsal.runtime.limits import MAX_CHARS_PER_TOKEN
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.prompt import DecodingOptions, check_prompt

BIN = Path(sys.executable).parent
GREEDY = DecodingOptions(num_beams=1, max_new_tokens=3)


class SpyPipeline(Pipeline):
    """Records every graph asked for: an encoder that runs must be asked for first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graphs_used: list[str] = []

    def backend(self, name):
        self.graphs_used.append(name)
        return super().backend(name)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from vsal.runtime.synthetic import write_clip, write_tone

    folder = tmp_path_factory.mktemp("limits")
    return {
        "wav": write_tone(folder / "tone.wav", seconds=2.0),
        # 35 s of silent video: 35 clips, 70 frames -> 70 slots, more than audio's 60
        "video": write_clip(folder / "long.mp4", seconds=35.0, fps=4, size=(64, 48), audio_rate=None),
    }


@pytest.fixture
def spy(tiny_package):
    return SpyPipeline.load(tiny_package, provider="cpu", verbose=False, verify=False)


@pytest.fixture(scope="module")
def pipeline(tiny_package):
    return Pipeline.load(tiny_package, provider="cpu", verbose=False, verify=False)


def _limits(pipeline):
    profile = pipeline.manifest.graphs["llm_decoder"].profile
    return profile["B"]["max"], profile["T"]["max"], profile["P"]["max"] + 1


def test_a_huge_prompt_is_refused_before_any_encoder(spy, media):
    _, t_max, _ = _limits(spy)
    with pytest.raises(LimitError, match=rf"at most {t_max} at once \(llm_decoder profile T max\)"):
        spy.ask("a " * 50_000, audio=media["wav"], options=GREEDY)
    assert spy.graphs_used == []


def _tokenised(pipeline, monkeypatch) -> list[int]:
    """Records the length of every text the LLM tokenizer is asked to encode."""
    lengths: list[int] = []
    encode = pipeline.llama.encode

    def recording(text):
        lengths.append(len(text))
        return encode(text)

    monkeypatch.setattr(pipeline.llama, "encode", recording)
    return lengths


def test_a_question_longer_than_t_max_tokens_can_be_is_refused_untokenised(spy, media, monkeypatch):
    _, t_max, _ = _limits(spy)
    most = t_max * MAX_CHARS_PER_TOKEN
    lengths = _tokenised(spy, monkeypatch)
    with pytest.raises(LimitError, match=rf"is {most + 1:,} characters.* at most {most:,} characters$"):
        spy.ask("a" * (most + 1), audio=media["wav"], options=GREEDY)
    assert lengths == [] and spy.graphs_used == []
    with pytest.raises(LimitError, match="shorten the question by at least"):  # the token count decides
        spy.check_request("a " * (most // 2), GREEDY)
    assert max(lengths) > most


def test_beams_past_b_max_are_refused_before_any_encoder(spy, media):
    b_max, _, _ = _limits(spy)
    expected = rf"num_beams {b_max + 1} .* B max {b_max}\): ask for at most {b_max}"
    with pytest.raises(LimitError, match=expected):
        spy.ask("What?", video=media["video"], options=DecodingOptions(num_beams=b_max + 1))
    assert spy.graphs_used == []


def test_max_new_tokens_past_the_context_names_what_fits(spy, media):
    _, _, context = _limits(spy)
    head, tail = spy.text_ids("What?")
    room = context - len(head) - len(tail) - spy.av_token_count(70)  # the 35 s video's 70 frames
    huge = DecodingOptions(num_beams=4, max_new_tokens=10**9)
    with pytest.raises(LimitError, match=rf"holds {context} tokens .* ask for at most {room} new tokens"):
        spy.ask("What?", video=media["video"], options=huge)
    assert spy.graphs_used == []
    spy.check_request("What?", DecodingOptions(num_beams=4, max_new_tokens=room), video=media["video"])


def test_the_token_count_known_before_encoding_is_the_decoders(pipeline, media):
    answer = pipeline.ask("What?", video=media["video"], options=GREEDY)
    assert answer.av_tokens == pipeline.av_token_count(70) > pipeline.av_token_count(0)
    assert pipeline.ask("What?", audio=media["wav"], options=GREEDY).av_tokens == pipeline.av_token_count(0)


def test_a_request_filling_the_context_exactly_runs(pipeline, media):
    """The limits are not stricter than the profile: input T max - a few, every new token the
    context leaves (eos blocked throughout), and the decoder's feed checks never object."""
    _, t_max, context = _limits(pipeline)
    head, tail = pipeline.text_ids("")
    av = pipeline.av_token_count(0)
    question = "a " * (t_max - av - len(head) - len(tail) - 4)
    head, tail = pipeline.text_ids(question)
    given = len(head) + len(tail) + av
    assert given <= t_max
    options = DecodingOptions(num_beams=1, max_new_tokens=context - given, min_length=context)
    answer = pipeline.ask(question, audio=media["wav"], options=options)
    assert len(answer.token_ids) == context - given


# --- the IO-binding decoder step checks its feeds ----------------------------------------------------


@pytest.fixture(scope="module")
def bound_step(pipeline):
    llm = pipeline.llm
    layout = KVLayout.of_llm(llm)
    step = pipeline.backend("llm_decoder").decoder_step(layout)  # ONNX Runtime's: IO binding
    return step, llm["hidden_size"], (layout.kv_heads, layout.head_dim)


def _feeds(t: int, hidden: int, past: int = 0):
    return (
        np.zeros((1, t, hidden), np.float32),
        np.ones((1, past + t), np.int64),
        np.arange(past, past + t, dtype=np.int64)[None],
    )


def test_the_bound_step_runs_good_feeds(bound_step):
    step, hidden, _ = bound_step
    logits, cache = step(*_feeds(3, hidden), None)
    assert logits.shape[:2] == (1, 3) and cache.values[0].shape()[2] == 3


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, m, p: (x.astype(np.float64), m, p), "inputs_embeds is float64, expected float32"),
        (lambda x, m, p: (x, m.astype(np.int32), p), "attention_mask is int32, expected int64"),
        (lambda x, m, p: (x[..., :-1], m, p), "inputs_embeds has shape"),
        (lambda x, m, p: (x, m[:, :-1], p), "attention_mask dimension 1 is 2, expected P\\+T = 3"),
        (lambda x, m, p: (x, m, p[:, :, None]), "position_ids has shape .* expected rank 2"),
    ],
)
def test_the_bound_step_refuses_a_wrong_feed(bound_step, change, message):
    step, hidden, _ = bound_step
    with pytest.raises(BackendError, match=f"llm_decoder: .*{message}"):
        step(*change(*_feeds(3, hidden)), None)


def test_the_bound_step_refuses_inputs_past_the_profile(pipeline, bound_step):
    import onnxruntime as ort

    step, hidden, (heads, head_dim) = bound_step
    _, t_max, context = _limits(pipeline)
    expected = rf"inputs_embeds axis T = {t_max + 1} is outside .*\[1, {t_max}\]"
    with pytest.raises(BackendError, match=expected):
        step(*_feeds(t_max + 1, hidden), None)
    past = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, context, head_dim), np.float32))
    cache = OrtKVCache(tuple(past for _ in step.past), "cpu")
    with pytest.raises(BackendError, match=rf"axis P = {context} is outside .*\[0, {context - 1}\]"):
        step(*_feeds(1, hidden, past=context), cache)


# --- prompts are text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("", "the prompt is empty"),
        (" \n\t", "the prompt is empty"),
        ("ab\udcffc", r"not valid UTF-8 text \(byte 0xff at character 2\)"),
        ("\ud800", r"lone surrogate U\+D800 at character 0"),
        (b"ok \xc3(", r"not valid UTF-8 text \(byte 0xc3 at byte 3\)"),
        ("a\x00b", r"control character U\+0000 at character 1"),
        ("\x1b[2J", r"control character U\+001B at character 0"),
        (5, "the prompt must be text, got int"),
    ],
)
def test_a_prompt_that_is_not_text_is_a_prompt_error(prompt, message):
    with pytest.raises(PromptError, match=message):
        check_prompt(prompt)


@pytest.mark.parametrize(
    "prompt", ["\u200b", "\ufeff \u00a0", "\u2028\u3000\t", "\u200b\ufeff\u00a0\u2028\u3000"]
)
def test_a_prompt_of_invisible_characters_is_empty(prompt):
    with pytest.raises(
        PromptError, match=r"^the prompt is empty \(only whitespace or invisible characters\)"
    ):
        check_prompt(prompt)
    assert check_prompt(prompt + "?") == prompt + "?"


def test_text_with_tabs_newlines_and_any_script_is_a_prompt():
    for prompt in ("What is said?", "line one\r\nline two\tend", "Что говорят? 何と言っていますか 🎵"):
        assert check_prompt(prompt) == prompt
    assert check_prompt("é".encode()) == "é"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_beams": "5"}, "num_beams must be int, got '5'"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be int, got 2.5"),
        ({"sample": 1}, "sample must be bool, got 1"),
        ({"num_beams": True}, "num_beams must be int, got True"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"repetition_penalty": math.inf}, "repetition_penalty must be a finite number"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": "x"}, "seed must be int or None"),
    ],
)
def test_decoding_options_of_the_wrong_type_are_a_config_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        DecodingOptions(**fields)


# --- the command line ---------------------------------------------------------------------------------


def _vsal(*args, stdin: bytes | None = None):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONIOENCODING="utf-8")
    return subprocess.run([str(BIN / "vsal"), *args], input=stdin, capture_output=True, timeout=300, env=env)


def test_an_invalid_utf8_prompt_is_one_line(tiny_package, media):
    out = _vsal("run", str(tiny_package), "--audio", str(media["wav"]), "--prompt", b"caf\xe9?")
    assert out.returncode == 1
    assert out.stderr.decode().splitlines() == [
        "vsal: error: the prompt is not valid UTF-8 text (byte 0xe9 at character 3): give the question "
        "as UTF-8 (check the terminal's or the file's encoding)"
    ]


def test_chat_goes_on_after_bad_lines(tiny_package, media):
    lines = [b"\xff\xfe what?", b"bell \x07", b"a " * 2000, b"What is it?", b""]
    out = _vsal(
        "chat",
        str(tiny_package),
        "--audio",
        str(media["wav"]),
        "--beams",
        "1",
        "--max-new-tokens",
        "3",
        stdin=b"\n".join(lines),
    )
    stderr = out.stderr.decode()
    assert out.returncode == 0, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("vsal: error:")]
    assert len(errors) == 3
    assert "not valid UTF-8" in errors[0] and "U+0007" in errors[1] and "T max" in errors[2]
    assert out.stdout.decode().count("> ") == 5  # every line was read, the fourth one answered


def test_chat_refuses_its_options_before_encoding(tiny_package, media):
    out = _vsal("chat", str(tiny_package), "--audio", str(media["wav"]), "--beams", "64", stdin=b"hi\n")
    stderr = out.stderr.decode()
    assert out.returncode == 1
    assert stderr.splitlines()[-1].startswith("vsal: error: num_beams 64 is more than the decoder takes")
    assert "whisper_encoder" not in stderr  # no backend was chosen: no encoder ran


# --- decoding options: out of bounds on the command line and in a server's OPTIONS ----------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sample", "--temperature", "1e-39"], r"temperature must be in \[0.001, 1000\], got 1e-39"),
        (["--sample", "--temperature", "1e300"], r"temperature must be in \[0.001, 1000\], got 1e\+300"),
        (["--temperature", "0"], r"temperature must be > 0, got 0.0 \(greedy decoding, the default"),
    ],
)
def test_out_of_bounds_decoding_options_are_one_line_on_the_command_line(tiny_package, media, args, message):
    out = _vsal("run", str(tiny_package), "--audio", str(media["wav"]), "--prompt", "hi", *args)
    stderr = out.stderr.decode()
    assert out.returncode == 1, stderr
    assert len(stderr.splitlines()) == 1
    assert re.match("vsal: error: invalid decoding options: " + message, stderr)
    assert "Warning" not in stderr and "sample=" not in stderr


@pytest.fixture
def options_of(monkeypatch):
    """The orchestrator's OPTIONS parser, imported with a bare stand-in for Triton's backend module."""
    import types

    stand_in = types.ModuleType("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    for name in ("orchestrator", "dlpack"):  # bound to the stand-in: imported afresh, dropped after
        monkeypatch.delitem(sys.modules, f"vsal.runtime.serving.triton_models.{name}", raising=False)
    from vsal.runtime.serving.triton_models.orchestrator import _options

    yield _options
    import vsal.runtime.serving.triton_models as package

    for name in ("orchestrator", "dlpack"):  # the module and the package's attribute both go
        sys.modules.pop(f"{package.__name__}.{name}", None)
        package.__dict__.pop(name, None)


@pytest.mark.parametrize(
    "data, message",
    [
        (
            b'{"seed": 1' + b"0" * 5000 + b"}",
            r"^OPTIONS is not JSON \(Exceeds the limit \(4300 .*5001 digits\)$",
        ),
        (b'{"sample": true, "num_beams": 1, "temperature": 1e-39}', r"temperature must be in \[0.001, 1"),
        (b'{"sample": true, "num_beams": 1, "repetition_penalty": 1e-45}', r"repetition_penalty must be in"),
        (b'{"num_beams": 2, "length_penalty": 2000}', r"length_penalty must be in \[-10, 10\], got 2000$"),
        (b'{"temperature": NaN}', "temperature must be a finite number, got nan$"),
        (b'{"length_penalty": -1e400}', "length_penalty must be a finite number, got -inf$"),
        (b'{"temperature": 1' + b"0" * 400 + b"}", r"temperature must be in .*, got an integer of 1329 bits"),
        (b'{"seed": -1' + b"0" * 40 + b"}", "seed must be >= 0 or None, got a negative integer of 133 bits$"),
        (b"\xff{}", r"^OPTIONS is not JSON \("),
    ],
)
def test_server_options_out_of_bounds_are_a_config_error(options_of, data, message):
    with pytest.raises(ConfigError, match=message) as caught:
        options_of(data)
    assert "set_int_max_str_digits" not in str(caught.value)


def test_server_options_with_huge_valid_integers_parse(options_of):
    data = b'{"num_beams": 1, "sample": true, "seed": 1' + b"0" * 40 + b', "min_length": 1' + b"0" * 30 + b"}"
    options = options_of(data)
    assert options.seed == 10**40 and options.min_length == 10**30
