"""Real weights through ONNX: Whisper tiny.en exported as a whisper_encoder graph transcribes a
spoken clip exactly as its PyTorch encoder does (transformers' decoder reads either output)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from vsal.export import real_weights as rw
from vsal.export.config import WhisperEncoderConfig
from vsal.export.models.video_salmonn import build_part
from vsal.export.onnx_export import _session, export_graph, validate_graph
from vsal.export.specs import encoder_specs

from tests.test_real_weights import SPOKEN, _espeak_16k


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


def test_onnx_encoder_transcribes_like_pytorch(whisper, tiny_config, tmp_path):
    from transformers import WhisperFeatureExtractor
    from transformers.modeling_outputs import BaseModelOutput

    model, tokenizer = whisper
    config = _tiny_en_config(tiny_config, model.config)
    part = build_part(config, "whisper_encoder")
    part.encoder.load_state_dict(model.model.encoder.state_dict())
    with torch.no_grad():
        part.speech_pre_qformer_proj.weight.copy_(torch.eye(config.whisper.d_model))
        part.speech_pre_qformer_proj.bias.zero_()
    spec = encoder_specs(config)["whisper_encoder"]
    path = export_graph(spec, part, tmp_path / "whisper_encoder.onnx")[0]
    validation = validate_graph(spec, part, path)  # B = 1 and 3 against PyTorch
    assert validation.worst() < 1e-3

    audio = _espeak_16k(SPOKEN, tmp_path)
    features = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np")
    onnx_states = _session(path).run(["speech_tokens"], {"input_features": features.input_features})[0]
    with torch.inference_mode():
        torch_ids = model.generate(torch.from_numpy(features.input_features), do_sample=False)
        onnx_ids = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=torch.from_numpy(onnx_states)), do_sample=False
        )
    torch_text = tokenizer.decode(torch_ids[0], skip_special_tokens=True).strip()
    onnx_text = tokenizer.decode(onnx_ids[0], skip_special_tokens=True).strip()
    assert onnx_ids.tolist() == torch_ids.tolist(), (onnx_text, torch_text)
    assert "football" in onnx_text.lower()
    np.testing.assert_allclose(
        onnx_states,
        model.model.encoder(torch.from_numpy(features.input_features)).last_hidden_state.detach(),
        atol=1e-3,
    )
