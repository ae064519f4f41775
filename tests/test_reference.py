"""The PyTorch reference pipeline on generated clips (tiny preset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vsal.export.reference import CLIP_MEAN, CLIP_STD, ReferencePipeline, preprocess_frame
from vsal.runtime.prompt import PROMPT_BEFORE, DecodingOptions, cut_answer, prompt_after
from vsal.runtime.synthetic import write_clip, write_tone

GREEDY = DecodingOptions(num_beams=1, max_new_tokens=6)


@pytest.fixture(scope="module")
def pipeline(tiny_model, tokenizer_assets):
    return ReferencePipeline(tiny_model, tokenizer_assets.llama_dir, tokenizer_assets.bert_vocab.parent)


def test_encoder_inputs_of_a_10s_clip(pipeline, clip_10s):
    inputs = pipeline.prepare(video=clip_10s)
    assert inputs.pixel_values.shape == (20, 3, 224, 224)
    assert inputs.input_features.shape == (1, 80, 3000)
    assert inputs.fbank.shape[0] == 1 and inputs.fbank.shape[2] == 128
    assert 995 <= inputs.fbank.shape[1] <= 1001  # ~10 s at 10 ms


def test_frame_preprocessing_is_bicubic_then_clip_normalised():
    frame = np.full((90, 160, 3), (200, 100, 50), dtype=np.uint8)
    got = preprocess_frame(frame)
    expected = (torch.tensor([200, 100, 50]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got[:, 100, 100], expected.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["video+audio", "video-only", "audio-only"])
def test_a_10s_clip_gives_180_llm_tokens(pipeline, clip_10s, tmp_path, case):
    if case == "video+audio":
        inputs = pipeline.prepare(video=clip_10s)
    elif case == "video-only":
        silent = write_clip(tmp_path / "silent.mp4", seconds=10.0, size=(64, 48), audio_rate=None)
        inputs = pipeline.prepare(video=silent)
        assert inputs.input_features is None
    else:
        inputs = pipeline.prepare(audio=write_tone(tmp_path / "tone.wav", seconds=10.0))
        assert inputs.pixel_values is None
    tokens = pipeline.av_tokens(inputs, "What is happening?")
    # Audio always spans 60 slots (30 s Whisper window); video-only still gets 60 (zero audio).
    assert tokens.shape == (1, 180, pipeline.config.llm.hidden_size)
    assert torch.isfinite(tokens).all()


def test_a_long_video_gives_3_tokens_per_half_second(pipeline, tmp_path):
    clip = write_clip(tmp_path / "long.mp4", seconds=40.0, fps=4, size=(64, 48))
    tokens = pipeline.av_tokens(pipeline.prepare(video=clip), "Describe it.")
    assert tokens.shape[1] == 240  # 80 frames -> 80 slots -> 240 tokens


def test_prompt_embedding_layout(pipeline):
    av = torch.randn(1, 180, pipeline.config.llm.hidden_size)
    embeds = pipeline.inputs_embeds(av, "What is said?")
    before = pipeline.text_ids(PROMPT_BEFORE).shape[1]
    after = pipeline.text_ids(prompt_after("What is said?")).shape[1]
    assert embeds.shape[1] == 1 + before + 180 + after
    torch.testing.assert_close(embeds[:, 1 + before : 1 + before + 180], av)
    bos = pipeline.model.llm.embed(torch.tensor([[1]]))
    torch.testing.assert_close(embeds[:, :1], bos)


def test_release_prompt_pieces_tokenise_like_vicuna(pipeline):
    assert pipeline.text_ids(PROMPT_BEFORE).tolist() == [[3148, 1001, 29901, 529, 25518, 29958]]
    ids, mask = pipeline.instruction("What is said?")
    assert ids.tolist() == [[101, 2054, 2003, 2056, 1029, 102]] and mask.sum() == 6


def test_greedy_and_beam_answers_are_deterministic(pipeline, clip_10s):
    first = pipeline.ask("What is happening?", video=clip_10s, options=GREEDY)
    again = pipeline.ask("What is happening?", video=clip_10s, options=GREEDY)
    assert first.token_ids == again.token_ids and 1 <= len(first.token_ids) <= 6
    assert first.av_tokens == 180
    beam = pipeline.ask(
        "What is happening?", video=clip_10s, options=DecodingOptions(num_beams=3, max_new_tokens=6)
    )
    assert 1 <= len(beam.token_ids) <= 6


def test_answer_is_cut_at_newline_hash():
    assert cut_answer("A dog barks.\n### Human: more") == "A dog barks."
    assert cut_answer("no cut here") == "no cut here"
