"""Each part is called with its graph's input names and returns the design page's shapes."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("n", [1, 3])
def test_vision_encoder(tiny_model, tiny_config, n):
    out = tiny_model.vision_encoder(pixel_values=torch.randn(n, 3, 224, 224))
    assert out.shape == (n, 257, tiny_config.vision.embed_dim)


@pytest.mark.parametrize("n,length", [(2, 4), (5, 9)])
def test_frame_qformer(tiny_model, tiny_config, n, length):
    out = tiny_model.frame_qformer(
        image_embeds=torch.randn(n, 257, tiny_config.vision.embed_dim),
        instruction_ids=torch.randint(0, 30522, (1, length)),
        instruction_mask=torch.ones(1, length, dtype=torch.long),
    )
    assert out.shape == (n, 32, tiny_config.frame_qformer.hidden_size)


@pytest.mark.parametrize("b", [1, 2])
def test_whisper_encoder(tiny_model, tiny_config, b):
    with torch.no_grad():
        out = tiny_model.whisper_encoder(input_features=torch.randn(b, 80, 3000))
    assert out.shape == (b, 1500, tiny_config.frame_qformer.hidden_size)


@pytest.mark.parametrize("b,frames", [(1, 998), (2, 300)])
def test_beats_encoder(tiny_model, tiny_config, b, frames):
    with torch.no_grad():
        out = tiny_model.beats_encoder(fbank=torch.randn(b, frames, 128))
    assert out.shape == (b, 1500, tiny_config.frame_qformer.hidden_size)


@pytest.mark.parametrize("b,slots", [(1, 60), (2, 20)])
def test_mrc_qformer(tiny_model, tiny_config, b, slots):
    with torch.no_grad():
        out = tiny_model.mrc_qformer(
            av_features=torch.randn(b, slots * 32, tiny_config.av_width), slot_mask=torch.ones(b, slots)
        )
    assert out.shape == (b, 3 * slots, tiny_config.llm.hidden_size)


def test_llm_prefill_then_decode(tiny_model, tiny_config):
    h, v = tiny_config.llm.hidden_size, tiny_config.llm.vocab_size
    with torch.no_grad():
        logits, cache = tiny_model.llm(
            inputs_embeds=torch.randn(2, 7, h),
            attention_mask=torch.ones(2, 7, dtype=torch.long),
            position_ids=torch.arange(7).expand(2, -1),
        )
        assert logits.shape == (2, 7, v)
        step, _ = tiny_model.llm(
            inputs_embeds=torch.randn(2, 1, h),
            attention_mask=torch.ones(2, 8, dtype=torch.long),
            position_ids=torch.full((2, 1), 7),
            cache=cache,
        )
    assert step.shape == (2, 1, v)


def test_config_round_trips_and_rejects_typos(tiny_config):
    from vsal.export.config import ModelConfig

    assert ModelConfig.from_dict(tiny_config.to_dict()) == tiny_config
    data = tiny_config.to_dict()
    data["vision"]["embed_dims"] = 3
    with pytest.raises(ValueError, match="embed_dims"):
        ModelConfig.from_dict(data)


def test_config_checks_that_parts_fit(tiny_config):
    import dataclasses

    from vsal.export.config import QFormerConfig

    with pytest.raises(ValueError, match="encoder_width"):
        dataclasses.replace(tiny_config, mrc_qformer=QFormerConfig(hidden_size=32, encoder_width=64))
