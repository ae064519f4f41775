"""Real weights through ONNX: Whisper tiny.en exported as a whisper_encoder graph transcribes a
spoken clip exactly as its PyTorch encoder does (transformers' decoder reads either output)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from vsal.export.config import WhisperEncoderConfig
from vsal.export.models.video_salmonn import build_part
from vsal.export.onnx_export import export_graph, validate_graph
from vsal.export.specs import graph_specs
from vsal.export.weights import real_weights as rw
from vsal.runtime.backends import ort_session

from tests.test_real_weights import KEY_WORDS, SPOKEN, _espeak_16k

CALIBRATION_SENTENCES = (
    "The weather today is cold and windy, so bring a warm coat.",
    "Please open the window and let some fresh air into the room.",
    "Seven hundred people came to the concert in the park last night.",
)


@pytest.fixture(scope="module")
def whisper():
    return rw.load_whisper_tiny_en(), rw.load_whisper_tiny_en_tokenizer()


def _tiny_en_config(tiny_config, hf):
    """The tiny preset with Whisper tiny.en's encoder and a frame width equal to its d_model, so the
    speech projection can be the identity and the graph's output is the encoder's own."""
    width = hf.d_model
    whisper = WhisperEncoderConfig(
        num_mel_bins=hf.num_mel_bins,
        d_model=width,
        encoder_layers=hf.encoder_layers,
        encoder_attention_heads=hf.encoder_attention_heads,
        encoder_ffn_dim=hf.encoder_ffn_dim,
    )
    fq = dataclasses.replace(tiny_config.frame_qformer, hidden_size=width)
    mrc = dataclasses.replace(tiny_config.mrc_qformer, hidden_size=width, encoder_width=3 * width)
    return dataclasses.replace(tiny_config, whisper=whisper, frame_qformer=fq, mrc_qformer=mrc)


@pytest.fixture(scope="module")
def exported(whisper, tiny_config, tmp_path_factory):
    """Whisper tiny.en's encoder as a whisper_encoder graph: (config, PyTorch part, ONNX path)."""
    model, _ = whisper
    config = _tiny_en_config(tiny_config, model.config)
    part = build_part(config, "whisper_encoder")
    part.encoder.load_state_dict(model.model.encoder.state_dict())
    with torch.no_grad():
        part.speech_pre_qformer_proj.weight.copy_(torch.eye(config.whisper.d_model))
        part.speech_pre_qformer_proj.bias.zero_()
    spec = graph_specs(config)["whisper_encoder"]
    path = export_graph(spec, part, tmp_path_factory.mktemp("whisper") / "whisper_encoder.onnx")[0]
    return config, part, spec, path


def _features(text: str, tmp_path) -> np.ndarray:
    from transformers import WhisperFeatureExtractor

    audio = _espeak_16k(text, tmp_path)
    features = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np")
    return features.input_features


def _transcribe(model, tokenizer, states: np.ndarray) -> tuple[list[int], str]:
    from transformers.modeling_outputs import BaseModelOutput

    with torch.inference_mode():
        ids = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=torch.from_numpy(states)), do_sample=False
        )
    return ids[0].tolist(), tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def test_onnx_encoder_transcribes_like_pytorch(whisper, exported, tmp_path):
    model, tokenizer = whisper
    config, part, spec, path = exported
    validation = validate_graph(spec, part, path)  # B = 1 and 3 against PyTorch
    assert validation.worst() < 1e-3

    features = _features(SPOKEN, tmp_path)
    onnx_states = ort_session(path).run(["speech_tokens"], {"input_features": features})[0]
    with torch.inference_mode():
        torch_ids = model.generate(torch.from_numpy(features), do_sample=False)
    onnx_ids, onnx_text = _transcribe(model, tokenizer, onnx_states)
    torch_text = tokenizer.decode(torch_ids[0], skip_special_tokens=True).strip()
    assert onnx_ids == torch_ids[0].tolist(), (onnx_text, torch_text)
    assert "football" in onnx_text.lower()
    np.testing.assert_allclose(
        onnx_states,
        model.model.encoder(torch.from_numpy(features)).last_hidden_state.detach(),
        atol=1e-3,
    )


def test_int8_encoder_still_transcribes(whisper, exported, tmp_path):
    """The int8 build of a real Whisper encoder (calibrated on other sentences) keeps the transcript."""
    from vsal.export.accuracy import accuracy
    from vsal.transforms.int8 import quantize_int8

    model, tokenizer = whisper
    _, _, _, path = exported
    calibration = [{"input_features": _features(t, tmp_path)} for t in CALIBRATION_SENTENCES]
    int8 = tmp_path / "whisper_encoder.int8.onnx"
    quantize_int8(path, int8, calibration)
    held_out = {"input_features": _features(SPOKEN, tmp_path)}
    fp32_ids, fp32_text = _transcribe(model, tokenizer, ort_session(path).run(["speech_tokens"], held_out)[0])
    int8_ids, int8_text = _transcribe(model, tokenizer, ort_session(int8).run(["speech_tokens"], held_out)[0])
    cosine = accuracy(path, int8, [held_out])["speech_tokens"]["cosine"]
    print(f"int8 Whisper tiny.en: cosine {cosine:.5f}; fp32 {fp32_text!r}; int8 {int8_text!r}")
    assert cosine > 0.99
    assert all(word in int8_text.lower() for word in KEY_WORDS), (int8_text, fp32_text)
    assert int8_text == fp32_text
